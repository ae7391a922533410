"""Hostile and odd input on the newer surfaces (issue #22): each case failed before its fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from onnxcam import maps
from onnxcam.errors import OnnxcamError, printable
from onnxcam.outputs import safe_stem
from tests.conftest import EXAMPLES
from tests.test_cli import assert_clean_failure, run


def test_a_map_whose_range_is_below_float32s_normal_numbers_is_empty_never_nan() -> None:
    """A BatchNorm network with HF's default random init scores ~1e-43: its maps' range is a denormal, and
    1 / range overflowed to inf (NaN in the map and in ``top20_mass``)."""
    cam = np.zeros((7, 7), np.float32)
    cam[3, 3] = 1e-43
    finished, empty = maps.finish(cam, (224, 224))
    assert empty and not finished.any() and not np.isnan(finished).any()
    json.dumps(maps.stats(finished), allow_nan=False)  # strict JSON


def test_bidi_controls_and_undecodable_bytes_are_escaped_on_the_terminal() -> None:
    shown = printable("cat\u202egnp.exe\udcff\x1b[31m")
    assert "\u202e" not in shown and "\udcff" not in shown and "\x1b" not in shown
    assert shown == "cat\\u202egnp.exe\\udcff\\x1b[31m"
    assert safe_stem("caf\udce9 \u202e.png") == "caf_ \u202e"  # (a file name may hold any printable text)


def test_a_file_name_that_is_not_utf8_is_explained_and_reported(lite0_model: Path, tmp_path: Path) -> None:
    """Old archives and Samba shares hold names with Latin-1 bytes: the whole run aborted (UnicodeEncodeError)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(EXAMPLES / "chelsea.png", bytes(photos) + b"/caf\xe9.png")
    out = tmp_path / "out"
    result = run("explain", str(photos), "--model", str(lite0_model), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["summary"]["explained"] == 1
    assert (out / "caf__285_egyptian-cat.png").is_file() and "caf%E9.png" in (out / "index.html").read_text()
    plain = run("explain", str(photos), "--model", str(lite0_model), "--out", str(tmp_path / "again"))
    assert plain.returncode == 0 and "caf\\udce9.png" in plain.stdout, plain.stderr


HOSTILE_JSON = ["[" * 5000 + "]" * 5000, "[" + "9" * 5000 + "]", '{"size": ' + "[" * 5000 + "]" * 5000 + "}"]


@pytest.mark.parametrize("text", HOSTILE_JSON, ids=["nested", "long-integer", "nested-field"])
def test_a_sidecar_nested_or_numbered_past_reason_is_refused_in_one_line(text: str, tmp_path: Path) -> None:
    from onnxcam_export.sources import labels_file, preprocess_file

    (tmp_path / "prep.json").write_text(text)
    with pytest.raises(OnnxcamError):
        preprocess_file(str(tmp_path / "prep.json"))
    with pytest.raises(OnnxcamError):
        labels_file(tmp_path / "prep.json")


@pytest.mark.parametrize("text", HOSTILE_JSON, ids=["nested", "long-integer", "nested-field"])
def test_a_model_card_field_nested_or_numbered_past_reason_is_one_line(text: str, lite0_model: Path,
                                                                       tmp_path: Path) -> None:  # fmt: skip
    import onnx

    model = onnx.load(lite0_model)
    next(p for p in model.metadata_props if p.key == "onnxcam.labels").value = text
    onnx.save(model, tmp_path / "forged.onnx")
    assert_clean_failure(run("info", str(tmp_path / "forged.onnx")), "labels")


def test_a_threshold_out_of_range_names_its_option(tmp_path: Path) -> None:
    from onnxcam.engine import _threshold_feeds

    with pytest.raises(OnnxcamError, match=r"^--conf \(conf_threshold\) must be a number from 0 to 1, got 1.5$"):
        _threshold_feeds({"conf_threshold": 1.5})


def test_a_class_name_that_is_none_suggests_the_classes_that_hold_it_as_a_word(lite0_model: Path) -> None:
    result = run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(lite0_model), "--target", "cat")
    assert_clean_failure(result, "did you mean 'tiger cat', 'Persian cat', 'Siamese cat'?")


def test_the_missing_model_hint_names_the_architecture_of_the_file_asked_for(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    result = run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(tmp_path / "vgg16.onnx"))
    assert_clean_failure(result, f"onnxcam export --arch vgg16 --out {tmp_path / 'vgg16.onnx'}")


def test_the_eval_table_prints_its_mean_on_its_own_line_and_flags_as_words(lite0_model: Path) -> None:
    result = run("eval", str(EXAMPLES / "chelsea.png"), "--model", str(lite0_model), "--steps", "4", "--road")
    assert result.returncode == 0, result.stderr
    assert "\\nmean" not in result.stdout and "\nmean: images 1" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("| chelsea.png"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] in ("yes", "no") and all(len(c) <= 12 for c in cells[1:]), row


@pytest.mark.parametrize("content", ['{"a.png": [1, 2, 3, 4], "a.png": [5, 6, 7, 8]}', '{"a.png": [1, 2, 3, 1e400]}',
                                     '{"a.png": [1, 2, 3, 12345678901234567890]}'], ids=["twice", "inf", "20-digit"])
