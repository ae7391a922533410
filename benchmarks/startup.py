"""Memory and start-up of one explanation in a fresh process: what ONNX Runtime's options and the file layout cost.

    python benchmarks/startup.py [--runs 3]

VGG16 (random weights: the cost does not depend on them) is exported once and stored both ways:
one .onnx file, and the .onnx with its weights in an external data file beside it (what
`onnxcam export` writes above 100 MB). Each variant (file layout x ONNX Runtime weight
pre-packing on/off) loads the model and explains the bundled cat in a fresh process; the table
gives the median wall time of the whole process, the peak RSS (VmHWM) and its ratio to the
weight bytes, and the warm explain time measured in the same process. Then the real command,
`onnxcam explain`, for VGG16 and EfficientNet-Lite0 with onnxcam's defaults.
Prints markdown and stores it in benchmarks/results.md (section "startup").
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxcam_export.torch_export import export_arch

sys.path.insert(0, str(Path(__file__).parent))
from process import run_cli, write_section

ROOT = Path(__file__).resolve().parents[1]
PHOTO = str(ROOT / "examples" / "chelsea.png")
VARIANT = """
import json, sys, time
start = time.perf_counter()
import onnxruntime as ort
from onnxcam import Explainer
options = ort.SessionOptions()
options.add_session_config_entry("session.disable_prepacking", sys.argv[2])
explainer = Explainer(sys.argv[1], session_options=options)
explainer.explain(sys.argv[3]).maps[0].cam  # (a map is finished when first read)
first = time.perf_counter() - start
warm = []
for _ in range(3):
    tick = time.perf_counter()
    explainer.explain(sys.argv[3]).maps[0].cam
    warm.append(time.perf_counter() - tick)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": first, "warm": min(warm), "peak": int(hwm.split()[1]) * 1024}))
"""


def variant(model: Path, prepacking: bool, runs: int) -> dict[str, float]:
    results = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", VARIANT, str(model), "0" if prepacking else "1", PHOTO],
                              capture_output=True, text=True, check=True)  # fmt: skip
        results.append(json.loads(done.stdout) | {"process": time.perf_counter() - start})
    return {key: statistics.median(r[key] for r in results) for key in results[0]} | {
        "peak": max(r["peak"] for r in results)
    }


def cli(model: Path, out: Path, runs: int) -> tuple[float, int]:
    timings = [run_cli("explain", PHOTO, "--model", str(model), "--out", str(out), "--quiet", "--overwrite")
               for _ in range(runs)]  # fmt: skip
    return statistics.median(t.seconds for t in timings), max(t.peak_rss for t in timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    lines = ["## Memory and start-up", "",
             f"`python benchmarks/startup.py --runs {args.runs}`, {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
             f"onnxruntime {ort.__version__}; one photo, whole fresh process, median of {args.runs} runs.",
             ""]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "external").mkdir()
        (folder / "single").mkdir()
        external = folder / "external" / "vgg16.onnx"
        export_arch("vgg16", "none", None, external)
        single = folder / "single" / "vgg16.onnx"
        onnx.save(onnx.load(external), single)
        weights = sum(t.ByteSize() for t in onnx.load(single, load_external_data=True).graph.initializer)
        lines += [f"VGG16, {weights / 1e6:.0f} MB of weights:", "",
                  "| file layout | ORT pre-packing | process s | warm explain s | peak RSS MB | peak / weights |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, model in (("one .onnx file", single), (".onnx + external data", external)):
            for prepacking in (True, False):
                r = variant(model, prepacking, args.runs)
                lines.append(f"| {name} | {'on' if prepacking else 'off'} | {r['process']:.2f} | {r['warm']:.3f} | "
                             f"{r['peak'] / 1e6:.0f} | {r['peak'] / weights:.2f} |")  # fmt: skip
                print(lines[-1], flush=True)
        lite0 = folder / "efficientnet_lite0.onnx"
        export_arch("efficientnet_lite0", "imagenet", None, lite0)
        lines += ["", "`onnxcam explain PHOTO` with onnxcam's defaults (no pre-packing; VGG16 with external data):", "",
                  "| model | process s | peak RSS MB |", "|---|---|---|"]  # fmt: skip
        for name, model in (("VGG16", external), ("EfficientNet-Lite0", lite0)):
            seconds, peak = cli(model, folder / "out", args.runs)
            lines.append(f"| {name} | {seconds:.2f} | {peak / 1e6:.0f} |")
            print(lines[-1], flush=True)
    write_section("startup", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
