"""``onnxcam`` command line: a thin shell over :mod:`onnxcam.api`."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from onnxcam import audit as audit_mod
from onnxcam import evaluate as evaluation
from onnxcam.api import ALL_METHODS, Explainer, save
from onnxcam.errors import OnnxcamError
from onnxcam.folder import Options, Progress, read_records, run
from onnxcam.image import MAX_PIXELS, atomic_write, read_rgb
from onnxcam.inputs import expand
from onnxcam.overlay import HEAT_WEIGHT
from onnxcam.report import write_report

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Grad-CAM on ONNX Runtime: the class gradient is inside the .onnx file, no PyTorch at run time.",
)

DEFAULT_MODEL = Path("models/vgg16.onnx")


class Arch(str, Enum):
    vgg16 = "vgg16"
    efficientnet_lite0 = "efficientnet_lite0"
    # through torchvision, when it is installed
    resnet50 = "resnet50"
    mobilenet_v2 = "mobilenet_v2"
    mobilenet_v3_large = "mobilenet_v3_large"
    efficientnet_b0 = "efficientnet_b0"
    densenet121 = "densenet121"
    convnext_tiny = "convnext_tiny"


@app.command()
def export(
    arch: Annotated[Arch, typer.Option(help="Network to build (ignored with --from).")] = Arch.vgg16,
    weights: Annotated[
        str, typer.Option(help="'imagenet' (download once, hash-checked), 'none' (seeded random), or a .pth path.")
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
    labels: Annotated[Path | None, typer.Option(help="With --from: class names, one per line.")] = None,
    size: Annotated[int | None, typer.Option(help="With --from: input size when the model's is dynamic.")] = None,
    mean: Annotated[
        tuple[float, float, float] | None, typer.Option(help="With --from: per-channel mean, 0..1 scale, RGB.")
    ] = None,
    std: Annotated[
        tuple[float, float, float] | None, typer.Option(help="With --from: per-channel std, 0..1 scale.")
    ] = None,
    bgr: Annotated[bool, typer.Option("--bgr", help="With --from: the model takes BGR channels.")] = False,
    preprocess: Annotated[
        Path | None, typer.Option(help='With --from: JSON sidecar {"size", "mean", "std", "bgr"} instead of flags.')
    ] = None,
) -> None:
    """Build an ONNX model whose outputs are the logits AND the class gradients.

    Example: onnxcam export --arch efficientnet_lite0      (needs PyTorch)

    Example: onnxcam export --from resnet50.onnx --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225      (needs onnx)
    """
    if source is not None:
        _export_from(source, out, layer, labels, size, mean, std, bgr, preprocess)
        return
    try:
        from onnxcam_export.torch_export import export_arch
    except ImportError as exc:
        raise OnnxcamError(
            f"onnxcam export --arch needs PyTorch ({exc}); install: pip install 'onnxcam[export]'"
        ) from exc
    target = out or Path("models") / f"{arch.value}.onnx"
    card = export_arch(arch.value, weights, layer, target)
    _report_export(target, card, [])


def _export_from(
    source: Path, out: Path | None, layer: str | None, labels: Path | None, size: int | None,
    mean: tuple | None, std: tuple | None, bgr: bool, preprocess: Path | None,
) -> None:  # fmt: skip
    try:
        from onnxcam_export.from_onnx import Preprocessing, graft_file
    except ImportError as exc:
        raise OnnxcamError(f"onnxcam export --from needs the onnx package ({exc}); install: pip install onnx") from exc
    if not source.is_file():
        raise OnnxcamError(f"model file {source} not found")
    if preprocess is not None:
        if size or mean or std or bgr:
            raise OnnxcamError("give the preprocessing either as --preprocess JSON or as flags, not both")
        prep = Preprocessing.from_json(preprocess)
    else:
        prep = Preprocessing.create((size, size) if size else None, mean, std, bgr)
    target = out or source.with_name(source.name.removesuffix(".onnx") + ".cam.onnx")
    card, notes = graft_file(source, target, layer, labels, prep)
    _report_export(target, card, notes)


def _report_export(target: Path, card: dict, notes: list[str]) -> None:
    typer.echo(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")
    for note in notes:
        typer.echo(f"  note: {note}")
    for key, value in card.items():
        if key != "notes":
            typer.echo(f"  {key}: {value}")


@app.command()
def explain(
    images: Annotated[
        list[str],
        typer.Argument(help="Image files, folders (recursive), glob patterns or @list.txt.", show_default=False),
    ],
    model: Annotated[Path, typer.Option(help="An onnxcam model from `onnxcam export`.")] = DEFAULT_MODEL,
    target: Annotated[
        list[str] | None, typer.Option(help="Class to explain: an index or a class name. Repeatable.")
    ] = None,
    top_k: Annotated[
        int | None, typer.Option(help="Also explain the K top-scoring classes [default: 1 without --target].")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder: maps, results.jsonl, index.html.")] = Path("onnxcam-out"),
    alpha: Annotated[float, typer.Option(help="Heat-map weight in the overlay (photo gets 1 - alpha).")] = HEAT_WEIGHT,
    provider: Annotated[str | None, typer.Option(help="ONNX Runtime provider, e.g. cpu, cuda.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")] = False,
    method: Annotated[
        str, typer.Option(help=f"CAM method: {', '.join(ALL_METHODS)}, or 'all' (adds a side-by-side sheet).")
    ] = "gradcam",
    eigen_smooth: Annotated[
        bool, typer.Option("--eigen-smooth", help="Replace the channel sum by its first principal component.")
    ] = False,
    aug_smooth: Annotated[
        bool, typer.Option("--aug-smooth", help="Average the maps of flipped and brightness-scaled views.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Images per ONNX Runtime call.")] = 8,
    panel: Annotated[bool, typer.Option("--panel", help="Also write photo | heat map | overlay per map.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Skip images whose outputs are complete.")] = False,
    keep_going: Annotated[
        bool, typer.Option("--keep-going", help="Exit 0 even when some images could not be explained.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    max_pixels: Annotated[int, typer.Option(help="Refuse images with more pixels than this.")] = MAX_PIXELS,
) -> None:
    """Explain images with Grad-CAM (or another CAM method) on ONNX Runtime, no PyTorch.

    Writes an overlay PNG and the raw map (.npy) per image and class, results.jsonl (one line
    per image and class) and index.html (a report that opens from the file system).

    Example: onnxcam explain photos/ --model models/efficientnet_lite0.onnx --top-k 2 --batch-size 16
    """
    if not 0.0 <= alpha <= 1.0:
        raise OnnxcamError(f"--alpha must be between 0 and 1, got {alpha}")
    if method != "all" and method not in ALL_METHODS:
        raise OnnxcamError(f"unknown --method {method!r}; choose one of: {', '.join(ALL_METHODS)}, all")
    if batch_size < 1:
        raise OnnxcamError(f"--batch-size must be at least 1, got {batch_size}")
    explainer = Explainer(model, provider)
    targets = target or []
    explainer.target_codes(targets, top_k)  # bad classes fail before any image is read
    paths = expand(images)
    if not paths:
        raise OnnxcamError(f"no image files found in {' '.join(images)}")
    if len(images) == 1 and len(paths) == 1 and not Path(images[0]).is_dir():
        read_rgb(paths[0], max_pixels)  # one named image: a bad one is an error before anything is written
    options = Options(
        out=out, targets=targets, top_k=top_k, methods=list(ALL_METHODS) if method == "all" else [method],
        eigen_smooth=eigen_smooth, aug_smooth=aug_smooth, alpha=alpha, batch_size=batch_size, panel=panel,
        sheets=method == "all", resume=resume, max_pixels=max_pixels,
    )  # fmt: skip
    shown: dict[str, dict] = {}
    summary: dict = {}
    try:
        for record in run(explainer, paths, options, progress=sys.stderr.isatty() and not quiet):
            if "summary" in record:
                summary = record["summary"]
                continue
            if record["error"]:
                typer.echo(f"error: {record['error']}", err=True)  # the message names the file
            if json_output or len(paths) <= TABLE_LIMIT:
                _collect(shown, record)
    except KeyboardInterrupt:
        typer.echo(f"interrupted; finished images are kept in {out}: run again with --resume", err=True)
        raise SystemExit(130) from None
    report = write_report(read_records(out), out)
    if json_output:
        typer.echo(json.dumps({"model": str(model), "images": list(shown.values()), "summary": summary}, indent=2))
    else:
        _print_table(list(shown.values()))
        typer.echo(
            f"explained {summary['explained']} of {summary['images']} images ({summary['skipped']} skipped, "
            f"{summary['failed']} failed) in {summary['seconds']:.1f} s; report: {report}"
        )
    if summary["failed"] and not keep_going:
        raise SystemExit(2)


TABLE_LIMIT = 20  # above this many images the table is left to results.jsonl and index.html


def _collect(shown: dict[str, dict], record: dict) -> None:
    """Group records per image into the --json / table shape."""
    if record.get("error"):
        shown[record["path"]] = {"path": record["path"], "error": record["error"]}
        return
    item = shown.setdefault(
        record["path"],
        {"path": record["path"], "size": record["size"], "predictions": record["predictions"], "targets": []},
    )
    extra = {k: record[k] for k in ("overlay", "map", "panel") if k in record}
    item["targets"].append({**record["target"], "empty_map": record["empty_map"], **record["stats"], **extra})
    if "sheets" in record:
        item["sheets"] = record["sheets"]


def _print_table(report: list[dict]) -> None:
    for item in report:
        if "error" in item:
            continue  # already said on stderr
        width, height = item["size"]
        typer.echo(f"{item['path']} ({width}x{height})")
        typer.echo(f"  {'class':>5}  {'probability':>11}  label")
        for p in item["predictions"]:
            typer.echo(f"  {p['class']:>5}  {p['probability']:>11.4f}  {p['label']}")
        for t in item["targets"]:
            note = "  (empty map: no region supports this class)" if t["empty_map"] else ""
            typer.echo(f"  {t['method']} map for {t['label']} ({t['class']}): {t['overlay']}  {t['map']}{note}")
        for sheet in item.get("sheets", []):
            typer.echo(f"  all methods side by side: {sheet}")


@app.command()
def audit(
    folder: Annotated[Path, typer.Argument(help="One subfolder per class, named as the model's labels.")],
    boxes: Annotated[Path, typer.Option(help='JSON {"image path": [x0, y0, x1, y1], ...} of the objects.')],
    model: Annotated[Path, typer.Option(help="An onnxcam model.")] = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(help="Output folder: overlays, audit.jsonl, index.html.")] = Path(
        "onnxcam-audit"
    ),
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")] = False,
) -> None:
    """Bias audit: per class, how much of each map lies on the object and how much on the background.

    Images where the map puts less mass on the object than a uniform map would are flagged and
    listed first, here and in the HTML report.

    Example: onnxcam audit data/val/ --boxes boxes.json --model models/vgg16.onnx
    """
    explainer = Explainer(model)
    box_map = audit_mod.load_boxes(boxes)
    out.mkdir(parents=True, exist_ok=True)
    audits, records = [], []
    for found, result in audit_mod.audit(explainer, folder, box_map):
        stem = f"{Path(found.path).parent.name}-{Path(found.path).stem}"
        files = save(result, out, stem)
        audits.append(found)
        records.append({"path": found.path, "predictions": [vars(p) for p in result.predictions],
                        **files[0], **vars(found), "error": None})  # fmt: skip
    atomic_write(out / "audit.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in records)))
    report = write_report(records, out)
    per_class = audit_mod.summary(audits)
    flagged = [a for a in audits if a.flagged]
    if json_output:
        typer.echo(json.dumps({"classes": per_class, "flagged": [vars(a) for a in flagged]}, indent=2))
        return
    typer.echo(f"{'class':<20} {'images':>6} {'accuracy':>8} {'on object':>9} {'background':>10} {'flagged':>7}")
    for label, row in per_class.items():
        typer.echo(f"{label:<20} {row['images']:>6} {row['accuracy']:>8.2f} {row['object_share']:>9.2f} "
                   f"{row['background_share']:>10.2f} {row['flagged']:>7}")  # fmt: skip
    typer.echo(f"{len(flagged)} image(s) where the model looks mostly off the object:")
    for a in sorted(flagged, key=lambda a: a.object_share):
        typer.echo(f"  {a.path}: predicted {a.predicted} ({a.probability:.0%}), {a.object_share:.0%} of the map "
                   f"on a box covering {a.box_area:.0%}")  # fmt: skip
    typer.echo(f"report: {report}")


@app.command(name="eval")
def evaluate_command(
    images: Annotated[list[str], typer.Argument(help="Image files, folders, globs or @list.txt.", show_default=False)],
    model: Annotated[Path, typer.Option(help="An onnxcam model.")] = DEFAULT_MODEL,
    target: Annotated[str | None, typer.Option(help="Class to explain [default: each image's top prediction].")] = None,
    method: Annotated[str, typer.Option(help=f"CAM method: {', '.join(ALL_METHODS)}.")] = "gradcam",
    steps: Annotated[int, typer.Option(help="Deletion/insertion steps (equal shares of the pixels).")] = 32,
    boxes: Annotated[
        Path | None, typer.Option(help='JSON {"image path": [x0, y0, x1, y1]} for the pointing games.')
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    road: Annotated[
        bool, typer.Option("--road", help="Also ROAD MoRF/LeRF at 10..90% (18 imputations: seconds per image).")
    ] = False,
) -> None:
    """Faithfulness metrics of the maps: Average Drop, Increase in Confidence, deletion/insertion AUC,
    and with --boxes the pointing game and its energy-based form.

    Example: onnxcam eval photos/ --model models/efficientnet_lite0.onnx --boxes boxes.json
    """
    if method not in ALL_METHODS:
        raise OnnxcamError(f"unknown --method {method!r}; choose one of: {', '.join(ALL_METHODS)}")
    if steps < 1:
        raise OnnxcamError(f"--steps must be at least 1, got {steps}")
    explainer = Explainer(model)
    if target is not None:
        explainer.class_index(target)
    paths = expand(images)
    if not paths:
        raise OnnxcamError(f"no image files found in {' '.join(images)}")
    box_map = audit_mod.load_boxes(boxes) if boxes is not None else None
    bar = Progress(len(paths), sys.stderr.isatty() and not quiet)
    rows = []
    for row in evaluation.evaluate(explainer, paths, target, method, steps, box_map, road):
        rows.append(row)
        bar.update(1)
    bar.close()
    means = evaluation.averages(rows)
    if json_output:
        typer.echo(json.dumps({"model": str(model), "method": method, "steps": steps, "mean": means, "images": rows},
                              indent=2))  # fmt: skip
        return
    keys = [k for k in rows[0] if k not in ("path", "class") and not k.endswith("_curve")]
    typer.echo("| image | " + " | ".join(keys) + " |")
    typer.echo("|---" * (len(keys) + 1) + "|")
    for row in rows:
        typer.echo(f"| {Path(str(row['path'])).name} | " + " | ".join(str(row[k]) for k in keys) + " |")
    typer.echo("\nmean: " + ", ".join(f"{k} {v}" for k, v in means.items()))


@app.command()
def info(
    model: Annotated[Path, typer.Argument(help="An onnxcam model.")],
    labels: Annotated[bool, typer.Option("--labels", help="Also list every class index and name.")] = False,
) -> None:
    """Print the model card: architecture, weights, target layer, preprocessing, classes.

    Example: onnxcam info models/vgg16.onnx
    """
    explainer = Explainer(model)
    typer.echo(str(model))
    for key, value in explainer.card.rows():
        typer.echo(f"  {key:<16} {value}")
    if labels:
        for i, name in enumerate(explainer.labels):
            typer.echo(f"  {i:>5}  {name}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except OnnxcamError as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)  # always one line
        sys.exit(2)
