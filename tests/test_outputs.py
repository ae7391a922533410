"""What a run writes: unique safe names, atomic writes that follow no symlink, the folder's lock."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from onnxcam import outputs
from onnxcam.errors import OnnxcamError


def test_stems_are_unique_against_every_stem_of_the_run() -> None:
    paths = ["a/cat.png", "b/cat.png", "c/cat-2.png", "d/CAT.jpg", "e/cat-3.png", "s3://bucket/cat.jpg"]
    stems = outputs.unique_stems(paths)
    assert len({s.casefold() for s in stems.values()}) == len(paths), stems
    assert stems["a/cat.png"] == "cat" and stems["c/cat-2.png"] == "cat-2"
    assert stems["e/cat-3.png"] == "cat-3", "a file's own name is never taken by a renamed repeat"


def test_stems_of_an_earlier_run_are_kept_and_reserved() -> None:
    stems = outputs.unique_stems(["x/cat.png", "y/cat.png"], fixed={"y/cat.png": "cat"})
    assert stems == {"x/cat.png": "cat-2", "y/cat.png": "cat"}


def test_output_names_stay_short_and_printable() -> None:
    stem = outputs.safe_stem(Path("é" * 117 + "\n\x1b[31m.png"))  # 234 bytes of name, plus control characters
    name = outputs.map_name(stem, 999, "label " * 50, "gradcam-elementwise", "panel") + ".png"
    assert len(name.encode()) <= 200 and "\n" not in name and "\x1b" not in name
    assert outputs.slug("x" * 300) == "x" * outputs.MAX_LABEL_BYTES


def test_atomic_write_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    """The old temporary name was predictable (.NAME.PID.partial): plant a link there and at the target."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / f".index.html.{os.getpid()}.partial").symlink_to(victim)
    outputs.write_text(tmp_path / "index.html", "report")
    assert victim.read_text() == "precious" and (tmp_path / "index.html").read_text() == "report"
    (tmp_path / "map.npy").symlink_to(victim)
    outputs.write_npy(tmp_path / "map.npy", np.zeros(3))
    assert victim.read_text() == "precious" and not (tmp_path / "map.npy").is_symlink()


def test_a_fresh_run_never_replaces_a_file_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "mine.png").write_text("user's file")
    with pytest.raises(OnnxcamError, match="already exists and this run did not write it"):
        outputs.write_text(tmp_path / "mine.png", "x", replace=False)
    assert (tmp_path / "mine.png").read_text() == "user's file"


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    outputs.write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~outputs._UMASK


def test_a_second_writer_of_the_same_folder_is_refused(tmp_path: Path) -> None:
    refused = pytest.raises(OnnxcamError, match="another onnxcam run is writing to")
    with outputs.owned(tmp_path), refused, outputs.owned(tmp_path):
        pass
    with outputs.owned(tmp_path):  # released: the next run may go
        pass


def test_owning_a_folder_cleans_a_killed_runs_temporaries(tmp_path: Path) -> None:
    stale = tmp_path / ".cat_1_x.png.k3j2h1.partial.png"
    stale.write_bytes(b"")
    keep = tmp_path / "notes.partial.txt"
    keep.write_text("not ours")
    with outputs.owned(tmp_path):
        pass
    assert not stale.exists() and keep.exists()


@pytest.mark.parametrize("out", ["file", "below-a-file"])
def test_an_output_folder_that_cannot_be_a_folder_is_one_clear_error(out: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" if out == "file" else tmp_path / "file" / "sub"
    with pytest.raises(OnnxcamError, match="choose"), outputs.owned(target):
        pass


def test_an_earlier_run_is_refused_resumed_with_the_same_settings_or_overwritten(tmp_path: Path) -> None:
    settings = {"model": "sha256:1", "method": ["gradcam"]}
    with outputs.owned(tmp_path):
        outputs.start_run(tmp_path, settings, resume=False, overwrite=False)
    (tmp_path / "cat_1_x.png").write_bytes(b"png")
    (tmp_path / "photo.png").write_bytes(b"not the run's")
    record = {"path": "cat.png", "overlay": str(tmp_path / "cat_1_x.png"), "error": None}
    (tmp_path / outputs.RESULTS).write_text(json.dumps(record) + "\n")
    with pytest.raises(OnnxcamError, match="holds an earlier run; add --resume"):
        outputs.start_run(tmp_path, settings, resume=False, overwrite=False)
    with pytest.raises(OnnxcamError, match=r"--method \(now \['gradcam\+\+'\], before \['gradcam'\]\)"):
        outputs.start_run(tmp_path, {**settings, "method": ["gradcam++"]}, resume=True, overwrite=False)
    assert outputs.start_run(tmp_path, settings, resume=True, overwrite=False) == [record]
    assert outputs.start_run(tmp_path, {**settings, "method": ["layercam"]}, resume=False, overwrite=True) == []
    assert not (tmp_path / "cat_1_x.png").exists() and (tmp_path / "photo.png").exists(), "only the run's files"
    assert json.loads((tmp_path / outputs.SETTINGS).read_text())["settings"]["method"] == ["layercam"]


@pytest.mark.parametrize("line", ["{}", "5", "[1, 2]", '{"path": 3}', "not json"])
def test_a_results_file_that_is_not_onnxcam_records_is_a_clear_error(line: str, tmp_path: Path) -> None:
    (tmp_path / outputs.RESULTS).write_text(line + "\n" + json.dumps({"path": "a.png"}) + "\n")
    with pytest.raises(OnnxcamError, match=r"results.jsonl line 1 is not an onnxcam record"):
        outputs.read_records(tmp_path / outputs.RESULTS)


def test_the_cut_off_last_line_of_an_interrupted_write_is_ignored(tmp_path: Path) -> None:
    (tmp_path / outputs.RESULTS).write_text(json.dumps({"path": "a.png"}) + '\n{"path": "b.p')
    assert outputs.read_records(tmp_path / outputs.RESULTS) == [{"path": "a.png"}]


@pytest.mark.parametrize(("size", "box"), [((48, 64), (40, 2, 63, 40)), ((30, 40), (0, 0, 39, 29)),
                                           ((600, 800), (700, 300, 790, 400)), ((24, 24), (20, 20, 23, 23))])
def test_a_box_label_lies_whole_inside_the_picture(size: tuple[int, int], box: tuple[int, ...]) -> None:
    """Labels were cut at the edge of small pictures: OpenCV's own measure of the drawn text lies inside."""
    from onnxcam.overlay import draw_box, label_extent, label_place

    label = "Egyptian cat 0.78"
    text, origin, scale = label_place(label, box[:2], size, 2)
    x0, y0, x1, y1 = label_extent(text, origin, scale, 2)
    assert x0 >= 0 and y0 >= 0 and x1 <= size[1] and y1 <= size[0], (text, origin, scale)
    assert text == label or (text.endswith("..") and label.startswith(text[:-2]))
    picture = draw_box(np.zeros((*size, 3), np.uint8), box, label)
    assert picture.any()
