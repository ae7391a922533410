"""Outside Python: the web page in headless Chromium (onnxruntime-web) and the Node.js script (onnxruntime-node).

Both need `npm ci --prefix web` (CI's .ci/run does it); the browser test needs Debian's chromium and
Playwright (the `test` extra); each test skips, saying why, where they are missing.
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from onnxcam import Explainer
from onnxcam.image import read_rgb, resize_rgb
from onnxcam.overlay import heatmap_rgb, overlay_rgb
from onnxcam.web import DEFAULT_ORT, ORT_WEB_VERSION
from tests.conftest import EXAMPLES, ROOT
from tests.test_cli import assert_clean_failure, run
from tests.test_pixels import small  # noqa: F401 (a fixture: a small CNN exported with --pixels)

CAT = EXAMPLES / "chelsea.png"
NODE = shutil.which("node")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NODE_MODULES = ROOT / "web" / "node_modules"
needs_npm = pytest.mark.skipif(not NODE_MODULES.is_dir(), reason="web/node_modules missing: run npm ci --prefix web")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1])


def test_the_javascript_jet_table_is_opencvs() -> None:
    text = (ROOT / "onnxcam" / "site" / "onnxcam.mjs").read_text()
    table = re.search(r"export const JET = new Uint8Array\(\[(.*?)\]\);", text, re.S)[1]
    values = np.asarray([int(v) for v in re.findall(r"\d+", table)], np.uint8).reshape(256, 3)
    np.testing.assert_array_equal(values, heatmap_rgb((np.arange(256, dtype=np.float32) / 255)[None])[0])


def test_the_npm_pins_are_exact_and_agree_with_the_page() -> None:
    package = json.loads((ROOT / "web" / "package.json").read_text())
    lock = json.loads((ROOT / "web" / "package-lock.json").read_text())
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in package["dependencies"].values()), "exact versions"
    assert package["dependencies"]["onnxruntime-web"] == ORT_WEB_VERSION
    for name, version in package["dependencies"].items():
        assert lock["packages"][f"node_modules/{name}"]["version"] == version


@needs_npm
@pytest.mark.skipif(NODE is None, reason="Node.js is not installed (.ci/run installs it)")
def test_the_ir_limit_web_checks_is_the_pinned_onnxruntime_webs_own(tmp_path: Path) -> None:
    """`onnxcam web` refuses files past ORT_WEB_MAX_IR: the pinned onnxruntime-web itself loads that IR version and
    refuses the next ("Unsupported model IR version: 14, max supported IR version: 13")."""
    import onnx
    from onnx import TensorProto, helper

    from onnxcam.web import ORT_WEB_MAX_IR

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])  # fmt: skip
    versions = (ORT_WEB_MAX_IR, ORT_WEB_MAX_IR + 1)
    for version in versions:
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=version),
                  tmp_path / f"ir{version}.onnx")  # fmt: skip
    code = ("import * as ort from 'onnxruntime-web'; ort.env.wasm.numThreads = 1;"
            f"for (const v of {list(versions)}) {{ try {{ await ort.InferenceSession.create('{tmp_path.as_posix()}/ir' "
            "+ v + '.onnx'); console.log(v, 'loads'); } catch (e) { console.log(v, String(e.message ?? e)); } }")
    shown = subprocess.run(["node", "--input-type=module", "-e", code], capture_output=True, text=True, timeout=120,
                           cwd=ROOT / "web")  # fmt: skip
    loaded, refused = shown.stdout.strip().splitlines()
    assert loaded == f"{ORT_WEB_MAX_IR} loads", shown.stderr
    assert f"max supported IR version: {ORT_WEB_MAX_IR}" in refused, refused


def test_web_without_onnxruntime_web_is_one_line_and_writes_nothing(lite0_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    result = run("web", str(lite0_model), "--out", str(out), "--ort", str(tmp_path))
    assert_clean_failure(result, "onnxruntime-web not found", "npm ci --prefix web", ORT_WEB_VERSION)
    assert not out.exists()


def test_web_refuses_a_model_with_external_weights(lite0_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "big.onnx"
    model.symlink_to(lite0_model)
    (tmp_path / "big.onnx.data").write_bytes(b"")  # as onnxcam export writes the weights of a model over 100 MB
    result = run("web", str(model), "--out", str(tmp_path / "site"), "--ort", str(ROOT / DEFAULT_ORT))
    assert_clean_failure(result, "big.onnx.data", "models in one file")
    assert not (tmp_path / "site").exists()


@pytest.fixture(scope="module")
def site(lite0_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not NODE_MODULES.is_dir():
        pytest.skip("web/node_modules missing: run npm ci --prefix web")
    out = tmp_path_factory.mktemp("site")
    result = run("web", str(lite0_model), "--out", str(out), "--ort", str(ROOT / DEFAULT_ORT))
    assert result.returncode == 0, result.stderr
    return out


@contextmanager
def serving(site: Path) -> Iterator[str]:
    """The site on a local static file server (127.0.0.1, a free port) while the block runs."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=site))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/index.html"
    finally:
        server.shutdown()
        thread.join()


