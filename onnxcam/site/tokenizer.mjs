// A Hugging Face tokenizer.json in JavaScript, for what image-text models' text towers use: word-level and BPE
// models (CLIP's byte-level BPE with "</w>" word ends), their normalisers, pre-tokenisers and templates. The page
// (and the Node script) tokenise prompts with it exactly as the Python path's `tokenizers` package does
// (tests/test_web.py compares the ids); a tokenizer.json with a part not listed in SUPPORTED is refused, naming it.
// onnxcam/web.py reads SUPPORTED from this file: a tokenizer it lists gets the page's prompt box.

export const SUPPORTED = {
  "model": ["WordLevel", "BPE"],
  "normalizer": ["Lowercase", "NFC", "NFD", "NFKC", "NFKD", "Replace", "Strip", "Sequence"],
  "pre_tokenizer": ["Whitespace", "WhitespaceSplit", "Split", "ByteLevel", "Sequence"],
  "post_processor": ["TemplateProcessing", "RobertaProcessing", "BertProcessing", "ByteLevel", "Sequence"]
};

// GPT-2's byte-level alphabet: printable bytes as themselves, the others from U+0100 on, in byte order.
const BYTE_SYMBOLS = (() => {
  const printable = (b) => (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
  const symbols = [];
  let next = 256;
  for (let b = 0; b < 256; b++) symbols.push(String.fromCodePoint(printable(b) ? b : next++));
  return symbols;
})();
const WORD = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}"; // Rust regex's \w, which tokenizers uses
const GPT2_SPLIT = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

function refuse(part, type) {
  throw new Error(`the tokenizer's ${part} ${type} does not run in this page (it runs ${SUPPORTED[part].join(", ")})`);
}

