"""Shared by the benchmarks: the onnxcam CLI run in a fresh process (wall time, peak RSS), :func:`finished`, the
contenders timed in alternated rounds (:func:`alternated`) and the CPU named beside the figures (:func:`cpu`)."""

from __future__ import annotations

import platform
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# VmHWM, the peak resident set of this process image: unlike ru_maxrss it does not inherit the
# parent's peak across fork + exec (the parent may have just exported models with torch).
WRAPPER = """
import runpy, sys
sys.argv = ["onnxcam", *sys.argv[1:]]
try:
    runpy.run_module("onnxcam", run_name="__main__")
except SystemExit as exit:
    code = exit.code
else:
    code = 0
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("peak_rss_kb", hwm.split()[1], file=sys.stderr)
sys.exit(code)
"""


def cpu() -> str:
    """The CPU's model and its widest vector instructions (INT8 and speed figures depend on them)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = [("avx512_vnni", "AVX-512 VNNI"), ("avx512f", "AVX-512"), ("avx2", "AVX2")]
    isa = next((shown for flag, shown in flags if flag in text), "?")
    return f"{name or platform.processor()} ({isa})"


def alternated(contenders: dict[str, Callable[[], object]], rounds: int,
               order: random.Random | None = None) -> dict[str, list[float]]:  # fmt: skip
    """Seconds of each contender per round: each run once to warm up, then every round runs all of them in a
    shuffled order (``order``: default seeded 0), with a pause before each, so that idle worker threads of one do
    not slow the next."""
    for run in contenders.values():
        run()
    order = order or random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        names = list(contenders)
        order.shuffle(names)
        for name in names:
            time.sleep(0.05)
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return times


def finished(results: list) -> list:
    """``Explainer.explain_batch``'s results with every map finished: a map (``TargetMap.cam``: upsampled to the
    photo, min-max scaled) is computed when first read, and a timed explanation must include it."""
    for result in results:
        for m in result.maps:
            m.cam  # noqa: B018
    return results


@dataclass(frozen=True)
class Run:
    seconds: float  # the whole command, start-up and model loading included
    peak_rss: int  # bytes
    stdout: str

    @property
    def loop_seconds(self) -> float:
        """The time ``onnxcam explain`` reports for its images ("in X s"), start-up excluded."""
        return float(re.search(r" in ([\d.]+) s;", self.stdout).group(1))


def run_cli(*args: str) -> Run:
    """Run ``onnxcam ARGS...`` in a fresh process; raises if the command fails."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"onnxcam {' '.join(args)} failed: {result.stderr[-2000:]}")
    rss = int(next(line.split()[1] for line in result.stderr.splitlines() if line.startswith("peak_rss_kb")))
    return Run(seconds, rss * 1024, result.stdout)


RESULTS = Path(__file__).parent / "results.md"


def write_section(name: str, text: str) -> None:
    """Put ``text`` into benchmarks/results.md between its ``<!-- NAME -->`` markers (appended the first time)."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    current = RESULTS.read_text() if RESULTS.exists() else ""
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in current and end in current:
        before, rest = current.split(begin, 1)
        current = before + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(current)