def test_boxes_that_are_ambiguous_or_past_reason_are_refused_in_one_line(content: str, tmp_path: Path) -> None:
    from onnxcam.audit import load_boxes

    (tmp_path / "boxes.json").write_text(content)
    with pytest.raises(OnnxcamError, match=r"boxes\.json"):
        load_boxes(tmp_path / "boxes.json")


def test_a_boxes_file_that_is_a_device_or_an_alias_is_refused(tmp_path: Path) -> None:
    from onnxcam.audit import load_boxes

    with pytest.raises(OnnxcamError, match="not a regular file"):
        load_boxes(Path("/dev/zero"))
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "alias.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "boxes.json").write_text(json.dumps({str(tmp_path / "a.png"): [0, 0, 1, 1],
                                                     str(tmp_path / "alias.png"): [0, 0, 2, 2]}))  # fmt: skip
    with pytest.raises(OnnxcamError, match="another key names too"):
        load_boxes(tmp_path / "boxes.json")


@pytest.mark.parametrize("options, phrase", [
    (["--mean", "nan", "0", "0"], "mean needs three finite values"),
    (["--std", "inf", "1", "1"], "std needs three finite values"),
    (["--size", "5000"], "--size needs a height and width from 1 to 4096"),
    (["--size", "100000"], "--size needs a height and width from 1 to 4096"),
    (["--preprocess", "{bad"], "neither a preset"),
    (["--resize", "squash"], "unknown --resize"),
], ids=["nan-mean", "inf-std", "size-5000", "size-100000", "bad-preprocess", "bad-resize"])  # fmt: skip
def test_export_options_are_checked_before_any_work(options: list[str], phrase: str, tmp_path: Path) -> None:
    """Each was refused only after the model was loaded and probed (39 s and 15.6 GB for --size 5000): the file
    given here is no model at all, so only a check made first can name the option."""
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    assert_clean_failure(run("export", "--from", str(tmp_path / "model.onnx"), *options), phrase)


def test_labels_that_are_not_utf8_are_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    (tmp_path / "labels.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    result = run("export", "--from", str(tmp_path / "model.onnx"), "--labels", str(tmp_path / "labels.txt"))
    assert_clean_failure(result, "as UTF-8 text")


def _if_head(path: Path) -> Path:
    """conv -> relu (the layer) -> pool -> linear, plus an ``If`` whose branch reads the layer by name (no node
    input): the layer's gradient has a path through it."""
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnx import helper as h

    rng = np.random.default_rng(0)
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    then = h.make_graph([h.make_node("ReduceMean", ["act"], ["mean"], axes=[1, 2, 3], keepdims=0),
                         h.make_node("Unsqueeze", ["mean", "one"], ["then_out"])], "then", [],
                        [h.make_tensor_value_info("then_out", TensorProto.FLOAT, None)], [one])  # fmt: skip
    zeros = numpy_helper.from_array(np.zeros((1, 1), np.float32))
    other = h.make_graph([h.make_node("Constant", [], ["else_out"], value=zeros)], "else", [],
                         [h.make_tensor_value_info("else_out", TensorProto.FLOAT, None)])  # fmt: skip
    nodes = [h.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c"], ["act"]),
             h.make_node("GlobalAveragePool", ["act"], ["p"]), h.make_node("Flatten", ["p"], ["f"]),
             h.make_node("MatMul", ["f", "F"], ["m"]),
             h.make_node("If", ["cond"], ["extra"], name="outer_if", then_branch=then, else_branch=other),
             h.make_node("Add", ["m", "extra"], ["scores"])]  # fmt: skip
    weights = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "W"),
               numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "F"),
               numpy_helper.from_array(np.array(True), "cond")]  # fmt: skip
    graph = h.make_graph(nodes, "if_head", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                         [h.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 4])], weights)  # fmt: skip
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_a_branch_that_reads_the_layer_from_the_outer_scope_is_refused_naming_its_node(tmp_path: Path) -> None:
    """It grafted with exit 0, exact logits and gradients off by ~65%: the walk saw only node inputs."""
    source = _if_head(tmp_path / "if.onnx")
    result = run("export", "--from", str(source), "--mean", "0", "0", "0", "--std", "1", "1", "1")
    assert_clean_failure(result, "control flow between the target layer and the logits: If node 'outer_if'")



