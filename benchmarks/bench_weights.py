"""Ways to make inference-tensor weights usable by autograd, measured side by side on one
differentiated AD pass (forward to the last selected layer + backward):

- alias: each parameter swapped for a zero-copy normal tensor on the same storage (the pack's way);
- cast copy: every op routed through ComfyUI's cast path with a no-op weight function, so each
  weight is copied on every call (the per-call recipe of the host notes);
- clone once: every parameter replaced by a normal copy for the run (a second set of weights).

    python benchmarks/bench_weights.py [--kind sd15] [--size 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from harness import build_full_unet, conditioning, measure, mib

from attention_distillation_pack.attention.reference import ADReference
from attention_distillation_pack.attention.session import ADModelSession
from attention_distillation_pack.guidance.autograd import aliased_weights, clone_saved_tensors, needs_inplace_guard
from attention_distillation_pack.guidance.optimize import ad_objective

parser = argparse.ArgumentParser()
parser.add_argument("--kind", default="sd15", choices=["sd15", "sdxl"])
parser.add_argument("--size", type=int, default=256)
parser.add_argument("--repeats", type=int, default=3)
args = parser.parse_args()


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@contextlib.contextmanager
def cast_copies(module: torch.nn.Module):
    """Transiently route every ComfyUI op through its cast path with a no-op weight function."""
    saved = []
    for m in module.modules():
        if not hasattr(m, "comfy_cast_weights"):
            continue
        saved.append((m, {k: m.__dict__[k] for k in ("comfy_cast_weights", "weight_function", "bias_function")
                          if k in m.__dict__}))
        if isinstance(m.weight_function, list):
            m.weight_function, m.bias_function = [*m.weight_function, _identity], [*m.bias_function, _identity]
        else:
            m.weight_function = m.weight_function or _identity
            m.bias_function = m.bias_function or _identity
        m.comfy_cast_weights = True
    try:
        yield
    finally:
        for m, attrs in saved:
            for k in ("comfy_cast_weights", "weight_function", "bias_function"):
                m.__dict__.pop(k, None)
            m.__dict__.update(attrs)


@contextlib.contextmanager
def cloned_once(module: torch.nn.Module):
    originals = []
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                originals.append((m, name, p))
                m._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
    try:
        yield
    finally:
        for m, name, p in originals:
            m._parameters[name] = p


patcher = build_full_unet(args.kind)
dm = patcher.model.diffusion_model
side = args.size // 8
reference = ADReference(torch.randn(1, 4, side, side), "paper default", conditioning(args.kind))
session = ADModelSession(patcher, reference)
x0 = torch.randn(1, 4, side, side, device=session.device)
strategies = {"alias (pack)": aliased_weights, "cast copy per call": cast_copies, "clone once": cloned_once}
rows = []
with torch.inference_mode():
    for label, strategy in strategies.items():
        with torch.inference_mode(False), torch.enable_grad():
            setup_time, setup_peak = 0.0, 0
            holder = contextlib.ExitStack()
            setup_time, setup_peak = measure(lambda: holder.enter_context(strategy(dm)), session.device)
            guard = clone_saved_tensors() if needs_inplace_guard(dm) else contextlib.nullcontext()
            with holder, guard:
                refs = session.reference_kv(500)

                def step():
                    x = x0.clone().requires_grad_(True)
                    loss, _, _ = ad_objective(session, x, 500, refs, None, 0.0, None)
                    loss.backward()

                step()
                seconds, peak = measure(step, session.device, args.repeats)
        rows.append((label, setup_time, setup_peak, seconds, peak))

print(f"{args.kind} {args.size}x{args.size}, one AD forward+backward, {torch.get_num_threads()} threads")
print("| weights | set-up | set-up memory | per pass | x alias | peak memory of a pass |")
print("|---|---|---|---|---|---|")
base = rows[0][3]
for label, setup_time, setup_peak, seconds, peak in rows:
    print(f"| {label} | {setup_time * 1000:.0f} ms | {mib(setup_peak)} | {seconds:.2f} s | {seconds / base:.2f} | {mib(peak)} |")
