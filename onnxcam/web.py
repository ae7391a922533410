"""``onnxcam web``: a static page that explains photos in the browser with onnxruntime-web (no server code).

The site is the page (``onnxcam/site/``: ``index.html``, ``app.mjs``, ``onnxcam.mjs``, the steps
around the ONNX Runtime call that the Node.js script shares, and ``tokenizer.mjs``), the model as ``model.onnx``,
its card as ``card.json`` (labels, input size, in-graph methods) and onnxruntime-web's files in ``ort/``,
copied from an npm install of the pinned version (``web/package.json``). An image-text model's page gets its text
tower (``text.onnx``) and tokenizer (``tokenizer.json``) too, and a prompt box, where ``tokenizer.mjs`` runs the
tokenizer's kind (its ``SUPPORTED``).
"""

from __future__ import annotations

import json
import re
import shutil
from importlib import resources
from pathlib import Path

from onnxcam.contract import REFERENCES
from onnxcam.engine import Engine, ir_version
from onnxcam.errors import OnnxcamError
from onnxcam.outputs import atomic_write

ORT_WEB_VERSION = "1.30.0"  # the version web/package.json pins (tests/test_web.py checks that they agree)
ORT_WEB_MAX_IR = 13  # the newest ONNX IR version that onnxruntime-web 1.30 loads ("max supported IR version: 13")
EXTERNAL_DATA = b"\n\x08location"  # a TensorProto's external_data entry: key "location" (field 1, 8 bytes)
ORT_WEB_FILES = ("ort.min.mjs", "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm")
PAGE_FILES = ("index.html", "app.mjs", "onnxcam.mjs", "tokenizer.mjs")
DEFAULT_ORT = Path("web/node_modules/onnxruntime-web/dist")


