"""The whole graph of issue #3 at the comfy.* level: an SD15-format checkpoint through
`comfy.sd.load_checkpoint_guess_config`, a LoRA through ComfyUI's LoRA loading, a real (tiny,
random) `comfy.controlnet.ControlNet` on the conditioning, AD Loss Guidance, `comfy.sample.sample`
and VAE decode — all inside inference mode, as a prompt runs."""

from __future__ import annotations

import importlib

import pytest
import torch

H, W = 8, 12


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_controlnet(config: dict, seed: int = 7):
    """A comfy ControlNet with the checkpoint's UNet layout and random (non-zero) weights, the way
    ControlNetLoader wraps a loaded control model."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops

    cfg = {k: v for k, v in config.items() if k not in ("out_channels", "transformer_depth_output")}
    control = comfy.cldm.cldm.ControlNet(
        hint_channels=3, device=torch.device("cpu"), dtype=torch.float32, operations=comfy.ops.manual_cast, **cfg
    )
    generator = torch.Generator().manual_seed(seed)
    control.load_state_dict(
        {k: torch.randn(v.shape, generator=generator) * 0.02 for k, v in control.state_dict().items()}
    )
    return comfy.controlnet.ControlNet(control, load_device=mm.get_torch_device(), manual_cast_dtype=None)


def tiny_vae(seed: int = 5):
    """A comfy.sd.VAE from a random TAESD state dict (the full SD VAE decodes the same way,
    but its random init costs seconds for nothing this test checks)."""
    import comfy.sd
    import comfy.taesd.taesd

    generator = torch.Generator().manual_seed(seed)
    state = {
        k: torch.randn(v.shape, generator=generator) * 0.05 for k, v in comfy.taesd.taesd.TAESD().state_dict().items()
    }
    state["vae_scale"], state["vae_shift"] = torch.tensor(1.0), torch.tensor(0.0)
    return comfy.sd.VAE(sd=state)


def test_checkpoint_lora_controlnet_guidance_sample_decode(pack, sd15_checkpoint, monkeypatch):
    import comfy.controlnet
    import comfy.sample
    import comfy.sd
    import comfy.utils
    from checkpoints import SD15_DETECTABLE_UNET

    capture = importlib.import_module("attention_distillation_pack.nodes.capture")
    node = importlib.import_module("attention_distillation_pack.nodes.guidance")
    guided_mod = importlib.import_module("attention_distillation_pack.guidance.guided")
    ckpt, lora_path = sd15_checkpoint

    control_calls = []
    original_get_control = comfy.controlnet.ControlNet.get_control

    def counting_get_control(self, x_noisy, *args, **kwargs):
        control_calls.append(x_noisy.shape[0])
        return original_get_control(self, x_noisy, *args, **kwargs)

    monkeypatch.setattr(comfy.controlnet.ControlNet, "get_control", counting_get_control)
    sessions = []
    original_update = guided_mod.ad_guidance_update

    def recording_update(session, *args, **kwargs):
        sessions.append(session)
        return original_update(session, *args, **kwargs)

    monkeypatch.setattr(guided_mod, "ad_guidance_update", recording_update)

    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        model, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=False)
        assert type(model.model.model_config).__name__ == "SD15"
        lora = comfy.utils.load_torch_file(str(lora_path), safe_load=True)
        lora_model, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
        assert len(lora_model.patches) == 9 and lora_model.patches_uuid != model.patches_uuid

        hint = torch.rand(1, 3, H * 8, W * 8, generator=g)
        control = tiny_controlnet(SD15_DETECTABLE_UNET).copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
        text, negative_text, empty = (torch.randn(1, 77, 768, generator=g) for _ in range(3))
        positive = [[text, {"control": control, "control_apply_to_uncond": True}]]
        positive_plain = [[text, {}]]
        negative = [[negative_text, {}]]

        reference_latent = {"samples": 5.0 * torch.randn(1, 4, H, W, generator=g)}
        (reference,) = capture.CaptureReferenceAttention().capture(
            lora_model, reference_latent, [[empty, {}]], "paper default"
        )
        (guided,) = node.ADLossGuidance().patch(lora_model, reference, 0.015, 2, True, 0.0, 1.0, 0)
        reports = []
        guided.model_options["sampler_post_cfg_function"][0].on_iteration = reports.append

        latent = torch.zeros(1, 4, H, W)
        noise = comfy.sample.prepare_noise(latent, 0)

        def run(model_to_use, cond):
            return comfy.sample.sample(
                model_to_use, noise, 3, 5.0, "euler", "normal", cond, negative, latent, seed=0, disable_pbar=True
            )

        out = run(guided, positive)
        calls_in_guided_run = len(control_calls)
        reports_of_run = list(reports)
        image = tiny_vae().decode(out)
        without_control = run(guided, positive_plain)
        unguided = run(lora_model, positive)

    assert torch.isfinite(out).all()
    assert image.shape == (1, H * 8, W * 8, 3) and torch.isfinite(image).all()
    # The ControlNet ran once per sampling step (cond and uncond batched), never in the AD passes.
    assert calls_in_guided_run == 3
    assert float((out - without_control).abs().max()) > 1e-3  # ControlNet still steers the image
    assert float((out - unguided).abs().max()) > 1e-3  # and the guidance still acts
    # The AD passes ran on the LoRA patcher's weights and the loss fell within every step.
    assert len(sessions) >= 3 and all(s.model_key[1] == lora_model.patches_uuid for s in sessions[:3])
    steps = sorted({r.step for r in reports_of_run})
    assert steps == [0, 1, 2]
    for step in steps:
        losses = [r.ad for r in reports_of_run if r.step == step]
        assert losses[0] > losses[1], (step, losses)
