"""AD Loss Guidance on a full-size random-weight SD1.5 UNet: plain vs guided sampling in one
process, per step and in total, with peak memory, and how close a guided step is to its floor.

    python benchmarks/bench_guidance.py [--size 256] [--steps 20] [--cfg 7.5] [--iterations 2]

The floor of one guided step (docs/DESIGN.md §5) is the sampler's own CFG forward, one reference
forward up to the last selected layer (none when cached) and, per iteration, a forward to the
last selected layer plus its backward. The floor's parts are measured here with a bare
hand-written pass (one attn1 replace that records and stops, an L1 loss, backward), not with
the pack's code, so the pack's overhead shows up as the distance to it.
"""

from __future__ import annotations

import argparse
import time

import torch
from harness import build_full_unet, conditioning, measure, mib

parser = argparse.ArgumentParser()
parser.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size/8)")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--cfg", type=float, default=7.5)
parser.add_argument("--iterations", type=int, default=2)
parser.add_argument("--sampler", default="ddim")
parser.add_argument("--scheduler", default="ddim_uniform")
parser.add_argument("--floor-repeats", type=int, default=3)
parser.add_argument("--rerun", action="store_true", help="also time a second guided run (reference features cached)")
args = parser.parse_args()

torch.manual_seed(0)
patcher = build_full_unet("sd15")
device = patcher.load_device
side = args.size // 8
positive = [[torch.randn(1, 77, 768), {}]]
negative = conditioning("sd15")
reference_latent = 5.0 * torch.randn(1, 4, side, side)

from attention_distillation_pack.guidance.autograd import autograd_through  # noqa: E402
from attention_distillation_pack.nodes.capture import CaptureReferenceAttention  # noqa: E402
from attention_distillation_pack.nodes.guidance import ADLossGuidance  # noqa: E402

import comfy.sample  # noqa: E402

with torch.inference_mode():
    (reference,) = CaptureReferenceAttention().capture(
        patcher, {"samples": reference_latent}, conditioning("sd15"), "paper default"
    )
    (guided,) = ADLossGuidance().patch(patcher, reference, 0.015, args.iterations, True, 0.0, 1.0, 0)
latent = torch.zeros(1, 4, side, side)
noise = comfy.sample.prepare_noise(latent, 0)


def run(model, stamps: list[tuple[float, float]]):
    """Sample once, stamping (wall, process CPU) time at the start, each step and the end. CPU
    time is reported next to wall time because shared CI machines make wall time noisy."""

    def stamp(*_):
        stamps.append((time.perf_counter(), time.process_time()))

    with torch.inference_mode():
        stamp()
        comfy.sample.sample(
            model, noise, args.steps, args.cfg, args.sampler, args.scheduler, positive, negative, latent,
            seed=0, disable_pbar=True, callback=stamp,
        )
        stamp()


def per_step(stamps: list[tuple[float, float]], which: int = 0) -> list[float]:
    # callback i fires after the model call of step i (before the update), so the step spans
    # callback i-1 → callback i; the first runs from the start, the last ends at the return.
    return [b[which] - a[which] for a, b in zip(stamps[:-1], stamps[1:])][: args.steps]


# -- the floor's parts, measured bare ---------------------------------------------------------------


class _Stop(Exception):
    pass


