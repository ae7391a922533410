// onnxcam in JavaScript: the steps around one ONNX Runtime call, shared by the web page (onnxruntime-web)
// and the Node.js script (onnxruntime-node). Pixels are RGB, row-major; maps are Float32Array in [0, 1].
// The graph does the Grad-CAM work itself (its `saliency` output); this file only resizes the photo,
// feeds the contract's inputs and paints the overlay as the Python path does (onnxcam/overlay.py).

export const HEAT_WEIGHT = 0.4; // 0.4 heat map + 0.6 photo, as the CLI
export const GRADCAM = 0; // saliency_method 0: Grad-CAM, or a gradient-free file's ReciproCAM (card.saliency_methods)

// OpenCV's COLORMAP_JET as RGB triples for levels 0..255 (tests/test_web.py checks it against cv2).
export const JET = new Uint8Array([
  0, 0, 128, 0, 0, 132, 0, 0, 136, 0, 0, 140, 0, 0, 144, 0, 0, 148, 0, 0, 152, 0, 0, 156, 0, 0, 160, 0, 0, 164, 0, 0, 168, 0, 0, 172, 0, 0, 176, 0, 0, 180, 0, 0, 184, 0, 0, 188,
  0, 0, 192, 0, 0, 196, 0, 0, 200, 0, 0, 204, 0, 0, 208, 0, 0, 212, 0, 0, 216, 0, 0, 220, 0, 0, 224, 0, 0, 228, 0, 0, 232, 0, 0, 236, 0, 0, 240, 0, 0, 244, 0, 0, 248, 0, 0, 252,
  0, 0, 255, 0, 4, 255, 0, 8, 255, 0, 12, 255, 0, 16, 255, 0, 20, 255, 0, 24, 255, 0, 28, 255, 0, 32, 255, 0, 36, 255, 0, 40, 255, 0, 44, 255, 0, 48, 255, 0, 52, 255, 0, 56, 255, 0, 60, 255,
  0, 64, 255, 0, 68, 255, 0, 72, 255, 0, 76, 255, 0, 80, 255, 0, 84, 255, 0, 88, 255, 0, 92, 255, 0, 96, 255, 0, 100, 255, 0, 104, 255, 0, 108, 255, 0, 112, 255, 0, 116, 255, 0, 120, 255, 0, 124, 255,
  0, 128, 255, 0, 132, 255, 0, 136, 255, 0, 140, 255, 0, 144, 255, 0, 148, 255, 0, 152, 255, 0, 156, 255, 0, 160, 255, 0, 164, 255, 0, 168, 255, 0, 172, 255, 0, 176, 255, 0, 180, 255, 0, 184, 255, 0, 188, 255,
  0, 192, 255, 0, 196, 255, 0, 200, 255, 0, 204, 255, 0, 208, 255, 0, 212, 255, 0, 216, 255, 0, 220, 255, 0, 224, 255, 0, 228, 255, 0, 232, 255, 0, 236, 255, 0, 240, 255, 0, 244, 255, 0, 248, 255, 0, 252, 255,
  2, 255, 254, 6, 255, 250, 10, 255, 246, 14, 255, 242, 18, 255, 238, 22, 255, 234, 26, 255, 230, 30, 255, 226, 34, 255, 222, 38, 255, 218, 42, 255, 214, 46, 255, 210, 50, 255, 206, 54, 255, 202, 58, 255, 198, 62, 255, 194,
  66, 255, 190, 70, 255, 186, 74, 255, 182, 78, 255, 178, 82, 255, 174, 86, 255, 170, 90, 255, 166, 94, 255, 162, 98, 255, 158, 102, 255, 154, 106, 255, 150, 110, 255, 146, 114, 255, 142, 118, 255, 138, 122, 255, 134, 126, 255, 130,
  130, 255, 126, 134, 255, 122, 138, 255, 118, 142, 255, 114, 146, 255, 110, 150, 255, 106, 154, 255, 102, 158, 255, 98, 162, 255, 94, 166, 255, 90, 170, 255, 86, 174, 255, 82, 178, 255, 78, 182, 255, 74, 186, 255, 70, 190, 255, 66,
  194, 255, 62, 198, 255, 58, 202, 255, 54, 206, 255, 50, 210, 255, 46, 214, 255, 42, 218, 255, 38, 222, 255, 34, 226, 255, 30, 230, 255, 26, 234, 255, 22, 238, 255, 18, 242, 255, 14, 246, 255, 10, 250, 255, 6, 254, 255, 1,
  255, 252, 0, 255, 248, 0, 255, 244, 0, 255, 240, 0, 255, 236, 0, 255, 232, 0, 255, 228, 0, 255, 224, 0, 255, 220, 0, 255, 216, 0, 255, 212, 0, 255, 208, 0, 255, 204, 0, 255, 200, 0, 255, 196, 0, 255, 192, 0,
  255, 188, 0, 255, 184, 0, 255, 180, 0, 255, 176, 0, 255, 172, 0, 255, 168, 0, 255, 164, 0, 255, 160, 0, 255, 156, 0, 255, 152, 0, 255, 148, 0, 255, 144, 0, 255, 140, 0, 255, 136, 0, 255, 132, 0, 255, 128, 0,
  255, 124, 0, 255, 120, 0, 255, 116, 0, 255, 112, 0, 255, 108, 0, 255, 104, 0, 255, 100, 0, 255, 96, 0, 255, 92, 0, 255, 88, 0, 255, 84, 0, 255, 80, 0, 255, 76, 0, 255, 72, 0, 255, 68, 0, 255, 64, 0,
  255, 60, 0, 255, 56, 0, 255, 52, 0, 255, 48, 0, 255, 44, 0, 255, 40, 0, 255, 36, 0, 255, 32, 0, 255, 28, 0, 255, 24, 0, 255, 20, 0, 255, 16, 0, 255, 12, 0, 255, 8, 0, 255, 4, 0, 255, 0, 0,
  252, 0, 0, 248, 0, 0, 244, 0, 0, 240, 0, 0, 236, 0, 0, 232, 0, 0, 228, 0, 0, 224, 0, 0, 220, 0, 0, 216, 0, 0, 212, 0, 0, 208, 0, 0, 204, 0, 0, 200, 0, 0, 196, 0, 0, 192, 0, 0,
  188, 0, 0, 184, 0, 0, 180, 0, 0, 176, 0, 0, 172, 0, 0, 168, 0, 0, 164, 0, 0, 160, 0, 0, 156, 0, 0, 152, 0, 0, 148, 0, 0, 144, 0, 0, 140, 0, 0, 136, 0, 0, 132, 0, 0, 128, 0, 0,
]);