@pytest.mark.parametrize("head", ["features", "regressor", "autoencoder"])
def test_an_output_that_is_no_task_onnxcam_knows_is_refused_with_what_was_found(head: str, tmp_path: Path) -> None:
    """A ``[1, 1024, 8]`` feature output was taken for a YOLOv5 detector (10 fake boxes, exit 0); a ``[N, 1]``
    regressor showed "probability 1.0000" for every image; an autoencoder's sigmoid image, the input's shape, was
    read as a 3-class segmenter."""
    torch = pytest.importorskip("torch")
    from tests.test_deployed import export

    class Features(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, 1, 1)
            self.decode = torch.nn.Conv2d(8, 3, 3, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features = torch.relu(self.conv(x))
            if head == "autoencoder":
                return torch.sigmoid(self.decode(features))
            return features.flatten(2).transpose(1, 2) if head == "features" else features.mean((1, 2, 3))[:, None]

    source = export(Features().eval(), tmp_path / f"{head}.onnx", (1, 3, 32, 32))
    result = run("export", "--from", str(source), "--mean", "0", "0", "0", "--std", "1", "1", "1")
    found = {"features": ["[1, 1024, 8]", "are not a layout onnxcam knows"],
             "regressor": ["one score per image", "regressor"],
             "autoencoder": ["[1, 3, 32, 32]", "the input's shape", "Sigmoid", "--task segmentation"]}
    assert_clean_failure(result, *found[head])
    if head == "autoencoder":  # a 3-class segmenter that happens to end so is still explained when forced
        forced = run("export", "--from", str(source), "--mean", "0", "0", "0", "--std", "1", "1", "1",
                     "--task", "segmentation")  # fmt: skip
        assert forced.returncode == 0, forced.stderr


def test_web_never_replaces_files_it_did_not_write_nor_follows_a_planted_link(lite0_model: Path,
                                                                               tmp_path: Path) -> None:  # fmt: skip
    """``web --out`` replaced index.html, model.onnx, ... of any folder and wrote the wasm files through a planted
    ``ort`` link outside it."""
    from onnxcam.web import DEFAULT_ORT
    from tests.conftest import ROOT

    ort = str(ROOT / DEFAULT_ORT)
    if not (ROOT / DEFAULT_ORT).is_dir():
        pytest.skip("web/node_modules missing: run npm ci --prefix web")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("my page")
    assert_clean_failure(run("web", str(lite0_model), "--out", str(mine), "--ort", ort), "did not write")
    assert (mine / "index.html").read_text() == "my page" and len(list(mine.iterdir())) == 1
    planted, elsewhere = tmp_path / "planted", tmp_path / "elsewhere"
    planted.mkdir()
    elsewhere.mkdir()
    (planted / "ort").symlink_to(elsewhere)
    assert_clean_failure(run("web", str(lite0_model), "--out", str(planted), "--ort", ort), "symbolic link")
    assert not list(elsewhere.iterdir())
    site = tmp_path / "site"
    assert run("web", str(lite0_model), "--out", str(site), "--ort", ort).returncode == 0
    assert_clean_failure(run("web", str(lite0_model), "--out", str(site), "--ort", ort), "--overwrite")
    assert run("web", str(lite0_model), "--out", str(site), "--ort", ort, "--overwrite").returncode == 0


def _small_head(path: Path, between: str | None = None, names: dict | None = None, duplicate: bool = False,
                opsets: tuple = (("", 17),)) -> Path:  # fmt: skip
    """conv (stride 2) -> relu -> Flatten [-> ``between``] -> MatMul on an 8x8 input; tensors named by ``names``."""
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnx import helper as h

    rng = np.random.default_rng(0)
    n = {"x": "x", "act": "act", "out": "scores"} | (names or {})
    nodes = [h.make_node("Conv", [n["x"], "W"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2], name="a"),
             h.make_node("Relu", ["c"], [n["act"]], name="a" if duplicate else "b"),
             h.make_node("Flatten", [n["act"]], ["f"], name="c")]  # fmt: skip
    if between:
        nodes.append(h.make_node(between, ["f"], ["f2"], name="d"))
    nodes.append(h.make_node("MatMul", ["f2" if between else "f", "F"], [n["out"]], name="e"))
    weights = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "W"),
               numpy_helper.from_array(rng.normal(size=(128, 4)).astype(np.float32), "F")]  # fmt: skip
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info(n["x"], TensorProto.FLOAT, ["N", 3, 8, 8])],
                         [h.make_tensor_value_info(n["out"], TensorProto.FLOAT, ["N", 4])], weights)  # fmt: skip
    model = h.make_model(graph, opset_imports=[h.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    onnx.save(model, path)
    return path


UNIT = ["--mean", "0", "0", "0", "--std", "1", "1", "1"]
ODD_GRAPHS = {
    "relu-before-the-fc": {"between": "Relu"},
    "dropout-before-the-fc": {"between": "Dropout"},
    "unused-com-microsoft": {"opsets": (("", 17), ("com.microsoft", 1))},
    "custom-domain": {"opsets": (("", 17), ("my.custom", 3))},
    "contract-names": {"names": {"x": "image", "act": "activations", "out": "targets"}},
    "duplicate-node-names": {"duplicate": True},
}


@pytest.mark.parametrize("name", list(ODD_GRAPHS))
def test_odd_but_valid_graphs_graft_and_their_gradient_is_the_heads(name: str, tmp_path: Path) -> None:
    """Each crashed (IndexError, ``Unsupported opset-version``, SSA errors) or grafted a file ORT refused. The
    gradient at the layer is checked against the head's own formula: d score_c / d act = relu'(f) * F[:, c]."""
    import onnx
    from onnx import numpy_helper

    from onnxcam.engine import Engine

    source = _small_head(tmp_path / f"{name}.onnx", **ODD_GRAPHS[name])
    result = run("export", "--from", str(source), *UNIT)
    assert result.returncode == 0, result.stderr
    engine = Engine(tmp_path / f"{name}.cam.onnx")
    image = np.random.default_rng(1).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    out = engine.run(image, np.array([[0, 3]]), full_gradients=True)
    fc = numpy_helper.to_array(next(i for i in onnx.load(source).graph.initializer if i.name == "F"))
    flat = out.activations.reshape(1, -1)
    slope = (flat > 0) if ODD_GRAPHS[name].get("between") == "Relu" else np.ones_like(flat)
    for t, c in enumerate((0, 3)):
        expected = (slope * fc[:, c]).reshape(out.activations.shape[1:])
        np.testing.assert_allclose(out.gradients[0, t], expected, rtol=1e-5, atol=1e-5)


def test_an_opset_newer_than_the_onnx_package_is_one_line(tmp_path: Path) -> None:
    source = _small_head(tmp_path / "future.onnx", opsets=(("", 30),))
    assert_clean_failure(run("export", "--from", str(source), *UNIT), "opset 30", "upgrade onnx")


def test_a_graph_that_fails_onnxs_checker_is_one_line_and_nothing_is_written(tmp_path: Path) -> None:
    """The final checker call was unguarded: two nodes writing one tensor failed with a traceback after the work."""
    import onnx

    from onnxcam_export.save import check

    model = onnx.load(_small_head(tmp_path / "m.onnx"))
    model.graph.node.append(onnx.helper.make_node("Relu", ["c"], ["act"], name="twice"))  # a second writer of act
    with pytest.raises(OnnxcamError, match="fails ONNX's checker"):
        check(model)


def test_quantize_refuses_what_it_cannot_regraft_in_one_line(tmp_path: Path) -> None:
    """A detector, a segmenter or an INT8 file crashed in the checker or in ORT's calibrator."""
    pytest.importorskip("onnxruntime.quantization")
    source = _small_head(tmp_path / "det.onnx")
    assert run("export", "--from", str(source), *UNIT).returncode == 0
    import onnx

    model = onnx.load(tmp_path / "det.cam.onnx")
    next(p for p in model.metadata_props if p.key == "onnxcam.quantized").value = "true"
    onnx.save(model, tmp_path / "int8.onnx")
    (tmp_path / "photos").mkdir()
    result = run("quantize", str(tmp_path / "int8.onnx"), "--calibrate", str(tmp_path / "photos"))
    assert_clean_failure(result, "already INT8")
    torch = pytest.importorskip("torch")
    from tests.test_detect import TinyDetector, export_plain

    torch.manual_seed(0)
    export_plain(TinyDetector(), tmp_path / "tiny.onnx")
    assert run("export", "--from", str(tmp_path / "tiny.onnx"), *UNIT).returncode == 0
    result = run("quantize", str(tmp_path / "tiny.cam.onnx"), "--calibrate", str(tmp_path / "photos"))
    assert_clean_failure(result, "is a detection model", "takes a classifier")


FORGED_CARDS = {  # card field -> (forged JSON value, what the refusal says)
    "task": ("detection", "says task 'detection'"),  # (a text field: no JSON quotes)
    "extra_layers": ('["absent (8x4x4)"]', "names 1 extra target layers but the graph has 0"),
    "saliency_methods": ("[]", "lists the in-graph methods []"),
    "saliency_methods-reordered": ('["layercam", "gradcam", "gradcam++", "xgradcam", "hirescam", '
                                   '"gradcam-elementwise"]', "lists the in-graph methods ['layercam'"),
}


@pytest.mark.parametrize("name", list(FORGED_CARDS))
def test_a_card_that_the_graph_contradicts_is_refused_when_the_model_loads(name: str, lite0_model: Path,
                                                                           tmp_path: Path) -> None:  # fmt: skip
    """Each gave raw ORT text per image, or (reordered methods) saliency="gradcam" returned the LayerCAM map."""
    import onnx

    value, phrase = FORGED_CARDS[name]
    model = onnx.load(lite0_model)
    key = "onnxcam." + name.split("-")[0]
    entry = next((p for p in model.metadata_props if p.key == key), None) or model.metadata_props.add(key=key)
    entry.value = value
    onnx.save(model, tmp_path / "forged.onnx")
    result = run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(tmp_path / "forged.onnx"), "--out",
                 str(tmp_path / "out"))  # fmt: skip
    assert_clean_failure(result, phrase, "re-create the model")
    assert not (tmp_path / "out").exists()


def test_overwrite_and_resume_from_another_working_folder_find_the_earlier_runs(lite0_model: Path,
                                                                               tmp_path: Path) -> None:  # fmt: skip
    """The records name files relative to the earlier run's working folder: from another one, --overwrite deleted
    nothing and every image then failed ("already exists and this run did not write it")."""
    import subprocess
    import sys

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    photo = str(EXAMPLES / "chelsea.png")

    def explain(cwd: str, out: str, *more: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "onnxcam", "explain", photo, "--model", str(lite0_model), "--out", out, *more]
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path / cwd, timeout=300)

    assert explain("a", "run").returncode == 0
    stale = tmp_path / "a" / "run" / "chelsea_285_egyptian-cat.png"
    again = explain("b", "../a/run", "--overwrite", "--top-k", "0", "--target", "tabby")
    assert again.returncode == 0 and "explained 1 of 1" in again.stdout, again.stderr
    assert not stale.exists() and (tmp_path / "a" / "run" / "chelsea_281_tabby.png").is_file()
    resumed = explain("b", "../a/run", "--resume", "--top-k", "0", "--target", "tabby")
    assert resumed.returncode == 0 and "1 skipped" in resumed.stdout, resumed.stdout + resumed.stderr


