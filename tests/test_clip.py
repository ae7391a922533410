"""Image-text models (CLIP-style: an image tower, a text tower, ``logit_scale * cos``), exported as optimum does (one
combined file) or as two towers: the prompts' logits equal the torch model's own, each prompt's gradient at the
target layer equals torch autograd (float64 reference, float32 graph), several prompts in one call, for the logit
and its softmax over the prompts; the zero-shot file of baked prompts gives the prompt path's maps; the text tower
runs once per distinct prompt; bad input is refused in one line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from onnxcam.api import Explainer
from onnxcam.engine import Engine
from onnxcam.errors import OnnxcamError
from onnxcam_export.from_onnx import Preprocessing, graft_file
from tests.conftest import assert_rows_match_autograd
from tests.test_cli import assert_clean_failure, run

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")
nn = torch.nn
UNIT = Preprocessing.create(None, (0, 0, 0), (1, 1, 1), False)  # the towers take pixel / 255
SIZE = (32, 32)
LENGTH = 8  # the two-file text tower's fixed length (open_clip's is 77)
SCALE = 14.3
VOCAB = ["[PAD]", "[UNK]", "<s>", "</s>", "a", "photo", "of", "dog", "cat", "grass", "red", "circle", "blue", "square"]
PROMPTS = ["a photo of a dog", "grass", "a red circle"]
TOL = 1e-4


def write_tokenizer(path: Path) -> None:
    """A word-level Hugging Face tokenizer.json: lower case, words, ``<s> ... </s>`` around each prompt."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2),
                                                                                                  ("</s>", 3)])
    tokenizer.save(str(path))


def token_ids(prompt: str) -> list[int]:
    """The ids the tokenizer above gives, computed another way."""
    return [2, *(VOCAB.index(w) if w in VOCAB else 1 for w in prompt.lower().split()), 3]


class TinyClip(nn.Module):
    """An image tower (convolutions to an 8x8 grid, a pool, a projection) and a text tower (token and position
    embeddings, attention pooling over the unmasked tokens, a projection), both to 12 dimensions."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.visual = nn.Linear(16, 12)
        self.tokens, self.positions = nn.Embedding(len(VOCAB), 16), nn.Parameter(torch.randn(LENGTH, 16))
        self.query, self.textual = nn.Parameter(torch.randn(16)), nn.Linear(16, 12)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(SCALE))))

    def image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pooled(self.features(pixels))

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        return self.visual(features.mean((2, 3)))

    def text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions[: ids.shape[1]]
        weights = torch.softmax((x @ self.query).masked_fill(mask == 0, -1e4), dim=1)
        return self.textual((weights.unsqueeze(2) * x).sum(1))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        """As Hugging Face's CLIPModel: logits_per_image, logits_per_text, text_embeds, image_embeds."""
        image = unit(self.image(pixel_values))
        text = unit(self.text(input_ids, attention_mask))
        per_image = self.logit_scale.exp() * image @ text.T
        return per_image, per_image.T, text, image


class ImageTower(nn.Module):
    def __init__(self, clip: TinyClip) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.image(x)


class TextTower(nn.Module):
    def __init__(self, clip: TinyClip) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.clip.text(input_ids, attention_mask)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, path, input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=17, dynamo=False)  # fmt: skip


def images(count: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *SIZE, 3), dtype=np.uint8)


def as_input(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch / 255.0).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyClip, Path]:
    """The model, exported as optimum's zero-shot export (one file, free text length, tokenizer.json beside it)
    and as two towers (the text tower of fixed length, in its own folder with its tokenizer)."""
    torch.manual_seed(0)
    model = TinyClip().eval()
    folder = tmp_path_factory.mktemp("clip")
    ids, mask = torch.tensor([token_ids("a dog"), token_ids("a cat")]), torch.ones(2, 4, dtype=torch.long)
    export(model, (ids, torch.zeros(1, 3, *SIZE), mask), folder / "model.onnx",
           ["input_ids", "pixel_values", "attention_mask"],
           ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"],
           {"input_ids": {0: "T", 1: "L"}, "attention_mask": {0: "T", 1: "L"}, "pixel_values": {0: "N"}})  # fmt: skip
    write_tokenizer(folder / "tokenizer.json")
    export(ImageTower(model), (torch.zeros(1, 3, *SIZE),), folder / "image.onnx", ["x"], ["image_embeds"],
           {"x": {0: "N"}})  # fmt: skip
    (folder / "towers").mkdir()
    fixed = torch.zeros(1, LENGTH, dtype=torch.long), torch.ones(1, LENGTH, dtype=torch.long)
    export(TextTower(model), fixed, folder / "towers" / "text.onnx", ["input_ids", "attention_mask"],
           ["text_embeds"], {"input_ids": {0: "T"}, "attention_mask": {0: "T"}})  # fmt: skip
    write_tokenizer(folder / "towers" / "tokenizer.json")
    return model, folder


