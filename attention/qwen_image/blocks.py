"""The `patches_replace["dit"]` block wrappers of a Qwen-Image AD pass (docs/DESIGN.md §2.8).

As on Flux (attention/flux_blocks.py, whose attention overrides and pass state these reuse), a wrapper
sits on every block up to the last selected one, for one AD forward only: it gives its block a
`optimized_attention_override` that computes SDPA under the one the MODEL carries (attention/backends.py) and records the selected blocks, calls a dit
replace already registered for the block, and optionally checkpoints the block
(attention/recompute.py). Qwen-Image blocks add their residuals out of place, so no residual guard.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..flux_blocks import ADAttention, FluxLayerRecord, FluxPassState
from ..recompute import CheckpointedBlock

_FEATURES = ("q", "k", "v", "out")
_STREAMS = ("img", "txt")


class QwenImageBlockWrapper:
    """The dit replace of one block in one AD forward (see the module docstring)."""

    def __init__(self, state: FluxPassState, key: tuple[str, int], block: torch.nn.Module,
                 previous: Callable | None, text_mask: torch.Tensor | None) -> None:
        self.state = state
        self.key = key
        self.block = block
        self.previous = previous
        self.text_mask = text_mask

    def _original(self, args: dict) -> dict:
        """The block as ComfyUI's `original_block` calls it, without reference tokens (no timestep-zero
        split). ComfyUI's own closes over its loop variable, so it names another block by the time a
        checkpointed backward recomputes this one."""
        txt, img = self.block(hidden_states=args["img"], encoder_hidden_states=args["txt"],
                              encoder_hidden_states_mask=self.text_mask, temb=args["vec"],
                              image_rotary_emb=args["pe"], timestep_zero_index=None,
                              transformer_options=args["transformer_options"])
        return {"img": img, "txt": txt}

    def _inner(self, args: dict, extra: dict) -> dict:
        if self.previous is not None:
            return self.previous(args, {**extra, "original_block": self._original})
        return self._original(args)

    def __call__(self, args: dict, extra: dict) -> dict:
        options = dict(args.get("transformer_options") or {})
        options["optimized_attention_override"] = ADAttention(self.state, self.key, options.get("optimized_attention_override"))
        args = dict(args, transformer_options=options)
        hidden = [args[name] for name in _STREAMS]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in hidden)
        constants_need_grad = any(torch.is_tensor(v) and v.requires_grad for k, v in args.items() if k not in _STREAMS)
        if not grad or not self.state.checkpoint or self.key == self.state.last_key or constants_need_grad:
            return self._inner(args, extra)
        return self._checkpointed(args, extra, hidden)

    def _checkpointed(self, args: dict, extra: dict, hidden: list[torch.Tensor]) -> dict:
        recorded = self.key in self.state.selected

        def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            local: dict = {}
            with self.state.capture(local):
                out = self._inner(dict(args, **dict(zip(_STREAMS, tensors))), extra)
            features = tuple(getattr(local[self.key], f) for f in _FEATURES) if recorded else ()
            return (*[out[name] for name in _STREAMS], *features)

        outputs = CheckpointedBlock.apply(run, *hidden)
        if recorded:
            q, k, v, out = outputs[len(_STREAMS):]
            self.state.records[self.key] = FluxLayerRecord(q=q, k=k, v=v, out=out, hw=self.state.hw,
                                                           text_tokens=self.state.text_tokens)
        return dict(zip(_STREAMS, outputs[: len(_STREAMS)]))


def wrapped_options(transformer_options: dict | None, state: FluxPassState, blocks: dict[tuple[str, int], torch.nn.Module],
                    text_mask: torch.Tensor | None) -> dict:
    """A fresh options dict for one AD forward: the MODEL's own with a wrapper on each of `blocks`, chained
    to any dit replace already there. The MODEL's dicts are not touched."""
    options = dict(transformer_options or {})
    replaces = dict(options.get("patches_replace") or {})
    dit = dict(replaces.get("dit") or {})
    for key, block in blocks.items():
        dit[key] = QwenImageBlockWrapper(state, key, block, dit.get(key), text_mask)
    replaces["dit"] = dit
    options["patches_replace"] = replaces
    return options
