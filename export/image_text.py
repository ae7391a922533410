"""Image-text models (CLIP and relatives) for the graft: the image tower, the text tower, the logit scale.

A CLIP-style model scores an image against a text by ``logit_scale * cos(image_embed, text_embed)``. onnxcam
grafts the image tower as a similarity model (:func:`onnxcam_export.tasks.add_similarity_scores`, the logit scale
multiplied in) whose references are the prompts' text embeddings, and puts the text tower and its tokenizer beside
the file (the card's ``text``, run by :mod:`onnxcam.prompts`); or it bakes a list of prompts' embeddings into
the file, which is then a zero-shot classifier with no text tower at run time (:func:`bake_prompts`).

The towers come as two files (the image tower's first output its embedding ``[N, D]``, the text tower's ``[T, D]``
from token ids), or as one combined export (optimum's zero-shot export: ``pixel_values``, ``input_ids``,
``attention_mask`` in, ``logits_per_image``, ``image_embeds``, ``text_embeds`` out), which is cut in two and
whose logit scale is measured from its own ``logits_per_image``.
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxcam.errors import OnnxcamError
from onnxcam.prompts import TextTower, load_tokenizer, unit

CLIP_SCALE = 100.0  # exp(logit_scale) of every released CLIP (OpenAI's and open_clip's: clamped at 100)
INTEGER = (TensorProto.INT64, TensorProto.INT32)
MASK = re.compile(r"mask", re.I)
TOKENIZER = "tokenizer.json"  # the file a Hugging Face tokenizer saves, and optimum's export folder holds
CLIP_MERGES = 49152 - 256 - 2  # the merges OpenAI's and open_clip's tokenizers read: a 49408-token vocabulary
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # their words (after lower case)
BAKED = "zero_shot_logits"  # a baked file's logits: logit_scale * cos(image, prompt k), [N, K]


@dataclass
class ImageText:
    """An image-text model's image tower, its logit scale, where each fact came from and its text tower's spec."""

    image: onnx.ModelProto  # pixels -> image embedding, its first output
    scale: float
    sources: dict[str, str]
    spec: dict  # the card's ``text`` (contract.TEXT_TOWER), naming the text tower and tokenizer in the scratch folder


def _rank(value: onnx.ValueInfoProto) -> int:
    return len(value.type.tensor_type.shape.dim)


def _elem(value: onnx.ValueInfoProto) -> int:
    return value.type.tensor_type.elem_type


def _inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph's inputs that are no weights (an input with an initializer is a default)."""
    weights = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def _ancestry(graph: onnx.GraphProto) -> dict[str, set[str]]:
    """Each tensor -> the graph inputs it is computed from."""
    found: dict[str, set[str]] = {i.name: {i.name} for i in graph.input}
    for node in graph.node:  # (topological order, as ONNX requires)
        reached = set().union(*(found.get(name, set()) for name in node.input if name))
        for attribute in node.attribute:  # a subgraph's outer names
            for sub in [attribute.g, *attribute.graphs]:
                reached |= set().union(*(found.get(n, set()) for s in sub.node for n in s.input))
        for name in node.output:
            found[name] = reached
    return found


def is_combined(model: onnx.ModelProto) -> bool:
    """Whether ``model`` takes an image and token ids (a combined image-text export)."""
    inputs = _inputs(model)
    return any(_rank(i) == 4 for i in inputs) and any(_rank(i) == 2 and _elem(i) in INTEGER for i in inputs)


def _extract(model: onnx.ModelProto, inputs: list[str], output: str) -> onnx.ModelProto:
    """The part of ``model`` that computes ``output`` from ``inputs`` (ONNX's extractor)."""
    with tempfile.TemporaryDirectory() as tmp:
        whole, part = Path(tmp) / "whole.onnx", Path(tmp) / "part.onnx"
        onnx.save(model, whole)
        onnx.utils.extract_model(str(whole), str(part), inputs, [output], check_model=False)
        return onnx.load(part)


