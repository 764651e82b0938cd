"""A literal, independent implementation of DESIGN §2.3-2.4 written from direct UNet calls,
for equivalence tests. It shares no code with the pack: its own attn1 patch, explicit softmax
attention, full forwards, its own schedule and masks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SD15_SCALE = 0.18215


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)


def softmax_attention(q, k, v, allowed=None):
    logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(logits, dim=-1), v)


def extract(diffusion_model, latent, t, context, keys, y=None):
    """q, k, v, out of the layers `keys` (in order) for one full UNet forward at timestep t."""
    found = {}

    def patch(q, k, v, extra):
        heads = extra["n_heads"]
        qh, kh, vh = _heads(q, heads), _heads(k, heads), _heads(v, heads)
        out = softmax_attention(qh, kh, vh)
        found[(extra["block"][0], extra["block"][1], extra["block_index"])] = (qh, kh, vh, out)
        return out.permute(0, 2, 1, 3).reshape(q.shape)

    options = {"patches_replace": {"attn1": {key: patch for key in keys}}}
    batch = latent.shape[0]
    kwargs = {"y": y.expand(batch, -1)} if y is not None else {}
    # timesteps in float32, as ComfyUI and diffusers compute the timestep embedding
    diffusion_model(latent, torch.full((batch,), float(t), dtype=torch.float32), context=context.expand(batch, -1, -1),
                    transformer_options=options, **kwargs)
    return [found[key] for key in keys]


def schedule(steps):
    return [1 + (1000 // steps) * (steps - 1 - i) for i in range(steps)]


def grid(shape, tokens):
    """(h, w) of a layer: halve (rounding up) until h·w is the token count."""
    h, w = shape[-2], shape[-1]
    while h * w != tokens:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def region_masks(ref_labels, tgt_labels, ref_grids, tgt_grids):
    """Per layer: boolean (B, 1, N, R·M), True where nearest-resized labels are equal."""
    masks = []
    for ref_hw, tgt_hw in zip(ref_grids, tgt_grids):
        r = F.interpolate(ref_labels[:, None].double(), size=ref_hw, mode="nearest").reshape(-1)
        tl = F.interpolate(tgt_labels[:, None].double(), size=tgt_hw, mode="nearest").flatten(1)
        masks.append((tl[:, :, None] == r[None, None, :])[:, None])
    return masks


def ad_optimize(diffusion_model, reference, init, context, keys, steps, lr, iterations, content=None,
                content_weight=0.0, ref_labels=None, tgt_labels=None, y=None, y_reference=None):
    """The reference code's optimize(): model-space tensors in, model-space latent out. `y` is the
    added conditioning of every pass (SDXL); `y_reference`, if given, replaces it for the reference
    pass only (not the reference code's rule: for showing what that rule changes)."""
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone() if t.requires_grad else t, lambda t: t):
        x = init.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=lr)
        for t in schedule(steps):
            with torch.no_grad():
                ref = extract(diffusion_model, reference, t, context, keys, y if y_reference is None else y_reference)
                k_ref = [torch.cat(list(k.unbind(0)), dim=1)[None] for _, k, _, _ in ref]
                v_ref = [torch.cat(list(v.unbind(0)), dim=1)[None] for _, _, v, _ in ref]
                q_content = [q for q, _, _, _ in extract(diffusion_model, content, t, context, keys, y)] \
                    if content is not None else None
            for _ in range(iterations):
                optimizer.zero_grad()
                feats = extract(diffusion_model, x, t, context, keys, y)
                masks = None
                if ref_labels is not None:
                    ref_grids = [grid(reference.shape, k.shape[2]) for _, k, _, _ in ref]
                    tgt_grids = [grid(x.shape, q.shape[2]) for q, *_ in feats]
                    masks = region_masks(ref_labels, tgt_labels, ref_grids, tgt_grids)
                loss = 0
                for i, (q, _, _, out) in enumerate(feats):
                    with torch.no_grad():
                        target = softmax_attention(q, k_ref[i], v_ref[i], masks[i] if masks else None)
                    loss = loss + (out - target).abs().mean()
                if q_content is not None:
                    loss = loss + content_weight * sum((q - qc).abs().mean() for (q, *_), qc in zip(feats, q_content))
                loss.backward()
                optimizer.step()
    return x.detach()
