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


@pytest.mark.slow  # real processes, interrupted or racing
def test_interrupted_run_resumes_to_the_same_outputs(lite0_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(10):
        image = cv2.imread(str(EXAMPLES / ("chelsea.png" if i % 2 else "coffee.png")))
        cv2.imwrite(str(folder / f"{i:02d}.png"), np.ascontiguousarray(image[i * 5 :, : 300 + i * 5]))
    args = [sys.executable, "-m", "onnxcam", "explain", str(folder), "--model", str(lite0_model), "--batch-size", "1",
            "--quiet", "--panel"]  # fmt: skip
    partial = tmp_path / "partial"
    # SIGINT as a terminal delivers it: a shell's background job (CI may be one) ignores SIGINT, and its children
    # would inherit that
    process = subprocess.Popen([*args, "--out", str(partial)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
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


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_html_report_in_a_headless_browser(lite0_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(["chelsea.png", "coffee.png", "chelsea.png"]):
        cv2.imwrite(str(folder / f"{i}.png"), cv2.imread(str(EXAMPLES / name))[i * 3 :])
    cv2.imwrite(str(folder / "z#?% <!--<script>.png"), cv2.imread(str(EXAMPLES / "coffee.png")))  # once: no cards
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
    assert dom.count('class="card"') == 4 and dom.count('class="card error"') == 1
    assert "5 of 5 images" in dom
    assert ":CONSOLE" not in log, "the page logged to the console (an error?): " + log[-2000:]
    filtered, _ = load(f"#class={cat}")
    assert filtered.count(' hidden=""') == 3, "the coffee cards and the failed card are hidden"
    assert "2 of 5 images" in filtered


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


def _photo(path: Path, crop: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.imread(str(EXAMPLES / "chelsea.png"))[crop:, crop:])
    return path


def test_same_stems_in_different_folders_get_different_outputs(lite0_model: Path, tmp_path: Path) -> None:
    for i, name in enumerate(["a/cat.png", "b/cat.png", "c/cat-2.png"]):
        _photo(tmp_path / "in" / name, crop=10 * i)
    out = tmp_path / "out"
    result = run("explain", str(tmp_path / "in"), "--model", str(lite0_model), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    records = _records(out)
    assert len({r["overlay"] for r in records}) == 3 and len({r["map"] for r in records}) == 3
    for r in records:  # each map is its own image's: the three crops differ
        np.testing.assert_equal(np.load(r["map"]).shape, cv2.imread(r["path"]).shape[:2])


def test_long_names_and_labels_are_shortened_not_fatal(tmp_path: Path) -> None:
    """A 234-character file name and a 300-character class label: File name too long, before."""
    from tests.test_passes import build_tiny

    model = build_tiny(tmp_path)
    labelled = tmp_path / "labelled.cam.onnx"
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{'very long label ' * 19}{i}\n" for i in range(5)))
    from onnxcam_export.from_onnx import graft_file

    graft_file(tmp_path / "tiny.onnx", labelled, labels=labels)
    photo = _photo(tmp_path / "in" / ("x" * 230 + ".png"))
    out = tmp_path / "out"
    for m in (model, labelled):
        result = run("explain", str(photo), "--model", str(m), "--out", str(out), "--quiet", "--overwrite")
        assert result.returncode == 0, result.stderr
        (record,) = _records(out)
        assert Path(record["overlay"]).is_file() and len(Path(record["overlay"]).name.encode()) < 255


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_pipes_and_devices_are_not_regular_files(lite0_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    _photo(folder / "cat.png")
    os.mkfifo(folder / "pipe.jpg")
    os.mkfifo(tmp_path / "list.txt")
    out = tmp_path / "out"
    result = run("explain", str(folder), "--model", str(lite0_model), "--out", str(out), "--quiet")
    assert result.returncode == 2 and "pipe.jpg is not a regular file" in result.stderr
    assert len(_records(out)) == 2
    for listing in ("/dev/zero", str(tmp_path / "list.txt")):  # MemoryError and a hang, before
        result = run("explain", f"@{listing}", "--model", str(lite0_model), "--out", str(tmp_path / "o2"))
        assert result.returncode == 2 and "is not a regular file" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_resume_with_other_settings_is_refused_naming_the_setting(lite0_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    for i in range(2):
        _photo(folder / f"{i}.png", crop=5 * i)
    out = tmp_path / "out"
    base = ["explain", str(folder), "--model", str(lite0_model), "--out", str(out), "--quiet"]
    assert run(*base).returncode == 0
    for extra, setting in [(["--method", "layercam"], "--method"), (["--top-k", "3"], "--top-k"),
                           (["--target", "tabby"], "--target"), (["--alpha", "0.5"], "--alpha"),
                           (["--panel"], "--panel")]:  # fmt: skip
        result = run(*base, "--resume", *extra)
        assert result.returncode == 2 and f"{setting} (now" in result.stderr, result.stderr
    copy = tmp_path / "other.onnx"
    copy.write_bytes(lite0_model.read_bytes())  # the same model under another name resumes
    result = run(*base[:2], "--model", str(copy), *base[4:], "--resume")
    assert result.returncode == 0 and "(2 skipped, 0 failed)" in result.stdout
    again = run(*base)
    assert again.returncode == 2 and "holds an earlier run" in again.stderr
    assert run(*base, "--overwrite", "--method", "layercam").returncode == 0
    assert {r["target"]["method"] for r in _records(out)} == {"layercam"}
    assert all(".layercam." in p.name for p in out.glob("*.png")), "the earlier run's overlays are gone"


@pytest.mark.slow  # real processes, interrupted or racing
def test_a_second_concurrent_run_into_the_same_folder_is_refused(lite0_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    cat = cv2.imread(str(EXAMPLES / "chelsea.png"))
    for i in range(80):  # long enough that the second run starts while the first works (it checks below)
        cv2.imwrite(str(folder / f"{i:02d}.jpg"), cat[i:])
    out = tmp_path / "out"
    args = [sys.executable, "-m", "onnxcam", "explain", str(folder), "--model", str(lite0_model), "--out", str(out),
            "--batch-size", "1", "--quiet"]  # fmt: skip
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "results.jsonl").is_file() and (out / "results.jsonl").read_text()):
        time.sleep(0.02)
    second = subprocess.run([*args, "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert first.poll() is None, "the first run ended before the second started: the test proved nothing"
    assert first.wait(timeout=300) == 0
    assert second.returncode == 2 and "another onnxcam run is writing to" in second.stderr, second.stderr
    assert len({r["path"] for r in _records(out)}) == 80, "no record of the first run lost"


def test_a_killed_runs_temporaries_are_cleaned_on_resume(lite0_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    photo = _photo(tmp_path / "in" / "cat.png")
    assert run("explain", str(photo), "--model", str(lite0_model), "--out", str(out)).returncode == 0
    stale = out / ".cat_285_egyptian-cat.png.x1y2z3.partial.png"  # what kill -9 leaves mid-write
    stale.write_bytes(b"")
    assert run("explain", str(photo), "--model", str(lite0_model), "--out", str(out), "--resume").returncode == 0
    assert not stale.exists()


def test_eval_goes_on_past_a_bad_image(lite0_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    _photo(folder / "a.png")
    (folder / "b.png").write_text("not an image")
    _photo(folder / "c.png", crop=20)
    result = run("eval", str(folder), "--model", str(lite0_model), "--steps", "4", "--json")
    assert result.returncode == 2 and "b.png is not a readable image" in result.stderr
    doc = json.loads(result.stdout)
    assert [Path(r["path"]).name for r in doc["images"]] == ["a.png", "b.png", "c.png"]
    assert doc["mean"]["images"] == 2 and "error" in doc["images"][1]


def test_report_survives_hostile_names(lite0_model: Path, tmp_path: Path) -> None:
    """`<!--<script>` in a name once emptied the page; `#`, `?` and `%` broke thumbnails."""
    from urllib.parse import unquote

    name = "a#b?c%d <!--<script>x.png"
    _photo(tmp_path / "in" / name)
    out = tmp_path / "out"
    result = run("explain", str(tmp_path / "in"), "--model", str(lite0_model), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    page = (out / "index.html").read_text()
    script = page.split('<script id="data" type="application/json">')[1].split("</script>")[0]
    assert "<" not in script and "#" not in script.split('"thumb"')[1].split(",")[0]
    data = json.loads(script)
    (item,) = data["items"]
    assert item["path"].endswith(name) and (out / unquote(item["thumb"])).is_file()
    assert (out / unquote(item["full"][0])).resolve() == (tmp_path / "in" / name).resolve()


def test_names_are_printed_escaped(lite0_model: Path, tmp_path: Path) -> None:
    """A newline in a file name could fake the summary line; an escape sequence could recolour the terminal."""
    photo = _photo(tmp_path / "in" / "x\nexplained 99 of 99 images\x1b[31m.png")
    result = run("explain", str(photo), "--model", str(lite0_model), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\\x1b[31m" in result.stdout
    assert sum(line.startswith("explained") for line in result.stdout.splitlines()) == 1


def test_audit_checks_its_boxes(lite0_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    good, outside, missing = (_photo(folder / "tabby" / f"{n}.png") for n in ("good", "outside", "missing"))
    boxes = tmp_path / "boxes.json"
    bad_boxes = ("[-1, 0, 5, 5]", "[10, 10, 5, 5]", '["a", 0, 5, 5]', "[1, 2, 3]", "[0, 0, 1e400, 1]")
    bad_boxes += ("[true, 0, 1, 1]",)
    for bad in bad_boxes:
        boxes.write_text(f"{{{json.dumps(str(good))}: {bad}}}")
        result = run("audit", str(folder), "--boxes", str(boxes), "--model", str(lite0_model),
                     "--out", str(tmp_path / "x"))  # fmt: skip
        assert result.returncode == 2 and "a box is [x0, y0, x1, y1]" in result.stderr, (bad, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    boxes.write_text(json.dumps({str(good): [100, 50, 300, 250], str(outside): [0, 0, 451, 10]}))
    out = tmp_path / "out"
    result = run("audit", str(folder), "--boxes", str(boxes), "--model", str(lite0_model), "--out", str(out), "--json")
    assert result.returncode == 2
    assert "reaches outside the image (451x300 pixels)" in result.stderr and f"no box for {missing}" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["classes"]["tabby"]["images"] == 1 and len(doc["failed"]) == 2
