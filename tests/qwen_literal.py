"""Literal Qwen-Image computations for the tests, from direct model calls and no code of the pack:
an attention recorder on ComfyUI's `optimized_attention_override`, block 0's q/k/v written from its
weights, RoPE from the token positions of docs/DESIGN.md §2.8, and the packed AdaIN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from comfy_env import differentiable_kernels


class Recorder:
    """`optimized_attention_override` that records (q, k, v, out) of every attention call in order."""

    def __init__(self) -> None:
        self.records: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, func, q, k, v, *args, **kwargs):
        assert kwargs.get("skip_reshape")
        out = F.scaled_dot_product_attention(q, k, v)
        self.records.append((q, k, v, out))
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)


@differentiable_kernels()
def features(dm, x: torch.Tensor, tau: float, context: torch.Tensor, last: int) -> list[tuple[torch.Tensor, ...]]:
    """(q, k, v, out) of the last `last` blocks: a whole forward of x (B, 16, 1, H, W) at time τ, null text."""
    recorder = Recorder()
    batch = x.shape[0]
    dm(x, torch.full((batch,), float(tau)), context.expand(batch, -1, -1),
       transformer_options={"optimized_attention_override": recorder})
    return recorder.records[-last:]


def positions(text: int, h: int, w: int) -> torch.Tensor:
    """(T + L, 3) ids: text token j at (s + j)·(1, 1, 1), s = max(⌊w/2⌋, ⌊h/2⌋); image token (row, col) at
    (0, row − ⌊h/2⌋, col − ⌊w/2⌋), row-major."""
    start = max(w // 2, h // 2)
    txt = (start + torch.arange(text, dtype=torch.float64))[:, None].expand(-1, 3)
    rows, cols = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    img = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).double()
    return torch.cat([txt, img])


def rotate(t: torch.Tensor, ids: torch.Tensor, axes: tuple[int, ...], theta: float = 10000.0) -> torch.Tensor:
    """Rotary embedding: channel pairs (2i, 2i+1) of axis a turn by pos_a · theta^(-2i/d_a)."""
    angles = [ids[:, a, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) for a, d in enumerate(axes)]
    angle = torch.cat(angles, dim=-1)  # (N, d/2)
    even, odd = t[..., 0::2].double(), t[..., 1::2].double()
    out = torch.stack([even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()], dim=-1)
    return out.flatten(-2).to(t.dtype)


def pack(latent: torch.Tensor) -> torch.Tensor:
    """(B, 16, 1, H, W) as tokens (B, L, 64), packed channel c·4 + ph·2 + pw."""
    b, c, _, h, w = latent.shape
    return latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)


def unpack(tokens: torch.Tensor, shape) -> torch.Tensor:
    b, c, f, h, w = shape
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(shape)


def adain(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Per packed channel (64 statistics), per sample; the target's over its batch and tokens."""
    source, target = pack(x), pack(r)
    mean, std = source.mean(dim=1, keepdim=True), source.std(dim=1, keepdim=True)
    out = (source - mean) / (std + 1e-6) * target.std(dim=(0, 1), keepdim=True) + target.mean(dim=(0, 1), keepdim=True)
    return unpack(out, x.shape)
