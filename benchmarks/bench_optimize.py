"""Latent AD Optimize on a full-size random-weight UNet: time and peak memory per iteration next
to one plain UNet forward (ComfyUI's apply_model), measured in one process.

    python benchmarks/bench_optimize.py [--kind sd15|sdxl] [--size 256] [--steps 4]
"""

from __future__ import annotations

import argparse

import torch
from harness import build_full_unet, conditioning, measure, mib

parser = argparse.ArgumentParser()
parser.add_argument("--kind", default="sd15", choices=["sd15", "sdxl"])
parser.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size/8)")
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--repeats", type=int, default=3)
args = parser.parse_args()

torch.manual_seed(0)
patcher = build_full_unet(args.kind)
device = patcher.load_device
side = args.size // 8
cond = conditioning(args.kind)
reference = torch.randn(1, 4, side, side)
content = torch.randn(1, 4, side, side)

from attention_distillation_pack.nodes.capture import CaptureReferenceAttention  # noqa: E402
from attention_distillation_pack.nodes.optimize import LatentADOptimize  # noqa: E402


def plain_forward():
    with torch.inference_mode():
        x = torch.randn(1, 4, side, side, device=device)
        sigma = torch.tensor([1.0], device=device)
        model = patcher.model
        kwargs = {"c_crossattn": cond[0][0].to(device)}
        if args.kind == "sdxl":
            kwargs["y"] = torch.zeros(1, 2816, device=device)
        model.apply_model(x, sigma, **kwargs)


def optimize(ref):
    with torch.inference_mode():
        LatentADOptimize().optimize(patcher, ref, {"samples": content}, args.steps, 0.05, 1, 0.25, 0)


plain_forward()  # warm-up
t_fwd, m_fwd = measure(plain_forward, device, args.repeats)
with torch.inference_mode():
    (ref,) = CaptureReferenceAttention().capture(patcher, {"samples": reference}, cond, "paper default")
t_first, m_first = measure(lambda: optimize(ref), device)
t_rerun, m_rerun = measure(lambda: optimize(ref), device)
per_first = t_first / args.steps
per_rerun = t_rerun / args.steps

print(f"{args.kind} {args.size}x{args.size} on {device}, {torch.get_num_threads()} threads, "
      f"{args.steps} steps x 1 iteration, content_weight 0.25, layers: paper default")
print("| what | time | x plain forward | peak memory |")
print("|---|---|---|---|")
print(f"| plain UNet forward (apply_model) | {t_fwd:.3f} s | 1.00 | {mib(m_fwd)} |")
print(f"| Latent AD Optimize, per iteration, first run | {per_first:.3f} s | {per_first / t_fwd:.2f} | {mib(m_first)} |")
print(f"| Latent AD Optimize, per iteration, re-run (reference cached) | {per_rerun:.3f} s | "
      f"{per_rerun / t_fwd:.2f} | {mib(m_rerun)} |")
print(f"re-run speed-up: {t_first / t_rerun:.2f}x; cache hits {ref.cache.hits}, misses {ref.cache.misses}")