def test_the_plain_explain_command_works_every_time_in_a_fresh_folder(lite0_model: Path, tmp_path: Path) -> None:
    """After the demo, ``onnxcam explain my.jpg`` was refused: the default folder "holds an earlier run"."""
    first = run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(lite0_model), cwd=tmp_path)
    second = run("explain", str(EXAMPLES / "coffee.png"), "--model", str(lite0_model), cwd=tmp_path)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert "report: onnxcam-out/index.html" in first.stdout and "report: onnxcam-out/run2/index.html" in second.stdout
    assert (tmp_path / "onnxcam-out" / "run2" / "coffee_967_espresso.png").is_file()
    again = run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(lite0_model), "--overwrite", cwd=tmp_path)
    assert again.returncode == 0 and "report: onnxcam-out/index.html" in again.stdout


def test_a_batch_size_past_reason_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    result = run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(tmp_path / "none.onnx"), "--batch-size",
                 "100000")  # fmt: skip
    assert_clean_failure(result, "--batch-size must be from 1 to 256")


def test_the_report_shows_each_cards_own_map_and_every_map_of_the_image(lite0_model: Path, tmp_path: Path) -> None:
    """``--target tabby --top-k 2`` gave a card labelled "Egyptian cat 78.1%" whose picture was the tabby map, and
    the other maps could not be reached from the report."""
    out = tmp_path / "out"
    result = run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(lite0_model), "--target", "tabby",
                 "--top-k", "2", "--method", "gradcam,layercam", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    page = (out / "index.html").read_text()
    data = json.loads(page.split('<script id="data" type="application/json">')[1].split("</script>")[0])
    (item,) = data["items"]
    assert item["top"]["label"] == "Egyptian cat" and item["thumb"] == "chelsea_285_egyptian-cat.png"
    assert item["thumbCaption"].startswith("gradcam map of Egyptian cat")
    maps = {f for f in item["full"] if f.endswith(".png") and f != item["full"][0]}
    expected = {p.name for p in out.glob("chelsea_*.png") if ".methods." not in p.name}  # (not the method sheets)
    assert maps == expected and len(expected) == 6 and len(item["captions"]) == len(item["full"])


