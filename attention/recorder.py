"""The attn1 replace patch that records q/k/v/out of the selected SD UNet layers during an AD pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sd_unet import SelfAttentionLayer, token_grid


class StopForward(Exception):
    """Raised after the last selected layer: nothing later in the UNet is needed."""


@dataclass
class LayerRecord:
    """Features of one layer, heads split: tensors are (B, heads, N, dim_head).

    k and v are None where the pass did not keep them: a checkpointed differentiated pass
    returns only what the losses read of the latent being optimized (q and out). The N tokens
    are `text_tokens` tokens (a DiT's joint text, none on the SD UNet) followed by the image's
    h×w grid `hw`.
    """

    q: torch.Tensor
    out: torch.Tensor
    hw: tuple[int, int]
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    text_tokens: int = 0
    # Tokens of k and v before and after the image grid where they differ from the query rows'
    # (`text_tokens`, 0): Z-Image keeps its pad tokens among the keys but not among the query rows
    # (docs/DESIGN.md §2.8).
    key_layout: tuple[int, int] | None = None

    def image_part(self, tensor: torch.Tensor) -> torch.Tensor:
        """The image tokens' rows of a (B, heads, N, d) query or output of this layer."""
        return tensor[:, :, self.text_tokens :] if self.text_tokens else tensor

    def keys_around_grid(self) -> tuple[int, int]:
        """(tokens before, tokens after) the image grid among this layer's keys and values."""
        return self.key_layout if self.key_layout is not None else (self.text_tokens, 0)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class AttentionRecorder:
    """Callable for `patches_replace["attn1"]`: computes self-attention with SDPA (which has
    a backward on every backend), records the features and, after the last selected layer,
    stops the forward when `stop_early` is set."""

    def __init__(self, layers: list[SelfAttentionLayer], stop_early: bool = True) -> None:
        self.layers = list(layers)
        self.keys = [layer.patch_key for layer in self.layers]
        self.last_key = self.keys[-1]
        self.stop_early = stop_early
        self.records: dict[tuple[str, int, int], LayerRecord] = {}

    def transformer_options(self) -> dict:
        """A fresh options dict for one UNet call (the UNet writes into it)."""
        return {"patches_replace": {"attn1": {key: self for key in self.keys}}}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = int(extra_options["n_heads"])
        key = (extra_options["block"][0], extra_options["block"][1], extra_options.get("block_index", 0))
        qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
        out = F.scaled_dot_product_attention(qh, kh, vh)
        hw = token_grid(extra_options["original_shape"], q.shape[1])
        self.records[key] = LayerRecord(q=qh, k=kh, v=vh, out=out, hw=hw)
        if self.stop_early and key == self.last_key:
            raise StopForward
        return merge_heads(out)

    def ordered(self) -> list[LayerRecord]:
        """Records in layer order; every selected layer must have run."""
        missing = [key for key in self.keys if key not in self.records]
        if missing:
            raise RuntimeError(f"AD layers {missing} did not run in the UNet forward")
        return [self.records[key] for key in self.keys]