// Python's round(): halves to even (ultralytics' letterbox offsets are computed with it).
function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// Resampling weights along one axis: for each output index, [source index, weight] pairs.
// "area": shrinking averages the covered source cells by their covered fraction (OpenCV's INTER_AREA),
// enlarging interpolates linearly between pixel centres, clamped at the edges (INTER_LINEAR); "linear": always
// the latter; "pil-nearest": OpenCV's INTER_NEAREST_EXACT (PIL's NEAREST).
function taps(from, to, interpolation = "area") {
  const scale = from / to;
  const out = [];
  for (let i = 0; i < to; i++) {
    const row = [];
    if (interpolation === "pil-nearest") {
      row.push([Math.min(Math.floor((i + 0.5) * scale), from - 1), 1]);
    } else if (scale > 1 && interpolation === "area") {
      const start = i * scale;
      const end = start + scale;
      for (let s = Math.floor(start); s < Math.min(Math.ceil(end), from); s++) {
        const w = Math.min(end, s + 1) - Math.max(start, s);
        if (w > 1e-9) row.push([s, w / scale]);
      }
    } else {
      const x = Math.min(Math.max((i + 0.5) * scale - 0.5, 0), from - 1);
      const s = Math.floor(x);
      const f = x - s;
      row.push([s, 1 - f]);
      if (f > 0) row.push([s + 1, f]);
    }
    out.push(row);
  }
  return out;
}

