"""Mixed precision: the UNet in the dtype ComfyUI loaded, the latent, loss and Adam in float32."""

from __future__ import annotations

import logging

import pytest
import torch
import tiny_models as tm
from ad_helpers import capture, losses_at, optimize


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_stay_finite_and_work(pack, dtype):
    with torch.inference_mode():
        patcher = tm.build("sd15", dtype=dtype, scale=0.1)
    ref = capture(patcher, torch.randn(1, 4, 8, 8) * 4, tm.conditioning(dtype=dtype))
    content = torch.randn(1, 4, 8, 8) * 4
    out = optimize(patcher, ref, content, steps=8, weight=0.1)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert losses_at(patcher, ref, out)[0] < losses_at(patcher, ref, content)[0]


def test_non_finite_loss_skips_the_update_and_says_so_once(pack, caplog):
    with torch.inference_mode():
        patcher = tm.build("sd15", dtype=torch.float16, scale=60.0)  # activations overflow fp16
    ref = capture(patcher, torch.randn(1, 4, 8, 8) * 4, tm.conditioning(dtype=torch.float16))
    content = torch.randn(1, 4, 8, 8) * 4
    with caplog.at_level(logging.WARNING):
        out = optimize(patcher, ref, content, steps=3)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, content, atol=1e-5), "a non-finite loss must not move the latent"
    assert sum("non-finite loss" in r.getMessage() for r in caplog.records) == 1