def reference(model: TinyClip, prompts: list[str], batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, T], the target layer [N, 16, 8, 8]) in float64 by the torch model, from the prompts' ids."""
    double = TinyClip().double()
    double.load_state_dict(model.state_dict())
    texts = []
    for prompt in prompts:
        ids = token_ids(prompt)
        texts.append(double.text(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0])
    features = double.features(as_input(batch)).detach().requires_grad_(True)
    logits = double.logit_scale.exp() * unit(double.pooled(features)) @ unit(torch.stack(texts)).T
    return logits, features


@pytest.fixture(scope="module")
def combined(clip: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[str]]:
    _, folder = clip
    out = tmp_path_factory.mktemp("combined") / "clip.cam.onnx"
    card, notes = graft_file(folder / "model.onnx", out, prep=UNIT)
    return out, card, notes


def test_the_combined_export_is_cut_in_two_and_its_logit_scale_measured(combined: tuple) -> None:
    out, card, notes = combined
    assert card["task"] == "similarity" and card["score"] == "logit"
    assert abs(card["logit_scale"] - SCALE) < 1e-4 * SCALE, card["logit_scale"]
    assert "measured from 'logits_per_image'" in card["sources"]["logit scale"]
    assert card["text"] == {"model": "clip.cam.text.onnx", "tokenizer": "clip.cam.tokenizer.json", "length": None,
                            "pad": 0, "ids": "input_ids", "mask": "attention_mask"}  # fmt: skip
    assert (out.parent / "clip.cam.text.onnx").is_file() and (out.parent / "clip.cam.tokenizer.json").is_file()
    assert any("an image-text model" in n for n in notes), notes


