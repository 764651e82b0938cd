"""Flux AD on CPU: a full-width Flux (hidden 3072, 24 heads, FLUX.1's widths) with few blocks
and random weights. One AD iteration (the pass to the last selected block plus its backward),
with and without block checkpointing, against the sampler's plain forward, and one whole guided
step (AD Loss Guidance in ComfyUI's euler sampler: the sampler's pass, a reference pass, 2 AD
iterations with checkpointing 'auto' = on) against its floor, in one process; peak memory is the
exact tensor-storage peak of each call (weights excluded).

    python benchmarks/bench_flux.py [--size 256] [--double 2] [--single 4] [--text-tokens 256]
"""

from __future__ import annotations

import argparse
import time

import torch
from harness import tensor_peak

from attention_distillation_pack.attention import flux_family as ff
from attention_distillation_pack.attention.layers import select_layers
from attention_distillation_pack.guidance.autograd import autograd_through
from attention_distillation_pack.guidance.losses import ad_loss
from attention_distillation_pack.nodes.capture import CaptureReferenceAttention
from attention_distillation_pack.nodes.guidance import ADLossGuidance

parser = argparse.ArgumentParser()
parser.add_argument("--size", type=int, default=256)
parser.add_argument("--double", type=int, default=2)
parser.add_argument("--single", type=int, default=4)
parser.add_argument("--text-tokens", type=int, default=256)
parser.add_argument("--layers", default="paper default")
parser.add_argument("--repeats", type=int, default=2)
args = parser.parse_args()

FLUX1_WIDTHS = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
    mlp_ratio=4.0, num_heads=24, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
)


def build_flux(double: int, single: int):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = sm.Flux(dict(FLUX1_WIDTHS, depth=double, depth_single_blocks=single))
    config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode():
        model = config.get_model({}, "", device=torch.device("cpu"))
        generator = torch.Generator().manual_seed(0)
        for name, p in model.diffusion_model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.1 * noise if name.endswith(".scale") else noise * 0.02)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        mm.load_models_gpu([patcher])
    return patcher


patcher = build_flux(args.double, args.single)
base = patcher.model
dm = base.diffusion_model
side = args.size // 8
generator = torch.Generator().manual_seed(1)
x = torch.randn(1, 16, side, side, generator=generator)
reference = torch.randn(1, 16, side, side, generator=generator)
context = torch.randn(1, args.text_tokens, 4096, generator=generator) * 0.1
pooled = torch.randn(1, 768, generator=generator) * 0.1
sigma = 0.5
time_ad, _ = ff.feature_time(base.model_sampling, sigma)
cond = ff.flux_conditioning(base, [[context, {"pooled_output": pooled}]], x, torch.device("cpu"))
layers = select_layers(dm, args.layers)
with torch.inference_mode():
    refs = ff.FluxFeaturePass(base, layers).run(reference, time_ad, cond)


def plain_forward() -> None:
    """The sampler's pass at cfg 1 (FLUX.1-dev has no CFG): one full forward."""
    with torch.inference_mode():
        base.apply_model(x, torch.tensor([sigma]), c_crossattn=context, y=pooled, guidance=torch.tensor([3.5]))


def reference_pass() -> None:
    with torch.inference_mode():
        ff.FluxFeaturePass(base, layers).run(reference, time_ad, cond)


def ad_iteration(checkpoint: bool):
    feature_pass = ff.FluxFeaturePass(base, layers, checkpoint=checkpoint)

    def run() -> None:
        with torch.inference_mode(), autograd_through(dm):
            latent = x.clone().requires_grad_(True)
            records = feature_pass.run(latent, time_ad, cond)
            loss = ad_loss([r.q for r in records], [r.out for r in records], [r.k for r in refs], [r.v for r in refs])
            loss.backward()

    return run


