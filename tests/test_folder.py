"""Explaining folders: odd and broken files, batching, interrupt and resume, the HTML report."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import EXAMPLES, ROOT

Image = pytest.importorskip("PIL.Image", reason="pillow writes the palette, CMYK and EXIF fixtures")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxcam", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)  # fmt: skip


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    """Every kind of file a real folder holds; maps name -> the phrase its error must contain (None: fine)."""
    root = tmp_path_factory.mktemp("odd")
    (root / "sub" / "deeper").mkdir(parents=True)
    cat = cv2.imread(str(EXAMPLES / "chelsea.png"))
    small = cv2.resize(cat, (120, 80))
    rgb = Image.fromarray(cv2.cvtColor(small, cv2.COLOR_BGR2RGB))
    cv2.imwrite(str(root / "cat.png"), small)
    cv2.imwrite(str(root / "sub" / "GRAY.PNG"), cv2.cvtColor(small, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(root / "sub" / "rgba.png"), cv2.cvtColor(small, cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(root / "sub" / "deep16.png"), small.astype(np.uint16) * 257)
    rgb.convert("P").save(root / "sub" / "palette.png")
    rgb.convert("CMYK").save(root / "sub" / "deeper" / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 80 x 120
    rgb.save(root / "rotated.JPG", exif=exif.tobytes())
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG")
    (root / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.png").write_text("not an image")
    (root / "readme.txt").write_text("ignored: not an image extension")
    cv2.imwrite(str(root / "big.png"), cv2.resize(cat, (400, 300)))
    locked = root / "locked.png"
    cv2.imwrite(str(locked), small)
    locked.chmod(0)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    readable = os.access(locked, os.R_OK)  # root reads anything
    expected = {
        "cat.png": None, "GRAY.PNG": None, "rgba.png": None, "deep16.png": None, "palette.png": None,
        "cmyk.jpg": None, "rotated.JPG": None, "cut.jpg": "truncated JPEG", "empty.jpg": "empty (0 bytes)",
        "notes.png": "not a readable image", "big.png": "over the limit of 100,000",
        "locked.png": None if readable else "Permission denied",
    }  # fmt: skip
    return root, expected


def test_odd_folder_completes_and_reports_each_bad_file(
    odd_folder: tuple[Path, dict[str, str | None]], lite0_model: Path, tmp_path: Path
) -> None:
    root, expected = odd_folder
    out = tmp_path / "out"
    result = run("explain", str(root), "--model", str(lite0_model), "--out", str(out), "--max-pixels", "100000",
                 "--batch-size", "3", "--quiet")  # fmt: skip
    bad = {name for name, phrase in expected.items() if phrase}
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == len(bad) and "Traceback" not in result.stderr
    records = {Path(r["path"]).name: r for r in _records(out)}
    assert set(records) == set(expected), "each file once: the symlink loop is not followed twice"
    for name, phrase in expected.items():
        if phrase:
            assert phrase in records[name]["error"], (name, records[name]["error"])
        else:
            assert records[name]["error"] is None and Path(records[name]["overlay"]).is_file(), name
    good = len(expected) - len(bad)
    assert f"explained {good} of {len(expected)} images (0 skipped, {len(bad)} failed)" in result.stdout
    assert records["rotated.JPG"]["size"] == [80, 120], "EXIF orientation applied"
    assert records["cat.png"]["target"]["class"] in range(281, 286)
    for name in ("GRAY.PNG", "rgba.png", "deep16.png", "palette.png", "cmyk.jpg"):
        assert records[name]["size"] == [120, 80]


def test_batched_results_equal_one_at_a_time(lite0_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(["chelsea.png", "coffee.png", "chelsea.png", "coffee.png", "chelsea.png"]):
        image = cv2.imread(str(EXAMPLES / name))
        cv2.imwrite(str(folder / f"{i}.png"), np.ascontiguousarray(image[:, i * 7 :]))  # five different crops
    for batch in ("1", "4"):
        result = run("explain", str(folder), "--model", str(lite0_model), "--out", str(tmp_path / batch),
                     "--batch-size", batch, "--top-k", "2", "--quiet")  # fmt: skip
        assert result.returncode == 0, result.stderr
    one, four = _records(tmp_path / "1"), _records(tmp_path / "4")
    assert [(r["path"], r["target"]["class"]) for r in one] == [(r["path"], r["target"]["class"]) for r in four]
    for a, b in zip(one, four, strict=True):
        np.testing.assert_allclose(np.load(a["map"]), np.load(b["map"]), atol=1e-4)
        assert a["predictions"][0]["class"] == b["predictions"][0]["class"]


def test_interrupted_run_resumes_to_the_same_outputs(lite0_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(10):
        image = cv2.imread(str(EXAMPLES / ("chelsea.png" if i % 2 else "coffee.png")))
        cv2.imwrite(str(folder / f"{i:02d}.png"), np.ascontiguousarray(image[i * 5 :, : 300 + i * 5]))
    args = [sys.executable, "-m", "onnxcam", "explain", str(folder), "--model", str(lite0_model), "--batch-size", "1",
            "--quiet", "--panel"]  # fmt: skip
    partial = tmp_path / "partial"
    process = subprocess.Popen([*args, "--out", str(partial)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        results = partial / "results.jsonl"
        if results.is_file() and len(results.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr.decode()
    assert "--resume" in stderr.decode() and b"Traceback" not in stderr
    assert not list(partial.glob("*.partial")) and not list(partial.glob(".*.partial"))
    done_before = len(_records(partial))
    assert 3 <= done_before < 10
    resumed = subprocess.run([*args, "--out", str(partial), "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({done_before} skipped, 0 failed)" in resumed.stdout
    whole = tmp_path / "whole"
    assert subprocess.run([*args, "--out", str(whole)], cwd=ROOT, capture_output=True).returncode == 0
    assert sorted(p.name for p in partial.iterdir()) == sorted(p.name for p in whole.iterdir())
    key = lambda r: (r["path"], r["target"]["class"])  # noqa: E731
    a, b = sorted(_records(partial), key=key), sorted(_records(whole), key=key)
    assert [key(r) for r in a] == [key(r) for r in b]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.load(x["map"]), np.load(y["map"]))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_html_report_in_a_headless_browser(lite0_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(["chelsea.png", "coffee.png", "chelsea.png"]):
        cv2.imwrite(str(folder / f"{i}.png"), cv2.imread(str(EXAMPLES / name))[i * 3 :])
    (folder / "broken.png").write_text("not an image")
    out = tmp_path / "report"
    result = run("explain", str(folder), "--model", str(lite0_model), "--out", str(out), "--quiet", "--keep-going")
    assert result.returncode == 0, result.stderr
    cat = next(r["predictions"][0]["class"] for r in _records(out) if r["path"].endswith("0.png"))

    def load(fragment: str) -> tuple[str, str]:
        profile = tmp_path / f"profile{len(fragment)}"
        page = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000",
             "--dump-dom", (out / "index.html").as_uri() + fragment],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        return page.stdout, page.stderr

    dom, log = load("")
    assert dom.count('class="card"') == 3 and dom.count('class="card error"') == 1
    assert "4 of 4 images" in dom
    assert ":CONSOLE" not in log, "the page logged to the console (an error?): " + log[-2000:]
    filtered, _ = load(f"#class={cat}")
    assert filtered.count(' hidden=""') == 2, "the coffee card and the failed card are hidden"
    assert "2 of 4 images" in filtered


def test_globs_and_list_files_expand_to_each_file_once(tmp_path: Path) -> None:
    from onnxcam.errors import OnnxcamError
    from onnxcam.inputs import expand

    for name in ("a.JPG", "b.png", "sub/c.jpeg", "sub/d.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# photos\n{tmp_path / 'b.png'}\n\n{tmp_path / 'sub'}\n")
    found = expand([str(tmp_path / "*.png"), f"@{listing}", str(tmp_path / "a.JPG"), str(tmp_path)])
    assert [p.name for p in found] == ["b.png", "c.jpeg", "a.JPG"]
    assert [p.name for p in expand([str(tmp_path / "**" / "*.jpeg")])] == ["c.jpeg"]
    with pytest.raises(OnnxcamError, match="matches no file"):
        expand([str(tmp_path / "*.gif")])
    with pytest.raises(OnnxcamError, match="cannot read the list file"):
        expand([f"@{tmp_path / 'missing.txt'}"])
