"""The Ray path against the local path on this machine: throughput and memory per actor.

    python benchmarks/distributed.py [--images 200] [--many 2000] [--rounds 3] [--model models/efficientnet_lite0.onnx]

Side by side in one process, in rounds of shuffled order: `onnxcam explain FOLDER` the local
way (one session, decoding and writing overlapped with ONNX Runtime) and on a local Ray with
2 CPUs with 1 and 2 actors (one session each), JPEG overlays, batch 8. Prints images/s (the
run's own time, start-up excluded), the median ratio of Ray's throughput to the local path's
and the overhead Ray adds per image. Last, 2 actors on ``--many`` images, with the peak RSS of
each actor process sampled from /proc, against the same on ``--images``: flat, or growing.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import ray

from onnxcam import Explainer, distributed
from onnxcam.folder import Options, run

sys.path.insert(0, str(Path(__file__).parent))
from folder import make_photos

ROOT = Path(__file__).resolve().parents[1]


class ActorMemory:
    """Peak VmRSS of every ExplainActor process, sampled every 50 ms while the block runs."""

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    if b"ExplainActor" not in (proc / "cmdline").read_bytes():
                        continue
                    rss = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("VmRSS"))
                except (OSError, StopIteration):
                    continue
                pid = int(proc.name)
                self.peaks[pid] = max(self.peaks.get(pid, 0), int(rss.split()[1]) * 1024)

    def __enter__(self) -> ActorMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def seconds(kind: str, explainer: Explainer, paths: list[str], out: Path) -> float:
    options = Options(out=out, overwrite=True, picture="jpg")
    if kind == "local":
        records = list(run(explainer, [Path(p) for p in paths], options))
    else:
        records = list(distributed.run(explainer, paths, options, actors=int(kind[-1]), progress=False))
    assert records[-1]["summary"]["explained"] == len(paths), records[-1]
    return records[-1]["summary"]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--many", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "efficientnet_lite0.onnx")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    explainer = Explainer(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_photos(work / "few", args.images)
        paths = [str(p) for p in sorted((work / "few").glob("*.jpg"))]
        runs: dict[str, list[float]] = {"local": [], "ray-1": [], "ray-2": []}
        for _ in range(args.rounds):
            for kind in random.sample(list(runs), len(runs)):
                runs[kind].append(seconds(kind, explainer, paths, work / f"out-{kind}"))
        print(f"| path ({args.model.name}, {args.images} images, batch 8, JPEG) | images/s | ratio to local | "
              "overhead ms/image |\n|---|---|---|---|")  # fmt: skip
        for kind, times in runs.items():
            ratio = statistics.median(a / b for a, b in zip(runs["local"], times, strict=True))
            overhead = 1000 * (statistics.median(times) - statistics.median(runs["local"])) / args.images
            print(f"| {kind} | {args.images / statistics.median(times):.1f} | {ratio:.2f} | {overhead:.1f} |")
        print("\n| 2 actors | images | images/s | peak RSS per actor MB |\n|---|---|---|---|")
        make_photos(work / "many", args.many)
        for folder, count in ((work / "few", args.images), (work / "many", args.many)):
            listed = [str(p) for p in sorted(folder.glob("*.jpg"))]
            with ActorMemory() as memory:
                elapsed = seconds("ray-2", explainer, listed, work / f"mem-{count}")
            peaks = ", ".join(f"{v / 2**20:.0f}" for v in sorted(memory.peaks.values()))
            print(f"| 2 | {count} | {count / elapsed:.1f} | {peaks} |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
