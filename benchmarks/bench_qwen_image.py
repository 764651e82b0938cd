"""Qwen-Image AD on CPU: a full-width Qwen-Image (hidden 3072, 24 heads of 128, text width 3584) with few
blocks and random weights. One AD iteration (the pass to the last selected block plus its backward) with and
without block checkpointing against the sampler's plain forward, and one whole guided step (AD Loss Guidance
in ComfyUI's euler sampler with true CFG: two network passes, a reference pass, 2 AD iterations with
checkpointing 'auto' = on) against its floor, in one process; peak memory is the tensor-storage peak of
each call (weights excluded).

    python benchmarks/bench_qwen_image.py [--size 256] [--blocks 3] [--text-tokens 5] [--cfg 2.5]
"""

from __future__ import annotations

import argparse
import time

import torch
from harness import tensor_peak

from attention_distillation_pack.attention.families import family_of
from attention_distillation_pack.attention.layers import select_layers
from attention_distillation_pack.guidance.autograd import autograd_through
from attention_distillation_pack.guidance.losses import ad_loss
from attention_distillation_pack.nodes.capture import CaptureReferenceAttention
from attention_distillation_pack.nodes.guidance import ADLossGuidance

parser = argparse.ArgumentParser()
parser.add_argument("--size", type=int, default=256)
parser.add_argument("--blocks", type=int, default=3)
parser.add_argument("--text-tokens", type=int, default=5)
parser.add_argument("--cfg", type=float, default=2.5)
parser.add_argument("--layers", default="paper default")
parser.add_argument("--repeats", type=int, default=1)
args = parser.parse_args()


def build(blocks: int):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = sm.QwenImage({"image_model": "qwen_image", "num_layers": blocks})
    config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode():
        model = config.get_model({}, "", device=torch.device("cpu"))
        generator = torch.Generator().manual_seed(0)
        for name, p in model.diffusion_model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else noise * 0.02)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        mm.load_models_gpu([patcher])
    return patcher


patcher = build(args.blocks)
base, family = patcher.model, family_of(patcher.model)
dm = base.diffusion_model
side = args.size // 8
generator = torch.Generator().manual_seed(1)
x = torch.randn(1, 16, 1, side, side, generator=generator)
reference = torch.randn(1, 16, 1, side, side, generator=generator)
context = torch.randn(1, args.text_tokens, 3584, generator=generator) * 0.1
null = [[context, {"pooled_output": None}]]
sigma = 0.5
time_ad, _ = family.feature_time(base.model_sampling, sigma)
cond = family.conditioning(base, null, x, torch.device("cpu"))
layers = select_layers(dm, args.layers)
with torch.inference_mode():
    refs = family.feature_pass(patcher, layers).run(reference, time_ad, cond)


def plain_forward() -> None:
    """One network pass of the sampler (true CFG makes two per step)."""
    with torch.inference_mode():
        base.apply_model(x, torch.tensor([sigma]), c_crossattn=context)


def reference_pass() -> None:
    with torch.inference_mode():
        family.feature_pass(patcher, layers).run(reference, time_ad, cond)


def ad_iteration(checkpoint: bool):
    feature_pass = family.feature_pass(patcher, layers, checkpoint=checkpoint)

    def run() -> None:
        with torch.inference_mode(), autograd_through(dm):
            latent = x.clone().requires_grad_(True)
            records = feature_pass.run(latent, time_ad, cond)
            loss = ad_loss([r.q for r in records], [r.out for r in records], [r.k for r in refs], [r.v for r in refs])
            loss.backward()

    return run


def guided_step() -> None:
    """One step of a 50-step euler/simple run with AD Loss Guidance (lr 0.01, 2 iterations, AdaIN), true CFG."""
    import comfy.sample

    with torch.inference_mode():
        ref = CaptureReferenceAttention().capture(patcher, {"samples": reference}, null, args.layers)[0]
        (model,) = ADLossGuidance().patch(patcher, ref, 0.01, 2, True, 0.0, 1.0, 0)
        comfy.sample.sample(model, x.clone(), 50, args.cfg, "euler", "simple", null, null, torch.zeros_like(x),
                            last_step=1, force_full_denoise=False, disable_pbar=True, seed=0)


def seconds(fn) -> tuple[float, float]:
    """(wall, CPU seconds of this process) of the fastest of `--repeats` calls after a warm-up."""
    fn()
    best = (float("inf"), float("inf"))
    for _ in range(args.repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


cases = {
    "plain forward (one sampler pass)": plain_forward,
    "reference pass (no grad, stopped early)": reference_pass,
    "AD iteration, no checkpointing": ad_iteration(False),
    "AD iteration, checkpointing": ad_iteration(True),
    "guided step (true CFG), reference computed": guided_step,
}
rows = {name: (*seconds(fn), tensor_peak(fn)) for name, fn in cases.items()}
plain_wall, plain_cpu, plain_peak = rows["plain forward (one sampler pass)"]
weights = sum(p.numel() * p.element_size() for p in dm.parameters())
passes = 2 if args.cfg != 1.0 else 1
print(f"Qwen-Image widths (hidden 3072, 24x128 heads, text 3584), {args.blocks} blocks, {weights / 2**30:.2f} GiB fp32, "
      f"{args.size}x{args.size} ({args.text_tokens} text + {(side // 2) ** 2} image tokens), layers '{args.layers}' = "
      f"AD {[layer.ad_index for layer in layers]}, {torch.get_num_threads()} threads")
print("| call | wall | CPU | CPU x plain | peak tensor memory | x plain |")
print("|---|---|---|---|---|---|")
for name, (wall, cpu, peak) in rows.items():
    print(f"| {name} | {wall:.2f} s | {cpu:.2f} s | {cpu / plain_cpu:.2f} | {peak / 2**20:,.0f} MiB | {peak / plain_peak:.2f} |")
floor = passes * plain_cpu + rows["reference pass (no grad, stopped early)"][1] + 2 * rows["AD iteration, checkpointing"][1]
step = rows["guided step (true CFG), reference computed"]
print(f"guided step: {step[1] / floor:.3f}x its floor ({passes} sampler passes + reference pass + 2 checkpointed AD "
      f"iterations, CPU time); peak {step[2] / plain_peak:.2f}x one plain pass's")
