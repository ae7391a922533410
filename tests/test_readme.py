"""The README is true: every code block runs as written after `bash scripts/demo.sh`, or says why not."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
BLOCK = re.compile(
    r"<!-- (?:example: (?P<name>[\w-]+)|not run: (?P<why>[^>]+?)) -->\n```(?P<lang>bash|python)\n(?P<code>.*?)```", re.S
)
NOT_RUN = {  # the only reasons a block may give for not being run here
    "this is what CI runs",
    "scripts/setup.sh runs these steps (CI runs it)",
    "needs the internet once (torchvision's checkpoint)",
    "needs the npm registry (CI's .ci/run runs it)",
}
EXAMPLES = {m["name"]: (m["lang"], m["code"]) for m in BLOCK.finditer(README) if m["name"]}
EXPECTED = {  # what each example's output must say
    "own": ["espresso", "report: onnxcam-out/index.html"],
    "tour": ["Egyptian cat", "gradcam map for tabby (281)", "layercam map for espresso", "all methods side by side"],
    "from": ["Egyptian cat", "yours/chelsea_285_egyptian-cat.png"],
    "byo": ["labels: file metadata (ultralytics)", "labels: sidecar config.json", "resize: timm pretrained_cfg",
            "mean: preset caffe", "size: flag --size", "every box: byo-yolo/chelsea_boxes.png", "astronaut"],
    "folder": ["explained 2 of 2 images", "explained 0 of 2 images (2 skipped, 0 failed)"],
    "eval": ["deletion_auc", "insertion_auc", "road_morf"],
    "api": ["tabby", "wrote api-out/tabby.png"],
    "ray": ["explained 2 of 2 images"],
    "web": ["wrote 9 files to site/", "class 285: wrote cat-overlay.png"],
    "int8": ["wrote 16 scenes", "wrote models/efficientnet_lite0.int8.onnx", "Egyptian cat"],
}
SLOW = {"from", "byo", "eval", "ray", "web", "int8"}  # torch export, ROAD, starting Ray, node, quantization
# torch makes the stand-in models; the Ray extra; quantize
NEEDS = {"from": "torch", "byo": "torch", "ray": "ray", "int8": "onnx"}
# run by tests/test_{bias,vit,detect,ocr,clip}_demo.py, which check meaning
OWN_TESTS = {"bias", "vit", "detect", "ocr", "clip"}


def test_every_code_block_is_run_or_says_why() -> None:
    fences = re.findall(r"^```(\w+)", README, re.M)
    blocks = list(BLOCK.finditer(README))
    assert len(blocks) == len(fences), "a ```bash or ```python block without <!-- example: NAME --> or <!-- not run -->"
    assert {m["why"] for m in blocks if m["why"]} <= NOT_RUN
    assert set(EXPECTED) | OWN_TESTS == set(EXAMPLES), "each example has its checks here or in its own test"


def test_the_install_block_is_what_setup_runs() -> None:
    install = next(m["code"] for m in BLOCK.finditer(README) if m["why"] and "setup.sh" in m["why"])
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    for spec in re.findall(r'pip install --quiet "([^"]+)"', setup):
        assert f'pip install "{spec}"' in install, spec


def test_the_rules_list_is_the_rules_table() -> None:
    """The README's list of the ops with a gradient rule is :data:`onnxcam_export.vjp.RULES`, no more, no less
    (it lacked Resize)."""
    pytest.importorskip("onnx")
    from onnxcam_export.vjp import RULES

    listed = re.search(r"<!-- rules -->(.*?)<!-- /rules -->", README, re.S)
    assert listed is not None, "the README marks its rules list"
    assert re.findall(r"`(\w+)`", listed.group(1)) == sorted(RULES)
    assert f"exactly these {len(RULES)} ops" in README
    from onnxcam_export.ops import ops_with

    flat = re.search(r"<!-- flat -->(.*?)<!-- /flat -->", README, re.S)
    assert flat is not None and re.findall(r"`(\w+)`", flat.group(1)) == sorted(ops_with("flat"))


def test_the_methods_table_lists_the_registered_methods() -> None:
    from onnxcam.methods import METHODS

    table = README.split("## CAM methods")[1].split("\n\n")[2]
    assert re.findall(r"^\| `([\w+-]+)`", table, re.M) == list(METHODS)


def run_example(name: str, folder: Path, model: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run README example ``name`` in ``folder``, laid out as the repository after `bash scripts/demo.sh`
    (``model``: the Lite0 model that the demo exports)."""
    for entry in ("examples", "scripts", "web"):
        (folder / entry).symlink_to(ROOT / entry)
    (folder / ".venv").symlink_to(Path(sys.prefix))
    (folder / "models").mkdir()
    if model is not None:
        (folder / "models" / "efficientnet_lite0.onnx").symlink_to(model)
    lang, code = EXAMPLES[name]
    command = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(command, capture_output=True, text=True, cwd=folder, env=env, timeout=900)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in EXPECTED]
)  # fmt: skip
def test_readme_example_runs_as_written(name: str, lite0_model: Path, tmp_path: Path) -> None:
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    if name == "web" and not (shutil.which("node") and (ROOT / "web" / "node_modules").is_dir()):
        pytest.skip("needs node and web/node_modules (npm ci --prefix web; .ci/run does it)")
    result = run_example(name, tmp_path, lite0_model)
    assert result.returncode == 0, result.stderr[-3000:]
    for phrase in EXPECTED[name]:
        assert phrase in result.stdout, (phrase, result.stdout[-3000:])


def test_the_blocks_that_need_more_than_the_demo_say_so_where_they_start() -> None:
    """"Every command below works after scripts/demo.sh" was false for the Ray and web/Node blocks."""
    for name, install in {"ray": "pip install '.[ray]'", "web": "npm ci --prefix web"}.items():
        before = README.split(f"<!-- example: {name} -->")[0][-700:]
        assert install in before, name
        assert install in README.split("## Explain your own photo")[0], "and the promise at the top says so"