// PIL's antialiased filters (Resample.c), reproduced exactly: [source index, integer weight] pairs per output.
const PIL_FILTERS = {
  "pil-bilinear": [1, (x) => Math.max(0, 1 - Math.abs(x))],
  "pil-bicubic": [2, (x) => {
    const a = -0.5;
    x = Math.abs(x);
    if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
    return x < 2 ? (((x - 5) * x + 8) * x - 4) * a : 0;
  }],
  "pil-lanczos": [3, (x) => {
    const sinc = (v) => (v === 0 ? 1 : Math.sin(Math.PI * v) / (Math.PI * v));
    return Math.abs(x) < 3 ? sinc(x) * sinc(x / 3) : 0;
  }],
};
const PRECISION_BITS = 22;

function pilTaps(from, to, interpolation) {
  const [support, kernel] = PIL_FILTERS[interpolation];
  const scale = from / to;
  const filterscale = Math.max(scale, 1);
  const reach = support * filterscale;
  const out = [];
  for (let i = 0; i < to; i++) {
    const centre = (i + 0.5) * scale;
    const low = Math.max(Math.trunc(centre - reach + 0.5), 0);
    const high = Math.min(Math.trunc(centre + reach + 0.5), from);
    const weights = [];
    for (let s = low; s < high; s++) weights.push(kernel((s - centre + 0.5) / filterscale));
    const total = weights.reduce((a, b) => a + b, 0);
    out.push(weights.map((w, k) => {
      const v = (total !== 0 ? w / total : w) * (1 << PRECISION_BITS);
      return [low + k, Math.trunc(v < 0 ? v - 0.5 : v + 0.5)];
    }));
  }
  return out;
}

// One PIL pass over uint8 values: along rows (horizontal) or columns, rounded to 8 bits as PIL does.
function pilPass(values, height, width, channels, horizontal, table) {
  const [outHeight, outWidth] = horizontal ? [height, table.length] : [table.length, width];
  const out = new Uint8Array(outHeight * outWidth * channels);
  for (let y = 0; y < outHeight; y++) {
    for (let x = 0; x < outWidth; x++) {
      for (let c = 0; c < channels; c++) {
        let acc = 1 << (PRECISION_BITS - 1);
        for (const [s, w] of table[horizontal ? x : y]) {
          acc += w * values[((horizontal ? y : s) * width + (horizontal ? s : x)) * channels + c];
        }
        out[(y * outWidth + x) * channels + c] = Math.min(255, Math.max(0, Math.floor(acc / (1 << PRECISION_BITS))));
      }
    }
  }
  return out;
}

// Separable resize of `channels`-interleaved values (height x width) to (outHeight x outWidth), Float32Array
// (uint8 values for the PIL filters, which round each pass as PIL does).
export function resize(values, height, width, channels, outHeight, outWidth, interpolation = "area") {
  if (interpolation in PIL_FILTERS) {
    let out = values;
    if (outWidth !== width) out = pilPass(out, height, width, channels, true, pilTaps(width, outWidth, interpolation));
    if (outHeight !== height) out = pilPass(out, height, outWidth, channels, false, pilTaps(height, outHeight, interpolation));
    return Float32Array.from(out);
  }
  if (!["area", "linear", "pil-nearest"].includes(interpolation)) {
    throw new Error(`the model's resize interpolation ${interpolation} is not implemented here; use the Python path`);
  }
  const across = taps(width, outWidth, interpolation);
  const down = taps(height, outHeight, interpolation);
  const rows = new Float32Array(height * outWidth * channels);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < outWidth; x++) {
      for (const [s, w] of across[x]) {
        for (let c = 0; c < channels; c++) rows[(y * outWidth + x) * channels + c] += w * values[(y * width + s) * channels + c];
      }
    }
  }
  const out = new Float32Array(outHeight * outWidth * channels);
  for (let y = 0; y < outHeight; y++) {
    for (const [s, w] of down[y]) {
      const from = s * outWidth * channels;
      const to = y * outWidth * channels;
      for (let i = 0; i < outWidth * channels; i++) out[to + i] += w * rows[from + i];
    }
  }
  return out;
}