def test_each_prompts_logit_and_gradient_equal_the_torch_model_in_one_call(clip: tuple, combined: tuple) -> None:
    model, _ = clip
    path = combined[0]
    explainer = Explainer(path)
    texts = explainer.text_tower.embed(PROMPTS)
    batch = images()
    out = Engine(path).run(batch, np.array([[0, 1, 2], [2, 0, 1]]), full_gradients=True, references=texts)
    logits, features = reference(model, PROMPTS, batch)
    np.testing.assert_allclose(out.logits, logits.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert_rows_match_autograd(out, logits, features, TOL)
    with torch.no_grad():  # the torch model's own logits_per_image, prompt by prompt
        for t, prompt in enumerate(PROMPTS):
            ids = torch.tensor([token_ids(prompt)])
            own = model(ids, as_input(batch).float(), torch.ones_like(ids))[0][:, 0].numpy()
            np.testing.assert_allclose(out.logits[:, t], own, rtol=1e-5, atol=1e-5)


def test_the_softmax_over_the_prompts_and_its_gradient_equal_autograd(clip: tuple, tmp_path: Path) -> None:
    model, folder = clip
    out_path = tmp_path / "p.cam.onnx"
    card, _ = graft_file(folder / "model.onnx", out_path, prep=UNIT, score="probability")
    assert card["score"] == "probability"
    texts = Explainer(out_path).text_tower.embed(PROMPTS)
    out = Engine(out_path).run(images(), np.array([[0, 2], [1, 0]]), full_gradients=True, references=texts)
    logits, features = reference(model, PROMPTS, images())
    assert_rows_match_autograd(out, torch.softmax(logits, 1), features, TOL)


def test_two_towers_with_a_fixed_length_give_the_same_logits(clip: tuple, tmp_path: Path) -> None:
    model, folder = clip
    out = tmp_path / "two.cam.onnx"
    card, _ = graft_file(folder / "image.onnx", out, prep=UNIT, text=folder / "towers" / "text.onnx",
                         logit_scale=SCALE)  # fmt: skip
    assert card["text"]["length"] == LENGTH
    assert card["sources"]["tokenizer"] == "found beside the model (tokenizer.json)"
    assert card["sources"]["logit scale"] == f"flag --logit-scale {SCALE:g}"
    explainer = Explainer(out)
    result = explainer.explain(images(1)[0], prompts=PROMPTS)
    logits, _ = reference(model, PROMPTS, images(1))
    expected = logits.detach().numpy()[0]
    np.testing.assert_allclose([p.logit for p in result.predictions], expected, rtol=1e-5, atol=1e-5)
    shares = np.exp(expected - expected.max()) / np.exp(expected - expected.max()).sum()
    np.testing.assert_allclose([p.probability for p in result.predictions], shares, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([m.similarity for m in result.maps], expected / SCALE, rtol=1e-5, atol=1e-6)
    assert [m.label for m in result.maps] == PROMPTS and all(m.explains is None for m in result.maps)


class WithHidden(nn.Module):
    """A tower that returns its token-level or grid states beside its embedding (Hugging Face's
    ``CLIPTextModelWithProjection`` and ``CLIPVisionModelWithProjection``), in either order; ``projected=False``:
    the text embedding before its projection (``CLIPTextModel``'s ``pooler_output``, 16 dimensions, not 12)."""

    def __init__(self, clip: TinyClip, text: bool, projected: bool = True) -> None:
        super().__init__()
        self.clip, self.text, self.projected = clip, text, projected

    def forward(self, *args: torch.Tensor) -> tuple:
        if not self.text:
            features = self.clip.features(args[0])
            return features, self.clip.pooled(features)
        ids, mask = args
        x = self.clip.tokens(ids) + self.clip.positions[: ids.shape[1]]
        embed = self.clip.text(ids, mask)
        return embed if self.projected else x.mean(1), x


def test_towers_that_return_their_states_beside_the_embedding_use_the_embedding(clip: tuple, tmp_path: Path) -> None:
    model, _ = clip
    fixed = torch.zeros(1, LENGTH, dtype=torch.long), torch.ones(1, LENGTH, dtype=torch.long)
    axes = {"input_ids": {0: "T"}, "attention_mask": {0: "T"}}
    export(WithHidden(model, True), fixed, tmp_path / "text.onnx", ["input_ids", "attention_mask"],
           ["text_embeds", "last_hidden_state"], axes)  # fmt: skip
    export(WithHidden(model, False), (torch.zeros(1, 3, *SIZE),), tmp_path / "image.onnx", ["x"],
           ["last_hidden_state", "image_embeds"], {"x": {0: "N"}})  # fmt: skip
    write_tokenizer(tmp_path / "tokenizer.json")
    out = tmp_path / "states.cam.onnx"
    card, _ = graft_file(tmp_path / "image.onnx", out, prep=UNIT, text=tmp_path / "text.onnx", logit_scale=SCALE)
    assert card["task"] == "similarity"
    result = Explainer(out).explain(images(1)[0], prompts=PROMPTS)
    logits, _ = reference(model, PROMPTS, images(1))
    np.testing.assert_allclose([p.logit for p in result.predictions], logits.detach().numpy()[0], rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    export(WithHidden(model, True, projected=False), fixed, tmp_path / "pooled.onnx", ["input_ids", "attention_mask"],
           ["pooler_output", "last_hidden_state"], axes)  # fmt: skip
    with pytest.raises(OnnxcamError, match=r"12 dimensions but the text tower's output 'pooler_output' has 16"):
        graft_file(tmp_path / "image.onnx", tmp_path / "bad.cam.onnx", prep=UNIT, text=tmp_path / "pooled.onnx")
    assert not list(tmp_path.glob("bad.cam*")), "nothing written"


def test_the_zero_shot_file_gives_the_prompt_paths_maps(clip: tuple, combined: tuple, tmp_path: Path) -> None:
    _, folder = clip
    (tmp_path / "labels.txt").write_text("\n".join(PROMPTS) + "\n")
    baked = tmp_path / "zero.cam.onnx"
    card, _ = graft_file(folder / "model.onnx", baked, prep=UNIT, prompts=tmp_path / "labels.txt")
    assert card["task"] == "classification" and "text" not in card and "logit_scale" not in card
    zero = Explainer(baked)
    assert zero.labels == tuple(PROMPTS) and not list(baked.parent.glob("*.text.onnx"))
    prompted = Explainer(combined[0])
    for photo in images(2, seed=3):
        by_class = zero.explain(photo, targets=list(range(3)), method=["gradcam", "layercam"])
        by_prompt = prompted.explain(photo, prompts=PROMPTS, method=["gradcam", "layercam"])
        for a, b in zip(by_class.maps, by_prompt.maps, strict=True):
            assert (a.label, a.method) == (b.label, b.method)
            assert abs(a.logit - b.logit) < 1e-5 * max(1.0, abs(b.logit))
            np.testing.assert_allclose(a.cam, b.cam, atol=1e-5)
            np.testing.assert_allclose(a.cam_lowres, b.cam_lowres, rtol=1e-5, atol=1e-5 * np.abs(b.cam_lowres).max())


def test_explain_prompt_writes_one_map_per_prompt_and_runs_the_text_tower_once_each(combined: tuple,
                                                                                  tmp_path: Path) -> None:  # fmt: skip
    import cv2

    path = combined[0]
    for i, photo in enumerate(images(3, seed=5)):
        cv2.imwrite(str(tmp_path / f"p{i}.png"), photo[:, :, ::-1])
    prompts = [arg for p in PROMPTS[:2] for arg in ("--prompt", p)]
    result = run("explain", str(tmp_path), "--model", str(path), *prompts, "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    items = json.loads(result.stdout)["images"]
    assert len(items) == 3
    for item in items:
        assert [t["label"] for t in item["targets"]] == PROMPTS[:2]
        assert abs(sum(p["probability"] for p in item["predictions"]) - 1) < 1e-5
        for t in item["targets"]:
            assert abs(t["logit"] - SCALE * t["similarity"]) < 1e-3 and Path(t["overlay"]).is_file()
    table = run("explain", str(tmp_path / "p0.png"), "--model", str(path), *prompts, "--out", str(tmp_path / "t"))
    assert "probability" in table.stdout and "cosine" in table.stdout, table.stdout
    explainer = Explainer(path)
    request = explainer.request(prompts=PROMPTS)
    explainer.run(list(images(3)), request)
    explainer.request(prompts=PROMPTS[::-1])
    assert explainer.text_tower.runs == len(PROMPTS), "the text tower runs once per distinct prompt"


def test_bad_prompts_and_options_are_refused_in_one_line(clip: tuple, combined: tuple, tmp_path: Path) -> None:
    _, folder = clip
    path, photo = combined[0], tmp_path / "p.png"
    import cv2

    cv2.imwrite(str(photo), images(1)[0])
    out = str(tmp_path / "out")
    assert_clean_failure(run("explain", str(photo), "--model", str(path), "--out", out), "give --prompt TEXT")
    odd = tmp_path / "odd"  # a tokenizer of a kind the page's JavaScript does not run (SentencePiece's Metaspace)
    odd.mkdir()
    for name in (path.name, combined[1]["text"]["model"]):
        (odd / name).write_bytes((path.parent / name).read_bytes())
    tokenizer = json.loads((path.parent / combined[1]["text"]["tokenizer"]).read_text())
    tokenizer["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always"}
    (odd / combined[1]["text"]["tokenizer"]).write_text(json.dumps(tokenizer))
    page = run("web", str(odd / path.name), "--out", str(tmp_path / "site"))
    assert_clean_failure(page, "tokenizer's pre_tokenizer (Metaspace) does not run in the page", "--prompts")
    assert not (tmp_path / "site").exists()
    twice = run("explain", str(photo), "--model", str(path), "--prompt", "a dog", "--prompt", "a dog", "--out", out)
    assert_clean_failure(twice, "is given twice")
    assert_clean_failure(run("explain", str(photo), "--model", str(path), "--prompt", " ", "--out", out),
                         "must hold some text")  # fmt: skip
    two = tmp_path / "two.cam.onnx"
    graft_file(folder / "image.onnx", two, prep=UNIT, text=folder / "towers" / "text.onnx")
    long = run("explain", str(photo), "--model", str(two), "--prompt", "a photo of a red circle and a blue square",
               "--out", out)  # fmt: skip
    assert_clean_failure(long, "tokens; the text tower takes at most 8")
    (tmp_path / "two.cam.tokenizer.json").unlink()
    assert_clean_failure(run("explain", str(photo), "--model", str(two), "--prompt", "a dog", "--out", out),
                         "is not beside the model")  # fmt: skip
    plain = run("export", "--from", str(folder / "image.onnx"), "--mean", "0", "0", "0", "--std", "1", "1", "1",
                "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "x.cam.onnx"))  # fmt: skip
    assert_clean_failure(plain, "cannot read the prompts")
    (tmp_path / "one.txt").write_text("a dog\n")
    one = run("export", "--from", str(folder / "model.onnx"), "--prompts", str(tmp_path / "one.txt"), "--out",
              str(tmp_path / "y.cam.onnx"))  # fmt: skip
    assert_clean_failure(one, "two or more different prompts")
    (tmp_path / "labels.txt").write_text("a dog\ngrass\n")
    no_text = run("export", "--from", str(folder / "image.onnx"), "--mean", "0", "0", "0", "--std", "1", "1", "1",
                  "--prompts", str(tmp_path / "labels.txt"), "--out", str(tmp_path / "z.cam.onnx"))  # fmt: skip
    assert_clean_failure(no_text, "give its text tower with --text")
    both = run("export", "--from", str(folder / "model.onnx"), "--text", str(folder / "towers" / "text.onnx"),
               "--out", str(tmp_path / "w.cam.onnx"))  # fmt: skip
    assert_clean_failure(both, "holds both towers already")
    assert not list(tmp_path.glob("[xyzw].cam*")), "nothing written"
    prompt_on_plain = Explainer(combined[0])
    with pytest.raises(Exception, match="a likeness"):
        prompt_on_plain.request()


def test_optimums_folder_with_every_axis_symbolic_and_a_config_with_no_classes(clip: tuple, tmp_path: Path) -> None:
    """optimum's CLIP export: its config.json has a model_type and no id2label (refused as "not a Hugging Face
    config"), and the input's size is symbolic, so the logit scale's probe image takes the size the flags give (it
    took 224 for every symbolic axis, channels too, and failed with a traceback)."""
    model, _ = clip
    ids, mask = torch.tensor([token_ids("a dog")]), torch.ones(1, 4, dtype=torch.long)
    export(model, (ids, torch.zeros(1, 3, *SIZE), mask), tmp_path / "model.onnx",
           ["input_ids", "pixel_values", "attention_mask"],
           ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"],
           {"input_ids": {0: "T", 1: "L"}, "attention_mask": {0: "T", 1: "L"},
            "pixel_values": {0: "N", 1: "C", 2: "H", 3: "W"}})  # fmt: skip
    write_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip", "projection_dim": 12}))
    out = tmp_path / "clip.cam.onnx"
    failed = run("export", "--from", str(tmp_path / "model.onnx"), "--mean", "0", "0", "0", "--std", "1", "1", "1",
                 "--out", str(out))  # fmt: skip
    assert_clean_failure(failed, "pass --size")
    assert not out.exists()
    card, _ = graft_file(tmp_path / "model.onnx", out, prep=Preprocessing.create(SIZE, (0, 0, 0), (1, 1, 1), False))
    assert abs(card["logit_scale"] - SCALE) < 1e-4 * SCALE and card["task"] == "similarity"


def test_clips_own_bpe_vocabulary_is_read_as_its_tokenizer(tmp_path: Path) -> None:
    """``--tokenizer bpe_simple_vocab_16e6.txt.gz``: CLIP's vocabulary is 256 byte symbols, the same with
    ``</w>``, the merges, then start and end of text; ids counted by hand on a two-merge file ('a' is byte 97, the
    65th printable symbol: 256 + 64; 'dog</w>' the second merge: 512 + 1; open_clip's own ids for 'a' and the
    specials on the real file are 320, 49406, 49407, checked by tests/test_clip_openclip.py)."""
    import gzip

    from onnxcam_export.image_text import clip_bpe_tokenizer

    vocabulary = tmp_path / "bpe_tiny.txt.gz"
    with gzip.open(vocabulary, "wt", encoding="utf-8") as f:
        f.write("\"bpe_simple_vocab_16e6.txt#version: 0.2\nd o\ndo g</w>\n")
    tokenizer = clip_bpe_tokenizer(vocabulary)
    assert tokenizer.encode("A  Dog").ids == [514, 320, 513, 515]
    assert tokenizer.encode("dogs").ids == [514, 512, 70, 82 + 256, 515]  # do, g, s</w>: no merge 'g s</w>'
    with gzip.open(vocabulary, "wt", encoding="utf-8") as f:
        f.write("#version\nd o x\n")
    with pytest.raises(OnnxcamError, match="each line must be one merge of two symbols"):
        clip_bpe_tokenizer(vocabulary)