def _embedding_output(model: onnx.ModelProto, computed_from: set[str], prefer: str, ancestry: dict, hint: str) -> str:
    """The ``[M, D]`` output computed from ``computed_from`` only (by name ``prefer`` among several); refused with
    ``hint`` where there is none or no one."""
    found = [o.name for o in model.graph.output if _rank(o) == 2 and ancestry.get(o.name, set()) <= computed_from
             and ancestry.get(o.name)]  # fmt: skip
    named = [name for name in found if prefer in name.lower()]
    if len(named) == 1 or len(found) == 1:
        return (named or found)[0]
    shown = ", ".join(f"{o.name} {_rank(o)}-D" for o in model.graph.output)
    raise OnnxcamError(f"cannot tell the {prefer} [M, D] among the outputs ({shown}); {hint}")


def _tower(model: onnx.ModelProto, prefer: str, source: str) -> onnx.ModelProto:
    """One tower's file cut to its embedding, where it returns more (Hugging Face's ``...WithProjection`` towers:
    the embedding and the last hidden state)."""
    if len(model.graph.output) == 1:
        return model
    inputs = [i.name for i in _inputs(model)]
    hint = f"export {source} with its embedding as its only output"
    return _extract(model, inputs, _embedding_output(model, set(inputs), prefer, _ancestry(model.graph), hint))


def _width(model: onnx.ModelProto) -> int | None:
    """The embedding's size D of a tower's one output ``[M, D]`` (None where it is symbolic)."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return dims[1].dim_value if len(dims) == 2 and dims[1].HasField("dim_value") else None


def split_combined(model: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto, str | None]:
    """The image tower, the text tower and the name of the pair's image-text logits ``[N, T]`` (or None) of a
    combined export."""
    inputs, ancestry = _inputs(model), _ancestry(model.graph)
    image = next(i.name for i in inputs if _rank(i) == 4)
    tokens = {i.name for i in inputs if _rank(i) == 2 and _elem(i) in INTEGER}
    hint = "export its two towers as two files and give the text tower with --text"
    image_out = _embedding_output(model, {image}, "image_embeds", ancestry, hint)
    text_out = _embedding_output(model, tokens, "text_embeds", ancestry, hint)
    both = [o.name for o in model.graph.output if _rank(o) == 2 and ancestry.get(o.name, set()) >= {image, *tokens}]
    logits = next((n for n in both if "per_image" in n), both[0] if both else None)
    text_inputs = [i.name for i in inputs if i.name in tokens]
    return _extract(model, [image], image_out), _extract(model, text_inputs, text_out), logits


def text_spec(text: onnx.ModelProto, source: str) -> dict:
    """The card's ``text`` for a text tower (its file names still to be set): its token ids' input, its mask's,
    its length; refused where it is no text tower."""
    inputs = _inputs(text)
    ids = [i for i in inputs if _rank(i) == 2 and _elem(i) in INTEGER and not MASK.search(i.name)]
    masks = [i for i in inputs if _rank(i) == 2 and _elem(i) in INTEGER and MASK.search(i.name)]
    described = ", ".join(f"{i.name} {_rank(i)}-D" for i in inputs)
    if len(ids) != 1 or len(masks) > 1 or len(inputs) != len(ids) + len(masks):
        raise OnnxcamError(f"{source} is not a text tower onnxcam knows: it takes ({described}), not token ids "
                           "[T, L] (and an attention mask)")  # fmt: skip
    if len(text.graph.output) != 1 or _rank(text.graph.output[0]) != 2:
        shown = ", ".join(f"{o.name} {_rank(o)}-D" for o in text.graph.output)
        raise OnnxcamError(f"{source}'s outputs ({shown}) are not one text embedding [T, D]")
    batch, length = (d.dim_value if d.HasField("dim_value") else None for d in ids[0].type.tensor_type.shape.dim)
    if batch not in (None, 1):
        raise OnnxcamError(f"{source} takes a fixed batch of {batch} prompts; re-export it with a free batch axis")
    return {"model": "", "tokenizer": "", "length": length, "pad": 0, "ids": ids[0].name,
            "mask": masks[0].name if masks else None}  # fmt: skip


def is_bpe_vocabulary(path: Path) -> bool:
    """``path`` is CLIP's own BPE vocabulary (``bpe_simple_vocab_16e6.txt.gz``: a version line, then merges)."""
    return path.name.endswith((".txt.gz", ".txt"))


