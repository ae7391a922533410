// The page: load the explainer once, then for each photo one ONNX Runtime call for the top-5 classes and
// their Grad-CAM maps; a click on a class shows its overlay. An image-text model's page has a prompt box instead:
// its text tower and tokenizer run here, once per new prompt, and one call explains every prompt.
// State for tests: window.onnxcam.
import * as ort from "./ort/ort.min.mjs";
import { PIXEL_METHODS, embedPrompt, explain, explainPixels, mapToPhoto, modelInput, overlay, ranked } from "./onnxcam.mjs";
import { Tokenizer } from "./tokenizer.mjs";

const TOP = 5;
const $ = (id) => document.getElementById(id);
ort.env.wasm.wasmPaths = new URL("./ort/", import.meta.url).href;
window.onnxcam = { state: "loading" };

async function open() {
  const card = await (await fetch("card.json")).json();
  for (const providers of [["webgpu", "wasm"], ["wasm"]]) {
    if (providers[0] === "webgpu" && !("gpu" in navigator && (await navigator.gpu.requestAdapter()))) continue;
    try {
      const options = { executionProviders: providers, logSeverityLevel: 3 };
      const session = await ort.InferenceSession.create("model.onnx", options);
      if (!card.text.model) return { card, session, provider: providers[0] };
      const tokenizer = new Tokenizer(await (await fetch("tokenizer.json")).json());
      const text = await ort.InferenceSession.create("text.onnx", options);
      return { card, session, provider: providers[0], text, tokenizer, embeddings: new Map() };
    } catch (error) {
      if (providers.length === 1) throw error;
    }
  }
}

function rgbOf(image) {
  const canvas = new OffscreenCanvas(image.width, image.height);
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  const rgba = context.getImageData(0, 0, image.width, image.height).data;
  const rgb = new Uint8Array(image.width * image.height * 3);
  for (let i = 0; i < image.width * image.height; i++) rgb.set(rgba.subarray(i * 4, i * 4 + 3), i * 3);
  return rgb;
}

function show(photo, result, t, card) {
  const { rgb, height, width } = photo;
  const canvas = $("overlay");
  [canvas.width, canvas.height] = [width, height];
  const pixels = overlay(rgb, height, width, result.maps[t], photo.placement);
  canvas.getContext("2d").putImageData(new ImageData(pixels, width, height), 0, 0);
  for (const [i, button] of [...$("classes").children].entries()) button.setAttribute("aria-pressed", i === t);
}

// The prompt box's prompts (one per line, each once) and their embeddings [R, D], the text tower run per new one.
async function references(model) {
  const prompts = [...new Set($("prompts").value.split("\n").map((p) => p.trim()).filter(Boolean))];
  if (!prompts.length) throw new Error("type one or more prompts in the box, one per line");
  for (const prompt of prompts) {
    if (!model.embeddings.has(prompt)) {
      model.embeddings.set(prompt, await embedPrompt(ort, model.text, model.card.text, model.tokenizer, prompt));
    }
  }
  const rows = prompts.map((p) => model.embeddings.get(p));
  const flat = new Float32Array(rows.length * rows[0].length);
  rows.forEach((row, r) => flat.set(row, r * row.length));
  return { prompts, flat };
}

async function explainFile(file, model) {
  $("status").textContent = `explaining ${file.name} ...`;
  const image = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const photo = { rgb: rgbOf(image), height: image.height, width: image.width };
  const size = model.card.input_size;
  const started = performance.now();
  const asked = model.text ? await references(model) : null;
  const labels = asked ? asked.prompts : model.card.labels;
  const targets = asked ? asked.prompts.map((_, r) => r) : Array.from({ length: TOP }, (_, k) => -(k + 1));
  const { pixels, placement } = modelInput(photo.rgb, photo.height, photo.width, size, model.card.resize);
  photo.placement = placement;
  const method = $("method").value;
  const result = PIXEL_METHODS.includes(method) ? await explainPixels(ort, model.session, pixels, size, targets, method)
    : await explain(ort, model.session, pixels, size, targets, undefined, asked?.flat);
  const seconds = (performance.now() - started) / 1000;
  const probabilities = new Map(ranked(result.logits, labels.length)); // (an image-text model's: over the prompts)
  $("classes").replaceChildren(...result.classes.map((index, t) => {
    const button = document.createElement("button");
    const logit = asked ? `, logit ${result.logits[index].toFixed(3)}` : "";
    button.textContent = `${(100 * probabilities.get(index)).toFixed(1)}%  ${labels[index]} (${index}${logit})`;
    button.addEventListener("click", () => show(photo, result, t, model.card));
    return button;
  }));
  show(photo, result, 0, model.card);
  const what = asked ? "prompt" : "class";
  $("status").textContent = `${file.name}: ${seconds.toFixed(2)} s on ${model.provider}; click a ${what} to see its map`;
  window.onnxcam = { state: "done", provider: model.provider, classes: result.classes,
                     probabilities: result.classes.map((i) => probabilities.get(i)), logits: Array.from(result.logits),
                     method, maps: result.maps.map((m) => Array.from(m)), map: Array.from(result.maps[0]),
                     photoMap: Array.from(mapToPhoto(result.maps[0], placement)) };
}

const model = await open().catch((error) => {
  $("status").textContent = `could not load the model: ${error.message}`;
  window.onnxcam = { state: "error", error: String(error) };
});
if (model) {
  const { card } = model;
  const targets = model.text ? "text prompts typed in the box below (its text tower and tokenizer run in this page)"
    : `${card.labels.length} classes, its labels baked in the file`;
  $("model").textContent = `${card.arch}, ${targets}, target layer ${card.layer}, ` +
    `input ${card.input_size.join("x")}, maps: ${card.saliency_methods[0]}`;
  $("prompting").hidden = !model.text;
  const pixelMaps = model.session.inputNames.includes("return_pixels") && !model.text;
  $("method").replaceChildren(...[card.saliency_methods[0], ...(pixelMaps ? PIXEL_METHODS : [])].map((name) => {
    const option = document.createElement("option");
    option.textContent = name;
    return option;
  }));
  $("choosing").hidden = !pixelMaps;
  if (!card.trained) $("model").innerHTML += ' <span class="warning">NOT TRAINED: its maps mean nothing</span>';
  $("status").textContent = `ready (${model.provider}): pick or drop a photo`;
  window.onnxcam = { state: "ready", provider: model.provider };
  const run = (file) => file && explainFile(file, model).catch((error) => {
    $("status").textContent = `could not explain ${file.name}: ${error.message}`;
    window.onnxcam = { state: "error", error: String(error) };
  });
  $("file").addEventListener("change", (event) => run(event.target.files[0]));
  $("again").addEventListener("click", () => run($("file").files[0]));
  $("method").addEventListener("change", () => run($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    run(event.dataTransfer.files[0]);
  });
}