def guided_step(fresh_reference: bool):
    """One step of a 50-step euler/simple run with AD Loss Guidance (lr 0.01, 2 iterations, AdaIN): a fresh
    reference computes its keys/values in the step; otherwise they come from the cache of the warm-up."""
    import comfy.sample

    null = [[context, {"pooled_output": pooled}]]
    positive = [[context, {"pooled_output": pooled, "guidance": 3.5}]]

    def captured():
        with torch.inference_mode():
            return CaptureReferenceAttention().capture(patcher, {"samples": reference}, null, args.layers)[0]

    kept = captured()

    def run() -> None:
        ref = captured() if fresh_reference else kept
        with torch.inference_mode():
            (model,) = ADLossGuidance().patch(patcher, ref, 0.01, 2, True, 0.0, 1.0, 0)
            comfy.sample.sample(model, x.clone(), 50, 1.0, "euler", "simple", positive, positive, torch.zeros_like(x),
                                last_step=1, force_full_denoise=False, disable_pbar=True, seed=0)

    return run


def seconds(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of the fastest of `--repeats` calls; CPU
    time is the steadier figure on a machine shared with other jobs."""
    fn()  # warm-up
    best = (float("inf"), float("inf"))
    for _ in range(args.repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


cases = {
    "plain forward (the sampler's pass)": plain_forward,
    "reference pass (no grad, stopped early)": reference_pass,
    "AD iteration, no checkpointing": ad_iteration(False),
    "AD iteration, checkpointing": ad_iteration(True),
    "guided step, reference computed": guided_step(True),
    "guided step, reference cached": guided_step(False),
}
rows = {name: (*seconds(fn), tensor_peak(fn)) for name, fn in cases.items()}
plain_wall, plain_cpu, plain_peak = rows["plain forward (the sampler's pass)"]
params = sum(p.numel() for p in dm.parameters())
weights = sum(p.numel() * p.element_size() for p in dm.parameters())
tokens = args.text_tokens + (side // 2) ** 2
print(f"Flux widths of FLUX.1 (hidden 3072, 24 heads), {args.double} double + {args.single} single blocks, "
      f"{params / 1e9:.2f}B parameters ({weights / 2**30:.2f} GiB), fp32 CPU, {args.size}x{args.size} ({tokens} tokens: "
      f"{args.text_tokens} text), layers '{args.layers}' = AD {[layer.ad_index for layer in layers]}, "
      f"{torch.get_num_threads()} threads")
print("| call | wall | CPU | CPU x plain | peak tensor memory | x plain | x plain, weights included |")
print("|---|---|---|---|---|---|---|")
for name, (wall, cpu, peak) in rows.items():
    print(f"| {name} | {wall:.2f} s | {cpu:.2f} s | {cpu / plain_cpu:.2f} | {peak / 2**20:,.0f} MiB | "
          f"{peak / plain_peak:.2f} | {(weights + peak) / (weights + plain_peak):.3f} |")
reference_cpu = rows["reference pass (no grad, stopped early)"][1]
for label in ("no checkpointing", "checkpointing"):
    floor = plain_cpu + reference_cpu + 2 * rows[f"AD iteration, {label}"][1]
    print(f"guided step floor with 2 iterations, {label} (plain + reference + 2 AD iterations): "
          f"{floor / plain_cpu:.2f}x the plain step (CPU time)")
checkpointed = rows["AD iteration, checkpointing"][1]
for label, reference_cost in (("reference computed", reference_cpu), ("reference cached", 0.0)):
    floor = plain_cpu + reference_cost + 2 * checkpointed
    print(f"guided step, {label}: {rows[f'guided step, {label}'][1] / floor:.3f}x its floor (sampler's pass"
          f"{' + reference pass' if reference_cost else ''} + 2 checkpointed AD iterations, CPU time); peak "
          f"{rows[f'guided step, {label}'][2] / plain_peak:.2f}x the plain step's")
print("full depth (FLUX.1: 19 double + 38 single blocks) is an extrapolation, not measured: with 'paper default' the "
      "AD passes run every block up to the last single block there as here, so the per-pass ratios carry over; the "
      "mix of double and single blocks differs")
