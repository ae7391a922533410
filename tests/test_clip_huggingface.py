"""Hugging Face's CLIPModel (a small config, seeded random weights) exported as its users export it (optimum's
``zero-shot-image-classification`` export: one file, every axis symbolic, ``config.json`` with no classes and
``tokenizer.json`` beside it), grafted with no flag but the normalisation and size it has no sidecar for: each
prompt's logit equals the torch model's ``logits_per_image``; the gradient of each of several prompts' logits at the
automatic target layer (the last encoder layer whose grid the class token's gradient reaches) equals torch autograd
in float64, from one call; the map of pytorch-grad-cam's CLIP recipe (``usage_examples/clip_example.py``: the
softmax over the prompts, the last layer's ``layer_norm1``, its ``reshape_transform``) equals ours on the same
weights and layer, Pearson >= 0.999.

Runs where transformers, optimum and pytorch-grad-cam import (a venv with torch and torchvision of matching
releases: see the README); skipped elsewhere, with the reason."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from onnxcam.api import Explainer
from onnxcam.engine import Engine
from onnxcam_export.from_onnx import Preprocessing, graft_file
from tests.conftest import assert_rows_match_autograd
from tests.test_clip import token_ids, write_tokenizer

try:
    import torch
    import transformers
    from optimum.exporters.onnx import main_export
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
except Exception as exc:  # ImportError, or torchvision's operator errors when releases do not match
    pytest.skip(f"transformers/optimum/grad-cam do not import here ({type(exc).__name__}: {exc})"[:300],
                allow_module_level=True)  # fmt: skip

pytestmark = pytest.mark.slow
HALF = Preprocessing.create((32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False)  # the recipe's normalisation
PROMPTS = ["a photo of a dog", "grass", "a red circle"]
GRID, WIDTH = 4, 32  # 32x32 input, 8x8 patches, 32 wide


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[transformers.CLIPModel, Path]:
    folder = tmp_path_factory.mktemp("hfclip")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={"vocab_size": 14, "hidden_size": WIDTH, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 16, "bos_token_id": 2, "eos_token_id": 3,
                     "pad_token_id": 0},
        vision_config={"hidden_size": WIDTH, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=24)  # fmt: skip
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(folder / "hf")
    write_tokenizer(folder / "tokenizer.json")
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="[PAD]",
                                         unk_token="[UNK]").save_pretrained(folder / "hf")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(folder / "hf"), folder / "onnx", task="zero-shot-image-classification", no_post_process=True)
    return model, folder / "onnx" / "model.onnx"


def images(count: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def pixels(batch: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(batch / 255.0).permute(0, 3, 1, 2) - 0.5) / 0.5


def text_inputs(prompts: list[str]) -> dict[str, torch.Tensor]:
    ids = [token_ids(p) for p in prompts]
    length = max(map(len, ids))
    padded = torch.tensor([i + [0] * (length - len(i)) for i in ids])
    mask = torch.arange(length) < torch.tensor([[len(i)] for i in ids])
    return {"input_ids": padded, "attention_mask": mask.long()}


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_each_prompts_logit_and_gradient_equal_the_torch_model_in_one_call(clip: tuple, tmp_path: Path) -> None:
    model, source = clip
    out = tmp_path / "clip.cam.onnx"
    card, _ = graft_file(source, out, prep=HALF)
    assert card["task"] == "similarity" and "layers.0/Add_1" in card["layer"], card["layer"]
    assert abs(card["logit_scale"] - model.logit_scale.exp().item()) < 1e-4
    texts = Explainer(out).text_tower.embed(PROMPTS)
    batch = images()
    run = Engine(out).run(batch, np.array([[0, 1, 2], [2, 0, 1]]), full_gradients=True, references=texts)
    double = transformers.CLIPModel(model.config).double().eval()
    double.load_state_dict(model.state_dict())
    store: list[torch.Tensor] = []

    def leaf_grid(_module: object, _args: object, output: object) -> object:
        """The layer's tokens rebuilt from a leaf [N, C, h, w] grid (the contract's view), the class token kept."""
        tokens = output[0] if isinstance(output, tuple) else output
        grid = tokens[:, 1:].detach().transpose(1, 2).reshape(len(batch), WIDTH, GRID, GRID).requires_grad_(True)
        store.append(grid)
        rebuilt = torch.cat([tokens[:, :1].detach(), grid.flatten(2).transpose(1, 2)], dim=1)
        return (rebuilt, *output[1:]) if isinstance(output, tuple) else rebuilt

    hook = double.vision_model.encoder.layers[0].register_forward_hook(leaf_grid)
    image = double.visual_projection(double.vision_model(pixel_values=pixels(batch)).pooler_output)
    hook.remove()
    with torch.no_grad():  # (the text tower in float32: its causal mask overflows in float64; it is no variable here)
        text = model(pixel_values=pixels(batch[:1]).float(), **text_inputs(PROMPTS)).text_embeds.double()
    logits = double.logit_scale.exp() * unit(image) @ unit(text).T  # CLIPModel's logits_per_image [N, T]
    np.testing.assert_allclose(run.logits, logits.detach().numpy(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the torch model's own logits_per_image
        own = model(pixel_values=pixels(batch).float(), **text_inputs(PROMPTS)).logits_per_image.numpy()
    np.testing.assert_allclose(run.logits, own, rtol=1e-4, atol=1e-4)
    assert_rows_match_autograd(run, logits, store[0], 1e-4)


def test_the_map_equals_pytorch_grad_cams_clip_recipe(clip: tuple, tmp_path: Path) -> None:
    model, source = clip
    out = tmp_path / "p.cam.onnx"
    graft_file(source, out, prep=HALF, score="probability",
               layer="/vision_model/encoder/layers.1/layer_norm1/LayerNormalization_output_0")  # fmt: skip

    class ImageClassifier(torch.nn.Module):  # the recipe's wrapper: the softmax over the prompts
        def __init__(self) -> None:
            super().__init__()
            self.clip = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.clip(pixel_values=x, **text_inputs(PROMPTS)).logits_per_image.softmax(dim=1)

    def reshape_transform(tensor: torch.Tensor) -> torch.Tensor:  # the recipe's, at this grid
        return tensor[:, 1:, :].reshape(tensor.size(0), GRID, GRID, tensor.size(2)).transpose(2, 3).transpose(1, 2)

    wrapper = ImageClassifier().eval()
    cam = GradCAM(model=wrapper, target_layers=[model.vision_model.encoder.layers[-1].layer_norm1],
                  reshape_transform=reshape_transform)  # fmt: skip
    explainer = Explainer(out)
    for photo in images(2, seed=4):
        ours = explainer.explain(photo, prompts=PROMPTS)
        for t, mine in enumerate(ours.maps):
            theirs = cam(input_tensor=pixels(photo[None]).float(), targets=[ClassifierOutputTarget(t)])[0]
            assert np.corrcoef(mine.cam.ravel(), theirs.ravel())[0, 1] >= 0.999, (t, mine.label)