def test_small_messages_say_what_is_wrong(lite0_model: Path, tmp_path: Path) -> None:
    """``export --from /dev/zero`` said "not found"; ``--resume`` over a ``{}`` run.json listed every setting as
    "before None"."""
    assert_clean_failure(run("export", "--from", "/dev/zero"), "/dev/zero is not a regular file")
    out = tmp_path / "out"
    assert run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(lite0_model), "--out", str(out)).returncode == 0
    (out / "run.json").write_text("{}")
    result = run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(lite0_model), "--out", str(out), "--resume")
    assert_clean_failure(result, "is not an onnxcam run's settings")


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_node_script_fails_in_one_line_without_a_stack_trace(lite0_model: Path, tmp_path: Path) -> None:
    import subprocess

    from tests.conftest import ROOT

    if not (ROOT / "web" / "node_modules").is_dir():
        pytest.skip("web/node_modules missing: run npm ci --prefix web")
    jpeg = tmp_path / "cat.jpg"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    script = str(ROOT / "web" / "explain.mjs")
    for args, phrase in (([str(lite0_model), str(jpeg)], "is not a PNG"),
                         ([str(lite0_model), str(tmp_path / "missing.png")], "not found"),
                         ([str(tmp_path / "missing.onnx"), str(EXAMPLES / "chelsea.png")], "not found")):  # fmt: skip
        result = subprocess.run(["node", script, *args, str(tmp_path / "o.png")], capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0]


def test_two_numbers_for_a_triple_blame_the_option_that_has_them(tmp_path: Path) -> None:
    """``--mean 0.5 0.5 --std ...`` blamed --std ("unexpected extra argument")."""
    result = run("export", "--from", str(tmp_path / "m.onnx"), "--mean", "0.5", "0.5", "--std", "1", "1", "1")
    assert_clean_failure(result, "--mean needs three numbers", "got 2")


def test_top_k_messages_and_untrained_cards_say_it_once(lite0_model: Path, tmp_path: Path) -> None:
    result = run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(lite0_model), "--top-k", "-3")
    assert_clean_failure(result, "from 1 to 1000 (0 only beside --target), got -3")
    pytest.importorskip("torch")
    assert run("export", "--weights", "none", "--out", str(tmp_path / "random.onnx")).returncode == 0
    shown = run("info", str(tmp_path / "random.onnx")).stdout
    assert shown.count("NOT TRAINED") == 1, shown


