"""The Ray path (`onnxcam explain --ray`) against the local path, on a local Ray with 2 CPUs.

Same records and maps as a local run of the same folder, a killed actor costs a retry and
not an image, and --resume works across the two paths.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest

from onnxcam import Explainer, outputs
from onnxcam.folder import Options, run
from tests.conftest import EXAMPLES

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'onnxcam[ray]'; CI installs it)")
pytestmark = pytest.mark.slow

from onnxcam import distributed  # noqa: E402  (needs ray)


@pytest.fixture(scope="module")
def local_ray() -> None:
    """A Ray instance with 2 CPUs for this module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _actor_pids() -> list[int]:
    """Process ids of the live onnxcam actors (Ray titles its worker processes after the actor's class)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"ExplainActor" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("photos")
    sources = [cv2.imread(str(EXAMPLES / n)) for n in ("chelsea.png", "coffee.png")]
    for i in range(200):
        crop = sources[i % 2][i % 40 :, (7 * i) % 50 :]
        cv2.imwrite(str(folder / f"{i:03d}.jpg"), cv2.resize(crop, (500, 375)), [cv2.IMWRITE_JPEG_QUALITY, 90])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return [str(p) for p in sorted(folder.iterdir())]


def _by_image(out: Path) -> dict[tuple[str, int], dict]:
    records = outputs.read_records(out / outputs.RESULTS)
    return {(r["path"], r.get("target", {}).get("class", -1)): r for r in records}


def _same_run(local: Path, remote: Path) -> None:
    """Identical records (file names relative to their folder) and maps equal to 1e-6."""
    a, b = _by_image(local), _by_image(remote)
    assert a.keys() == b.keys()
    for key, x in a.items():
        y = b[key]
        for name in ("overlay", "map"):
            if x.get(name):
                assert Path(x[name]).name == Path(y[name]).name
                x[name] = y[name] = Path(x[name]).name
        assert x == y, key
        if x.get("map"):
            np.testing.assert_allclose(np.load(local / x["map"]), np.load(remote / y["map"]), atol=1e-6)


@pytest.mark.parametrize(("fixture", "count"), [("lite0_model", 200), ("vgg16_model", 24)])
def test_a_ray_run_equals_a_local_run(
    fixture: str, count: int, photos: list[str], local_ray: None, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """VGG16 (random weights, ~6 images/s here) on 24 of the images keeps the suite's time in bounds."""
    explainer = Explainer(request.getfixturevalue(fixture))
    paths = photos[:count] + photos[-1:]  # and the broken one
    local = list(run(explainer, [Path(p) for p in paths], Options(out=tmp_path / "local")))
    remote = list(distributed.run(explainer, paths, Options(out=tmp_path / "ray"), progress=False))
    assert local[-1]["summary"]["failed"] == remote[-1]["summary"]["failed"] == 1
    assert local[-1]["summary"]["explained"] == remote[-1]["summary"]["explained"] == count
    _same_run(tmp_path / "local", tmp_path / "ray")
    table = pytest.importorskip("pyarrow.parquet").read_table(tmp_path / "ray" / outputs.PARQUET)
    assert table.num_rows == count + 1 and sum("broken" in p for p in table.column("path").to_pylist()) == 1
    assert (tmp_path / "ray" / "index.html").read_text().count('{"path": ') == count + 1


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the actor's process through /proc")
def test_a_killed_actor_costs_a_retry_not_an_image(
    lite0_model: Path, photos: list[str], local_ray: None, tmp_path: Path
) -> None:
    explainer = Explainer(lite0_model)
    options = Options(out=tmp_path / "out", batch_size=4)
    killed = []
    records = []
    for record in distributed.run(explainer, photos[:120], options, progress=False):
        records.append(record)
        if not killed and len(records) >= 8 and _actor_pids():
            killed.append(_actor_pids()[0])
            os.kill(killed[0], signal.SIGKILL)
    assert killed and records[-1]["summary"]["explained"] == 120 and records[-1]["summary"]["failed"] == 0
    by_path = {r["path"] for r in outputs.read_records(options.out / outputs.RESULTS)}
    assert by_path == set(photos[:120])
    assert not list(options.out.glob(".*partial*"))


def test_resume_works_across_local_and_ray_runs(
    lite0_model: Path, photos: list[str], local_ray: None, tmp_path: Path
) -> None:
    explainer = Explainer(lite0_model)
    out = tmp_path / "out"
    list(run(explainer, [Path(p) for p in photos[:30]], Options(out=out)))
    resumed = list(distributed.run(explainer, photos[:60], Options(out=out, resume=True), progress=False))
    assert resumed[-1]["summary"] == {**resumed[-1]["summary"], "skipped": 30, "explained": 30, "failed": 0}
    again = list(run(explainer, [Path(p) for p in photos[:60]], Options(out=out, resume=True)))
    assert again[-1]["summary"]["skipped"] == 60
    whole = tmp_path / "whole"
    list(run(explainer, [Path(p) for p in photos[:60]], Options(out=whole)))
    _same_run(whole, out)
    with pytest.raises(distributed.OnnxcamError, match="--method"):
        next(distributed.run(explainer, photos[:60], Options(out=out, resume=True, methods=["layercam"])))


def test_a_ray_run_refuses_a_folder_with_other_files(lite0_model: Path, local_ray: None, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(distributed.OnnxcamError, match="new or empty folder"):
        next(distributed.run(Explainer(lite0_model), [str(EXAMPLES / "chelsea.png")], Options(out=tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"], "left as it was (no lock file either)"


def test_images_and_model_from_uris(lite0_model: Path, photos: list[str], local_ray: None, tmp_path: Path) -> None:
    """Any filesystem pyarrow knows (here file://, as s3:// would be): a folder URI is listed, the model fetched."""
    from tests.test_cli import run as cli

    folder = Path(photos[0]).parent
    out = tmp_path / "out"
    result = cli("explain", folder.as_uri(), "--model", lite0_model.as_uri(), "--out", str(out), "--ray", "--quiet",
                 "--keep-going")  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = outputs.read_records(out / outputs.RESULTS)
    assert {r["path"] for r in records} == {Path(p).as_uri() for p in photos}
    assert sum(bool(r["error"]) for r in records) == 1 and "explained 200 of 201 images" in result.stdout
    uri = cli("explain", folder.as_uri(), "--model", str(lite0_model), "--out", str(tmp_path / "o2"))
    assert uri.returncode == 2 and "needs --ray" in uri.stderr


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the actor's process through /proc")
def test_a_quiet_json_ray_run_prints_its_document_and_nothing_of_rays(
    lite0_model: Path, photos: list[str], tmp_path: Path
) -> None:
    """`--ray --quiet --json`: stdout is the JSON document alone, even when an actor dies (Ray prints its raylet's
    lines to stdout), and stderr holds nothing (Ray's core-worker "E" lines, its auth-token warning)."""
    import subprocess
    import sys
    import time

    before = set(_actor_pids())
    command = [sys.executable, "-m", "onnxcam", "explain", *photos[:60], "--model", str(lite0_model), "--ray",
               "--quiet", "--json", "--batch-size", "4", "--out", str(tmp_path / "out")]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    results = tmp_path / "out" / outputs.RESULTS
    while process.poll() is None and killed is None:
        fresh = [p for p in _actor_pids() if p not in before]
        if fresh and results.exists() and results.stat().st_size:  # an actor has finished a batch
            killed = fresh[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert killed is not None, "the run ended before an actor could be killed"
    document = json.loads(stdout)
    assert len(document["images"]) == 60 and document["summary"]["failed"] == 0
    assert stderr == ""