// Where a photo (height x width) lies in the model's input of `size` under the card's resize convention
// (onnxcam/geometry.py, the same formulas): the resized photo's size and its offset [top, left] in the input.
export function placement(height, width, size, resize = {}) {
  const mode = resize.mode ?? "stretch";
  const centred = (resized) => {
    const split = resize.centre === "floor" ? Math.floor : roundHalfEven;
    return [-split((resized[0] - size[0]) / 2), -split((resized[1] - size[1]) / 2)];
  };
  let resized = [size[0], size[1]];
  let offset = [0, 0];
  if (mode === "letterbox") {
    const ratio = Math.min(size[0] / height, size[1] / width);
    resized = [Math.max(roundHalfEven(height * ratio), 1), Math.max(roundHalfEven(width * ratio), 1)];
    offset = [roundHalfEven((size[0] - resized[0]) / 2 - 0.1), roundHalfEven((size[1] - resized[1]) / 2 - 0.1)];
  } else if (mode === "crop") {
    const longer = Math.trunc((resize.shorter * Math.max(height, width)) / Math.min(height, width));
    resized = height <= width ? [resize.shorter, longer] : [longer, resize.shorter];
    offset = centred(resized);
  } else if (mode === "stretch-crop") {
    resized = [resize.scaled[0], resize.scaled[1]];
    offset = centred(resized);
  } else if (mode === "pad") {
    resized = [size[0], Math.max(Math.min(size[1], Math.ceil((size[0] * width) / height)), 1)];
  } else if (mode !== "stretch") {
    throw new Error(`unknown resize mode ${mode}`);
  }
  const window = [Math.max(offset[0], 0), Math.max(offset[1], 0),
                  Math.min(offset[0] + resized[0], size[0]), Math.min(offset[1] + resized[1], size[1])];
  const [fy, fx] = [height / resized[0], width / resized[1]];
  const seen = [roundHalfEven((window[1] - offset[1]) * fx), roundHalfEven((window[0] - offset[0]) * fy),
                roundHalfEven((window[3] - offset[1]) * fx), roundHalfEven((window[2] - offset[0]) * fy)];
  const whole = offset[0] === 0 && offset[1] === 0 && resized[0] === size[0] && resized[1] === size[1];
  return { photo: [height, width], size, resized, offset, window, seen, whole };
}

// RGB photo (Uint8 array, height x width x 3) -> the model's uint8 input at (size[0] x size[1]), placed by the
// card's resize convention ({} or none: a stretch), and where the photo lies in it.
export function modelInput(rgb, height, width, size, resize = {}) {
  const where = placement(height, width, size, resize);
  const [rh, rw] = where.resized;
  const scaled = rh === height && rw === width ? rgb : resize_(rgb, height, width, rh, rw, resize.interpolation);
  const pixels = new Uint8Array(size[0] * size[1] * 3).fill(where.whole ? 0 : resize.pad ?? 0);
  const [top, left, bottom, right] = where.window;
  for (let y = top; y < bottom; y++) {
    for (let x = left; x < right; x++) {
      const from = ((y - where.offset[0]) * rw + (x - where.offset[1])) * 3;
      pixels.set(scaled.subarray(from, from + 3), (y * size[1] + x) * 3);
    }
  }
  return { pixels, placement: where };
}

function resize_(rgb, height, width, outHeight, outWidth, interpolation = "area") {
  const resized = resize(rgb, height, width, 3, outHeight, outWidth, interpolation);
  return Uint8Array.from(resized, (v) => Math.min(255, Math.max(0, Math.round(v))));
}

