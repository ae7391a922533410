"""The same explain run on a Ray cluster (``pip install '.[ray]'`` from the clone), with Ray Data doing the work.

The driver plans the run exactly as :func:`onnxcam.folder.run` does (lock, ``run.json``,
``--resume``, unique output stems), then Ray Data streams ``(path, stem)`` rows through a
pool of actors. Each actor holds one ONNX Runtime session, loaded once, and runs the local
:class:`onnxcam.folder.Worker` on its batches: same decoding, same files, same records,
every failure a record. The driver appends the records to ``results.jsonl`` as they arrive,
then writes ``results.parquet`` and the same ``index.html``. An actor that dies is restarted
and its batch retried (its files are rewritten atomically), so a lost worker costs a retry,
not an image.

Images and the model may be local paths or URIs of any filesystem pyarrow knows (``s3://``,
``gs://``, ``file://``, ...): each actor reads the model itself (a path it cannot see is an
error; give a URI on a cluster). ``--out`` is a folder every worker can write (a local
folder for a local Ray, a shared mount on a cluster).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort

from onnxcam import outputs
from onnxcam.api import Explainer, Request
from onnxcam.errors import OnnxcamError
from onnxcam.folder import Driver, Options, Worker, plan, read_local
from onnxcam.image import decode_rgb
from onnxcam.inputs import IMAGE_EXTENSIONS

ADDRESS = re.compile(r"^(local|auto|ray://[^\s/]+|[\w.-]+:\d+)$")


def _ray() -> ModuleType:
    try:
        import ray
        import ray.data
    except ImportError:
        raise OnnxcamError("--ray needs Ray: pip install '.[ray]' from the onnxcam clone") from None
    return ray


def is_uri(path: str) -> bool:
    return "://" in path


def read_any(path: str, options: Options) -> np.ndarray:
    """An image from a local path, or from a URI through pyarrow's filesystems, with the same checks."""
    if not is_uri(path):
        return read_local(path, options)
    from pyarrow import fs

    filesystem, where = fs.FileSystem.from_uri(path)
    info = filesystem.get_file_info(where)
    if info.type != fs.FileType.File:
        raise OnnxcamError(f"image {path} {'not found' if info.type == fs.FileType.NotFound else 'is not a file'}")
    if info.size > options.max_bytes:
        raise OnnxcamError(f"image {path} is {info.size:,} bytes, over the limit of {options.max_bytes:,}")
    with filesystem.open_input_file(where) as f:
        return decode_rgb(f.read(), path, options.max_pixels)


def expand_uris(items: list[str]) -> list[str]:
    """Image files below each URI (a folder is listed recursively), in sorted order."""
    from pyarrow import fs

    found: list[str] = []
    for item in items:
        filesystem, where = fs.FileSystem.from_uri(item)
        info = filesystem.get_file_info(where)
        if info.type == fs.FileType.Directory:
            listed = filesystem.get_file_info(fs.FileSelector(where, recursive=True))
            scheme = item.split("://")[0]
            images = [i.path for i in listed if i.type == fs.FileType.File]
            found += sorted(f"{scheme}://{p}" for p in images if Path(p).suffix.lower() in IMAGE_EXTENSIONS)
        else:
            found.append(item)
    return found


def _model_bytes(model: str) -> bytes:
    if not is_uri(model):
        return Path(model).read_bytes()
    from pyarrow import fs

    filesystem, where = fs.FileSystem.from_uri(model)
    with filesystem.open_input_file(where) as f:
        return f.read()


def fetch_model(model: str, folder: Path) -> Path:
    """A model given as a URI, copied into ``folder`` (the driver reads its card there); a path as it is."""
    if not is_uri(model):
        return Path(model)
    local = folder / Path(model.split("://", 1)[1]).name
    try:
        local.write_bytes(_model_bytes(model))
    except OSError as exc:
        raise OnnxcamError(f"cannot read the model {model}: {exc}") from None
    return local


class ExplainActor:
    """One Ray actor: one ONNX Runtime session (loaded once) running the local Worker on its batches."""

    def __init__(self, model: str, options: Options, threads: int, base: str, request: Request | None = None,
                 mirrors: dict[str, str] | None = None) -> None:  # fmt: skip
        local = Path(model if is_uri(model) or os.path.isabs(model) else os.path.join(base, model))
        if is_uri(model) or not local.is_file():  # a URI, or a path this worker cannot see: fetch it once
            local = fetch_model(model, Path(tempfile.mkdtemp(prefix="onnxcam-actor-")))
        session = ort.SessionOptions()
        session.intra_op_num_threads = threads
        explainer = Explainer(local, session_options=session)

        def read(path: str, o: Options) -> np.ndarray:  # relative paths are the driver's
            return read_any(path if is_uri(path) or os.path.isabs(path) else os.path.join(base, path), o)

        # a retried batch rewrites its files; the request is the driver's, resolved once for the run
        self.worker = Worker(explainer, options, read=read, replace=True, request=request, mirrors=mirrors)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lines = self.worker([(str(p), str(s)) for p, s in zip(batch["path"], batch["stem"], strict=True)])
        return {"record": np.array([json.dumps(r) for r in lines], dtype=object)}