def timed(fn, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the fastest of `repeats` calls: the least disturbed by other load."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best = (min(best[0], time.perf_counter() - wall), min(best[1], time.process_time() - cpu))
    return best


def floor_parts() -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """(wall, CPU) of: a CFG forward of batch 2, a reference forward to the last AD layer, and a
    forward to it plus backward."""
    from attention_distillation_pack.attention.layers import select_layers

    unet = patcher.model.diffusion_model
    keys = [layer.patch_key for layer in select_layers(unet, "paper default")]
    last = keys[-1]
    context = torch.zeros(1, 77, 768, device=device)

    def forward(x, stop, store):
        def attn(q, k, v, extra):
            heads = extra["n_heads"]
            b, n, c = q.shape
            qh, kh, vh = (t.view(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
            key = (extra["block"][0], extra["block"][1], extra["block_index"])
            store[key] = (qh, kh, vh, out)
            if stop and key == last:
                raise _Stop
            return out.transpose(1, 2).reshape(b, n, c)

        options = {"patches_replace": {"attn1": {key: attn for key in keys}}}
        try:
            unet(x, torch.full((x.shape[0],), 500.0, device=device), context=context.expand(x.shape[0], -1, -1),
                 transformer_options=options)
        except _Stop:
            pass

    def cfg_forward():
        with torch.inference_mode():
            patcher.model.apply_model(
                torch.randn(2, 4, side, side, device=device), torch.tensor([5.0, 5.0], device=device),
                c_crossattn=torch.zeros(2, 77, 768, device=device),
            )

    with autograd_through(unet):
        ref_store: dict = {}

        def reference_forward():
            with torch.no_grad():
                forward(torch.randn(1, 4, side, side, device=device), True, ref_store)

        def iteration():
            z = torch.randn(1, 4, side, side, device=device, requires_grad=True)
            store: dict = {}
            forward(z, True, store)
            loss = 0.0
            for key in keys:
                q, _, _, out = store[key]
                _, k_ref, v_ref, _ = ref_store[key]
                with torch.no_grad():
                    target = torch.nn.functional.scaled_dot_product_attention(q, k_ref, v_ref)
                loss = loss + (out - target).abs().mean()
            loss.backward()

        reference_forward()  # warm-up, and the keys/values the iterations use
        iteration()
        t_ref = timed(reference_forward, args.floor_repeats)
        t_iter = timed(iteration, args.floor_repeats)
    cfg_forward()
    t_cfg = timed(cfg_forward, args.floor_repeats)
    return t_cfg, t_ref, t_iter


# -- the runs ------------------------------------------------------------------------------------------

torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # first use imports torch._dynamo (seconds)
t_cfg, t_ref, t_iter = floor_parts()  # also the warm-up: first calls, autograd set-up
plain_stamps: list[tuple[float, float]] = []
guided_stamps: list[tuple[float, float]] = []
rerun_stamps: list[tuple[float, float]] = []
t_plain, m_plain = measure(lambda: run(patcher, plain_stamps), device)
t_guided, m_guided = measure(lambda: run(guided, guided_stamps), device)
if args.rerun:
    t_rerun, m_rerun = measure(lambda: run(guided, rerun_stamps), device)

plain_steps, guided_steps = per_step(plain_stamps), per_step(guided_stamps)
plain_cpu, guided_cpu = per_step(plain_stamps, 1), per_step(guided_stamps, 1)
rerun_steps = per_step(rerun_stamps) if args.rerun else [float("nan")] * len(plain_steps)
floor_step = [t_cfg[k] + t_ref[k] + args.iterations * t_iter[k] for k in (0, 1)]
floor_cached = [t_cfg[k] + args.iterations * t_iter[k] for k in (0, 1)]

print(
    f"SD1.5 full-size UNet (random weights), {args.size}x{args.size}, {args.steps} steps, cfg {args.cfg}, "
    f"{args.sampler}/{args.scheduler}, iterations {args.iterations}, lr 0.015, AdaIN on, layers: paper default; "
    f"{device}, {torch.get_num_threads()} threads"
)
print()
print("| step | plain | guided | ratio | CPU time ratio | guided re-run (reference cached) | ratio |")
print("|---|---|---|---|---|---|---|")
rows = zip(plain_steps, guided_steps, plain_cpu, guided_cpu, rerun_steps)
for i, (p, g, pc, gc, r) in enumerate(rows):
    print(f"| {i} | {p:.2f} s | {g:.2f} s | {g / p:.2f} | {gc / pc:.2f} | {r:.2f} s | {r / p:.2f} |")
print()
print("| run | time | x plain | peak memory |")
print("|---|---|---|---|")
cpu_ratio = sum(guided_cpu) / sum(plain_cpu)
print(f"| plain sampling | {t_plain:.1f} s | 1.00 | {mib(m_plain)} |")
print(f"| guided, first run | {t_guided:.1f} s | {t_guided / t_plain:.2f} (CPU time {cpu_ratio:.2f}) | {mib(m_guided)} |")
if args.rerun:
    print(f"| guided, re-run (reference cached) | {t_rerun:.1f} s | {t_rerun / t_plain:.2f} | {mib(m_rerun)} |")
print()
mean_guided = sum(guided_steps) / len(guided_steps)
mean_guided_cpu = sum(guided_cpu) / len(guided_cpu)
mean_rerun = sum(rerun_steps) / len(rerun_steps)
print("Floor of one guided step, parts measured bare (fastest of the repeats; wall / CPU):")
print(f"  CFG forward (batch 2)                       {t_cfg[0]:.2f} s / {t_cfg[1]:.2f} s")
print(f"  reference forward to the last AD layer      {t_ref[0]:.2f} s / {t_ref[1]:.2f} s")
print(f"  forward to the last AD layer + backward     {t_iter[0]:.2f} s / {t_iter[1]:.2f} s  (x{args.iterations})")
print(f"  floor per step: {floor_step[0]:.2f} s / {floor_step[1]:.2f} s; "
      f"with the reference cached: {floor_cached[0]:.2f} s / {floor_cached[1]:.2f} s")
print(f"guided step (mean): {mean_guided:.2f} s wall = {mean_guided / floor_step[0]:.2f}x the floor; "
      f"{mean_guided_cpu:.2f} s CPU = {mean_guided_cpu / floor_step[1]:.2f}x the floor's CPU time")
mean_plain = sum(plain_steps) / len(plain_steps)
ad_floor = t_ref[0] + args.iterations * t_iter[0]
print(f"with the sampler's own plain step ({mean_plain:.2f} s, measured above) in place of the bare CFG forward: "
      f"floor {mean_plain + ad_floor:.2f} s, guided step = {mean_guided / (mean_plain + ad_floor):.2f}x; "
      f"the AD part alone (guided - plain step, {mean_guided - mean_plain:.2f} s) = "
      f"{(mean_guided - mean_plain) / ad_floor:.2f}x its floor ({ad_floor:.2f} s)")
if args.rerun:
    print(f"guided re-run step: {mean_rerun:.2f} s = {mean_rerun / floor_cached[0]:.2f}x the cached floor")
print(f"reference cache: hits {reference.cache.hits}, misses {reference.cache.misses}")