// A [0, 1] map at the model's input size -> the photo's size: the padding cut away, zero where the model did not
// see the photo (a centre crop's margins), min-max scaled again over what it saw (as onnxcam/maps.py finishes it).
export function mapToPhoto(map, where) {
  const [height, width] = where.photo;
  if (where.whole) return resize(map, where.size[0], where.size[1], 1, height, width, "linear");
  const [top, left, bottom, right] = where.window;
  const [x0, y0, x1, y1] = where.seen;
  const cut = new Float32Array((bottom - top) * (right - left));
  for (let y = top; y < bottom; y++) cut.set(map.subarray(y * where.size[1] + left, y * where.size[1] + right), (y - top) * (right - left));
  const part = resize(cut, bottom - top, right - left, 1, y1 - y0, x1 - x0, "linear");
  const out = new Float32Array(height * width);
  let [low, high] = [Infinity, -Infinity];
  for (let y = y0; y < y1; y++) {
    for (let x = x0; x < x1; x++) {
      const v = part[(y - y0) * (x1 - x0) + (x - x0)];
      out[y * width + x] = v;
      [low, high] = [Math.min(low, v), Math.max(high, v)];
    }
  }
  for (let y = y0; y < y1; y++) {
    for (let x = x0; x < x1; x++) {
      const i = y * width + x;
      out[i] = high > low ? Math.min(1, (out[i] - low) / (high - low)) : 0;
    }
  }
  return out;
}

// The model card from an .onnx file's bytes (ModelProto field 14, metadata_props: key 1, value 2): the
// onnxcam.* entries, JSON-decoded where they are not text. A reader without the file's card.json uses it.
const TEXT_FIELDS = new Set(["arch", "weights", "layer", "weights_path", "score", "channel_order", "notes", "contract", "task"]);
export function cardOf(bytes) {
  const decoder = new TextDecoder();
  const varint = (at) => {
    let [value, shift] = [0, 1];
    for (;;) {
      const byte = bytes[at.i++];
      value += (byte & 0x7f) * shift;
      if (byte < 0x80) return value;
      shift *= 128;
    }
  };
  const fields = (start, end, visit) => {
    const at = { i: start };
    while (at.i < end) {
      const tag = varint(at);
      const [field, wire] = [Math.floor(tag / 8), tag % 8];
      if (wire === 0) varint(at);
      else if (wire === 1) at.i += 8;
      else if (wire === 5) at.i += 4;
      else if (wire === 2) {
        const length = varint(at);
        visit(field, at.i, at.i + length);
        at.i += length;
      } else throw new Error(`not an ONNX model (protobuf wire type ${wire})`);
    }
  };
  const card = {};
  fields(0, bytes.length, (field, start, end) => {
    if (field !== 14) return;
    const entry = {};
    fields(start, end, (f, s, e) => { entry[f] = decoder.decode(bytes.subarray(s, e)); });
    if (!entry[1]?.startsWith("onnxcam.")) return;
    const key = entry[1].slice("onnxcam.".length);
    card[key] = TEXT_FIELDS.has(key) ? entry[2] : JSON.parse(entry[2]);
  });
  if (!card.contract) throw new Error("not an onnxcam model (its file has no onnxcam model card)");
  return card;
}

