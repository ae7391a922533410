// The page: load the explainer once, then for each photo one ONNX Runtime call for the top-5 classes and
// their Grad-CAM maps; a click on a class shows its overlay. State for tests: window.onnxcam.
import * as ort from "./ort/ort.min.mjs";
import { explain, mapToPhoto, modelInput, overlay, ranked } from "./onnxcam.mjs";

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
      return { card, session, provider: providers[0] };
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

async function explainFile(file, model) {
  $("status").textContent = `explaining ${file.name} ...`;
  const image = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const photo = { rgb: rgbOf(image), height: image.height, width: image.width };
  const size = model.card.input_size;
  const started = performance.now();
  const targets = Array.from({ length: TOP }, (_, k) => -(k + 1));
  const { pixels, placement } = modelInput(photo.rgb, photo.height, photo.width, size, model.card.resize);
  photo.placement = placement;
  const result = await explain(ort, model.session, pixels, size, targets);
  const seconds = (performance.now() - started) / 1000;
  const probabilities = new Map(ranked(result.logits, model.card.labels.length));
  $("classes").replaceChildren(...result.classes.map((index, t) => {
    const button = document.createElement("button");
    button.textContent = `${(100 * probabilities.get(index)).toFixed(1)}%  ${model.card.labels[index]} (${index})`;
    button.addEventListener("click", () => show(photo, result, t, model.card));
    return button;
  }));
  show(photo, result, 0, model.card);
  $("status").textContent = `${file.name}: ${seconds.toFixed(2)} s on ${model.provider}; click a class to see its map`;
  window.onnxcam = { state: "done", provider: model.provider, classes: result.classes,
                     probabilities: result.classes.map((i) => probabilities.get(i)),
                     map: Array.from(result.maps[0]), photoMap: Array.from(mapToPhoto(result.maps[0], placement)) };
}

const model = await open().catch((error) => {
  $("status").textContent = `could not load model.onnx: ${error.message}`;
  window.onnxcam = { state: "error", error: String(error) };
});
if (model) {
  const { card } = model;
  $("model").textContent = `${card.arch}, ${card.labels.length} classes, target layer ${card.layer}, ` +
    `input ${card.input_size.join("x")}, maps: ${card.saliency_methods[0]}`;
  if (!card.trained) $("model").innerHTML += ' <span class="warning">NOT TRAINED: its maps mean nothing</span>';
  $("status").textContent = `ready (${model.provider}): pick or drop a photo`;
  window.onnxcam = { state: "ready", provider: model.provider };
  const run = (file) => file && explainFile(file, model).catch((error) => {
    $("status").textContent = `could not explain ${file.name}: ${error.message}`;
    window.onnxcam = { state: "error", error: String(error) };
  });
  $("file").addEventListener("change", (event) => run(event.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    run(event.dataTransfer.files[0]);
  });
}
