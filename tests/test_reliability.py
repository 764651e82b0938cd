"""Failures leave nothing behind; repeated runs do not grow memory."""

from __future__ import annotations

import gc

import psutil
import pytest
import torch
import tiny_models as tm
from ad_helpers import capture, optimize


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_out_of_memory_is_reported_with_advice_and_leaves_nothing_behind(pack):
    import comfy.model_management as mm
    from attention_distillation_pack.nodes.errors import ADNodeError

    with torch.inference_mode():
        patcher = tm.build("sd15")
    ref = capture(patcher, torch.randn(1, 4, 8, 8), tm.conditioning())
    dm = patcher.model.diffusion_model
    calls = []

    def exhaust(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = dm.output_blocks[0][0].register_forward_pre_hook(exhaust)
    try:
        with pytest.raises(ADNodeError) as info:
            optimize(patcher, ref, torch.randn(1, 4, 8, 8), steps=3)
    finally:
        handle.remove()
    message = str(info.value)
    assert message.startswith("[Latent AD Optimize] out of memory")
    assert "gradient_checkpointing" in message and "resolution" in message and "layers" in message
    assert all(p.is_inference() for p in dm.parameters())
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    assert any(loaded.model is patcher for loaded in mm.current_loaded_models)
    out = optimize(patcher, ref, torch.randn(1, 4, 8, 8), steps=2)
    assert torch.isfinite(out).all()


def test_twenty_runs_do_not_grow_memory(pack):
    with torch.inference_mode():
        patcher = tm.build("sd15")
    ref = capture(patcher, torch.randn(1, 4, 8, 8), tm.conditioning())
    content = torch.randn(1, 4, 8, 8)
    process = psutil.Process()
    tensors, rss = [], []
    for run in range(20):
        optimize(patcher, ref, content, steps=2, weight=0.25, seed=run)
        tensors.append(_live_tensors())
        rss.append(process.memory_info().rss)
    assert tensors[-1] == tensors[1], tensors
    assert rss[-1] - rss[4] < 32 * 2**20, [r // 2**20 for r in rss]