def in_chromium(site: Path, photo: Path, before: Callable | None = None, after: Callable | None = None) -> tuple:
    """Open the site in headless Chromium, run ``before(page)``, give it ``photo``, wait for the result; then
    ``after(page)``. Returns (window.onnxcam, after's value, the page's text); no page error may occur."""
    playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is in the test extra")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
    with serving(site) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            page.wait_for_function("window.onnxcam.state !== 'loading'", timeout=120_000)
            if before:
                before(page)
            page.set_input_files("#file", str(photo))
            page.wait_for_function("['done', 'error'].includes(window.onnxcam.state)", timeout=120_000)
            state = page.evaluate("window.onnxcam")
            found = after(page) if after else None
            text = page.inner_text("body")
        finally:
            browser.close()
    assert state["state"] == "done", state.get("error")
    assert not errors, errors
    return state, found, text


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_page_explains_the_cat_in_headless_chromium(site: Path, lite0_model: Path) -> None:
    """The browser's top classes and Grad-CAM map of the bundled cat against the Python path's (same model)."""

    def click_second(page: object) -> list[str]:
        buttons = page.locator("#classes button")
        buttons.nth(1).click()
        return [buttons.nth(i).get_attribute("aria-pressed") for i in range(buttons.count())]

    state, pressed, text = in_chromium(site, CAT, after=click_second)
    assert "classes, its labels baked in the file" in text and "prompts" not in text.split("Pick a photo")[0]
    explainer = Explainer(lite0_model)
    reference = explainer.explain(resize_rgb(read_rgb(CAT), explainer.card.input_size), top_k=5)
    assert state["classes"][0] == reference.maps[0].index == 285  # Egyptian cat
    browser_map = np.asarray(state["map"], np.float32).reshape(explainer.card.input_size)
    assert pearson(browser_map, reference.maps[0].cam) >= 0.999
    assert pressed == ["false", "true", "false", "false", "false"], "a click shows that class's map"


@pytest.mark.slow
@needs_npm
@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_node_script_writes_the_overlay_of_the_cli(lite0_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "node.png"
    result = subprocess.run([NODE, str(ROOT / "web" / "explain.mjs"), str(lite0_model), str(CAT), str(out)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split("\t")[0] == "285"
    photo = read_rgb(CAT)
    expected = overlay_rgb(photo, Explainer(lite0_model).explain(photo).maps[0].cam)
    ours = read_rgb(out)
    assert ours.shape == expected.shape
    assert pearson(ours, expected) >= 0.999


HARD_PROMPTS = ["a photo of a dog", "A  Photo OF a Cat!!", "it's the 2nd of July, 1999 \u2014 na\u00efve caf\u00e9",
                "don't you'll we've I'm", "hello,world...foo?!", "\u65e5\u672c\u8a9e", "emoji \U0001f436 dog",
                "x\u00b2+y\u00b3", "<start_of_text> hi", "tab\tand\nnewline", "a1b2c3", "  spaces   around  ",
                "red circle blue square", "grass"]  # fmt: skip


def _trained_clip_vocabulary(path: Path) -> Path:
    """A CLIP-style BPE vocabulary file (a version line, then merges) of merges learnt on this repository's README
    by Hugging Face's BPE trainer over CLIP's words and byte alphabet, as bpe_simple_vocab_16e6.txt.gz is laid out."""
    import gzip

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    from onnxcam_export.image_text import CLIP_SPLIT

    learner = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    learner.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    learner.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # fmt: skip
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix="</w>", show_progress=False)  # fmt: skip
    learner.train([str(ROOT / "README.md")], trainer)
    merges = json.loads(learner.to_str())["model"]["merges"]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges))
    return path


