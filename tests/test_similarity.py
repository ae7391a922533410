"""Embedding models (``[N, D]``, L2-normalised: face recognition, re-identification, an image tower) grafted with
no flag: the cosine similarity to references given per call, its gradient against torch autograd (float64
reference, float32 graph), and ``explain --like``. They were refused as embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onnxcam.api import Explainer
from onnxcam.engine import Engine
from onnxcam_export.from_onnx import Preprocessing, graft_file
from tests.conftest import assert_rows_match_autograd
from tests.test_cli import assert_clean_failure, run
from tests.test_transformers import export_plain

torch = pytest.importorskip("torch")
nn = torch.nn
UNIT = Preprocessing.create(None, (0, 0, 0), (1, 1, 1), False)  # the model takes pixel / 255
SIZE = (32, 32)
TOL = 1e-4


class Embedder(nn.Module):
    """Convolutions to an 8x8 grid, a pool, a linear layer to 16 dimensions and an L2 normalisation."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(x))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        e = self.fc(features.mean((2, 3)))
        return e / e.norm(dim=1, keepdim=True)


def images(count: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *SIZE, 3), dtype=np.uint8)


def as_input(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch / 255.0).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, list[str]]:
    torch.manual_seed(0)
    model = Embedder().eval()
    folder = tmp_path_factory.mktemp("embedder")
    export_plain(model, SIZE, folder / "emb.onnx", dynamo=False, output="output")
    card, notes = graft_file(folder / "emb.onnx", folder / "emb.cam.onnx", prep=UNIT)
    assert card["task"] == "similarity"
    return model, folder / "emb.cam.onnx", notes