def clip_bpe_tokenizer(path: Path) -> object:
    """A ``tokenizers.Tokenizer`` equal to OpenAI's and open_clip's ``SimpleTokenizer`` on the BPE vocabulary
    ``path``: the vocabulary is the 256 byte symbols, the same with ``</w>``, the first :data:`CLIP_MERGES` merges
    joined, then ``<start_of_text>`` and ``<end_of_text>``, which frame every prompt. Text is NFC-normalised,
    its whitespace runs made one space, lower-cased and split into CLIP's words (the normaliser and pre-tokeniser
    of Hugging Face's CLIP converter); open_clip's ftfy repair of broken Unicode is not applied."""
    from onnxcam.prompts import MISSING

    try:
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    except ImportError:
        raise OnnxcamError(MISSING) from None
    try:
        with gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else path.open(encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise OnnxcamError(f"cannot read {path} as CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz): "
                           f"{exc}") from None
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()][:CLIP_MERGES]
    if not merges or any(len(m) != 2 for m in merges):
        raise OnnxcamError(f"{path} is not CLIP's BPE vocabulary: after its first line, each line must be one merge "
                           "of two symbols ('t h'), as bpe_simple_vocab_16e6.txt.gz holds")  # fmt: skip
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())  # (printable bytes as themselves, the rest from U+0100)
    words = [*symbols, *(v + "</w>" for v in symbols), *("".join(m) for m in merges), "<start_of_text>",
             "<end_of_text>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tokenizer = Tokenizer(models.BPE(vocab, merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                                     fuse_unk=False))  # fmt: skip
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                 normalizers.Strip(), normalizers.Lowercase()])  # fmt: skip
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.add_special_tokens(["<start_of_text>", "<end_of_text>"])
    start, end = vocab["<start_of_text>"], vocab["<end_of_text>"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<start_of_text> $A <end_of_text>", special_tokens=[("<start_of_text>", start), ("<end_of_text>", end)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _pad_id(tokenizer: Path, spec: dict) -> tuple[int, str]:
    """The id a fixed-length tower's prompts are padded with (the padding ``tokenizer.json`` sets), and where it
    came from."""
    try:
        padding = json.loads(tokenizer.read_text(encoding="utf-8")).get("padding") or {}
    except (OSError, ValueError, AttributeError):
        padding = {}
    if isinstance(padding, dict) and type(padding.get("pad_id")) is int:
        return padding["pad_id"], f"the padding of {tokenizer.name}"
    return 0, "assumed 0 (open_clip's; the tokenizer sets none)" if spec["length"] else "none needed (free length)"


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _measured_scale(
    combined: onnx.ModelProto, logits: str, image: onnx.ModelProto, tower: TextTower, size: tuple[int, int] | None
) -> float:
    """The pair's logit scale, from its own image-text logits for a random image and two prompts (one call each):
    the least squares ratio to the cosines of its towers' embeddings, refused where that is no scaled cosine.
    ``size``: the input size where the model leaves it symbolic (optimum does), from the sidecars or --size."""
    session, prompts = _session(combined), ("a photo of a cat", "a diagram")
    pixels = next(i for i in _inputs(combined) if _rank(i) == 4)
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in pixels.type.tensor_type.shape.dim]
    if not all(dims[2:]) and size is None:
        raise OnnxcamError(f"input {pixels.name!r} has a dynamic size and nothing names one, so the logit scale "
                           "cannot be measured: pass --size (or --logit-scale)")  # fmt: skip
    shape = [1, dims[1] or 3, *(d or s for d, s in zip(dims[2:], size or dims[2:], strict=True))]
    image_feed = {pixels.name: np.random.default_rng(0).normal(0, 1, shape).astype(np.float32)}
    try:
        given = np.asarray([session.run([logits], image_feed | tower.tokens(p))[0].item() for p in prompts])
        (image_embed,) = _session(image).run(None, {image.graph.input[0].name: image_feed[pixels.name]})
    except Exception as exc:  # (onnxruntime's errors have no common base)
        raise OnnxcamError(f"the combined export does not run on a {'x'.join(map(str, shape))} image to measure its "
                           f"logit scale ({str(exc).splitlines()[0][:160]}); give --size or --logit-scale") from None
    cosines = (unit(image_embed.astype(np.float64)) @ tower.embed(prompts).astype(np.float64).T).ravel()
    scale = float(cosines @ given / (cosines @ cosines))
    if not np.allclose(scale * cosines, given, rtol=1e-3, atol=1e-4 * max(1.0, abs(scale))):
        raise OnnxcamError(f"the model's {logits!r} is not a scaled cosine of its image and text embeddings "
                           f"({given.round(4).tolist()} against {cosines.round(4).tolist()}); export its towers as "
                           "two files and give --text and --logit-scale")  # fmt: skip
    return scale