@needs_npm
@pytest.mark.skipif(NODE is None, reason="Node.js is not installed (.ci/run installs it)")
def test_the_pages_tokenizer_gives_the_tokenizers_packages_ids(tmp_path: Path) -> None:
    """tokenizer.mjs against Hugging Face's tokenizers (the Python path's) on hard prompts: a word-level tokenizer
    with a template, CLIP's BPE vocabulary as onnxcam writes it (merges learnt here: 1000+ of them), and the same
    with Hugging Face's CLIP layout (RobertaProcessing, ByteLevel over GPT-2's split)."""
    from tokenizers import Tokenizer, processors

    from onnxcam_export.image_text import clip_bpe_tokenizer
    from tests.test_clip import write_tokenizer

    write_tokenizer(tmp_path / "words.json")
    clip = clip_bpe_tokenizer(_trained_clip_vocabulary(tmp_path / "bpe.txt.gz"))
    assert clip.get_vocab_size() > 1000
    clip.save(str(tmp_path / "clip.json"))
    layout = json.loads(clip.to_str())
    layout["pre_tokenizer"]["pretokenizers"][1]["use_regex"] = True
    hf = Tokenizer.from_str(json.dumps(layout))
    start, end = clip.token_to_id("<start_of_text>"), clip.token_to_id("<end_of_text>")
    hf.post_processor = processors.RobertaProcessing(("<end_of_text>", end), ("<start_of_text>", start),
                                                     add_prefix_space=False, trim_offsets=False)  # fmt: skip
    hf.save(str(tmp_path / "hf.json"))
    (tmp_path / "prompts.json").write_text(json.dumps(HARD_PROMPTS))
    code = ("import { Tokenizer } from './tokenizer.mjs'; import fs from 'node:fs';"
            "const [file, prompts] = process.argv.slice(1);"
            "const t = new Tokenizer(JSON.parse(fs.readFileSync(file, 'utf8')));"
            "for (const p of JSON.parse(fs.readFileSync(prompts, 'utf8'))) console.log(JSON.stringify(t.encode(p)));")
    for name in ("words.json", "clip.json", "hf.json"):
        shown = subprocess.run([NODE, "--input-type=module", "-e", code, str(tmp_path / name),
                                str(tmp_path / "prompts.json")], capture_output=True, text=True, timeout=120,
                               cwd=ROOT / "onnxcam" / "site")  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        ours = [json.loads(line) for line in shown.stdout.splitlines()]
        reference = Tokenizer.from_file(str(tmp_path / name))
        assert ours == [reference.encode(p).ids for p in HARD_PROMPTS], name
    assert any(len(ids) > 4 for ids in ours) and max(max(ids) for ids in ours) > 600, "real merges were used"