def _check_ort(dist: Path) -> None:
    """``dist`` is onnxruntime-web's ``dist`` folder of the pinned version, with the files the page loads."""
    install = f"install it with `npm ci --prefix web` in the onnxcam repository (onnxruntime-web@{ORT_WEB_VERSION})"
    try:
        version = json.loads((dist.parent / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        raise OnnxcamError(f"onnxruntime-web not found in {dist}; {install}, or pass --ort DIR/dist") from None
    if version != ORT_WEB_VERSION:
        raise OnnxcamError(f"{dist} is onnxruntime-web {version}, the page is tested with {ORT_WEB_VERSION}; {install}")
    missing = [name for name in ORT_WEB_FILES if not (dist / name).is_file()]
    if missing:
        raise OnnxcamError(f"{dist} lacks {', '.join(missing)}; {install}")


def _copy(source: Path, target: Path) -> None:
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


SITE_MARKER = ".onnxcam-site"  # in a folder that onnxcam web wrote: the files it wrote there (JSON list)


def _check_out(out: Path, overwrite: bool) -> None:
    """``out`` is new, empty, or a site this command wrote (replaced with ``overwrite``); never a link, and its
    ``ort`` folder neither, so that no write lands outside it."""
    for path in (out, out / "ort"):
        if path.is_symlink():
            raise OnnxcamError(f"{path} is a symbolic link; give --out a real folder (links are never followed)")
        if path.exists() and not path.is_dir():
            raise OnnxcamError(f"{path} is a file, not a folder; give --out a new or empty folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / SITE_MARKER).is_file():
        raise OnnxcamError(f"--out {out} holds files that onnxcam web did not write; give a new or empty folder")
    if not overwrite:
        raise OnnxcamError(f"--out {out} holds an earlier site; add --overwrite to replace it, or give another folder")


def _tokenizer_parts(path: Path) -> dict[str, str | None]:
    """The types of a tokenizer.json's model, normaliser, pre-tokeniser and post-processor (None where absent)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OnnxcamError(f"cannot read the tokenizer {path}: {exc}") from None
    return {part: (found.get(part) or {}).get("type") for part in ("model", "normalizer", "pre_tokenizer",
                                                                    "post_processor")}  # fmt: skip


def supported_tokenizer_parts() -> dict[str, list[str]]:
    """What the page's tokenizer runs, as ``tokenizer.mjs`` says it (its ``SUPPORTED``, one fact in one place)."""
    source = resources.files("onnxcam").joinpath("site", "tokenizer.mjs").read_text(encoding="utf-8")
    return json.loads(re.search(r"export const SUPPORTED = (\{.*?\});", source, re.S)[1])


def _text_files(model: Path, card: object) -> dict[str, Path]:
    """An image-text model's text tower and tokenizer for the page (``text.onnx``, ``tokenizer.json``), where its
    tokenizer is of a kind the page runs; else the refusal, naming the part and what to do instead."""
    folder = model.parent
    files = {"text.onnx": folder / card.text["model"], "tokenizer.json": folder / card.text["tokenizer"]}
    for path in files.values():
        if not path.is_file():
            raise OnnxcamError(f"the text tower's file {path.name} is not beside {model.name}; copy it with the "
                               ".onnx file (onnxcam export wrote both)")  # fmt: skip
    runs = supported_tokenizer_parts()
    for part, kind in _tokenizer_parts(files["tokenizer.json"]).items():
        if (kind is None and part == "model") or (kind is not None and kind not in runs[part]):
            raise OnnxcamError(f"{model} is an image-text model whose tokenizer's {part} ({kind}) does not run in "
                               f"the page (it runs {', '.join(runs[part])}): bake the prompts in with onnxcam export "
                               "--from ... --prompts labels.txt (a zero-shot classifier, which the page shows), or "
                               "use explain --prompt")  # fmt: skip
    return files


def _check_loadable(model: Path) -> None:
    """``model`` is one file that the pinned onnxruntime-web loads."""
    beside = model.with_name(model.name + ".data")
    if beside.exists() or EXTERNAL_DATA in model.read_bytes():
        where = beside.name if beside.exists() else "an external data file"
        raise OnnxcamError(f"{model} keeps its weights in {where} (as onnxcam export writes them above 100 MB): the "
                           "page takes models in one file (a browser tab holds a few hundred MB at most); use a "
                           "smaller model")  # fmt: skip
    version = ir_version(model)
    if version is not None and version > ORT_WEB_MAX_IR:
        raise OnnxcamError(f"{model} is ONNX IR version {version}; onnxruntime-web {ORT_WEB_VERSION} loads up to "
                           f"{ORT_WEB_MAX_IR}: export it with an onnx package that writes IR {ORT_WEB_MAX_IR} (or "
                           "set its ir_version to it when it uses nothing newer)")  # fmt: skip


def write_site(model: Path, out: Path, ort_dist: Path = DEFAULT_ORT, overwrite: bool = False) -> list[Path]:
    """Write the page for ``model`` into ``out``; return the files written. Checks come before any write: ``out``
    must be new, empty, or a site written here (replaced only with ``overwrite``), and never a link. An image-text
    model's page takes prompts: its text tower and tokenizer are written beside the model."""
    engine = Engine(model)
    card = engine.card
    if any(i.name == REFERENCES for i in engine.session.get_overridable_initializers()):
        raise OnnxcamError(f"{model} gives its references a default, which onnxruntime-web cannot replace (made by an "
                           "older onnxcam): export it again")  # fmt: skip
    text = _text_files(model, card) if card.text else {}
    if card.task != "classification" and not text:
        raise OnnxcamError(f"{model} is a {card.task} model; the page shows a classifier's classes or an image-text "
                           "model's prompts: use explain")  # fmt: skip
    if not card.saliency_methods:
        raise OnnxcamError(f"{model} has no saliency output (made by an older onnxcam); re-export it")
    for path in (model, *text.values()):
        if path.suffix == ".onnx":
            _check_loadable(path)
    _check_ort(ort_dist)
    _check_out(out, overwrite)
    (out / "ort").mkdir(parents=True, exist_ok=True)
    marker = json.dumps([*PAGE_FILES, *(f"ort/{n}" for n in ORT_WEB_FILES), "model.onnx", "card.json", *text])
    atomic_write(out / SITE_MARKER, lambda tmp: tmp.write_text(marker, encoding="utf-8"))  # (first: it is ours)
    written = []
    for name in PAGE_FILES:
        written.append(out / name)
        page = resources.files("onnxcam").joinpath("site", name).read_bytes()
        atomic_write(written[-1], lambda tmp, page=page: tmp.write_bytes(page))
    for name in ORT_WEB_FILES:
        written.append(out / "ort" / name)
        _copy(ort_dist / name, written[-1])
    written.append(out / "model.onnx")
    _copy(model, written[-1])
    for name, path in text.items():
        written.append(out / name)
        _copy(path, written[-1])
    fields = ("arch", "weights", "trained", "layer", "input_size", "labels", "saliency_methods", "resize", "task",
              "logit_scale")  # fmt: skip
    spec = {**card.text, "model": "text.onnx", "tokenizer": "tokenizer.json"} if text else {}
    document = json.dumps({**{key: getattr(card, key) for key in fields}, "text": spec}, indent=1)
    written.append(out / "card.json")
    atomic_write(written[-1], lambda tmp: tmp.write_text(document, encoding="utf-8"))
    return written