// One ONNX Runtime call: logits, the classes of `targets` (-k: the k-th best) and their finished maps.
// `references`: an image-text (similarity) model's [R, D] prompt embeddings (a Float32Array of R rows), whose
// logits (logit_scale times the cosine) the targets 0..R-1 explain.
export async function explain(ort, session, pixels, size, targets, method = GRADCAM, references = null) {
  const feeds = {
    image: new ort.Tensor("uint8", pixels, [1, size[0], size[1], 3]),
    targets: new ort.Tensor("int64", BigInt64Array.from(targets, BigInt), [1, targets.length]),
    return_saliency: new ort.Tensor("bool", Uint8Array.from([1]), []),
    saliency_method: new ort.Tensor("int64", BigInt64Array.from([BigInt(method)]), []),
  };
  if (session.inputNames.includes("return_pixels")) { // (a file with pixels: each row on its own pixels)
    const none = new ort.Tensor("float32", new Float32Array(3 * size[0] * size[1]), [1, 3, size[0], size[1]]);
    const no = new ort.Tensor("bool", Uint8Array.from([0]), []);
    Object.assign(feeds, { return_pixels: no, return_guided: no, pixel_baselines: none,
                           pixel_alphas: new ort.Tensor("float32", Float32Array.from([1]), [1]), pixel_noise: none });
  }
  if (references) feeds.references = new ort.Tensor("float32", references, [targets.length, references.length / targets.length]);
  const out = await session.run(feeds, ["logits", "target_classes", "saliency"]);
  const plane = size[0] * size[1];
  const saliency = out.saliency.data;
  return {
    logits: out.logits.data,
    classes: Array.from(out.target_classes.data, Number),
    maps: Array.from(targets, (_, t) => saliency.subarray(t * plane, (t + 1) * plane)),
  };
}

// The pixel methods a file exported with --pixels gives here, from its gradients at the model's input: their steps
// as rows of one batch, CHUNK rows a call, as the Python path runs them (onnxcam/pixels.py, onnxcam/methods.py).
export const PIXEL_METHODS = ["saliency", "gradient-x-input", "integrated-gradients", "guided-backprop"];
export const STEPS = 32; // Integrated Gradients' Gauss-Legendre steps, from a black baseline
const CHUNK = 4; // (a VGG16 row holds about 330 MB: the WebAssembly heap is at most 4 GB)
const PERCENTILE = 99; // a pixel map is clipped at this percentile of its values before it is scaled

// Gauss-Legendre nodes and weights on [0, 1] (numpy's leggauss, mapped as Captum maps it): Newton's method on the
// Legendre polynomial P_n from Chebyshev's guesses.
export function gaussLegendre(n) {
  const alphas = new Float64Array(n);
  const weights = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    let x = Math.cos(Math.PI * (i + 0.75) / (n + 0.5));
    let derivative = 0;
    for (let iteration = 0; iteration < 100; iteration++) {
      let [p0, p1] = [1, x];
      for (let k = 2; k <= n; k++) [p0, p1] = [p1, ((2 * k - 1) * x * p1 - (k - 1) * p0) / k];
      derivative = n === 1 ? 1 : (n * (x * p1 - p0)) / (x * x - 1);
      const step = (n === 1 ? x : p1) / derivative;
      x -= step;
      if (Math.abs(step) < 1e-15) break;
    }
    alphas[n - 1 - i] = 0.5 * (x + 1);
    weights[n - 1 - i] = 1 / ((1 - x * x) * derivative * derivative); // 0.5 * 2 / ((1 - x^2) P_n'(x)^2)
  }
  return { alphas, weights };
}

// numpy's percentile (linear between the order statistics).
function percentile(values, p) {
  const sorted = Float64Array.from(values).sort();
  const at = (p / 100) * (sorted.length - 1);
  const low = Math.floor(at);
  return sorted[low] + (at - low) * ((sorted[Math.min(low + 1, sorted.length - 1)] ?? sorted[low]) - sorted[low]);
}

// A pixel map at the input's size as onnxcam/maps.py finishes it: clipped at PERCENTILE, min-max scaled to [0, 1].
export function finishPixelMap(values) {
  const top = percentile(values, PERCENTILE);
  const clipped = Float64Array.from(values, (v) => Math.min(v, top));
  const low = clipped.reduce((a, b) => Math.min(a, b), Infinity);
  const range = clipped.reduce((a, b) => Math.max(a, b), -Infinity) - low;
  return Float32Array.from(clipped, (v) => (range > 1.1754944e-38 ? (v - low) / range : 0));
}