@pytest.mark.slow
@needs_npm
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_page_explains_typed_prompts_of_an_image_text_model(tmp_path: Path) -> None:
    """An image-text model's page: its prompt box, the text tower and tokenizer run in the browser, one call for
    three prompts; each prompt's logit and map equal the Python path's (explain --prompt) on the same photo."""
    pytest.importorskip("torch")
    import cv2
    import torch

    from onnxcam_export.from_onnx import graft_file
    from tests import test_clip as clip

    torch.manual_seed(0)
    model = clip.TinyClip().eval()
    ids, mask = torch.tensor([clip.token_ids("a dog"), clip.token_ids("a cat")]), torch.ones(2, 4, dtype=torch.long)
    clip.export(model, (ids, torch.zeros(1, 3, *clip.SIZE), mask), tmp_path / "model.onnx",
                ["input_ids", "pixel_values", "attention_mask"],
                ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"],
                {"input_ids": {0: "T", 1: "L"}, "attention_mask": {0: "T", 1: "L"},
                 "pixel_values": {0: "N"}})  # fmt: skip
    clip.write_tokenizer(tmp_path / "tokenizer.json")
    graft_file(tmp_path / "model.onnx", tmp_path / "clip.cam.onnx", prep=clip.UNIT)
    written = run("web", str(tmp_path / "clip.cam.onnx"), "--out", str(tmp_path / "site"), "--ort",
                  str(ROOT / DEFAULT_ORT))  # fmt: skip
    assert written.returncode == 0, written.stderr
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), clip.images(1, seed=3)[0][:, :, ::-1])
    prompts = ["a red circle", "grass", "a photo of a dog"]
    typed = "\n".join(prompts)
    state, _, text = in_chromium(tmp_path / "site", photo, before=lambda page: page.fill("#prompts", typed))
    assert "text prompts typed in the box below" in text
    expected = Explainer(tmp_path / "clip.cam.onnx").explain(read_rgb(photo), prompts=prompts)
    assert state["classes"] == [0, 1, 2]
    np.testing.assert_allclose(state["logits"], [m.logit for m in expected.maps], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(state["probabilities"], [m.probability for m in expected.maps], atol=1e-5)
    for browser_map, m in zip(state["maps"], expected.maps, strict=True):
        assert pearson(np.asarray(browser_map).reshape(clip.SIZE), m.cam) >= 0.999


PIXEL_SCRIPT = """import ort from 'onnxruntime-node'; import fs from 'node:fs';
import { explainPixels, gaussLegendre } from '../onnxcam/site/onnxcam.mjs';
const [model, photo, size, method, target] = process.argv.slice(2);
const session = await ort.InferenceSession.create(model, { logSeverityLevel: 3 });
const pixels = Uint8Array.from(JSON.parse(fs.readFileSync(photo, 'utf8')));
const found = await explainPixels(ort, session, pixels, [Number(size), Number(size)], [Number(target)], method);
const rule = gaussLegendre(7);
console.log(JSON.stringify({ classes: found.classes, map: Array.from(found.maps[0]),
                             alphas: Array.from(rule.alphas), weights: Array.from(rule.weights) }));
"""


@needs_npm
@pytest.mark.skipif(NODE is None, reason="Node.js is not installed (.ci/run installs it)")
@pytest.mark.parametrize("method", ["saliency", "gradient-x-input", "integrated-gradients", "guided-backprop"])
def test_the_javascript_pixel_maps_equal_the_python_paths(request: pytest.FixtureRequest, tmp_path: Path,
                                                           method: str) -> None:  # fmt: skip
    """onnxcam.mjs's saliency, gradient x input, guided backprop and Integrated Gradients (32 Gauss-Legendre steps
    as rows of the file, 4 a call) on onnxruntime-node against Explainer.explain's maps (Pearson >= 0.999, within
    1e-3); its Gauss-Legendre rule is numpy's leggauss on [0, 1]."""
    from onnxcam.pixels import quadrature
    from tests.conftest import random_images

    _, path = request.getfixturevalue("small")
    photo = random_images(1, seed=21, size=32)[0]
    (tmp_path / "photo.json").write_text(json.dumps(photo.ravel().tolist()))
    (ROOT / "web" / ".pixels-test.mjs").write_text(PIXEL_SCRIPT)
    try:
        shown = subprocess.run([NODE, str(ROOT / "web" / ".pixels-test.mjs"), str(path), str(tmp_path / "photo.json"),
                                "32", method, "3"], capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        (ROOT / "web" / ".pixels-test.mjs").unlink(missing_ok=True)
    assert shown.returncode == 0, shown.stderr
    found = json.loads(shown.stdout)
    alphas, weights = quadrature(7)
    np.testing.assert_allclose(found["alphas"], alphas, atol=1e-12)
    np.testing.assert_allclose(found["weights"], weights, atol=1e-12)
    reference = Explainer(path).explain(photo, targets=[3], method=method).maps[0]
    ours = np.asarray(found["map"], np.float32).reshape(32, 32)
    assert found["classes"] == [3]
    assert pearson(ours, reference.cam) >= 0.999
    assert np.abs(ours - reference.cam).max() <= 1e-3


@needs_npm
@pytest.mark.skipif(NODE is None, reason="Node.js is not installed (.ci/run installs it)")
def test_the_node_script_writes_a_pixel_methods_overlay(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from onnxcam.outputs import write_picture_rgb
    from tests.conftest import random_images

    _, path = request.getfixturevalue("small")
    photo = random_images(1, seed=22, size=32)[0]
    write_picture_rgb(tmp_path / "p.png", photo)
    out = tmp_path / "node.png"
    result = subprocess.run([NODE, str(ROOT / "web" / "explain.mjs"), str(path), str(tmp_path / "p.png"), str(out),
                             "-1", "saliency"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = overlay_rgb(photo, Explainer(path).explain(photo, method="saliency").maps[0].cam)
    assert pearson(read_rgb(out), expected) >= 0.999
    wrong = subprocess.run([NODE, str(ROOT / "web" / "explain.mjs"), str(path), str(tmp_path / "p.png"), str(out),
                            "-1", "smoothgrad"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert wrong.returncode == 2 and "usage:" in wrong.stderr and "Error" not in wrong.stderr


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_page_shows_integrated_gradients_of_a_file_with_pixels(request: pytest.FixtureRequest,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    """The page's map selector (a file exported with --pixels): Integrated Gradients computed in the browser from
    the file's gradients, its 32 steps as rows of the same file, against the Python path's map."""
    from onnxcam.outputs import write_picture_rgb
    from tests.conftest import random_images

    if not NODE_MODULES.is_dir():
        pytest.skip("web/node_modules missing: run npm ci --prefix web")
    _, path = request.getfixturevalue("small")
    made = run("web", str(path), "--out", str(tmp_path / "site"), "--ort", str(ROOT / DEFAULT_ORT))
    assert made.returncode == 0, made.stderr
    photo = random_images(1, seed=23, size=32)[0]
    write_picture_rgb(tmp_path / "p.png", photo)
    state, _, text = in_chromium(tmp_path / "site", tmp_path / "p.png",
                                 before=lambda page: page.select_option("#method", "integrated-gradients"))
    assert state["method"] == "integrated-gradients" and "Integrated Gradients and guided" in text
    reference = Explainer(path).explain(photo, top_k=1, method="integrated-gradients").maps[0]
    assert state["classes"][0] == reference.index
    assert pearson(np.asarray(state["map"], np.float32).reshape(32, 32), reference.cam) >= 0.999
