"""Peak memory of one guided step's AD update, with and without gradient checkpointing, next to a
plain CFG step (batch-2 forward), each measured in a fresh process so no freed heap is reused.

    python benchmarks/bench_memory.py [--size 512] [--iterations 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--size", type=int, default=512)
parser.add_argument("--iterations", type=int, default=2)
parser.add_argument("--case", choices=["plain", "guided", "guided-checkpointing"])
args = parser.parse_args()

if args.case is None:
    rows = {}
    for case in ("plain", "guided", "guided-checkpointing"):
        out = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--iterations", str(args.iterations),
                              "--case", case], capture_output=True, text=True, check=True).stdout
        rows[case] = json.loads(out.strip().splitlines()[-1])
    plain = rows["plain"]["peak"]
    print(f"sd15 {args.size}x{args.size}, AD update with {args.iterations} iterations, fresh process per row")
    print("| case | time | peak memory above the loaded model | x plain CFG step |")
    print("|---|---|---|---|")
    for case, row in rows.items():
        print(f"| {case} | {row['seconds']:.2f} s | {row['peak'] / 2**20:,.0f} MiB | {row['peak'] / plain:.2f} |")
    sys.exit(0)

import torch  # noqa: E402
from harness import build_full_unet, conditioning, measure  # noqa: E402

from attention_distillation_pack.attention.reference import ADReference  # noqa: E402
from attention_distillation_pack.attention.session import ADModelSession  # noqa: E402
from attention_distillation_pack.guidance.autograd import autograd_through  # noqa: E402
from attention_distillation_pack.guidance.guided_update import GuidanceSettings, ad_guidance_update  # noqa: E402

patcher = build_full_unet("sd15")
side = args.size // 8
device = patcher.load_device
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 4, side, side, generator=g)

if args.case == "plain":
    def call() -> None:
        with torch.inference_mode():
            patcher.model.apply_model(torch.cat([x, x]).to(device), torch.tensor([1.0, 1.0], device=device),
                                      c_crossattn=torch.zeros(2, 77, 768, device=device))
else:
    reference = ADReference(torch.randn(1, 4, side, side, generator=g), "paper default", conditioning("sd15"))
    session = ADModelSession(patcher, reference, gradient_checkpointing=args.case == "guided-checkpointing")
    noise = torch.randn(1, 4, side, side, generator=g)
    settings = GuidanceSettings(lr=0.015, iterations=args.iterations, adain=True)

    def call() -> None:
        with torch.inference_mode(), autograd_through(patcher.model.diffusion_model):
            ad_guidance_update(session, x.to(device), 1.0, noise, settings)

seconds, peak = measure(call, device)
print(json.dumps({"seconds": seconds, "peak": peak}))
