// Grad-CAM from Node.js with onnxruntime-node: the .onnx file computes the map, this script paints it.
//
//   npm ci --prefix web
//   node web/explain.mjs MODEL.onnx PHOTO.png OVERLAY.png [CLASS] [METHOD]
//
// Prints the top-5 classes (index, probability, label) and writes the overlay of CLASS (default: the
// top-1; -k: the k-th best) at the photo's size: JET colours blended 0.4 / 0.6 over the photo, as `onnxcam
// explain`. The photo is fitted to the model's input as its card says (stretch, letterbox, centre crop, padding),
// as in Python. METHOD: the file's in-graph map (default), or a pixel method of a file exported with --pixels
// (saliency, gradient-x-input, integrated-gradients, guided-backprop), computed here from the file's gradients at
// its input.
import { readFileSync, writeFileSync } from "node:fs";
import ort from "onnxruntime-node";
import { PNG } from "pngjs";
import { PIXEL_METHODS, cardOf, explain, explainPixels, modelInput, overlay, ranked } from "../onnxcam/site/onnxcam.mjs";

const [model, photo, out, target, method] = process.argv.slice(2);
if (!out || (method !== undefined && !PIXEL_METHODS.includes(method))) {
  console.error(`usage: node web/explain.mjs MODEL.onnx PHOTO.png OVERLAY.png [CLASS] [${PIXEL_METHODS.join("|")}]`);
  process.exit(2);
}
// what goes wrong is one line, exit 2, as with the onnxcam command (no stack trace)
const fail = (what) => (error) => {
  const reason = error.code === "ENOENT" ? "not found" : String(error.message ?? error).split("\n")[0];
  console.error(`error: ${what}: ${reason}`);
  process.exit(2);
};
const read = (path, what) => {
  try {
    return readFileSync(path);
  } catch (error) {
    return fail(`${what} ${path}`)(error);
  }
};
let png;
try {
  png = PNG.sync.read(read(photo, "photo"), { colorType: 2, inputHasAlpha: false }); // -> RGBA, 8 bits
} catch (error) {
  fail(`${photo} is not a PNG (this script reads PNG photos; convert it, or use onnxcam explain)`)(error);
}
const { width, height } = png;
const rgb = new Uint8Array(width * height * 3);
for (let i = 0; i < width * height; i++) for (let c = 0; c < 3; c++) rgb[i * 3 + c] = png.data[i * 4 + c];

let card;
try {
  card = cardOf(read(model, "model")); // (the session reads the file itself: external weights too)
} catch (error) {
  fail(`model ${model}`)(error);
}
const session = await ort.InferenceSession.create(model, { logSeverityLevel: 3 }).catch(fail(`model ${model}`));
const size = card.input_size;
const targets = target === undefined ? [-1] : [Number(target)];
const { pixels, placement } = modelInput(rgb, height, width, size, card.resize);
const result = await (method === undefined ? explain(ort, session, pixels, size, targets)
  : explainPixels(ort, session, pixels, size, targets, method)).catch(fail(`${method} on ${model}`));
for (const [index, probability] of ranked(result.logits, 5)) {
  console.log(`${index}\t${probability.toFixed(4)}\t${card.labels[index]}`);
}
const picture = new PNG({ width, height });
picture.data = Buffer.from(overlay(rgb, height, width, result.maps[0], placement));
writeFileSync(out, PNG.sync.write(picture));
console.log(`class ${result.classes[0]}: wrote ${out}`);