def contain_terminal(quiet: bool, scratch: Path) -> None:
    """For the command line, before Ray starts and for the rest of the process: keep stdout onnxcam's.

    Ray prints its raylet's lines (an actor that died) to ``sys.stdout``, which becomes stderr here: the caller
    writes its own output to the ``sys.stdout`` it held before. With ``quiet``, what Ray writes to the terminal
    (those lines, its C++ core worker's log lines, its warnings) goes to ``scratch/ray.log`` instead: file
    descriptor 2 points there, and ``sys.stderr`` keeps the terminal for onnxcam's own lines.
    """
    _ray()  # imported first: its log handlers hold the sys.stderr of their import, file descriptor 2
    if quiet:
        log = os.open(scratch / "ray.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        terminal = os.dup(2)
        os.dup2(log, 2)
        os.close(log)
        sys.stdout = sys.__stderr__  # (its file descriptor is 2: the log)
        sys.stderr = open(terminal, "w", buffering=1, encoding=sys.__stderr__.encoding, errors="backslashreplace")  # noqa: SIM115
    else:
        sys.stdout = sys.stderr


def connect(address: str, cpus: int | None = None, quiet: bool = False) -> None:
    """Join the cluster at ``address`` (``local``: a Ray on this machine), unless already connected."""
    if not ADDRESS.match(address):
        raise OnnxcamError(f"--ray-address takes 'local', 'auto', host:port or ray://host:port; got {address!r}")
    ray = _ray()
    logging.getLogger("ray.data").setLevel(logging.ERROR if quiet else logging.WARNING)
    if not ray.is_initialized():
        local = address == "local"
        ray.init(address=None if local else address, num_cpus=cpus if local else None, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)  # fmt: skip


def explain_rows(dataset: object, model: str, options: Options, actors: int, threads: int = 1,
                 request: Request | None = None, mirrors: dict[str, str] | None = None) -> object:  # fmt: skip
    """A Ray Dataset of ``(path, stem)`` rows -> a Dataset of ``record`` rows (JSON, one per image and target).

    For teams with a Ray pipeline: the files are written into ``options.out`` as a local run
    writes them; the records say where. ``mirrors``: ``--both``'s reference images' stems (:attr:`Plan.mirrors`).
    """
    ray = _ray()
    kwargs = {"model": model, "options": options, "threads": threads, "base": os.getcwd(), "request": request,
              "mirrors": mirrors}  # fmt: skip
    # Ray Data restarts a dead actor and retries its batch (max_restarts and max_task_retries default to -1)
    return dataset.map_batches(
        ExplainActor, fn_constructor_kwargs=kwargs, batch_size=options.batch_size, num_cpus=threads,
        compute=ray.data.ActorPoolStrategy(size=actors), batch_format="numpy",
    )  # fmt: skip


def _check_empty(out: Path) -> None:
    """A Ray run rewrites the files of retried batches: ``out`` may hold nothing but this run's own files."""
    ours = {outputs.LOCK, outputs.SETTINGS, outputs.RESULTS, outputs.REPORT, outputs.PARQUET}
    if any(p.name not in ours for p in out.iterdir()):
        raise OnnxcamError(
            f"--ray writes into a new or empty folder (retried batches rewrite their files); {out} holds other "
            "files: choose another --out, or --resume / --overwrite an earlier run there"
        )


def run(
    explainer: Explainer, paths: list[str], options: Options, address: str = "local", actors: int | None = None,
    progress: bool = True, warnings: list[str] = (), request: Request | None = None,
) -> Iterator[dict]:  # fmt: skip
    """:func:`onnxcam.folder.run` on Ray: yields every record as it arrives, then the summary."""
    ray = _ray()
    out = options.out
    request = request or options.request(explainer)  # a bad request fails before Ray starts
    connect(address, quiet=not progress)
    actors = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    ray.data.DataContext.get_current().enable_progress_bars = progress
    with outputs.owned(out):
        if not options.resume and not options.overwrite:
            _check_empty(out)
        work = plan(explainer, paths, options)
        if options.overwrite:
            _check_empty(out)
        driver = Driver(out, work.summary)
        if work.todo:
            rows = ray.data.from_items([{"path": p, "stem": s} for p, s in work.todo])
            resolved = replace(options, out=out.resolve())  # actors may run elsewhere: they write to the full path
            results = explain_rows(rows, str(explainer.engine.path), resolved, actors, request=request,
                                   mirrors=work.mirrors)  # fmt: skip
            for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
                yield from driver.append([_as_given(json.loads(r), resolved.out, out) for r in batch["record"]])
            outputs.remove_partials(out)  # an actor killed while writing left its temporary; its batch was redone
        yield driver.end(warnings, parquet="write")


def _as_given(record: dict, resolved: Path, given: Path) -> dict:
    """A record's file names under ``--out`` as the user gave it (so they equal a local run's)."""
    for key in outputs.FILE_KEYS:
        if record.get(key):
            record[key] = str(given / Path(record[key]).relative_to(resolved))
    if record.get("sheets"):
        record["sheets"] = [str(given / Path(s).relative_to(resolved)) for s in record["sheets"]]
    return record
