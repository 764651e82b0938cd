"""How the cost of one Latent AD Optimize iteration grows with latent size, batch size and the
number of references, and what gradient checkpointing saves. One process, side by side.

Each row runs the node for --steps steps on a fresh AD_REFERENCE (so reference features are
computed, as on a first run) and reports time per iteration and peak memory above the loaded model.
On the CPU the memory column is the peak of tensor storage the node allocated and held at once,
counted exactly in a separate 1-step run (tests/memory_meter.py): the process's resident-set peak
is not comparable between rows of one process.

    python benchmarks/bench_scaling.py [--kind sd15] [--steps 2] [--quick]
"""

from __future__ import annotations

import argparse

import torch
from harness import build_full_unet, conditioning, measure, mib, tensor_peak

from attention_distillation_pack.guidance.windows import WindowSettings
from attention_distillation_pack.nodes.capture import CaptureReferenceAttention
from attention_distillation_pack.nodes.optimize import LatentADOptimize

parser = argparse.ArgumentParser()
parser.add_argument("--kind", default="sd15", choices=["sd15", "sdxl"])
parser.add_argument("--steps", type=int, default=2)
parser.add_argument("--quick", action="store_true", help="smaller sizes (16², 24², 32² latents)")
args = parser.parse_args()

patcher = build_full_unet(args.kind)
device = patcher.load_device
cond = conditioning(args.kind)
sizes = (16, 24, 32) if args.quick else (32, 48, 64)
base = sizes[0]


def run(side: int, batch: int = 1, refs: int = 1, checkpointing: str = "off", windows=None) -> tuple[float, int]:
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(refs, 4, base, base, generator=g)
    latent = torch.randn(batch, 4, side, side, generator=g)

    def call(steps: int = args.steps) -> None:
        with torch.inference_mode():
            (ref,) = CaptureReferenceAttention().capture(patcher, {"samples": reference}, cond, "paper default")
            LatentADOptimize().optimize(patcher, ref, {"samples": latent}, steps, 0.05, 1, 0.0, 0,
                                        gradient_checkpointing=checkpointing, windows=windows)

    seconds, peak = measure(call, device)
    if device.type == "cpu":
        peak = tensor_peak(lambda: call(1))
    return seconds / args.steps, peak


rows = []
first = None
for label, kwargs in (
    [(f"latent {s}x{s}", {"side": s}) for s in sizes]
    + [(f"batch {b}", {"side": base, "batch": b}) for b in (2, 4)]
    + [(f"references {r}", {"side": base, "refs": r}) for r in (2, 4)]
    + [(f"latent {sizes[-1]}x{sizes[-1]}, gradient checkpointing", {"side": sizes[-1], "checkpointing": "on"})]
    + [(f"latent {2 * base}x{2 * base} in 4 windows of {base}x{base} (AD Texture Windows)",
        {"side": 2 * base, "windows": WindowSettings(size=base, stride=base)})]
):
    seconds, peak = run(**kwargs)
    first = first or seconds
    rows.append((label, seconds, peak))
    print(f"  {label}: {seconds:.2f} s/iteration, {mib(peak)}", flush=True)

print(f"\n{args.kind}, Latent AD Optimize, 1 iteration per step, content_weight 0, on {device}, "
      f"{torch.get_num_threads()} threads; reference {base}x{base} latent")
print("| case | time per iteration | x first row | peak memory |")
print("|---|---|---|---|")
for label, seconds, peak in rows:
    print(f"| {label} | {seconds:.2f} s | {seconds / first:.2f} | {mib(peak)} |")
