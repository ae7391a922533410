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
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from onnxcam import Explainer
from onnxcam.image import read_rgb, resize_rgb
from onnxcam.overlay import heatmap_rgb, overlay_rgb
from onnxcam.web import DEFAULT_ORT, ORT_WEB_VERSION
from tests.conftest import EXAMPLES, ROOT
from tests.test_cli import assert_clean_failure, run

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


@pytest.fixture
def served(site: Path) -> Iterator[str]:
    """The site on a local static file server (127.0.0.1, a free port) for the test's duration."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=site))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/index.html"
    server.shutdown()
    thread.join()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_page_explains_the_cat_in_headless_chromium(served: str, lite0_model: Path) -> None:
    """The browser's top classes and Grad-CAM map of the bundled cat against the Python path's (same model)."""
    playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is in the test extra")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(served)
            page.wait_for_function("window.onnxcam.state !== 'loading'", timeout=120_000)
            page.set_input_files("#file", str(CAT))
            page.wait_for_function("['done', 'error'].includes(window.onnxcam.state)", timeout=120_000)
            state = page.evaluate("window.onnxcam")
            buttons = page.locator("#classes button")
            buttons.nth(1).click()
            pressed = [buttons.nth(i).get_attribute("aria-pressed") for i in range(buttons.count())]
        finally:
            browser.close()
    assert state["state"] == "done", state.get("error")
    assert not errors, errors
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