// Rows of one photo through a file with pixels: row s runs on baseline + alphas[s] (x - baseline), and returns
// (logits, target_classes, pixels, ...) of the first chunk, and the gradients of every row (`guided`: Guided
// Backpropagation's).
async function pixelRows(ort, session, pixels, size, classes, alphas, baseline, guided = false) {
  const [height, width] = size;
  const plane = 3 * height * width;
  const gradients = [];
  let first = null;
  for (let start = 0; start < alphas.length; start += CHUNK) {
    const count = Math.min(CHUNK, alphas.length - start);
    const images = new Uint8Array(count * height * width * 3);
    for (let r = 0; r < count; r++) images.set(pixels, r * pixels.length);
    const targets = BigInt64Array.from({ length: count * classes.length }, (_, i) => BigInt(classes[i % classes.length]));
    const out = await session.run({
      image: new ort.Tensor("uint8", images, [count, height, width, 3]),
      targets: new ort.Tensor("int64", targets, [count, classes.length]),
      return_saliency: new ort.Tensor("bool", Uint8Array.from([0]), []),
      saliency_method: new ort.Tensor("int64", BigInt64Array.from([0n]), []),
      return_pixels: new ort.Tensor("bool", Uint8Array.from([1]), []),
      return_guided: new ort.Tensor("bool", Uint8Array.from([guided ? 1 : 0]), []),
      pixel_alphas: new ort.Tensor("float32", Float32Array.from(alphas.slice(start, start + count)), [count]),
      pixel_baselines: new ort.Tensor("float32", baseline ?? new Float32Array(plane), [1, 3, height, width]),
      pixel_noise: new ort.Tensor("float32", new Float32Array(plane), [1, 3, height, width]),
    }, ["logits", "target_classes", "pixels", guided ? "guided_gradients" : "pixel_gradients"]);
    first ??= out;
    gradients.push((guided ? out.guided_gradients : out.pixel_gradients).data);
  }
  return { first, gradients };
}

// A pixel method's maps (PIXEL_METHODS) of the classes of `targets` (-k: the k-th best), each [H, W] at the
// model's input in [0, 1]: saliency, the largest |dS/dx_c| over the channels (one call); gradient x input, the
// positive part of sum_c x_c dS/dx_c (the same call); Integrated Gradients, the positive part of the channel sum
// of (x - x') sum_s w_s dS/dx(x' + a_s (x - x')), x' the black photo's input; guided-backprop, saliency's
// reduction of the file's guided gradients (its ReLUs pass only positive ones).
export async function explainPixels(ort, session, pixels, size, targets, method = "saliency") {
  if (!session.inputNames.includes("return_pixels")) {
    throw new Error(`${method} needs a file exported with --pixels (its backward to the input)`);
  }
  const plane = size[0] * size[1];
  if (!PIXEL_METHODS.includes(method)) throw new Error(`unknown pixel method ${method}: one of ${PIXEL_METHODS.join(", ")}`);
  const one = await pixelRows(ort, session, pixels, size, targets, [1], null, method === "guided-backprop");
  const classes = Array.from(one.first.target_classes.data, Number);
  const gradient = one.gradients[0];
  const raw = classes.map(() => new Float64Array(plane));
  if (method === "saliency" || method === "guided-backprop") {
    raw.forEach((map, t) => {
      for (let c = 0; c < 3; c++) {
        for (let i = 0; i < plane; i++) map[i] = Math.max(map[i], Math.abs(gradient[(t * 3 + c) * plane + i]));
      }
    });
  } else if (method === "gradient-x-input") {
    const x = one.first.pixels.data;
    raw.forEach((map, t) => {
      for (let c = 0; c < 3; c++) {
        for (let i = 0; i < plane; i++) map[i] += x[c * plane + i] * gradient[(t * 3 + c) * plane + i];
      }
      for (let i = 0; i < plane; i++) map[i] = Math.max(map[i], 0);
    });
  } else if (method === "integrated-gradients") {
    const x = one.first.pixels.data;
    const black = await pixelRows(ort, session, new Uint8Array(pixels.length), size, classes, [1], null);
    const reference = black.first.pixels.data;
    const { alphas, weights } = gaussLegendre(STEPS);
    const { gradients } = await pixelRows(ort, session, pixels, size, classes, Array.from(alphas), reference);
    const stride = classes.length * 3 * plane;
    raw.forEach((map, t) => {
      for (let s = 0; s < STEPS; s++) {
        const rows = gradients[Math.floor(s / CHUNK)];
        const base = (s % CHUNK) * stride + t * 3 * plane;
        for (let c = 0; c < 3; c++) {
          for (let i = 0; i < plane; i++) {
            map[i] += weights[s] * (x[c * plane + i] - reference[c * plane + i]) * rows[base + c * plane + i];
          }
        }
      }
      for (let i = 0; i < plane; i++) map[i] = Math.max(map[i], 0);
    });
  }
  return { logits: one.first.logits.data, classes, maps: raw.map(finishPixelMap) };
}