def test_eval_steps_are_fed_in_bounded_chunks_and_capped(lite0_model: Path) -> None:
    """``eval --steps N`` fed every step as one batch: 10,000 steps was killed at 22.3 GB."""
    from onnxcam import metrics

    sizes: list[int] = []

    def score(images: np.ndarray) -> np.ndarray:
        sizes.append(len(images))
        return images.reshape(len(images), -1).mean(axis=1)

    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    curve = metrics._curve(score, image, np.zeros_like(image), np.random.default_rng(1).random((16, 16)), 100)
    assert len(curve) == 101 and max(sizes) <= metrics.CHUNK and sum(sizes) == 101
    assert curve[0] == image.mean() and curve[-1] == 0
    result = run("eval", str(EXAMPLES / "chelsea.png"), "--model", str(lite0_model), "--steps", "10000")
    assert_clean_failure(result, "--steps must be from 1 to 1000")


def test_a_folder_too_deep_for_path_max_is_a_record_with_its_error(lite0_model: Path, tmp_path: Path) -> None:
    """Images deeper than PATH_MAX were skipped without a word ("explained 1 of 1")."""
    import os

    shutil.copy(EXAMPLES / "chelsea.png", tmp_path / "ok.png")
    fd = os.open(tmp_path, os.O_RDONLY)
    for _ in range(18):  # 18 x 251 characters: past Linux's 4096
        os.mkdir("d" * 250, dir_fd=fd)
        inner = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    photo = os.open("deep.png", os.O_WRONLY | os.O_CREAT, dir_fd=fd)
    os.write(photo, (EXAMPLES / "chelsea.png").read_bytes())
    os.close(photo)
    os.close(fd)
    result = run("explain", str(tmp_path), "--model", str(lite0_model), "--out", str(tmp_path / "out"), "--json")
    summary = json.loads(result.stdout)["summary"]
    assert summary["images"] == 2 and summary["explained"] == 1 and summary["failed"] == 1
    assert "File name too long" in result.stderr


def test_web_refuses_sites_that_cannot_run(lite0_model: Path, tmp_path: Path) -> None:
    """IR version 14 files (onnx 1.23's default) and external data under another name gave sites that could not
    load, exit 0; more than ~125k classes threw a RangeError in the page."""
    import subprocess

    import onnx

    from onnxcam.web import DEFAULT_ORT
    from tests.conftest import ROOT

    ort = str(ROOT / DEFAULT_ORT)
    if not (ROOT / DEFAULT_ORT).is_dir():
        pytest.skip("web/node_modules missing: run npm ci --prefix web")
    model = onnx.load(lite0_model)
    model.ir_version = 14
    onnx.save(model, tmp_path / "ir14.onnx")
    assert_clean_failure(run("web", str(tmp_path / "ir14.onnx"), "--out", str(tmp_path / "a"), "--ort", ort),
                         "IR version 14", "up to 13")  # fmt: skip
    model.ir_version = 8
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, location="weights.bin", size_threshold=1024)
    assert_clean_failure(run("web", str(tmp_path / "ext.onnx"), "--out", str(tmp_path / "b"), "--ort", ort),
                         "external data file")  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    if shutil.which("node"):
        module = (ROOT / "onnxcam" / "site" / "onnxcam.mjs").as_uri()
        code = (f"import {{ ranked }} from '{module}'; const l = new Float32Array(200000); l[123456] = 5;"
                "console.log(ranked(l, 1)[0][0]);")  # fmt: skip
        shown = subprocess.run(["node", "--input-type=module", "-e", code], capture_output=True, text=True, timeout=60)
        assert shown.stdout.strip() == "123456", shown.stderr


def test_the_audit_report_has_its_table_its_title_and_each_cards_true_class(lite0_model: Path,
                                                                          tmp_path: Path) -> None:  # fmt: skip
    """The audit's HTML report had no per-class table (the audit's result), neither the true class nor the box on
    the cards, and the title "onnxcam report"."""
    folder = tmp_path / "val"
    (folder / "Egyptian cat").mkdir(parents=True)
    shutil.copy(EXAMPLES / "chelsea.png", folder / "Egyptian cat" / "cat.png")
    (tmp_path / "boxes.json").write_text(json.dumps({str(folder / "Egyptian cat" / "cat.png"): [120, 20, 330, 290]}))
    out = tmp_path / "audit"
    result = run("audit", str(folder), "--boxes", str(tmp_path / "boxes.json"), "--model", str(lite0_model), "--out",
                 str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    page = (out / "index.html").read_text()
    data = json.loads(page.split('<script id="data" type="application/json">')[1].split("</script>")[0])
    assert "<title>onnxcam audit of val</title>" in page
    assert data["table"][0]["class"] == "Egyptian cat" and data["table"][0]["images"] == 1
    assert data["items"][0]["truth"].startswith("Egyptian cat, ")
    record = json.loads((out / "audit.jsonl").read_text().splitlines()[0])
    assert record["predictions"][0]["class"] == 285 and "index" not in record["predictions"][0]
    from onnxcam.image import read_rgb
    from onnxcam.overlay import overlay_rgb

    drawn = read_rgb(record["overlay"]).astype(int)
    plain = overlay_rgb(read_rgb(EXAMPLES / "chelsea.png"), np.load(record["map"])).astype(int)
    changed = np.abs(drawn - plain).max(axis=2) > 8
    assert changed[18:23, 150:300].any(axis=0).mean() > 0.9 and changed[:, 328:333].any(axis=1)[50:280].mean() > 0.9
    assert not changed[60:250, 160:300].any(), "the box's edges, not its inside"


def test_a_ray_runs_table_follows_its_records_when_a_local_run_changes_them(lite0_model: Path,
                                                                          tmp_path: Path) -> None:  # fmt: skip
    """A plain --resume that added images left the old results.parquet beside more records; a plain --overwrite
    left rows naming deleted files."""
    parquet = pytest.importorskip("pyarrow.parquet")
    from onnxcam import outputs

    out = tmp_path / "out"
    assert run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(lite0_model), "--out", str(out)).returncode == 0
    outputs.write_parquet(outputs.read_records(out / outputs.RESULTS), out / outputs.PARQUET)  # as a Ray run ends
    photos = [str(EXAMPLES / "chelsea.png"), str(EXAMPLES / "coffee.png")]
    assert run("explain", *photos, "--model", str(lite0_model), "--out", str(out), "--resume").returncode == 0
    rows = parquet.read_table(out / outputs.PARQUET).to_pylist()
    assert sorted(Path(r["path"]).name for r in rows) == ["chelsea.png", "coffee.png"]
    assert run("explain", photos[1], "--model", str(lite0_model), "--out", str(out), "--overwrite").returncode == 0
    assert not (out / outputs.PARQUET).exists(), "the replaced run's table goes with its files"


