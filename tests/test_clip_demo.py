"""The image-text workflow as the README's example runs it: a CLIP-style model trained in seconds on drawn scenes
(`scripts/clip_demo.py`), exported as optimum does, grafted with --from and explained by text prompts: each
present object's prompt map on that object, absent objects' prompts ranked below, and --like on a shared object."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.test_readme import run_example

pytest.importorskip("torch")
pytest.importorskip("tokenizers")
pytestmark = pytest.mark.slow
COUNTS = re.compile(r"^(pointing|apart|absent|like): (\d+) of (\d+)", re.M)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("readme-clip")
    result = run_example("clip", folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, result.stdout


def test_each_prompts_map_lies_on_its_object_and_absent_objects_score_lower(demo: tuple[Path, str]) -> None:
    _, stdout = demo
    found = {m[1]: (int(m[2]), int(m[3])) for m in COUNTS.finditer(stdout)}
    assert set(found) == {"pointing", "apart", "absent", "like"}, stdout
    hits, total = found["pointing"]
    assert total == 100 and hits >= 0.9 * total, "each present object's prompt map peaks inside the object"
    assert found["apart"][0] >= 0.9 * found["apart"][1], "the two present prompts' maps differ"
    assert found["absent"][0] >= 0.9 * found["absent"][1], "an absent object's prompt scores below the present ones"
    good, pairs = found["like"]
    assert pairs == 25 and good >= 0.9 * pairs, "--like puts the map on the shared object"


def test_explain_writes_one_map_per_prompt_with_its_logit_and_probability(demo: tuple[Path, str]) -> None:
    folder, stdout = demo
    records = [json.loads(line) for line in (folder / "clip-out" / "results.jsonl").read_text().splitlines()]
    assert [r["target"]["label"] for r in records] == ["a red circle", "a blue square", "a green triangle"]
    assert abs(sum(p["probability"] for p in records[0]["predictions"]) - 1) < 1e-4, "the softmax over the prompts"
    present, absent = records[:2], records[2]
    assert min(r["target"]["logit"] for r in present) > absent["target"]["logit"]
    assert all((folder / r["overlay"]).is_file() for r in records)
    assert "logit scale: measured from 'logits_per_image'" in stdout
