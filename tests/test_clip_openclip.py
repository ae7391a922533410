"""An open_clip CLIP (a small ViT config, seeded random weights) exported as two towers through torch.onnx
(``encode_image`` and ``encode_text``, open_clip's own, fixed text length, no attention mask), grafted with the
text tower and open_clip's own BPE vocabulary (``bpe_simple_vocab_16e6.txt.gz``, read as a tokenizer.json): each
prompt's logit equals open_clip's ``logit_scale.exp() * cos(encode_image, encode_text)`` on open_clip's own
tokenization, the tokenizer's ids equal open_clip's ``SimpleTokenizer``'s on hard prompts, and the gradients of
several prompts' logits at the automatic target layer (the first resblock's output: the last the class token's
gradient reaches the grid from) equal torch autograd in float64, from one call.

Runs where open_clip imports (the bench venv of the README); skipped elsewhere, with the reason."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from onnxcam.engine import Engine
from onnxcam_export.from_onnx import Preprocessing, graft_file
from onnxcam_export.image_text import clip_bpe_tokenizer
from tests.conftest import assert_rows_match_autograd
from tests.test_clip import LENGTH, SIZE, as_input, images

try:
    import open_clip
    import torch
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
except Exception as exc:  # ImportError, or torchvision's operator errors when releases do not match
    pytest.skip(f"open_clip does not import here ({type(exc).__name__}: {exc})"[:300], allow_module_level=True)

pytestmark = pytest.mark.slow
UNIT = Preprocessing.create(None, (0, 0, 0), (1, 1, 1), False)  # the towers take pixel / 255 (as the test's)
PROMPTS = ["a photo of a dog", "grass", "a red circle"]
WIDTH, GRID = 32, 4


class Tower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, text: bool) -> None:
        super().__init__()
        self.model, self.text = model, text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(x) if self.text else self.model.encode_image(x)


RESNET = 128  # the ResNet tower's input: a 4x4 grid at its last stage (stride 32)


def _model(kind: str) -> torch.nn.Module:
    """A ViT tower, or a ResNet one (open_clip's ModifiedResNet: stages of one bottleneck, an attention pool)."""
    torch.manual_seed(0)
    vision = (CLIPVisionCfg(layers=2, width=WIDTH, head_width=8, patch_size=8, image_size=SIZE[0]) if kind == "vit"
              else CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, head_width=8, image_size=RESNET))  # fmt: skip
    return open_clip.CLIP(24, vision, CLIPTextCfg(context_length=LENGTH, width=WIDTH, heads=4, layers=2))  # 49408 ids


@pytest.fixture(scope="module", params=["vit", "resnet"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    model = _model(request.param).eval()
    folder = tmp_path_factory.mktemp("openclip")
    side = SIZE[0] if request.param == "vit" else RESNET
    with warnings.catch_warnings():  # (with grad on: under no_grad nn.MultiheadAttention's fast path does not export)
        warnings.simplefilter("ignore")
        torch.onnx.export(Tower(model, False), (torch.zeros(1, 3, side, side),), folder / "image.onnx",
                          input_names=["x"], output_names=["image_embeds"], dynamic_axes={"x": {0: "N"}},
                          opset_version=17, dynamo=False)  # fmt: skip
        (folder / "text").mkdir()
        ids = torch.zeros(1, LENGTH, dtype=torch.long)
        torch.onnx.export(Tower(model, True), (ids,), folder / "text" / "text.onnx", input_names=["input_ids"],
                          output_names=["text_embeds"], dynamic_axes={"input_ids": {0: "T"}}, opset_version=17,
                          dynamo=False)  # fmt: skip
    scale = float(model.logit_scale.exp())
    card, _ = graft_file(folder / "image.onnx", folder / "clip.cam.onnx", prep=UNIT, text=folder / "text" / "text.onnx",
                         tokenizer=Path(default_bpe()), logit_scale=scale)  # fmt: skip
    return model, folder / "clip.cam.onnx", card, request.param


HARD = ["a photo of a dog", "A  Photo OF a Cat!!", "it's the 2nd of July, 1999 \u2014 na\u00efve caf\u00e9",
        "don't you'll we've I'm", "hello,world...foo?!", "\u65e5\u672c\u8a9e", "emoji \U0001f436 dog",
        "x\u00b2+y\u00b3",
        "<start_of_text> hi", "tab\tand\nnewline", "a1b2c3", "  spaces   around  "]


def test_clips_bpe_vocabulary_tokenizes_as_open_clip() -> None:
    """CLIP's own vocabulary file read as a Hugging Face tokenizer: the same ids as open_clip's SimpleTokenizer
    (start and end of text around them) on punctuation, digits, accents, CJK, emoji and odd whitespace."""
    ours, theirs = clip_bpe_tokenizer(Path(default_bpe())), SimpleTokenizer()
    assert ours.get_vocab_size() == theirs.vocab_size == 49408
    for prompt in HARD:
        assert ours.encode(prompt).ids == [theirs.sot_token_id, *theirs.encode(prompt), theirs.eot_token_id], prompt


def test_each_prompts_logit_and_gradient_equal_open_clip_in_one_call(exported: tuple) -> None:
    """ViT: the automatic layer is the first block's tokens (the class token's gradient reaches the grid only before
    the last block's attention); ResNet (ModifiedResNet): the last stage's output, before the attention pool (what
    users of pytorch-grad-cam pick, ``visual.layer4``), its pool's mean over the grid taken as a token."""
    model, path, card, kind = exported
    assert card["task"] == "similarity" and card["text"]["length"] == LENGTH
    double = _model(kind).double().eval()
    double.load_state_dict(model.state_dict())
    grid = []

    def leaf(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:  # the target layer as a leaf
        if kind == "resnet":
            grid.append(out.detach().requires_grad_(True))
            return grid[-1]
        grid.append(out[:, 1:].transpose(1, 2).reshape(len(out), WIDTH, GRID, GRID).detach().requires_grad_(True))
        return torch.cat([out[:, :1].detach(), grid[-1].flatten(2).transpose(1, 2)], dim=1)

    if kind == "vit":
        assert "resblocks.0" in card["layer"] and f"1 + {GRID * GRID} tokens" in card["layer"], card["layer"]
        double.visual.transformer.resblocks[0].register_forward_hook(leaf)
        batch = images()
    else:
        assert "layer4" in card["layer"] and "x4x4" in card["layer"], card["layer"]
        double.visual.layer4.register_forward_hook(leaf)
        batch = np.random.default_rng(0).integers(0, 256, (2, RESNET, RESNET, 3), dtype=np.uint8)
    pixels = double.encode_image(as_input(batch), normalize=True)
    with torch.no_grad():
        texts = double.encode_text(open_clip.tokenize(PROMPTS, context_length=LENGTH), normalize=True)
    logits = double.logit_scale.exp() * pixels @ texts.T
    from onnxcam.api import Explainer

    references = Explainer(path).text_tower.embed(PROMPTS)
    out = Engine(path).run(batch, np.array([[0, 1, 2], [2, 0, 1]]), full_gradients=True, references=references)
    np.testing.assert_allclose(out.logits, logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert_rows_match_autograd(out, logits, grid[0], 1e-4)
