"""Everything a run writes: output names, atomic file writes, the output folder's lock and settings.

A run owns its ``--out`` folder while it works: an advisory lock keeps a second run out, a
``run.json`` says what the run was asked (so ``--resume`` can refuse a run with other
settings), and every file is written to an exclusively created temporary name and then
renamed, so an interrupted run leaves no half-written file and a planted symlink is never
followed. A fresh run never replaces a file it did not write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

import cv2
import numpy as np

from onnxcam import overlay
from onnxcam.errors import OnnxcamError

if TYPE_CHECKING:
    from onnxcam.api import Explanation

RESULTS = "results.jsonl"
SETTINGS = "run.json"
REPORT = "index.html"
LOCK = ".onnxcam.lock"
PARTIAL = ".partial"  # temporary names: .<name>.<random>.partial<suffix>
MAX_STEM_BYTES = 100  # output names stay far below the 255-byte limit of file systems
MAX_LABEL_BYTES = 60

_UMASK = os.umask(0)
os.umask(_UMASK)


# -- atomic writes --------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[Path], None], replace: bool = True) -> None:
    """Write ``path`` through an exclusively created temporary file in its folder, then rename.

    ``replace=False`` refuses to replace an existing file (a file the run did not write).
    """
    if not replace and os.path.lexists(path):
        raise OnnxcamError(f"{path} already exists and this run did not write it; choose another --out")
    prefix = "." + path.name.encode()[:120].decode(errors="ignore") + "."
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=PARTIAL + path.suffix)
    tmp = Path(name)
    try:
        if hasattr(os, "fchmod"):  # mkstemp creates 0600; outputs get the usual permissions
            os.fchmod(fd, 0o666 & ~_UMASK)
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# picture formats for overlays, panels and sheets: extension -> OpenCV encoder parameters
# (PNG is lossless and slow to encode; JPEG at quality 95 is faster, benchmarks/folder.py; the raw .npy map stays exact)
PICTURE_FORMATS: dict[str, list[int]] = {
    "png": [],
    "jpg": [cv2.IMWRITE_JPEG_QUALITY, 95],
    "webp": [cv2.IMWRITE_WEBP_QUALITY, 95],
}


def write_picture_rgb(path: Path, rgb: np.ndarray, replace: bool = True) -> None:
    """A PNG, JPEG or WebP (by ``path``'s extension) from uint8 RGB (OpenCV's BGR made on a copy here)."""
    params = PICTURE_FORMATS[path.suffix.lstrip(".").lower()]

    def write(tmp: Path) -> None:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params):
            raise OnnxcamError(f"could not write {path}")

    atomic_write(path, write, replace)


def write_npy(path: Path, array: np.ndarray, replace: bool = True) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.save(f, array)

    atomic_write(path, write, replace)


def write_text(path: Path, text: str, replace: bool = True) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), replace)


def remove_partials(folder: Path) -> None:
    """Delete temporary files left by a killed run (only while holding the folder's lock)."""
    for path in folder.glob(f".*{PARTIAL}*"):
        path.unlink(missing_ok=True)


# -- names ----------------------------------------------------------------------------------
def _clip_bytes(text: str, limit: int) -> str:
    return text.encode()[:limit].decode(errors="ignore")


def slug(text: str) -> str:
    """A label as a file-name part: lower case, ``[a-z0-9-]`` only, at most MAX_LABEL_BYTES."""
    return _clip_bytes(re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-"), MAX_LABEL_BYTES).strip("-") or "class"


def safe_stem(path: str | PurePath) -> str:
    """The file stem (of a path or a URI) with control characters and bytes that are not UTF-8 (old archives,
    Samba shares) replaced, at most MAX_STEM_BYTES."""
    return _clip_bytes(re.sub(r"[\x00-\x1f\x7f\ud800-\udfff]", "_", PurePath(path).stem), MAX_STEM_BYTES) or "image"


def unique_stems(paths: list[str], fixed: dict[str, str] | None = None) -> dict[str, str]:
    """Output stems, unique (ignoring case) over the whole run.

    ``fixed`` maps paths of an earlier run (``--resume``) to the stems they already have.
    Other repeats get ``-2``, ``-3``, ... never a stem that another input has naturally,
    so ``a/cat.png``, ``b/cat.png``, ``c/cat-2.png`` become ``cat``, ``cat-3``, ``cat-2``.
    """
    fixed = fixed or {}
    natural = {safe_stem(p).casefold() for p in paths} | {s.casefold() for s in fixed.values()}
    used = {s.casefold() for s in fixed.values()}
    stems: dict[str, str] = {}
    for path in paths:
        if path in fixed:
            stems[path] = fixed[path]
            continue
        base = candidate = safe_stem(path)
        k = 1
        while candidate.casefold() in used or (k > 1 and candidate.casefold() in natural):
            k += 1
            candidate = f"{base}-{k}"
        used.add(candidate.casefold())
        stems[path] = candidate
    return stems


def map_name(stem: str, index: int | str, label: str, method: str, kind: str = "") -> str:
    """``<stem>_<class>_<label>[.<method>][.<kind>]`` (a detection's class is ``box<rank>-<class>``); the
    extension is the caller's."""
    name = f"{stem}_{index}_{slug(label)}"
    name += "" if method == "gradcam" else f".{method.replace('+', 'p')}"
    return name + (f".{kind}" if kind else "")


# -- the run's folder -----------------------------------------------------------------------
def file_digest(path: Path) -> str:
    """sha256 of a file, read in chunks (a model can be hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _lock(fd: int) -> bool:
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
    except OSError:
        return False
    return True


def _prepare(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OnnxcamError(f"--out {out} is a file, not a folder; choose a folder name")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise OnnxcamError(f"cannot write to the output folder {out} ({exc.strerror}); choose another --out") from None


@contextlib.contextmanager
def owned(out: Path) -> Iterator[None]:
    """Hold ``out`` for one run: refuse a second concurrent run, clean a killed run's temporaries; the lock file
    goes when the run ends (a killed run's stays, and the next run takes it over)."""
    _prepare(out)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    held = False
    try:
        held = _lock(fd) and _still_there(fd, out / LOCK)  # (a run that just ended removed the file it held)
        if not held:
            raise OnnxcamError(
                f"another onnxcam run is writing to {out}; wait for it to finish or choose another --out"
            )
        remove_partials(out)
        yield
    finally:
        if held:  # removed while held: no empty lock file is left in --out
            (out / LOCK).unlink(missing_ok=True)
        os.close(fd)


def _still_there(fd: int, path: Path) -> bool:
    """Whether the locked file is still the one at ``path`` (not removed by the run that held it before)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def earlier_settings(out: Path, records: str = RESULTS) -> dict | None:
    """The settings of the run that wrote ``out`` before, None if there was none.

    An ``out`` holding results without ``run.json`` (or a corrupt one) is refused: its
    settings cannot be known.
    """
    path = out / SETTINGS
    if not path.is_file():
        if (out / records).exists() or (out / REPORT).exists():
            raise OnnxcamError(
                f"{out} holds results that are not from this version of onnxcam ({SETTINGS} is missing); "
                "choose another --out, or --overwrite to replace them"
            )
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        settings = None
    if not isinstance(settings, dict) or not isinstance(settings.get("settings"), dict):  # ({} has no settings)
        raise OnnxcamError(f"{path} is not an onnxcam run's settings; choose another --out, or --overwrite")
    return settings


def differences(before: dict, now: dict) -> list[str]:
    """The settings that differ, as ``--name (now X, before Y)``."""
    keys = sorted(set(before) | set(now))
    return [f"--{k.replace('_', '-')} (now {now.get(k)!r}, before {before.get(k)!r})"
            for k in keys if before.get(k) != now.get(k)]  # fmt: skip


def read_records(path: Path, strict: bool = True) -> list[dict]:
    """The records of a ``.jsonl`` file. A cut-off last line (an interrupted write) is ignored;
    anything else that is not a JSON object with a ``path`` is an error naming the line
    (skipped when not ``strict``)."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                continue
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            if not strict:
                continue
            raise OnnxcamError(
                f"{path} line {number} is not an onnxcam record ({line[:40]!r}); "
                "choose another --out, or --overwrite to replace that run"
            )
        records.append(record)
    return records


# a record's files (boxes: a detection's picture of all its image's boxes; signed: a signed map's diverging colours)
FILE_KEYS = ("overlay", "map", "attribution", "signed", "panel", "boxes")


def record_files(record: dict, out: Path) -> list[Path]:
    """The files a record names (its maps, panel and method sheets), in ``out``, where a run writes them all: the
    names as written are relative to that run's working folder, which need not be this one."""
    names = [record[k] for k in FILE_KEYS if record.get(k)] + list(record.get("sheets") or [])
    return [out / Path(str(name)).name for name in names]


def forget_run(out: Path, records: str = RESULTS) -> None:
    """Delete an earlier run's files in ``out`` (``--overwrite``): only files its records name, inside ``out``."""
    for record in read_records(out / records, strict=False):
        for path in record_files(record, out):
            path.unlink(missing_ok=True)
    for name in (records, REPORT, SETTINGS, PARQUET):
        (out / name).unlink(missing_ok=True)


def start_run(out: Path, settings: dict, resume: bool, overwrite: bool, records: str = RESULTS) -> list[dict]:
    """Check ``out`` against an earlier run and record this run's settings; return the records to keep.

    Without ``resume`` or ``overwrite``, a folder holding an earlier run is refused; with
    ``resume`` the earlier run's settings must equal these; with ``overwrite`` its files go
    first (not with ``resume``). Call it while holding :func:`owned`.
    """
    if overwrite:
        forget_run(out, records)
    before = earlier_settings(out, records)
    if before is not None and not resume:
        raise OnnxcamError(
            f"{out} holds an earlier run; add --resume to continue it, --overwrite to replace it, "
            "or choose another --out"
        )
    if before is not None and before.get("settings") != settings:
        changed = ", ".join(differences(before.get("settings") or {}, settings))
        raise OnnxcamError(
            f"--resume: this run differs from the earlier run in {out}: {changed}; use the same settings, "
            "or --overwrite to start again"
        )
    kept = read_records(out / records) if resume else []
    write_text(out / SETTINGS, json.dumps({"onnxcam": _version(), "settings": settings}, indent=1) + "\n")
    return kept


def _version() -> str:
    from onnxcam import __version__

    return __version__


def _write_boxes(result: Explanation, path: Path, replace: bool) -> str:
    """The photo with every detection's box and label, once per image."""
    picture = result.image_rgb.copy()
    for m in {m.rank: m for m in result.maps}.values():
        if m.mask is not None:
            overlay.draw_mask(picture, m.mask)
        overlay.draw_box(picture, m.box, f"{m.label} {m.probability:.2f}")
    write_picture_rgb(path, picture, replace)
    return str(path)


def save_explanation(
    result: Explanation,
    out: Path,
    stem: str,
    *,
    alpha: float,
    panel: bool = False,
    sheets: bool = False,
    picture: str = "png",
    replace: bool = True,
    marks: Sequence[tuple[tuple[float, float, float, float], str]] = (),
    colormap: str = "jet",
) -> tuple[list[dict[str, str]], list[str]]:
    """Write every map of one image: the overlay (a ``picture``: png, jpg or webp) and the raw ``.npy``
    (float32 in [0, 1]; a pixel method's float map at the model's input, before the ReLU, too); with ``panel``
    photo | heat map | overlay, with ``sheets`` one picture per class with every method's overlay; for a detector's
    maps, their boxes drawn and one picture of every box; ``marks`` (box, label) drawn on every overlay too (the
    audit's object); ``colormap``: one of :data:`overlay.COLORMAPS`. ``replace=False`` never replaces an existing
    file.

    Returns the files of each map (``overlay``, ``map``, ``attribution``, ``signed``: a signed map in a diverging
    colour map, ``panel``, ``boxes``) and the sheets.
    """  # fmt: skip
    files, tiles = [], {}
    detections = bool(result.maps) and result.maps[0].box is not None
    boxes = _write_boxes(result, out / f"{stem}_boxes.{picture}", replace) if detections else None
    for m in result.maps:
        name = map_name(stem, m.key, m.label, m.method)
        entry = {"overlay": str(out / f"{name}.{picture}"), "map": str(out / f"{name}.npy")}
        entry |= {"boxes": boxes} if boxes else {}
        blended = overlay.overlay_rgb(result.image_rgb, m.cam, alpha, colormap)
        if m.mask is not None:  # (the instance's mask drawn with its box: its outline on the map)
            overlay.draw_mask(blended, m.mask, alpha=0.0)
        if m.box is not None:
            overlay.draw_box(blended, m.box, f"{m.label} {m.probability:.2f}")
        for box, label in marks:
            overlay.draw_box(blended, box, label)
        write_picture_rgb(Path(entry["overlay"]), blended, replace)
        write_npy(Path(entry["map"]), m.cam, replace)
        if m.attribution is not None:  # (a pixel method's float map at the model's input, before the ReLU)
            entry["attribution"] = str(out / f"{name}.attribution.npy")
            write_npy(Path(entry["attribution"]), m.attribution, replace)
        if m.signed is not None:  # (and where it is signed, both signs in a diverging colour map)
            entry["signed"] = str(out / f"{name}.signed.{picture}")
            percentile = 99.0 if m.percentile is None else m.percentile
            write_picture_rgb(Path(entry["signed"]), overlay.signed_overlay_rgb(result.image_rgb, m.signed, percentile),
                              replace)  # fmt: skip
        if panel:
            entry["panel"] = str(out / f"{name}.panel.{picture}")
            caption = f"{m.label} {m.probability:.1%}"
            sheet = overlay.panel(result.image_rgb, m.cam, blended, caption, m.method, colormap)
            write_picture_rgb(Path(entry["panel"]), sheet, replace)
        if sheets:
            tiles.setdefault((m.key, m.label), []).append((m.method, overlay.thumbnail(blended)))
        files.append(entry)
    written = []
    for (index, label), row in tiles.items():
        path = out / f"{map_name(stem, index, label, 'gradcam', 'methods')}.{picture}"
        write_picture_rgb(path, overlay.comparison_sheet(row), replace)
        written.append(str(path))
    return files, written


PARQUET = "results.parquet"  # a Ray run's records as a table (pyarrow, the ray extra)


def write_parquet(records: list[dict], path: Path) -> None:
    """The records as a flat table for data tools (one row per image and target; errors keep their row). A local
    run over a Ray run's folder rewrites it too (:func:`refresh_parquet`), so it never lags the records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"path": r["path"], "stem": r.get("stem"), "error": r.get("error"),
             **{k: (r.get("target") or {}).get(k) for k in ("class", "label", "probability", "logit", "method")},
             "peak_x": (r.get("stats") or {}).get("peak_xy", [None])[0],
             "peak_y": (r.get("stats") or {}).get("peak_xy", [None, None])[1],
             "top20_mass": (r.get("stats") or {}).get("top20_mass"), "empty_map": r.get("empty_map"),
             "overlay": r.get("overlay"), "map": r.get("map"), "panel": r.get("panel")} for r in records]  # fmt: skip
    table = pa.Table.from_pylist(rows)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def refresh_parquet(records: list[dict], out: Path) -> str | None:
    """Rewrite an earlier Ray run's ``results.parquet`` after a local run changed its records; without pyarrow,
    remove it (a stale table would misstate the run). Returns a warning to show when it was removed."""
    path = out / PARQUET
    if not path.exists():
        return None
    try:
        write_parquet(records, path)
    except ImportError:
        path.unlink()
        return f"removed {path}, an earlier Ray run's table (pyarrow is not installed here to rewrite it)"
    return None
