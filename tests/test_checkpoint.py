"""The core on a checkpoint loaded the way CheckpointLoaderSimple loads it, with a LoRA applied
through ComfyUI's LoRA loading."""

from __future__ import annotations

import torch
from ad_helpers import capture, losses_at, optimize


def test_detected_sd15_checkpoint_with_lora(pack, sd15_checkpoint):
    import comfy.sd
    import comfy.utils

    ckpt, lora_path = sd15_checkpoint
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=False)
        lora = comfy.utils.load_torch_file(str(lora_path), safe_load=True)
        lora_model, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    assert type(model.model.model_config).__name__ == "SD15"
    assert sum(p.numel() for p in model.model.diffusion_model.parameters()) > 20_000_000
    assert len(lora_model.patches) == 9

    from attention_distillation_pack.attention.layers import list_self_attention_layers

    layers = list_self_attention_layers(model.model.diffusion_model)
    assert [la.patch_key for la in layers] == [("input", 1, 0), ("output", 0, 0), ("output", 1, 0)]

    g = torch.Generator().manual_seed(5)
    cond = [[torch.zeros(1, 77, 768), {}]]
    reference, content = torch.randn(1, 4, 8, 8, generator=g) * 4, torch.randn(1, 4, 8, 8, generator=g) * 4
    results = []
    for m in (model, lora_model):
        ref = capture(m, reference, cond)
        out = optimize(m, ref, content, steps=6, weight=0.0)
        assert torch.isfinite(out).all()
        assert losses_at(m, ref, out, timesteps=(1, 500))[0] < losses_at(m, ref, content, timesteps=(1, 500))[0]
        results.append(out)
    assert not torch.equal(results[0], results[1]), "the LoRA did not reach the AD passes"
