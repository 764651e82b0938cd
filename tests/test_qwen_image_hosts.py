"""Where ComfyUI has Qwen-Image but not the attention layout AD reads (v0.3.64), the nodes say which
ComfyUI Qwen-Image AD needs (docs/DESIGN.md §2.8)."""

from __future__ import annotations

import pytest
import torch
import tiny_qwen_image as tq


def _older_qwen_host() -> str | None:
    """Why the older-host test cannot run: it needs a ComfyUI with Qwen-Image before v0.33 (v0.3.64)."""
    if tq.HOST_REASON is None:
        return "this ComfyUI serves Qwen-Image AD"
    try:
        import comfy.ldm.qwen_image.model  # noqa: F401
    except ImportError:
        return "this ComfyUI has no Qwen-Image at all"
    return None


@pytest.mark.skipif(_older_qwen_host() is not None, reason=_older_qwen_host() or "")
def test_older_comfyui_qwen_image_gets_the_version_it_needs(pack):
    """v0.3.64 has Qwen-Image, but its attention flattens the heads before the override: refused by name."""
    from attention_distillation_pack.nodes.capture import CaptureReferenceAttention
    from attention_distillation_pack.nodes.errors import ADNodeError

    with torch.inference_mode():
        patcher = tq.build()
        with pytest.raises(ADNodeError, match="Qwen-Image needs ComfyUI v0.33.0 or newer"):
            CaptureReferenceAttention().capture(patcher, {"samples": tq.latent()}, tq.null_conditioning(), "paper default")
