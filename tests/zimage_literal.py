"""docs/DESIGN.md §2.8 on Z-Image written from direct model calls, for the tests to compare the pack with.

No code of the pack: features come from ComfyUI's whole `NextDiT.forward` with a recording attention
override (the 2 context-refiner and 2 noise-refiner calls come first, then one call per main layer), the
rows and keys are picked here from the token table of the family's definition, and AdaIN packs tokens the
way Z-Image does, (patch row, patch column, channel)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import tiny_zimage as tz
from comfy_env import differentiable_kernels

REFINER_CALLS = 4  # 2 context-refiner + 2 noise-refiner attention calls precede the main layers


class Recorder:
    """`optimized_attention_override` that records (q, k, v, out) of every attention call in order."""

    def __init__(self) -> None:
        self.records: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, func, q, k, v, *args, **kwargs):
        assert kwargs.get("skip_reshape")
        out = F.scaled_dot_product_attention(q, k, v)
        self.records.append((q, k, v, out))
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)


def rows(text: int, height: int, width: int) -> torch.Tensor:
    """The loss rows of a sequence: the real caption tokens [0, T), the real image tokens [T_pad, T_pad + L)."""
    image = math.ceil(height / 2) * math.ceil(width / 2)
    start = tz.padded(text)
    return torch.cat([torch.arange(text), torch.arange(start, start + image)])


@differentiable_kernels()
def features(dm, x: torch.Tensor, tau: float, context: torch.Tensor, layers, options: dict | None = None):
    """(q rows, k, v, out rows) of main `layers` for `x` at `timesteps` τ with caption `context` (1, T, C)."""
    recorder = Recorder()
    batch = x.shape[0]
    options = dict(options or {}, optimized_attention_override=recorder)
    dm(x, torch.full((batch,), float(tau)), context.expand(batch, -1, -1), context.shape[1],
       transformer_options=options)
    assert len(recorder.records) == REFINER_CALLS + len(dm.layers)
    picked = rows(context.shape[1], x.shape[-2], x.shape[-1])
    main = recorder.records[REFINER_CALLS:]
    return [(main[i][0][:, :, picked], main[i][1], main[i][2], main[i][3][:, :, picked]) for i in layers]


def ad_loss(records, refs) -> torch.Tensor:
    """Σ mean |out − SDPA(q, K_ref, V_ref)| with the target under no-grad; refs may hold several references'
    keys and values concatenated along tokens."""
    total = 0
    for (q, _, _, out), (k_ref, v_ref) in zip(records, refs, strict=True):
        with torch.no_grad():
            target = F.scaled_dot_product_attention(q, k_ref.expand(q.shape[0], -1, -1, -1),
                                                    v_ref.expand(q.shape[0], -1, -1, -1))
        total = total + (out - target).abs().mean()
    return total


def reference_kv(records) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of every reference in the batch, concatenated along tokens (all tokens, pads too)."""
    def pooled(t: torch.Tensor) -> torch.Tensor:
        r, h, n, d = t.shape
        return t.transpose(0, 1).reshape(1, h, r * n, d)

    return [(pooled(k), pooled(v)) for _, k, v, _ in records]


def _tokens(latent: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latent.shape
    return latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, 4 * c)


def _untokens(tokens: torch.Tensor, shape) -> torch.Tensor:
    b, c, h, w = shape
    return tokens.reshape(b, h // 2, w // 2, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(shape)


def adain(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """AdaIN of x to r over Z-Image's tokens: per sample mean and unbiased std of each of the 64 packed
    channels; the target's over batch × tokens of r; eps 1e-6."""
    source, target = _tokens(x), _tokens(r)
    mean, std = source.mean(dim=1, keepdim=True), source.std(dim=1, keepdim=True)
    out = (source - mean) / (std + 1e-6) * target.std(dim=(0, 1), keepdim=True) + target.mean(dim=(0, 1), keepdim=True)
    return _untokens(out, x.shape)


def pack_model(lora: bool = False, stored: torch.dtype | None = None, **config):
    """The MODEL the nodes get, inside inference mode; `stored`: weights kept in bf16/fp8, cast per call."""
    import comfy.sd
    import tiny_models as tm

    with torch.inference_mode():
        if stored is None:
            patcher = tz.build(**config)
        else:
            weights = tz.random_weights(tz.build(**config).model.diffusion_model)
            patcher = tz.build(dtype=stored, manual_cast=torch.float32, weights=weights, **config)
        if lora:
            patcher, _ = comfy.sd.load_lora_for_models(patcher, None, tm.lora_state_dict(patcher, match="layers"), 1.0, 0.0)
    return patcher


def literal_model(patcher, **config):
    """The same weights (LoRA merged where the MODEL has one) in a plain, non-inference float32 model."""
    with torch.inference_mode():
        patcher.patch_model(device_to=torch.device("cpu"))
        weights = {k: v.clone().float() for k, v in patcher.model.diffusion_model.state_dict().items()}
        patcher.unpatch_model(device_to=torch.device("cpu"))
    weights = {k: v.clone() for k, v in weights.items()}  # normal tensors
    base = tz.build(weights=weights, **config).model
    for parameter in base.diffusion_model.parameters():
        parameter.requires_grad_(False)
    return base