function pattern(spec) {
  if ("Regex" in spec) return new RegExp(spec.Regex, "gu");
  return new RegExp(spec.String.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"), "gu");
}

function normalizer(spec) {
  if (!spec) return (s) => s;
  if (!SUPPORTED.normalizer.includes(spec.type)) refuse("normalizer", spec.type);
  switch (spec.type) {
    case "Lowercase": return (s) => s.toLowerCase();
    case "Replace": { const p = pattern(spec.pattern); return (s) => s.replace(p, () => spec.content); }
    case "Strip": {
      const [left, right] = [spec.strip_left !== false, spec.strip_right !== false];
      return (s) => (left && right ? s.trim() : left ? s.trimStart() : right ? s.trimEnd() : s);
    }
    case "Sequence": { const steps = spec.normalizers.map(normalizer); return (s) => steps.reduce((v, f) => f(v), s); }
    default: return (s) => s.normalize(spec.type);
  }
}

// A pre-tokeniser: a list of pieces -> a list of pieces.
function preTokenizer(spec) {
  if (!spec) return (pieces) => pieces;
  if (!SUPPORTED.pre_tokenizer.includes(spec.type)) refuse("pre_tokenizer", spec.type);
  const each = (f) => (pieces) => pieces.flatMap(f);
  switch (spec.type) {
    case "Whitespace": {
      const words = new RegExp(`[${WORD}]+|[^${WORD}\\s]+`, "gu");
      return each((s) => s.match(words) ?? []);
    }
    case "WhitespaceSplit": return each((s) => s.split(/\s+/u).filter(Boolean));
    case "Split": {
      const p = pattern(spec.pattern);
      if (spec.behavior === "Removed" || spec.behavior === "removed") {
        return each((s) => (spec.invert ? s.match(p) ?? [] : s.split(p).filter(Boolean)));
      }
      if ((spec.behavior === "Isolated" || spec.behavior === "isolated") && !spec.invert) {
        return each((s) => {
          const out = [];
          let at = 0;
          for (const m of s.matchAll(p)) {
            if (m.index > at) out.push(s.slice(at, m.index));
            if (m[0]) out.push(m[0]);
            at = m.index + m[0].length;
          }
          if (at < s.length) out.push(s.slice(at));
          return out;
        });
      }
      return refuse("pre_tokenizer", `Split (behavior ${spec.behavior}${spec.invert ? ", inverted" : ""})`);
    }
    case "ByteLevel": {
      const encoder = new TextEncoder();
      return each((s) => {
        const text = spec.add_prefix_space && !s.startsWith(" ") ? ` ${s}` : s;
        const parts = spec.use_regex === false ? [text] : text.match(GPT2_SPLIT) ?? [];
        return parts.map((part) => Array.from(encoder.encode(part), (b) => BYTE_SYMBOLS[b]).join(""));
      });
    }
    default: { const steps = spec.pretokenizers.map(preTokenizer); return (p) => steps.reduce((v, f) => f(v), p); }
  }
}

function wordLevel(spec) {
  return (piece) => {
    const id = spec.vocab[piece] ?? spec.vocab[spec.unk_token];
    if (id === undefined) throw new Error(`the word ${JSON.stringify(piece)} is not in the tokenizer's vocabulary`);
    return [id];
  };
}

function bpe(spec) {
  const unsupported = spec.byte_fallback ? "byte_fallback" : spec.dropout ? "dropout" :
    spec.continuing_subword_prefix ? "a continuing-subword prefix" : null;
  if (unsupported) refuse("model", `BPE with ${unsupported}`);
  const ranks = new Map(spec.merges.map((m, i) => [Array.isArray(m) ? m.join(" ") : m, i]));
  const cache = new Map();
  return (piece) => {
    if (cache.has(piece)) return cache.get(piece);
    if (spec.ignore_merges && piece in spec.vocab) return [spec.vocab[piece]];
    let word = Array.from(piece);
    word[word.length - 1] += spec.end_of_word_suffix ?? "";
    for (;;) { // the pair of the lowest rank, merged wherever it occurs (left to right), until none is a merge
      let [best, rank] = [-1, Infinity];
      for (let i = 0; i + 1 < word.length; i++) {
        const r = ranks.get(`${word[i]} ${word[i + 1]}`);
        if (r !== undefined && r < rank) [best, rank] = [i, r];
      }
      if (best < 0) break;
      const [first, second] = [word[best], word[best + 1]];
      const merged = [];
      for (let i = 0; i < word.length; i++) {
        if (i + 1 < word.length && word[i] === first && word[i + 1] === second) merged.push(first + word[++i]);
        else merged.push(word[i]);
      }
      word = merged;
    }
    const ids = [];
    for (const symbol of word) {
      const known = spec.vocab[symbol];
      const id = known ?? spec.vocab[spec.unk_token];
      if (id === undefined) throw new Error(`the symbol ${JSON.stringify(symbol)} is not in the tokenizer's vocabulary`);
      if (!(known === undefined && spec.fuse_unk && ids.at(-1) === id)) ids.push(id);
    }
    cache.set(piece, ids);
    return ids;
  };
}

// The template's ids around a prompt's: [before, after].
function template(spec) {
  if (!spec) return [[], []];
  if (!SUPPORTED.post_processor.includes(spec.type)) refuse("post_processor", spec.type);
  if (spec.type === "ByteLevel") return [[], []]; // (it only trims offsets)
  if (spec.type === "Sequence") {
    const parts = spec.processors.map(template);
    return [parts.flatMap((p) => p[0]), parts.flatMap((p) => p[1])];
  }
  if (spec.type !== "TemplateProcessing") return [[spec.cls[1]], [spec.sep[1]]];
  const around = [[], []];
  let side = 0;
  for (const item of spec.single) {
    if ("Sequence" in item) side = 1;
    else around[side].push(...spec.special_tokens[item.SpecialToken.id].ids);
  }
  return around;
}

export class Tokenizer {
  // `json`: a tokenizer.json's parsed content. Throws, naming the part, where a part does not run here.
  constructor(json) {
    const model = json.model ?? {};
    if (!SUPPORTED.model.includes(model.type)) refuse("model", model.type);
    this.normalize = normalizer(json.normalizer);
    this.split = preTokenizer(json.pre_tokenizer);
    this.model = model.type === "BPE" ? bpe(model) : wordLevel(model);
    [this.before, this.after] = template(json.post_processor);
    this.added = (json.added_tokens ?? []).filter((t) => t.content).sort((a, b) => b.content.length - a.content.length);
  }

  // The ids of `text`, with the template's special tokens around them (as tokenizers' encode(text).ids).
  encode(text) {
    const ids = [];
    for (const [part, added] of this.addedSplit(text)) {
      if (added) ids.push(added.id);
      else for (const piece of this.split([this.normalize(part)])) ids.push(...this.model(piece));
    }
    return [...this.before, ...ids, ...this.after];
  }

  // `text` cut at its added tokens (a CLIP prompt's "<start_of_text>"): [text, null] and [content, token] pairs.
  addedSplit(text) {
    let parts = [[text, null]];
    for (const token of this.added) {
      parts = parts.flatMap(([s, t]) => {
        if (t) return [[s, t]];
        const pieces = s.split(token.content);
        return pieces.flatMap((p, i) => (i ? [[token.content, token], [p, null]] : [[p, null]]));
      });
    }
    return parts.filter(([s, t]) => t || s);
  }
}
