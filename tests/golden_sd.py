"""Golden SD outputs: Latent AD Optimize and AD-guided sampling on fixed tiny SD1.5- and SDXL-shaped
weights, recorded once so that refactoring can prove every SD output unchanged.

    python tests/golden_sd.py          # record this host's outputs in tests/fixtures/golden_sd.safetensors

Outputs are kept per host (the 2024 core and ComfyUI v0.3.64 differ at float32 rounding, which these
chaotic runs amplify to ~1e-5); recording one host keeps the others' entries. Another CPU rounds
differently again, so the test compares each case within its measured float32 sensitivity. Record only on code whose
outputs are known good; tests/test_golden_sd.py compares against the file.
The SDXL cases use a reference of the output's size and no size keys on the conditioning, so the
AD passes' size conditioning is the output's whichever way the pack derives it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "golden_sd.safetensors"
H, W = 8, 12  # SD1.5 latent (non-square, so height/width mix-ups show)
XL = 8  # SDXL latent side, the reference's too


def _null(kind: str, seed: int) -> list:
    import tiny_models as tm

    cond = tm.conditioning(kind, seed=seed)
    options = {k: v for k, v in cond[0][1].items() if k not in ("width", "height")}
    return [[cond[0][0], options]]


def _model(kind: str, rounding: float, rounding_seed: int = 0):
    """The case's tiny model; `rounding` > 0 moves every weight by that relative amount with a random sign
    drawn from `rounding_seed`: float32 rounding noise throughout the network, as another CPU's kernels make it."""
    import tiny_models as tm

    model = tm.build(kind, seed=0)
    if rounding:
        generator = torch.Generator().manual_seed(rounding_seed)
        for weight in model.model.diffusion_model.parameters():
            signs = torch.randint(0, 2, weight.shape, generator=generator).to(weight.dtype) * 2 - 1
            weight.mul_(1 + rounding * signs)
    return model


def _latent(seed: int, *shape: int) -> torch.Tensor:
    return 5.0 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _capture(model, latent: torch.Tensor, cond: list, **kwargs):
    from attention_distillation_pack.nodes.capture import CaptureReferenceAttention

    return CaptureReferenceAttention().capture(model, {"samples": latent}, cond, "paper default", **kwargs)[0]


def _optimize(model, ref, latent: torch.Tensor, steps: int, lr: float, iterations: int, weight: float, seed: int,
              **kwargs) -> torch.Tensor:
    from attention_distillation_pack.nodes.optimize import LatentADOptimize

    out, _curve = LatentADOptimize().optimize(model, ref, {"samples": latent}, steps, lr, iterations, weight, seed, **kwargs)
    return out["samples"]


def _sample(model, kind: str, latent: torch.Tensor, steps: int, sampler: str, scheduler: str, cfg: float) -> torch.Tensor:
    import comfy.sample

    pos, neg = _null(kind, 1), _null(kind, 2)
    noise = comfy.sample.prepare_noise(latent, 4)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent, seed=4, disable_pbar=True)


def _guide(model, ref, lr: float, iterations: int, adain: bool, seed: int, **kwargs):
    from attention_distillation_pack.nodes.guidance import ADLossGuidance

    return ADLossGuidance().patch(model, ref, lr, iterations, adain, 0.0, 1.0, seed, **kwargs)[0]


def _windows(size_px: int, stride_px: int):
    from attention_distillation_pack.nodes.windows import ADTextureWindows

    return ADTextureWindows().windows(size_px, stride_px)[0]


def sd15_cases(rounding: float = 0.0, rounding_seed: int = 0) -> dict[str, torch.Tensor]:
    model = _model("sd15", rounding, rounding_seed)
    null = _null("sd15", 9)
    ref = _capture(model, _latent(11, 1, 4, H, W), null)
    content = _latent(12, 1, 4, H, W)
    labels = torch.zeros(1, H * 8, W * 8)
    labels[..., W * 4 :] = 1.0
    masked_ref = _capture(model, _latent(11, 1, 4, H, W), null, reference_mask=labels)
    empty = torch.zeros(1, 4, H, W)
    return {
        "sd15_optimize_texture": _optimize(model, ref, empty, 3, 0.05, 2, 0.0, 5),
        "sd15_optimize_transfer_checkpointed": _optimize(model, ref, content, 3, 0.05, 1, 0.25, 0,
                                                         gradient_checkpointing="on"),
        "sd15_optimize_masked": _optimize(model, masked_ref, content, 2, 0.05, 1, 0.25, 0, target_mask=labels),
        "sd15_optimize_windows": _optimize(model, ref, torch.zeros(1, 4, H, 2 * W), 2, 0.05, 1, 0.0, 7,
                                           windows=_windows(64, 32)),
        "sd15_guided_ddim": _sample(_guide(model, ref, 0.015, 2, True, 3), "sd15", empty, 3, "ddim", "ddim_uniform", 5.0),
        "sd15_guided_euler_content": _sample(
            _guide(model, ref, 0.05, 2, False, 0, content={"samples": content}, content_weight=0.25),
            "sd15", empty, 3, "euler", "normal", 1.0),
    }


def sdxl_cases(rounding: float = 0.0, rounding_seed: int = 0) -> dict[str, torch.Tensor]:
    model = _model("sdxl", rounding, rounding_seed)
    ref = _capture(model, _latent(3, 1, 4, XL, XL), _null("sdxl", 9))
    empty = torch.zeros(1, 4, XL, XL)
    return {
        "sdxl_optimize_transfer": _optimize(model, ref, _latent(13, 1, 4, XL, XL), 2, 0.05, 1, 0.25, 0),
        "sdxl_guided_euler_checkpointed": _sample(_guide(model, ref, 0.05, 2, True, 1, gradient_checkpointing="on"),
                                                  "sdxl", empty, 2, "euler", "normal", 5.0),
    }


CASES: dict[str, Callable[..., dict[str, torch.Tensor]]] = {"sd15": sd15_cases, "sdxl": sdxl_cases}


def host_label() -> str:
    """Which ComfyUI the outputs come from: the full source tree names its version, the core package its own."""
    try:
        import comfyui_version

        return f"comfyui-{comfyui_version.__version__}"
    except ImportError:
        from importlib.metadata import version

        return f"notcomfy-{version('notcomfy')}"


def compute(family: str, rounding: float = 0.0, rounding_seed: int = 0) -> dict[str, torch.Tensor]:
    """The outputs of one family's cases, computed under inference mode as in a prompt (`rounding`: see
    `_model`)."""
    with torch.inference_mode():
        outputs = CASES[family](rounding, rounding_seed)
    return {name: t.detach().clone().contiguous().float() for name, t in outputs.items()}


def record() -> None:
    from safetensors.torch import load_file, save_file

    host = host_label()
    kept = {k: v for k, v in load_file(str(FIXTURE)).items() if not k.startswith(host + "/")} if FIXTURE.exists() else {}
    outputs = {f"{host}/{name}": t for family in CASES for name, t in compute(family).items()}
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    save_file({**kept, **outputs}, str(FIXTURE))
    print(f"wrote {len(outputs)} outputs of {host} to {FIXTURE.name} ({len(kept)} of other hosts kept)")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    from comfy_env import boot

    boot()
    torch.set_num_threads(1)
    from pack_loader import load_pack

    load_pack()
    record()