def resolve(
    model: onnx.ModelProto, source: Path, text: Path | None, tokenizer: Path | None, scale: float | None,
    folder: Path, size: tuple[int, int] | None = None,
) -> ImageText | None:  # fmt: skip
    """The image-text model ``source`` (combined, or its image tower with ``text``) and what it needs, or None
    where it is no image-text model (nothing asked for one). ``folder``: a scratch folder for the text tower;
    ``size``: the input size the sidecars or flags give, where the model's is symbolic."""
    combined = is_combined(model)
    if not combined and text is None:
        if tokenizer is not None or scale is not None:
            raise OnnxcamError("--tokenizer and --logit-scale go with an image-text model: give its text tower with "
                               "--text, or the combined export")  # fmt: skip
        return None
    if combined and text is not None:
        raise OnnxcamError(f"{source} holds both towers already (it takes an image and token ids): drop --text")
    sources: dict[str, str] = {}
    sources["tokenizer"] = f"flag --tokenizer {tokenizer.name}" if tokenizer else "found beside the model"
    tokenizer = tokenizer or _beside(source, text)
    sources["tokenizer"] += "" if sources["tokenizer"].startswith("flag") else f" ({tokenizer.name})"
    if combined:
        image, tower, logits = split_combined(model)
        where = f"{source.name}, cut from the combined export"
    else:
        try:
            tower = onnx.load(text)
        except Exception as exc:
            raise OnnxcamError(f"cannot read {text} as an ONNX model: {exc}") from None
        image, tower = _tower(model, "image_embeds", source.name), _tower(tower, "text_embeds", text.name)
        logits, where = None, text.name
    sources["text tower"] = where
    if None not in (_width(image), _width(tower)) and _width(image) != _width(tower):
        raise OnnxcamError(f"the image tower's embedding has {_width(image)} dimensions but the text tower's "
                           f"output {tower.graph.output[0].name!r} has {_width(tower)}: give the text tower with its "
                           "projection (text_embeds), as the image tower has its")  # fmt: skip
    spec = text_spec(tower, where)
    if is_bpe_vocabulary(tokenizer):  # CLIP's own vocabulary: written as the tokenizer.json the runtime reads
        clip_bpe_tokenizer(tokenizer).save(str(folder / TOKENIZER))
        sources["tokenizer"] += ", CLIP's BPE vocabulary as a tokenizer.json"
        tokenizer = folder / TOKENIZER
    load_tokenizer(tokenizer)  # (a file it cannot read is refused here)
    spec["pad"], sources["pad"] = _pad_id(tokenizer, spec)
    spec |= {"model": "text.onnx", "tokenizer": tokenizer.name}
    onnx.save(tower, folder / "text.onnx")
    if tokenizer != folder / TOKENIZER:
        (folder / tokenizer.name).write_bytes(tokenizer.read_bytes())
    towers = TextTower(folder, spec)
    if scale is not None:
        sources["logit scale"] = f"flag --logit-scale {scale:g}"
    elif logits is not None:
        scale = _measured_scale(model, logits, image, towers, size)
        sources["logit scale"] = f"measured from {logits!r}: {scale:.6g}"
    else:
        scale = CLIP_SCALE
        sources["logit scale"] = f"assumed {CLIP_SCALE:g} (every released CLIP's; --logit-scale)"
    if not (0 < scale < np.inf):
        raise OnnxcamError(f"the logit scale must be a positive number, got {scale}")
    return ImageText(image, scale, sources, spec)


