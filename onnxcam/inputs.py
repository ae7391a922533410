"""What ``onnxcam explain`` was pointed at: files, folders (recursive), glob patterns, ``@list.txt``."""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from onnxcam.errors import OnnxcamError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jpe", ".pgm", ".ppm"}
MAX_LIST_BYTES = 64 * 1024 * 1024  # an @list of paths, not a data set


MAX_TEXT_BYTES = 16 * 1024 * 1024  # a labels file, a sidecar, a preprocessing JSON


def read_small_text(path: Path, what: str = "file", limit: int = MAX_TEXT_BYTES) -> str:
    """A small UTF-8 text file: a regular file only (never a pipe or device, which would hang or never end), of
    at most ``limit`` bytes; anything else raises OnnxcamError naming ``what``."""
    try:
        info = path.stat()
    except OSError as exc:
        raise OnnxcamError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise OnnxcamError(f"the {what} {path} is not a regular file (a folder, pipe or device); give a text file")
    if info.st_size > limit:
        raise OnnxcamError(f"the {what} {path} is {info.st_size:,} bytes, over {limit:,}; give the right file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OnnxcamError(f"cannot read the {what} {path} as UTF-8 text: {exc}") from None


def read_list(listing: Path) -> list[str]:
    """The lines of an ``@list`` file (:func:`read_small_text`: a regular file of sane size)."""
    return read_small_text(listing, "list file", MAX_LIST_BYTES).splitlines()


def _walk(folder: Path) -> Iterator[Path]:
    """Image files below ``folder`` in sorted order, following links but never a folder twice."""
    seen: set[str] = set()
    unreadable: list[OSError] = []
    for root, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable.append):
        while unreadable:  # a folder the walk cannot enter (too deep for PATH_MAX, no permission): an item, whose
            failed = unreadable.pop(0)  # reading then fails with the reason, never a silent skip
            yield Path(failed.filename or root)
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop, or two links to one folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(root) / name
    yield from (Path(failed.filename or folder) for failed in unreadable)


def expand(items: list[str]) -> list[Path]:
    """Files in the order given; folders walked recursively; globs and @list files expanded.

    A plain path that does not exist (or is not a regular file) stays in the list, so that it
    is reported as that image's error.
    Each file appears once, at its first mention.
    """
    out: dict[str, Path] = {}
    for item in items:
        if item.startswith("@"):
            lines = read_list(Path(item[1:]))
            paths = expand([line.strip() for line in lines if line.strip() and not line.startswith("#")])
        elif Path(item).is_dir():
            paths = list(_walk(Path(item)))
        elif glob.has_magic(item):
            paths = [Path(p) for p in sorted(glob.glob(item, recursive=True)) if not Path(p).is_dir()]
            if not paths:
                raise OnnxcamError(f"the pattern {item!r} matches no file")
        else:
            paths = [Path(item)]
        for path in paths:
            out.setdefault(os.path.realpath(path), path)
    return list(out.values())
