"""Pixel attributions against Captum on the same weights and inputs (where captum imports; skipped elsewhere):
Saliency, InputXGradient, IntegratedGradients (the same baseline, steps and rule), NoiseTunnel's SmoothGrad fed
the same noisy inputs, GuidedBackprop and GuidedGradCam, on a small CNN and on EfficientNet-Lite0 with its ImageNet
weights: Pearson >= 0.999 and a largest difference <= 1e-3 of the largest magnitude."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcam import pixels
from onnxcam.engine import Engine
from tests.conftest import random_images
from tests.test_pixels import Small, as_normalised, lite0_pixels, lite0_torch, small  # noqa: F401 (fixtures)

torch = pytest.importorskip("torch")
captum = pytest.importorskip("captum.attr", reason="captum is not installed (pip install captum)")
pytestmark = pytest.mark.slow
KINKS = 0.01  # Lite0: measured 0.009% and 0.003% of the elements (IG, 32 steps), 0.12% (SmoothGrad, 4 samples)


def agree(ours: np.ndarray, theirs: np.ndarray, kinks: float = 0.0) -> None:
    """Pearson >= 0.999 and every difference <= 1e-3 of the largest magnitude, except on at most a ``kinks`` share
    of the elements (a method summing many inputs' gradients meets more ReLU6 kinks that float32 and float64
    resolve differently; each spoils the pixels that the flipped unit sees)."""
    ours, theirs = np.ravel(ours).astype(np.float64), np.ravel(theirs).astype(np.float64)
    assert np.corrcoef(ours, theirs)[0, 1] >= 0.999
    off = np.abs(ours - theirs) > 1e-3 * np.abs(theirs).max()
    assert off.mean() <= kinks, (off.mean(), np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.fixture(params=["small", "lite0"])
def case(request: pytest.FixtureRequest) -> tuple:
    """(torch model, grafted file, a photo at its size, a class, mean, std, the share of elements a kink may
    spoil in a many-input method, Integrated Gradients' baseline: black on Lite0; on the small CNN noise, as a flat
    one ties its max pool's windows at the trapezoid's first point, which torch resolves differently batched
    (Captum's rows) and alone (1% apart))."""
    if request.param == "small":
        model, path = request.getfixturevalue("small")
        photo = np.random.default_rng(11).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        noise = np.random.default_rng(12).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        return model.double(), path, photo, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.0, noise
    from onnxcam_export.torch_export import ARCHS

    path, arch = request.getfixturevalue("lite0_pixels"), ARCHS["efficientnet_lite0"]
    photo = random_images(1, seed=2)[0]
    return lite0_torch().double(), path, photo, 285, arch.mean, arch.std, KINKS, np.zeros_like(photo)


def test_saliency_and_input_x_gradient_equal_captums(case: tuple) -> None:
    model, path, photo, c, mean, std, *_ = case
    x = as_normalised(photo[None], mean, std)
    out = Engine(path).run(photo[None], np.array([[c]]), pixels=True)
    agree(np.abs(out.pixel_gradients[0, 0]), captum.Saliency(model).attribute(x, target=c).detach().numpy()[0])
    agree(out.pixels[0] * out.pixel_gradients[0, 0],
          captum.InputXGradient(model).attribute(x.clone(), target=c).detach().numpy()[0])


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_trapezoid"])
def test_integrated_gradients_equal_captums(case: tuple, rule: str) -> None:
    model, path, photo, c, mean, std, kinks, start = case
    found = pixels.integrated_gradients(Engine(path), photo, np.array([c]), baseline=start, steps=32, rule=rule)
    x, baseline = (as_normalised(p[None], mean, std) for p in (photo, start))
    theirs, delta = captum.IntegratedGradients(model).attribute(x, baseline, target=c, n_steps=32, method=rule,
                                                                return_convergence_delta=True)  # fmt: skip
    agree(found.values[0], theirs.detach().numpy()[0], kinks)
    with torch.no_grad():
        change = float(model(x)[0, c] - model(baseline)[0, c])
    assert abs(abs(float(delta)) / abs(change) - found.completeness[0]) < 0.01, "the same completeness error"


def test_smoothgrad_equals_captums_noise_tunnel_on_the_same_samples(case: tuple) -> None:
    """NoiseTunnel(Saliency) draws its own noise; it is fed ours: the mean over the same noisy inputs of Captum's
    signed gradient (Saliency with abs=False, as NoiseTunnel's smoothgrad averages it)."""
    model, path, photo, c, _, _, kinks, _ = case
    engine = Engine(path)
    found = pixels.smoothgrad(engine, photo, np.array([c]), samples=4)
    noisy = torch.from_numpy(pixels.noise_samples(engine, photo, samples=4)).double()
    theirs = captum.Saliency(model).attribute(noisy, target=c, abs=False).detach().numpy().mean(0)
    agree(found.values[0], theirs, kinks)


class GuidableReLU6(torch.nn.ReLU):
    """ReLU6 as a module Captum's guided methods hook (they override the backward of ``nn.ReLU`` modules only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.relu6(x)


def guidable(model: torch.nn.Module) -> torch.nn.Module:
    """Lite0 with each ReLU6 (its modules and its blocks' ``F.relu6`` calls) a :class:`GuidableReLU6` module, the
    same function; a model of ``nn.ReLU`` modules as it is."""
    import types

    def block(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = self.act0(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self._bn2(self._project_conv(self.act1(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.skip else y

    for module in list(model.modules()):
        if type(module).__name__ == "MBConv":
            module.act0, module.act1 = GuidableReLU6(), GuidableReLU6()
            module.forward = types.MethodType(block, module)
        for child, inner in list(module.named_children()):
            if isinstance(inner, torch.nn.ReLU6):
                setattr(module, child, GuidableReLU6())
    return model


class Joined(Small):
    """The small CNN with its target layer (the residual sum, ``/Add_output_0``) a module's output, for Captum's
    layer attributions."""

    def __init__(self) -> None:
        super().__init__()
        self.join = torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.block(self.stem(x))
        return self.fc(self.join(a + torch.tanh(self.skip(a))).mean((2, 3)))


def for_captum(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the same function as Captum's guided methods need it, the module whose output is the file's target layer):
    the small CNN's residual sum, Lite0's head ReLU6."""
    if isinstance(model, Small):
        joined = Joined().double().eval()
        joined.load_state_dict(model.state_dict())
        return joined, joined.join
    model = guidable(model)
    return model, model._relu1


def test_guided_backprop_and_guided_gradcam_equal_captums(case: tuple) -> None:
    """GuidedBackprop: the largest |guided gradient| over the channels; GuidedGradCam (bilinear, as the paper):
    Captum's is per channel, guided gradient times the upsampled Grad-CAM map, so ours is its largest |.| over the
    channels (the map is >= 0)."""
    from onnxcam.methods import cam

    model, path, photo, c, mean, std, *_ = case
    model, layer = for_captum(model)
    engine = Engine(path)
    x = as_normalised(photo[None], mean, std)
    out = engine.run(photo[None], np.array([[c]]), pixels=True, guided=True)
    theirs = captum.GuidedBackprop(model).attribute(x.clone(), target=c).detach().numpy()[0]
    agree(out.guided_gradients[0, 0], theirs)
    plain = captum.Saliency(model).attribute(x.clone(), target=c, abs=False).detach().numpy()[0]
    assert np.corrcoef(plain.ravel(), theirs.ravel())[0, 1] < 0.9, "the guided backward is not the plain one"
    ggc = captum.GuidedGradCam(model, layer).attribute(x.clone(), target=c,
                                                                         interpolate_mode="bilinear")  # fmt: skip
    ours = cam("guided-gradcam", out.activations[0], None, out.weights[0], pixels=out.pixels[0],
               guided_gradients=out.guided_gradients[0])  # fmt: skip
    agree(ours[0], np.abs(ggc.detach().numpy()[0]).max(axis=0))