def _beside(source: Path, text: Path | None) -> Path:
    """The ``tokenizer.json`` beside the text tower or the model, where no --tokenizer names one."""
    for folder in dict.fromkeys(p.parent for p in (text, source) if p is not None):
        if (folder / TOKENIZER).is_file():
            return folder / TOKENIZER
    raise OnnxcamError(f"an image-text model needs its tokenizer: give --tokenizer tokenizer.json, or CLIP's "
                       f"bpe_simple_vocab_16e6.txt.gz (no {TOKENIZER} lies beside {source.name})")  # fmt: skip


def prompts_file(path: Path) -> list[str]:
    """``--prompts``: one prompt per line (blank lines skipped), each once."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise OnnxcamError(f"cannot read the prompts {path}: {exc}") from None
    prompts = [line for line in lines if line]
    if len(prompts) < 2 or len(set(prompts)) != len(prompts):
        raise OnnxcamError(f"{path} must hold two or more different prompts, one per line (found {len(prompts)}, "
                           f"{len(prompts) - len(set(prompts))} repeated)")  # fmt: skip
    return prompts


def bake_prompts(pair: ImageText, prompts: list[str], folder: Path) -> onnx.ModelProto:
    """The image tower with the prompts' text embeddings baked in: a zero-shot classifier whose logits
    :data:`BAKED` ``[N, K]`` are ``logit_scale * cos(image, prompt k)``, its only output."""
    embeddings = TextTower(folder, pair.spec).embed(prompts)  # [K, D] unit rows
    model = pair.image
    graph = model.graph
    output = graph.output[0]
    dims = embeddings.shape[1]
    given = output.type.tensor_type.shape.dim
    if len(given) != 2 or (given[1].HasField("dim_value") and given[1].dim_value != dims):
        raise OnnxcamError(f"the image tower's output {output.name!r} does not match the text tower's embeddings "
                           f"[T, {dims}]")  # fmt: skip
    kind = output.type.tensor_type.elem_type
    dtype = helper.tensor_dtype_to_np_dtype(kind)
    p = "onnxcam/zero_shot/"
    graph.initializer.extend([
        numpy_helper.from_array((embeddings.T * pair.scale).astype(dtype), p + "scaled_prompts"),  # [D, K]
        numpy_helper.from_array(np.asarray([1], np.int64), p + "axis"),
        numpy_helper.from_array(np.asarray(1e-12, dtype), p + "eps"),
    ])  # fmt: skip
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    summed = (helper.make_node("ReduceSum", [p + "squares", p + "axis"], [p + "sum"], keepdims=1) if opset >= 13
              else helper.make_node("ReduceSum", [p + "squares"], [p + "sum"], keepdims=1, axes=[1]))  # fmt: skip
    graph.node.extend([
        helper.make_node("Mul", [output.name, output.name], [p + "squares"]),
        summed,
        helper.make_node("Sqrt", [p + "sum"], [p + "norm"]),
        helper.make_node("Max", [p + "norm", p + "eps"], [p + "clamped"]),
        helper.make_node("Div", [output.name, p + "clamped"], [p + "unit"]),
        helper.make_node("MatMul", [p + "unit", p + "scaled_prompts"], [BAKED]),
    ])  # fmt: skip
    batch = given[0].dim_param or given[0].dim_value or "N"
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(BAKED, kind, [batch, len(prompts)]))
    return model