def test_the_similarity_to_each_reference_and_its_gradient_equal_autograd(embedder: tuple) -> None:
    model, path, notes = embedder
    assert any("is L2-normalised: an embedding" in n for n in notes), notes
    reference = Embedder().double()
    reference.load_state_dict(model.state_dict())
    refs = np.random.default_rng(1).standard_normal((3, 16))
    out = Engine(path).run(images(), np.array([[0, 1, 2], [2, 0, 1]]), full_gradients=True, references=refs)
    features = reference.features(as_input(images())).detach().requires_grad_(True)
    embeddings = reference.embed(features)
    units = torch.from_numpy(refs / np.linalg.norm(refs, axis=1, keepdims=True))
    cosines = embeddings @ units.T  # [N, 3]
    np.testing.assert_allclose(out.embeddings, embeddings.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.logits, cosines.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert_rows_match_autograd(out, cosines, features, TOL)


def test_explain_like_a_photo_and_like_saved_embeddings(embedder: tuple, tmp_path: Path) -> None:
    import cv2

    model, path, _ = embedder
    a, b, c = images(3, seed=4)
    for name, photo in (("a", a), ("b", b), ("c", c)):
        cv2.imwrite(str(tmp_path / f"{name}.png"), photo[:, :, ::-1])
    with torch.no_grad():
        e = model(as_input(np.stack([a, b, c])).float()).numpy()
    np.save(tmp_path / "c.npy", e[2])
    result = run("explain", str(tmp_path / "a.png"), "--model", str(path), "--like", str(tmp_path / "b.png"),
                 "--like", str(tmp_path / "c.npy"), "--out", str(tmp_path / "out"), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    item = json.loads(result.stdout)["images"][0]
    assert [p["label"] for p in item["predictions"]] == ["b", "c"]
    np.testing.assert_allclose([p["probability"] for p in item["predictions"]], [e[0] @ e[1], e[0] @ e[2]],
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    assert [t["label"] for t in item["targets"]] == ["b", "c"]
    assert all("cosine similarity to this reference" in t["explains"] for t in item["targets"])
    assert all(Path(t["overlay"]).is_file() for t in item["targets"])
    explainer = Explainer(path)
    np.testing.assert_allclose(explainer.embed([a])[0], e[0], rtol=1e-5, atol=1e-6)
    unlike = run("explain", str(tmp_path / "a.png"), "--model", str(path), "--out", str(tmp_path / "no"))
    assert_clean_failure(unlike, "explains a likeness", "--like")
    np.save(tmp_path / "wide.npy", np.ones((1, 7)))
    wide = run("explain", str(tmp_path / "a.png"), "--model", str(path), "--like", str(tmp_path / "wide.npy"),
               "--out", str(tmp_path / "wide"))  # fmt: skip
    assert_clean_failure(wide, "references must be [R, 16]")


def test_both_explains_the_reference_against_each_image_too(embedder: tuple, tmp_path: Path) -> None:
    """``--like b --both``: b's map of its cosine similarity to a (and to c) beside a's and c's to b; b's Grad-CAM
    map equals torch autograd's on b's features (float64), its cosine torch's, and the run counts two images."""
    import cv2

    from onnxcam import maps

    model, path, _ = embedder
    a, b, c = images(3, seed=5)
    for name, photo in (("a", a), ("b", b), ("c", c)):
        cv2.imwrite(str(tmp_path / f"{name}.png"), photo[:, :, ::-1])
    result = run("explain", str(tmp_path / "a.png"), str(tmp_path / "c.png"), "--model", str(path), "--like",
                 str(tmp_path / "b.png"), "--both", "--batch-size", "1", "--out", str(tmp_path / "out"),
                 "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["summary"]["images"] == 2 and doc["summary"]["explained"] == 2, doc["summary"]
    found = {Path(item["path"]).name: item for item in doc["images"]}
    assert found["b.png"]["mirror"] and "mirror" not in found["a.png"]
    back = {t["label"]: t for t in found["b.png"]["targets"]}
    assert sorted(back) == ["a", "c"]  # one batch per image: b against a, then against c
    reference = Embedder().double()
    reference.load_state_dict(model.state_dict())
    features = reference.features(as_input(np.stack([a, b, c]))).detach()
    units = reference.embed(features).detach()
    for k, other in ((0, "a"), (2, "c")):
        mine = features[1:2].clone().requires_grad_(True)
        cosine = (reference.embed(mine)[0] * units[k]).sum()
        (gradient,) = torch.autograd.grad(cosine, mine)
        cam = torch.relu((gradient.mean((2, 3), keepdim=True) * mine).sum(1))[0].detach().numpy()
        assert back[other]["similarity"] == pytest.approx(cosine.item(), abs=1e-5)
        expected, _ = maps.finish(cam, SIZE)
        np.testing.assert_allclose(np.load(back[other]["map"]), expected, atol=1e-4)
    a_to_b = found["a.png"]["targets"][0]
    assert a_to_b["label"] == "b" and a_to_b["similarity"] == pytest.approx(back["a"]["similarity"], abs=1e-6)
    np.save(tmp_path / "b.npy", units[1].numpy())
    only = run("explain", str(tmp_path / "a.png"), "--model", str(path), "--like", str(tmp_path / "b.npy"),
               "--both", "--out", str(tmp_path / "npy"))  # fmt: skip
    assert_clean_failure(only, "--both explains each --like image", "--like IMAGE")
    same = run("explain", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model", str(path), "--like",
               str(tmp_path / "b.png"), "--both", "--out", str(tmp_path / "same"))  # fmt: skip
    assert_clean_failure(same, "give it as --like or as an image")


def test_an_embedding_named_so_is_a_similarity_model_too(tmp_path: Path) -> None:
    """Not L2-normalised, but named as one (``image_embeds``): it was refused (and before that read as 16
    classes)."""

    class Unnormalised(Embedder):
        def embed(self, features: torch.Tensor) -> torch.Tensor:
            return self.fc(features.mean((2, 3)))

    torch.manual_seed(0)
    export_plain(Unnormalised().eval(), SIZE, tmp_path / "e.onnx", dynamo=False, output="image_embeds")
    card, notes = graft_file(tmp_path / "e.onnx", tmp_path / "e.cam.onnx", prep=UNIT)
    assert card["task"] == "similarity" and any("is named as one: an embedding" in n for n in notes), notes


class TokenEmbedder(nn.Module):
    """A ViT whose embedding is its class token, normalised (DINOv2's, CLIP's image tower): the gradient reaches the
    grid tokens only before the last block's attention."""

    def __init__(self) -> None:
        super().__init__()
        from onnxcam_export.transformers import VisionTransformer

        self.vit = VisionTransformer(SIZE, patch=8, dim=32, depth=2, heads=4, classes=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.vit.blocks[0](self.tokens(x)))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        x = v.patch_embed(x).flatten(2).transpose(1, 2)
        return torch.cat([v.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + v.pos_embed

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.vit.head(self.vit.norm(self.vit.blocks[1](tokens))[:, 0])
        return e / e.norm(dim=1, keepdim=True)


def test_a_class_token_embedding_is_explained_at_the_last_token_layer_its_gradient_reaches(tmp_path: Path) -> None:
    """The layer is found with references in the probe's feed: with none (the file's default, one zero vector) every
    similarity, and so every gradient, was zero, and a ViT embedder was refused ("reaches no token layer")."""
    torch.manual_seed(0)
    model = TokenEmbedder().eval()
    export_plain(model, SIZE, tmp_path / "vit.onnx", dynamo=False, output="output")
    card, _ = graft_file(tmp_path / "vit.onnx", tmp_path / "vit.cam.onnx", prep=UNIT)
    assert card["task"] == "similarity" and "blocks.0" in card["layer"], card["layer"]
    assert "(32x4x4) [token layer: 1 + 16 tokens of 32, 4x4 grid, class token dropped]" in card["layer"]
    reference = TokenEmbedder().double()
    reference.load_state_dict(model.state_dict())
    refs = np.random.default_rng(1).standard_normal((3, 16))
    out = Engine(tmp_path / "vit.cam.onnx").run(images(), np.array([[0, 1], [2, 0]]), full_gradients=True,
                                                references=refs)  # fmt: skip
    with torch.no_grad():
        tokens = reference.vit.blocks[0](reference.tokens(as_input(images())))
    grid = tokens[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4).clone().requires_grad_(True)  # the contract's view
    embeddings = reference.embed(torch.cat([tokens[:, :1], grid.flatten(2).transpose(1, 2)], dim=1))
    cosines = embeddings @ torch.from_numpy(refs / np.linalg.norm(refs, axis=1, keepdims=True)).T
    np.testing.assert_allclose(out.logits, cosines.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert_rows_match_autograd(out, cosines, grid, TOL)


def test_a_token_model_keeps_weight_prepacking_and_a_convolutional_model_not(embedder: tuple, tmp_path: Path) -> None:
    """A transformer's MatMuls multiply each weight by every token: without ONNX Runtime's pre-packing a CLIP ViT-B/32
    explain took 1.6x its own forward (benchmarks/clip_cost.py). Its card says ``prepack``, a CNN's does not (there it
    only copies the weights), and the engine's session follows the card."""
    from onnxcam.engine import NO_PREPACKING

    torch.manual_seed(0)
    export_plain(TokenEmbedder().eval(), SIZE, tmp_path / "vit.onnx", dynamo=False, output="output")
    card, _ = graft_file(tmp_path / "vit.onnx", tmp_path / "vit.cam.onnx", prep=UNIT)
    chosen = {}
    for path in (tmp_path / "vit.cam.onnx", embedder[1]):
        engine = Engine(path)
        chosen[path.stem] = (engine.card.prepack, engine.session.get_session_options().get_session_config_entry(
            NO_PREPACKING))  # fmt: skip
    assert card["prepack"] and chosen == {"vit.cam": (True, "0"), "emb.cam": (False, "1")}


def test_integrated_gradients_of_a_likeness_equal_the_formula_by_autograd(tmp_path: Path) -> None:
    """explain --like with --method integrated-gradients on a file exported with --pixels: the cosine to each
    reference integrated from a black photo (the references fed to every row) against the sum by autograd."""
    from onnxcam import pixels
    from onnxcam.api import Explainer
    from tests.test_pixels import assert_close

    torch.manual_seed(0)
    model = Embedder().eval()
    export_plain(model, SIZE, tmp_path / "emb.onnx", dynamo=False, output="output")
    graft_file(tmp_path / "emb.onnx", tmp_path / "emb.cam.onnx", prep=UNIT, pixels=True)
    refs = np.random.default_rng(2).standard_normal((2, 16))
    np.save(tmp_path / "refs.npy", refs)
    photo = images(1, seed=3)[0]
    steps = 8
    found = Explainer(tmp_path / "emb.cam.onnx").explain(photo, method="integrated-gradients",
                                                         like=[tmp_path / "refs.npy"],
                                                         attribution=pixels.Settings(steps=steps))  # fmt: skip
    units = torch.from_numpy(refs / np.linalg.norm(refs, axis=1, keepdims=True))
    x = as_input(photo[None])
    alphas, sizes = pixels.quadrature(steps)
    total = torch.zeros(2, *x.shape[1:], dtype=torch.float64)
    reference = Embedder().double()
    reference.load_state_dict(model.state_dict())
    for alpha, size in zip(alphas, sizes, strict=True):
        point = (alpha * x).requires_grad_(True)  # (the black photo's input is 0: the model takes pixel / 255)
        cosines = reference(point) @ units.T
        for r in range(2):
            total[r] += size * torch.autograd.grad(cosines[0, r], point, retain_graph=True)[0][0]
    expected = (total * x[0]).numpy()
    assert [m.index for m in found.maps] == [0, 1]
    for r, m in enumerate(found.maps):
        assert_close(m.attribution[None, None], expected[r].sum(0)[None, None])
    with torch.no_grad():
        change = (reference(x) @ units.T - reference(0 * x) @ units.T)[0].numpy()
    errors = np.abs(expected.reshape(2, -1).sum(1) - change) / np.abs(change)
    assert [m.completeness for m in found.maps] == pytest.approx(errors, abs=1e-4)