def test_box_keys_are_relative_to_the_boxes_file_and_fast(tmp_path: Path) -> None:
    """Keys were resolved against the working folder (a boxes file was tied to where the audit ran)."""
    import os

    from onnxcam.audit import load_boxes

    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "cat" / "a.png").write_bytes(b"")
    (tmp_path / "data" / "boxes.json").write_text(json.dumps({"cat/a.png": [0, 0, 1, 1]}))
    assert load_boxes(tmp_path / "data" / "boxes.json") == {str((tmp_path / "data" / "cat" / "a.png").resolve()):
                                                          (0, 0, 1, 1)}  # fmt: skip
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(b"")
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(OnnxcamError, match="beside the boxes file and another in the working folder"):
            load_boxes(tmp_path / "data" / "boxes.json")
    finally:
        os.chdir(here)


def test_a_run_leaves_no_lock_file_in_its_folder(lite0_model: Path, tmp_path: Path) -> None:
    from onnxcam import outputs

    out = tmp_path / "out"
    assert run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(lite0_model), "--out", str(out)).returncode == 0
    assert not (out / outputs.LOCK).exists()
    with outputs.owned(out):
        with pytest.raises(OnnxcamError, match="another onnxcam run"), outputs.owned(out):
            pass
        assert (out / outputs.LOCK).exists(), "a refused second run does not remove the first run's lock"
    assert not (out / outputs.LOCK).exists()


def test_a_detectors_table_calls_its_box_scores_scores(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from tests.test_detect import TinyDetector, export_plain

    torch.manual_seed(0)
    export_plain(TinyDetector(), tmp_path / "tiny.onnx")
    assert run("export", "--from", str(tmp_path / "tiny.onnx"), *UNIT).returncode == 0
    result = run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(tmp_path / "tiny.cam.onnx"), "--conf", "0",
                 "--top-k", "2", "--out", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "class        score  label" in result.stdout and "probability" not in result.stdout


def _past_two_gigabytes(folder: Path, classes: int = 70_000) -> tuple[Path, np.ndarray, np.ndarray]:
    """A conv, ReLU, flatten and a 2.29 GB ``[8192, K]`` MatMul: its weights written in chunks as external data
    (protobuf cannot hold a message past 2 GB); returns the file, the conv's weights and the MatMul's as a
    read-only memory map."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng, features = np.random.default_rng(0), 8 * 32 * 32
    with (folder / "big.onnx.data").open("wb") as f:
        for start in range(0, features, 512):
            (rng.standard_normal((min(512, features - start), classes), dtype=np.float32) * 0.01).tofile(f)
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[features, classes],
                         data_location=TensorProto.EXTERNAL)  # fmt: skip
    for key, value in {"location": "big.onnx.data", "offset": "0", "length": str(features * classes * 4)}.items():
        weight.external_data.add(key=key, value=value)
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["scores"])]
    conv = rng.standard_normal((8, 3, 3, 3), dtype=np.float32)
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, classes])],
                              [numpy_helper.from_array(conv, "cw"), weight])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, folder / "big.onnx")
    matrix = np.memmap(folder / "big.onnx.data", np.float32, "r", shape=(features, classes))
    return folder / "big.onnx", conv, matrix


@pytest.mark.slow
def test_a_model_past_two_gigabytes_grafts_and_explains(tmp_path: Path) -> None:
    """It grafted, then failed with protobuf's "Failed to serialize proto" traceback while sizing its weights."""
    from onnxcam.engine import Engine

    source, conv, weight = _past_two_gigabytes(tmp_path)
    made = run("export", "--from", str(source), "--mean", "0", "0", "0", "--std", "1", "1", "1")
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "big.cam.onnx.data").stat().st_size > 2**31
    image = np.random.default_rng(1).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    out = Engine(tmp_path / "big.cam.onnx").run(image, np.asarray([[-1, 7]]))
    # float64 reference: the 3x3 conv as a sum of shifted images, the MatMul in chunks of the memory map
    padded = np.pad(image[0].astype(np.float64) / 255, ((1, 1), (1, 1), (0, 0)))
    activations = sum(np.einsum("hwc,kc->khw", padded[dy : dy + 32, dx : dx + 32], conv[:, :, dy, dx])
                      for dy in range(3) for dx in range(3))  # fmt: skip
    flat = np.maximum(activations, 0).reshape(-1)
    logits = sum(flat[i : i + 1024] @ np.asarray(weight[i : i + 1024], np.float64) for i in range(0, 8192, 1024))
    assert np.abs(out.logits[0] - logits).max() / np.abs(logits).max() < 1e-5
    assert out.target_classes[0, 0] == logits.argmax()
    for t, c in enumerate(out.target_classes[0]):  # a linear head: d logit_c / dA[k, p] = W[k * 1024 + p, c]
        expected = np.asarray(weight[:, c], np.float64).reshape(8, 1024).mean(axis=1)
        assert np.abs(out.weights[0, t] - expected).max() / np.abs(expected).max() < 1e-5


