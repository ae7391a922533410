"""Small vision transformers and a ConvNeXt, written as timm and torchvision write them (no timm needed).

They stand in for the real architectures in tests, scripts and benchmarks: the same ops in the
same order (timm's ``Attention``: one qkv Linear, reshape, ``permute(2, 0, 3, 1, 4)``, ``unbind``,
``q @ k^T * scale``, softmax, ``@ v``), so their ONNX exports have the layouts of the real ones:
tokens ``[N, P + h*w, D]`` with P prefix tokens (class, distillation, registers) for ViT/DeiT,
channels-last ``[N, h, w, C]`` grids for Swin and inside ConvNeXt blocks.
"""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    """timm's multi-head self-attention over ``[N, T, D]`` tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Identity()  # timm's dropout on the probabilities; a hook here sees them
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if bias is not None:
            attn = attn + bias
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """A strided conv: ``[N, 3, H, W]`` -> ``[N, D, H/p, W/p]``."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021) / DeiT (Touvron et al. 2021) with timm's module names.

    ``prefix`` tokens go before the patches: the class token, then a distillation token
    (``distilled``, DeiT: the logits are the mean of both heads) and ``registers``
    (Darcet et al. 2024). ``suffix`` tokens go after them (YOLOS's detection tokens). ``pool="token"``
    classifies the class token, ``"avg"`` the mean patch, ``"suffix"`` the mean suffix token.
    """

    def __init__(
        self,
        image_size: tuple[int, int] = (224, 224),
        patch: int = 16,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        classes: int = 1000,
        distilled: bool = False,
        registers: int = 0,
        pool: str = "token",
        suffix: int = 0,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch, dim)
        grid = (image_size[0] // patch) * (image_size[1] // patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.dist_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if distilled else None
        self.reg_token = nn.Parameter(torch.randn(1, registers, dim) * 0.02) if registers else None
        self.prefix = 1 + int(distilled) + registers
        self.suffix_tokens = nn.Parameter(torch.randn(1, suffix, dim) * 0.02) if suffix else None
        self.pos_embed = nn.Parameter(torch.randn(1, self.prefix + grid + suffix, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pool = pool
        self.head = nn.Linear(dim, classes)
        self.head_dist = nn.Linear(dim, classes) if distilled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        prefix = [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        suffix = [] if self.suffix_tokens is None else [self.suffix_tokens.expand(x.shape[0], -1, -1)]
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x, *suffix], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        if self.pool == "suffix":
            return self.head(x[:, -self.suffix_tokens.shape[1] :].mean(dim=1))
        if self.pool == "avg":
            return self.head(x[:, self.prefix :].mean(dim=1))
        if self.head_dist is not None:
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        return self.head(x[:, 0])


def window_partition(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, H, W, C]`` -> ``[N * H/size * W/size, size * size, C]`` (Swin's windows)."""
    n, h, w, c = x.shape
    x = x.view(n, h // size, size, w // size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size * size, c)


def window_reverse(windows: torch.Tensor, size: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // size, w // size, size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


class SwinBlock(nn.Module):
    """Swin block (Liu et al. 2021) on a channels-last grid: (shifted) window attention, then an MLP."""

    def __init__(self, dim: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)
        self.bias = nn.Parameter(torch.randn(heads, window * window, window * window) * 0.02)  # relative position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, self.window), self.bias), self.window, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (timm's reshape form), normed, projected: ``[N, H, W, C] -> [N, H/2, W/2, 2C]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        x = x.reshape(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinTransformer(nn.Module):
    """A small Swin: patch embedding to channels-last, stages of window blocks, patch merging, mean pool."""

    def __init__(
        self, patch: int = 4, dim: int = 32, depths: tuple[int, ...] = (2, 2), heads: int = 2, window: int = 4,
        classes: int = 10,
    ) -> None:  # fmt: skip
        super().__init__()
        self.patch_embed = PatchEmbed(patch, dim)
        stages: list[nn.Module] = []
        for i, depth in enumerate(depths):
            if i:
                stages.append(PatchMerging(dim))
                dim *= 2
            stages += [SwinBlock(dim, heads, window, shift=(j % 2) * window // 2) for j in range(depth)]
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.layers(self.patch_embed(x).permute(0, 2, 3, 1)))
        return self.head(x.mean(dim=(1, 2)))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, through channels-last (torchvision's ConvNeXt)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """ConvNeXt block (Liu et al. 2022): depthwise 7x7, then channels-last LayerNorm, MLP, layer scale."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.dwconv(x).permute(0, 2, 3, 1))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """ConvNeXt with torchvision's head: global pool, LayerNorm2d (channels-last inside), Flatten, Linear."""

    def __init__(self, dims: tuple[int, ...] = (16, 32, 64), depths: tuple[int, ...] = (1, 1, 2), classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))]
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            if i:
                layers.append(nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, 2, 2)))
            layers.append(nn.Sequential(*[CNBlock(dim) for _ in range(depth)]))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))
