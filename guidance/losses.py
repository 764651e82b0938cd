"""AD loss, content loss and region masks (docs/DESIGN.md §2.3). Plain torch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses in float32 at least (fp16/bf16 UNets), float64 when the UNet runs in it."""
    return torch.promote_types(dtype, torch.float32)


def attention_target(
    q: torch.Tensor,
    k_ref: torch.Tensor,
    v_ref: torch.Tensor,
    attn_scale: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """What the layer would output if its queries attended to the reference: SDPA of the
    scaled queries over the reference keys/values, without gradient.

    q: (B, H, N, d); k_ref, v_ref: (1 or B, H, M, d), broadcast over the batch;
    mask: boolean (B, 1, N, M), True where attending is allowed.
    """
    with torch.no_grad():
        return F.scaled_dot_product_attention(q * attn_scale, k_ref, v_ref, attn_mask=mask)


def ad_loss(
    queries: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
    ref_keys: Sequence[torch.Tensor],
    ref_values: Sequence[torch.Tensor],
    attn_scale: float = 1.0,
    masks: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Σ over layers of mean |out − target|, accumulated in float32 or wider."""
    total = None
    for i, (q, out, k_ref, v_ref) in enumerate(zip(queries, outputs, ref_keys, ref_values, strict=True)):
        mask = masks[i] if masks is not None else None
        target = attention_target(q, k_ref.to(q.dtype), v_ref.to(q.dtype), attn_scale, mask)
        acc = _accumulation_dtype(out.dtype)
        term = (out.to(acc) - target.to(acc)).abs().mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no AD layers")
    return total


def content_loss(queries: Sequence[torch.Tensor], content_queries: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over layers of mean |q − q_content| (the content latent's batch broadcasts)."""
    total = None
    for q, qc in zip(queries, content_queries, strict=True):
        acc = _accumulation_dtype(q.dtype)
        term = (q.to(acc) - qc.to(acc).expand_as(q)).abs().mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no AD layers")
    return total


def labels_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Integer region labels from a ComfyUI MASK (values in [0, 1]): each grey level is a region."""
    return torch.round(mask.float().clamp(0, 1) * 255).to(torch.int64)


def labels_at(labels: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) labels resized (nearest) to a layer's grid, flattened to (B, h·w)."""
    resized = F.interpolate(labels[:, None].float(), size=hw, mode="nearest")
    return resized[:, 0].flatten(1).to(torch.int64)


def region_attention_mask(target_labels: torch.Tensor, reference_labels: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, N, M): a target token may attend only to reference tokens of its label.

    target_labels: (B, N); reference_labels: (M,) over the concatenated references. A target
    token whose label no reference token carries may attend to all (instead of NaN).
    """
    allowed = target_labels[:, :, None] == reference_labels[None, None, :]
    orphan = ~allowed.any(dim=-1, keepdim=True)
    return (allowed | orphan)[:, None]


def adain(
    latent: torch.Tensor, reference: torch.Tensor, eps: float = 1e-6, dims: tuple[int, ...] = (2, 3)
) -> torch.Tensor:
    """Match each sample's per-channel mean/std to the reference's (taken over the reference
    batch and spatial dims), docs/DESIGN.md §2.5. `dims`: the dims one channel's statistics
    are taken over (a family's layout, e.g. packed patches)."""
    mean = latent.mean(dim=dims, keepdim=True)
    std = latent.std(dim=dims, keepdim=True)
    ref_mean = reference.mean(dim=(0, *dims), keepdim=True)
    ref_std = reference.std(dim=(0, *dims), keepdim=True)
    return (latent - mean) / (std + eps) * ref_std + ref_mean