FALSE_FRIENDS = {  # head -> (output names, the phrases of its refusal)
    # (a CTC text recogniser's [N, T, K] softmax per step, once taken for a detector, is one: test_recognition.py)
    # a face detector's raw anchor offsets and scores, decoded with anchors outside the graph (BlazeFace)
    "anchor offsets": (("regressors", "classificators"), ["'regressors' [1, 96, 16]", "'classificators' [1, 96, 1]",
                                                        "are not a layout onnxcam knows", "--detector-layout"]),
    # a pose model's keypoint heat maps [N, 17, h, w], shaped as a segmenter's masks
    "keypoint heat maps": (("heatmaps",), ["'heatmaps' [1, 17, 8, 8]", "keypoints"]),
    # (an embedding [N, D], L2-normalised or named so, once read as a classifier of D classes, is a similarity
    # model: tests/test_similarity.py)
}


@pytest.mark.parametrize("head", FALSE_FRIENDS)
def test_an_output_shaped_like_a_task_but_something_else_is_refused_with_what_it_is(head: str, tmp_path: Path) -> None:
    """Each of these grafted (as a detector, a segmenter or a classifier of D classes) with exit 0 and meaningless
    explanations: the layout detection's false friends, each refused in one line naming what was found."""
    torch = pytest.importorskip("torch")
    import warnings

    class FalseFriend(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 3, 4, 1)  # [N, 16, 8, 8] at 32x32

        def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            f = torch.relu(self.conv(x))
            if head == "anchor offsets":  # 8x8 cells + 4x4 cells x 2 anchors = 96
                cells = torch.cat([f.flatten(2), f[:, :, ::2, ::2].flatten(2).repeat(1, 1, 2)], 2).transpose(1, 2)
                return cells @ torch.ones(16, 16), cells @ torch.ones(16, 1)
            return torch.cat([f, f[:, :1]], 1)  # keypoint heat maps

    names, phrases = FALSE_FRIENDS[head]
    source = tmp_path / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(FalseFriend().eval(), (torch.zeros(1, 3, 32, 32),), source, input_names=["pixel_values"],
                          output_names=list(names), opset_version=17, dynamo=False)  # fmt: skip
    result = run("export", "--from", str(source), "--mean", "0", "0", "0", "--std", "1", "1", "1")
    assert_clean_failure(result, *phrases)
    assert not (tmp_path / "model.cam.onnx").exists()


def test_a_matmul_whose_weight_is_computed_from_weights_has_no_batch_axis(tmp_path: Path) -> None:
    """``MatMul(features, Transpose(W))`` with the Transpose left unfolded: the rule took the computed operand of
    the output's rank for a batched one, and ONNX Runtime failed (it could have broadcast silently)."""
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnx import helper as h

    from onnxcam.engine import Engine
    from onnxcam_export.from_onnx import Preprocessing, graft_file

    rng = np.random.default_rng(0)
    conv, fc = rng.normal(size=(8, 3, 3, 3)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
    nodes = [h.make_node("Conv", ["x", "W1"], ["c"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c"], ["act"]),
             h.make_node("GlobalAveragePool", ["act"], ["p"]), h.make_node("Flatten", ["p"], ["f"]),
             h.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), h.make_node("MatMul", ["f", "Wt"], ["scores"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                         [h.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 5])],
                         [numpy_helper.from_array(conv, "W1"), numpy_helper.from_array(fc, "W")])  # fmt: skip
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "mm.onnx")
    graft_file(tmp_path / "mm.onnx", tmp_path / "mm.cam.onnx", prep=Preprocessing.create(None, (0, 0, 0), (1, 1, 1),
                                                                                           False))  # fmt: skip
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    out = Engine(tmp_path / "mm.cam.onnx").run(images, np.array([[0, 3], [1, 4]]))
    expected = np.stack([fc[[0, 3]], fc[[1, 4]]]) / 256  # d score_c / d act[k] = W[c, k] / (h * w)
    assert np.abs(out.weights - expected).max() < 1e-6 * np.abs(expected).max() + 1e-9
