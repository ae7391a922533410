"""The ``onnxcam`` command as a user runs it: success paths and every bad-input path."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxcam
from onnxcam import Explainer
from onnxcam.image import read_rgb
from onnxcam.overlay import overlay_rgb
from tests.conftest import EXAMPLES, ROOT

CAT = str(EXAMPLES / "chelsea.png")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "onnxcam", *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=300
    )


def assert_clean_failure(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """Non-zero exit, exactly one line on stderr that says what is wrong, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_explain_writes_overlay_and_map_per_target(lite0_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run("explain", CAT, "--model", str(lite0_model), "--top-k", "2", "--target", "coffee mug",
                 "--out", str(out), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    (image,) = doc["images"]
    assert image["size"] == [451, 300] and len(image["predictions"]) == 5
    assert [t["class"] for t in image["targets"]] == [504, *[p["class"] for p in image["predictions"][:2]]]
    expected = Explainer(lite0_model).explain(CAT, targets=["coffee mug"], top_k=2)
    for target, reference in zip(image["targets"], expected.maps, strict=True):
        raw = np.load(target["map"])
        assert raw.dtype == np.float32 and raw.shape == (300, 451) and raw.min() >= 0 and raw.max() <= 1
        np.testing.assert_allclose(raw, reference.cam, atol=1e-6)
        np.testing.assert_array_equal(read_rgb(target["overlay"]), overlay_rgb(read_rgb(CAT), reference.cam))
        assert Path(target["overlay"]).parent == out and target["empty_map"] is False
    assert (
        sorted(p.suffix for p in out.iterdir()) == [".html", ".json", ".jsonl"] + [".npy"] * 3 + [".png"] * 3
    )


def test_explain_table_names_the_prediction_and_files(lite0_model: Path, tmp_path: Path) -> None:
    result = run("explain", CAT, "--model", str(lite0_model), "--alpha", "0.5", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "Egyptian cat" in result.stdout and "chelsea_285_egyptian-cat.png" in result.stdout


def test_default_output_folder_is_not_beside_the_input(lite0_model: Path, tmp_path: Path) -> None:
    photo = tmp_path / "in" / "cat.png"
    photo.parent.mkdir()
    photo.write_bytes(Path(CAT).read_bytes())
    result = run("explain", str(photo), "--model", str(lite0_model), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in photo.parent.iterdir()) == ["cat.png"]
    assert len(list((tmp_path / "onnxcam-out").glob("cat_*"))) == 2


def test_info_prints_the_model_card(lite0_model: Path) -> None:
    result = run("info", str(lite0_model))
    assert result.returncode == 0, result.stderr
    for phrase in ["efficientnet_lite0", "head (_relu1)", "RGB", "0.4980", "1000", "presummed"]:
        assert phrase in result.stdout
    labels = run("info", str(lite0_model), "--labels").stdout
    assert "  281  tabby" in labels


def test_export_cli_writes_a_working_model(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "lite.onnx"
    result = run("export", "--arch", "efficientnet_lite0", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "presummed" in result.stdout and out.is_file()
    assert not list(tmp_path.glob("*.partial"))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    jpeg = cv2.imencode(".jpg", cv2.imread(CAT))[1].tobytes()
    png = Path(CAT).read_bytes()
    files = {
        "text.jpg": b"this is not an image\n",
        "empty.png": b"",
        "cut.jpg": jpeg[: len(jpeg) // 2],
        "cut.png": png[: len(png) // 2],
        "garbage.onnx": b"\x08\x07garbage that is not a protobuf",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    plain = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "plain",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
    )
    onnx.save(plain, folder / "plain.onnx")
    return {name: folder / name for name in [*files, "plain.onnx"]}


BAD_INPUTS = {
    "missing image": (["explain", "nope.jpg"], ["nope.jpg", "not found"]),
    "not an image": (["explain", "{text.jpg}"], ["text.jpg", "not a readable image"]),
    "empty file": (["explain", "{empty.png}"], ["empty.png", "empty"]),
    "truncated jpeg": (["explain", "{cut.jpg}"], ["cut.jpg", "truncated JPEG"]),
    "truncated png": (["explain", "{cut.png}"], ["cut.png", "truncated PNG"]),
    "class index out of range": (["explain", CAT, "--target", "1000"], ["1000", "out of range", "0-999"]),
    "negative class index": (["explain", CAT, "--target", "-3"], ["-3", "out of range"]),
    "unknown class name": (["explain", CAT, "--target", "tabby kat"], ["tabby kat", "did you mean"]),
    "bad alpha": (["explain", CAT, "--alpha", "2"], ["--alpha"]),
    "bad top-k": (["explain", CAT, "--top-k", "1001"], ["top-k"]),
    "bad provider": (["explain", CAT, "--provider", "warp"], ["warp", "available"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_in_one_line_and_writes_nothing(
    case: str, bad_files: dict[str, Path], lite0_model: Path, tmp_path: Path
) -> None:
    args, phrases = BAD_INPUTS[case]
    args = [str(bad_files[a[1:-1]]) if a.startswith("{") else a for a in args]
    out = tmp_path / "out"
    assert_clean_failure(run(*args, "--model", str(lite0_model), "--out", str(out)), *phrases)
    assert not out.exists()


def test_a_bad_image_among_good_ones_is_reported_and_the_run_goes_on(
    bad_files: dict[str, Path], lite0_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run("explain", CAT, str(bad_files["cut.png"]), "--model", str(lite0_model), "--out", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: image {bad_files['cut.png']} is a truncated PNG (its end marker is missing); re-copy or re-export it"
    ]
    assert "explained 1 of 2 images (0 skipped, 1 failed)" in result.stdout
    assert len(list(out.glob("chelsea_*.png"))) == 1 and not list(out.glob("cut*"))
    kept = run(
        "explain",
        CAT,
        str(bad_files["cut.png"]),
        "--model",
        str(lite0_model),
        "--out",
        str(out),
        "--keep-going",
        "--overwrite",
    )
    assert kept.returncode == 0


@pytest.mark.parametrize(
    ("model", "phrases"),
    [
        ("models/missing.onnx", ["not found", "onnxcam export --arch efficientnet_lite0 --out models/missing.onnx"]),
        ("{garbage.onnx}", ["garbage.onnx is not an ONNX model", "onnxcam export"]),
        ("{plain.onnx}", ["not an onnxcam model", "onnxcam export"]),
    ],
)
def test_bad_model_fails_in_one_line(
    model: str, phrases: list[str], bad_files: dict[str, Path], tmp_path: Path
) -> None:
    path = str(bad_files[model[1:-1]]) if model.startswith("{") else model
    assert_clean_failure(run("explain", CAT, "--model", path, "--out", str(tmp_path / "o")), *phrases)
    assert_clean_failure(run("info", path), *phrases)
    assert not (tmp_path / "o").exists()


def test_export_bad_input_fails_in_one_line(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "m.onnx"
    base = ["export", "--arch", "efficientnet_lite0", "--out", str(out)]
    assert_clean_failure(run(*base, "--layer", "nope"), "unknown layer 'nope'", "head", "_blocks.15")
    assert_clean_failure(run(*base, "--weights", str(tmp_path / "none.pth")), "not found")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    assert_clean_failure(run(*base, "--weights", str(tmp_path / "bad.pth")), "could not load weights")
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def run_without(blocked: tuple[str, ...], *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a process where the ``blocked`` top-level packages cannot be imported (a runtime-only host)."""
    script = textwrap.dedent(
        f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ImportError(f"{{name}} is blocked in this test")

        sys.meta_path.insert(0, Block())
        from onnxcam.cli import main
        try:
            main({list(args)!r})
        finally:
            assert not any(m.split(".")[0] in {blocked!r} for m in sys.modules), "a blocked package got imported"
        """
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)


RUNTIME_ONLY = ("torch", "onnx", "onnxcam_export")


def test_explain_runs_where_torch_and_onnx_cannot_be_imported(lite0_model: Path, tmp_path: Path) -> None:
    result = run_without(RUNTIME_ONLY, "explain", CAT, "--model", str(lite0_model), "--out", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["images"][0]["targets"][0]["label"] == "Egyptian cat"


@pytest.mark.parametrize(
    ("blocked", "args", "phrases"),
    [
        (RUNTIME_ONLY, ["explain", CAT, "--model", "none.onnx"], ["none.onnx not found", "runtime only", "[export]"]),
        (("torch",), ["explain", CAT, "--model", "none.onnx"], ["graft an ONNX classifier with: onnxcam export"]),
        (("torch",), ["export"], ["needs PyTorch and onnx (torch not installed here)", "--from"]),
        (RUNTIME_ONLY, ["export", "--from", "x.onnx"], ["needs the onnx package (not installed here)"]),
    ],
)
def test_each_host_is_told_what_it_can_do(blocked: tuple[str, ...], args: list[str], phrases: list[str]) -> None:
    """On a runtime-only host no hint may suggest an export it cannot run."""
    assert_clean_failure(run_without(blocked, *args), *phrases)


def test_export_from_bad_input_fails_in_one_line(bad_files: dict[str, Path], tmp_path: Path) -> None:
    zoo = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"
    out = tmp_path / "x.cam.onnx"
    base = ["export", "--from", str(zoo), "--out", str(out)]
    assert_clean_failure(run(*base, "--layer", "nope"), "not a usable target", "candidates")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    assert_clean_failure(run(*base, "--labels", str(labels)), "2 labels", "1000 classes")
    assert_clean_failure(run(*base, "--size", "300"), "contradicts", "224x224")
    assert_clean_failure(run(*base, "--std", "0", "1", "1"), "std")
    prep = tmp_path / "prep.json"
    prep.write_text('{"size": 224, "scale": 1}')
    assert_clean_failure(run(*base, "--preprocess", str(prep)), "unknown keys", "scale")
    assert_clean_failure(run("export", "--from", str(bad_files["garbage.onnx"]), "--out", str(out)), "cannot read")
    assert_clean_failure(run("export", "--from", str(tmp_path / "missing.onnx")), "not found")
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_export_from_refuses_an_onnxcam_model(lite0_model: Path, tmp_path: Path) -> None:
    assert_clean_failure(run("export", "--from", str(lite0_model), "--out", str(tmp_path / "o.onnx")), "already")


def test_torchvision_architectures_say_what_to_install(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or broken beside this torch build: exactly the case under test
        result = run("export", "--arch", "resnet50", "--weights", "none", "--out", str(tmp_path / "r.onnx"))
        assert_clean_failure(result, "needs torchvision", "pip install")
    else:
        pytest.skip("torchvision imports here; the message is for hosts without it")


def test_method_all_writes_every_map_and_a_sheet(tmp_path: Path) -> None:
    """Every method this CNN file can run: all but those that read a vision transformer's attention maps and
    those that read input gradients (the file was built without ``--pixels``)."""
    from onnxcam import contract
    from onnxcam.methods import METHODS
    from tests.test_passes import build_tiny

    model = build_tiny(tmp_path)  # 8 channels: Score-CAM's pass per channel stays quick
    result = run("explain", CAT, "--model", str(model), "--method", "all", "--out", str(tmp_path / "o"), "--json")
    assert result.returncode == 0, result.stderr
    (image,) = json.loads(result.stdout)["images"]
    at_input = {contract.PIXEL_GRADIENTS, contract.GUIDED_GRADIENTS}
    cnn_methods = [name for name, m in METHODS.items() if m.uses != "attentions" and m.requires not in at_input]
    assert [t["method"] for t in image["targets"]] == cnn_methods
    assert len({t["overlay"] for t in image["targets"]}) == len(cnn_methods)
    (sheet,) = image["sheets"]
    assert read_rgb(sheet).shape[1] > 5 * read_rgb(image["targets"][0]["overlay"]).shape[1] // 3


def test_attention_method_on_a_cnn_fails_in_one_line(lite0_model: Path, tmp_path: Path) -> None:
    result = run("explain", CAT, "--model", str(lite0_model), "--method", "rollout", "--out", str(tmp_path / "o"))
    assert_clean_failure(result, "rollout needs the model output 'attentions'", "only vision transformers")


def test_unknown_method_fails_in_one_line(lite0_model: Path, tmp_path: Path) -> None:
    result = run("explain", CAT, "--model", str(lite0_model), "--method", "gradcam+", "--out", str(tmp_path / "o"))
    assert_clean_failure(result, "gradcam+", "gradcam++")
    assert not (tmp_path / "o").exists()


def _readme_options(readme: str, command: str) -> set[str]:
    """Every --option named in the README's `onnxcam COMMAND ...` code spans."""
    spans = re.findall(rf"`onnxcam {command}(?: [^`]*)?`", readme)
    return set(re.findall(r"--[a-z][a-z0-9-]*", " ".join(spans)))


def test_every_command_has_help_and_the_readme_names_each_of_its_options() -> None:
    import typer

    from onnxcam.cli import app

    readme = (ROOT / "README.md").read_text()
    commands = typer.main.get_command(app).commands
    assert set(commands) >= {"export", "explain", "info", "audit", "eval"}
    for name, command in commands.items():
        result = run(name, "--help")
        assert result.returncode == 0 and "Example:" in result.stdout, name
        assert "<bool>" not in result.stdout and "Traceback" not in result.stderr
        options = {opt for p in command.params for opt in p.opts if opt.startswith("--")} - {"--help"}
        assert _readme_options(readme, name) == options, f"README vs `onnxcam {name} --help`"


def test_help_keeps_brackets_and_shows_defaults() -> None:
    """Rich markup once ate `[...]`: `Class to explain .` and `JSON {"image path": }`."""
    explain, export, audit = (run(c, "--help").stdout for c in ("explain", "export", "audit"))
    assert "[default: 1 without --target]" in " ".join(explain.split())
    assert '{"image path": [x0, y0, x1, y1], ...}' in " ".join(audit.split())
    assert "[default: models/<arch>.onnx, or <model>.cam.onnx with --from]" in " ".join(export.split())
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"onnxcam {onnxcam.__version__}"


def test_command_line_mistakes_are_one_line_naming_the_value() -> None:
    assert_clean_failure(run("export", "--from", "x.onnx", "--mean", "0.5", "x", "0.5"), "--mean: 'x' is not a number")
    assert_clean_failure(run("explain", CAT, "--json=false"), "--json", "onnxcam explain --help")
    assert_clean_failure(run("explain", CAT, "--no-such-flag"), "--no-such-flag", "onnxcam explain --help")
    assert_clean_failure(run("nonsense"), "nonsense", "onnxcam --help")


def test_mean_and_std_take_commas_as_well() -> None:
    from onnxcam.cli import _split_triples

    assert _split_triples(["export", "--mean", "0.5,0.4,0.3", "--std=1,2,3", "--size", "9"]) == [
        "export", "--mean", "0.5", "0.4", "0.3", "--std", "1", "2", "3", "--size", "9"
    ]  # fmt: skip


def test_method_names_are_accepted_in_any_case(lite0_model: Path, tmp_path: Path) -> None:
    result = run("explain", CAT, "--model", str(lite0_model), "--method", "GradCAM++", "--out", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["images"][0]["targets"][0]["method"] == "gradcam++"


def test_random_weights_are_announced_everywhere(vgg16_model: Path, tmp_path: Path) -> None:
    """A --weights none model explains plausibly; the user must be told, on stderr, in --json and in the report."""
    result = run("explain", CAT, "--model", str(vgg16_model), "--out", str(tmp_path), "--json")
    assert result.returncode == 0
    assert result.stderr.startswith("warning: ") and "NOT TRAINED" in result.stderr
    assert any("NOT TRAINED" in w for w in json.loads(result.stdout)["warnings"])
    assert "NOT TRAINED" in (tmp_path / "index.html").read_text()
    assert run("info", str(vgg16_model)).stdout.count("NOT TRAINED") == 1  # (once: #22 item 32)


def test_a_folder_or_a_non_onnx_file_as_model_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.onnx").write_bytes(b"")
    assert_clean_failure(run("info", str(tmp_path / "models")), "is a folder (it holds a.onnx)")
    assert_clean_failure(run("info", str(ROOT / "README.md")), "README.md is not an ONNX model")


def test_an_output_folder_that_is_a_file_is_one_line(lite0_model: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("x")
    result = run("explain", CAT, "--model", str(lite0_model), "--out", str(tmp_path / "taken"))
    assert_clean_failure(result, "--out", "is a file, not a folder")


def test_colormap_colours_the_overlay_with_its_own_ends_and_a_resume_must_ask_it_again(lite0_model: Path,
                                                                                    tmp_path: Path) -> None:
    """`--colormap viridis --alpha 1`: the overlay is the colour map itself, whose ends are matplotlib's viridis
    (#440154 at 0, #fde725 at 1, within OpenCV's table's rounding); a resume with another colour map is refused."""
    out = tmp_path / "out"
    result = run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(lite0_model), "--out", str(out),
                 "--colormap", "viridis", "--alpha", "1", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    (target,) = json.loads(result.stdout)["images"][0]["targets"]
    cam, picture = np.load(target["map"]), cv2.imread(target["overlay"])[:, :, ::-1].astype(int)
    for where, colour in ((cam.argmin(), (0x44, 0x01, 0x54)), (cam.argmax(), (0xFD, 0xE7, 0x25))):
        assert np.abs(picture.reshape(-1, 3)[where] - colour).max() <= 3, (picture.reshape(-1, 3)[where], colour)
    again = run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(lite0_model), "--out", str(out), "--resume")
    assert_clean_failure(again, "colormap")
    assert_clean_failure(run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(lite0_model), "--out",
                             str(tmp_path / "o2"), "--colormap", "rainbowz"), "colormap")  # fmt: skip
    from onnxcam.overlay import COLORMAPS
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in COLORMAPS if name != "jet"), "the README names every colour map"


def test_the_cli_choices_are_their_registries() -> None:
    """The runtime cannot import the export side (torch, onnx), so the CLI names its choices itself: each list is
    its registry's, and the help names every detector layout and box format."""
    pytest.importorskip("torch")
    from onnxcam import cli
    from onnxcam_export.quantize import FORMATS
    from onnxcam_export.tasks import BOX_FORMATS, DETECTOR_LAYOUTS
    from onnxcam_export.torch_export import ARCHS

    assert {a.value for a in cli.ArchName} == set(ARCHS)
    assert [f.value for f in cli.QuantFormat] == list(FORMATS)
    shown = " ".join(run("export", "--help").stdout.split())
    assert f"({', '.join(DETECTOR_LAYOUTS)})" in shown and " or ".join(BOX_FORMATS) in shown