// A prompt's text embedding, L2-normalised, from the text tower (`spec`: the card's `text`), one prompt per call
// as the Python path runs it (onnxcam/prompts.py): its ids padded with the card's pad id to a fixed-length tower's
// length, and a mask of ones on its tokens where the tower takes one; a prompt too long is refused, not cut.
export async function embedPrompt(ort, textSession, spec, tokenizer, prompt) {
  if (!prompt.trim()) throw new Error("a prompt must hold some text, e.g. a photo of a dog");
  const ids = tokenizer.encode(prompt);
  if (spec.length !== null && ids.length > spec.length) {
    throw new Error(`the prompt "${prompt.slice(0, 60)}" is ${ids.length} tokens; the text tower takes at most ${spec.length}`);
  }
  const length = spec.length ?? ids.length;
  const wide = textSession.inputMetadata?.find?.((m) => m.name === spec.ids)?.type !== "int32";
  const tensor = (values) => (wide ? new ort.Tensor("int64", BigInt64Array.from(values, BigInt), [1, length])
                                   : new ort.Tensor("int32", Int32Array.from(values), [1, length]));
  const feeds = { [spec.ids]: tensor([...ids, ...Array(length - ids.length).fill(spec.pad)]) };
  if (spec.mask !== null) feeds[spec.mask] = tensor([...Array(ids.length).fill(1), ...Array(length - ids.length).fill(0)]);
  const out = await textSession.run(feeds, [textSession.outputNames[0]]);
  const embedding = Float64Array.from(out[textSession.outputNames[0]].data);
  const norm = Math.max(Math.hypot(...embedding), 1e-12);
  return Float32Array.from(embedding, (v) => v / norm);
}

// Softmax probabilities of `logits`, and the `k` best as [index, probability].
export function ranked(logits, k) {
  const top = logits.reduce((a, b) => (b > a ? b : a), -Infinity); // (a spread of 125k+ values overflows the stack)
  const exp = Array.from(logits, (v) => Math.exp(v - top));
  const total = exp.reduce((a, b) => a + b, 0);
  return exp.map((v, i) => [i, v / total]).sort((a, b) => b[1] - a[1]).slice(0, k);
}

// The overlay (RGBA, for a canvas or a PNG): JET of the map taken back to the photo (mapToPhoto), blended over it.
export function overlay(rgb, height, width, map, where, alpha = HEAT_WEIGHT) {
  const cam = mapToPhoto(map, where);
  const out = new Uint8ClampedArray(height * width * 4);
  for (let i = 0; i < height * width; i++) {
    const level = Math.min(255, Math.round(Math.abs(cam[i]) * 255));
    for (let c = 0; c < 3; c++) out[i * 4 + c] = Math.round(alpha * JET[level * 3 + c] + (1 - alpha) * rgb[i * 3 + c]);
    out[i * 4 + 3] = 255;
  }
  return out;
}
