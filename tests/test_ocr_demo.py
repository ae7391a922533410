"""The text-recognition workflow as the README's example runs it: a CTC recogniser trained in seconds on drawn
digits (`scripts/ocr_demo.py`), grafted with --from, read by the graph and explained one character at a time,
each character's map on that character."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.test_readme import run_example

pytest.importorskip("torch")
pytestmark = pytest.mark.slow
LINE = re.compile(r"(\w+\+*): (\d+) of (\d+) lines read right; (\d+) of (\d+) characters' maps peak on the character")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("readme-ocr")
    result = run_example("ocr", folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, result.stdout


def test_the_graph_reads_the_lines_and_each_characters_map_lies_on_it(demo: tuple[Path, str]) -> None:
    _, stdout = demo
    found = {m[1]: [int(v) for v in m.groups()[1:]] for m in LINE.finditer(stdout)}
    assert set(found) == {"hirescam", "gradcam"}, stdout
    right, lines, hits, characters = found["hirescam"]
    assert right >= 0.9 * lines and characters >= 3 * right
    assert hits >= 0.9 * characters, "HiResCAM: each character's map peaks on its own columns"
    assert found["gradcam"][2] < 0.5 * found["gradcam"][3], "Grad-CAM's spatial mean spreads the weights over the line"


def test_explain_writes_the_text_and_one_map_per_character(demo: tuple[Path, str]) -> None:
    folder, stdout = demo
    truth = json.loads((folder / "ocr-demo" / "truth.json").read_text())
    text = next(v["text"] for k, v in truth.items() if k.endswith("line00.png"))
    assert f"text {text!r}" in stdout
    records = [json.loads(line) for line in (folder / "ocr-out" / "results.jsonl").read_text().splitlines()]
    assert [r["target"]["position"] for r in records] == list(range(len(text)))
    assert [r["target"]["label"] for r in records] == list(text) and {r["text"] for r in records} == {text}
    assert {r["target"]["method"] for r in records} == {"hirescam"}, "a recogniser's default method"
