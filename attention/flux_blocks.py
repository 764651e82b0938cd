"""The `patches_replace["dit"]` block wrappers of a Flux AD pass.

A wrapper sits on every Flux block up to the last selected one, for one AD forward only
(in a private copy of the transformer options). It

- gives its block its own `optimized_attention_override`: attention through SDPA, which every
  backend can differentiate (sage/flash/INT8 kernels cannot), under the MODEL's own override
  (attention/backends.py: a kernel choice such as ModelAttentionBackend's is left out, any other
  override runs with SDPA as its attention function); on a selected block the SDPA call records
  q, k, v as they reach the kernel (after the q/k RMS norm, RoPE and any patch or override
  before it; text tokens first) and its output, before the output projection;
- calls a dit replace patch already registered for the block instead of the bare block;
- guards the block's residual stream: ComfyUI's Flux blocks add residuals in place
  (`x += …` in single blocks, `txt += …` in double blocks) after autograd saved them;
- optionally checkpoints the block (no activations kept; recomputed in backward).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .backends import ad_attention, backward_capable_kernel
from .recompute import CheckpointedBlock
from .recorder import LayerRecord, StopForward, split_heads

BlockKey = tuple[str, int]


@dataclass
class FluxLayerRecord(LayerRecord):
    """Features of one Flux block: tensors are (B, heads, T + L, dim_head), the T text tokens
    first, then the L image tokens of an `hw` grid."""

    text_tokens: int = 0

    def image_part(self, tensor: torch.Tensor) -> torch.Tensor:
        """The image tokens' rows of a (B, heads, T + L, d) feature."""
        return tensor[:, :, self.text_tokens:]


@dataclass
class FluxPassState:
    """What the wrappers of one AD forward share."""

    selected: tuple[BlockKey, ...]
    hw: tuple[int, int]
    text_tokens: int
    stop_early: bool = True
    checkpoint: bool = False
    records: dict[BlockKey, FluxLayerRecord] = field(default_factory=dict)

    @property
    def last_key(self) -> BlockKey:
        return self.selected[-1]

    def record(self, key: BlockKey, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        heads = int(q.shape[1])
        self.records[key] = FluxLayerRecord(
            q=q, k=k, v=v, out=split_heads(out, heads), hw=self.hw, text_tokens=self.text_tokens
        )

    @contextlib.contextmanager
    def capture(self, local: dict[BlockKey, FluxLayerRecord]) -> Iterator[None]:
        """Send records to `local` (a checkpointed block returns them as outputs)."""
        main, self.records = self.records, local
        try:
            yield
        finally:
            self.records = main


class ADAttention:
    """`optimized_attention_override` of one block in one AD forward (see the module docstring);
    after the last selected block it stops the forward."""

    def __init__(self, state: FluxPassState, key: BlockKey, previous: Callable | None) -> None:
        self.state = state
        self.key = key
        self.previous = previous
        self.recorded = key in state.selected

    def _recording(self, kernel: Callable) -> Callable:
        """`kernel`, recording what one call of it sees and returns."""
        calls = []

        def record(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if calls:
                raise RuntimeError(f"Flux block {self.key} ran attention twice in one forward; AD reads one call")
            calls.append(True)
            out = kernel(q, k, v, *args, **kwargs)
            self.state.record(self.key, q, k, v, out)
            return out

        functools.update_wrapper(record, kernel)
        return record

    def __call__(self, func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        kernel = backward_capable_kernel(func)
        if not self.recorded:
            return ad_attention(self.previous, kernel, *args, **kwargs)
        if not kwargs.get("skip_reshape", False):
            raise RuntimeError("this ComfyUI's Flux attention does not pass split heads; Flux AD cannot read it")
        out = ad_attention(self.previous, self._recording(kernel), *args, **kwargs)
        if self.state.stop_early and self.key == self.state.last_key:
            raise StopForward
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@contextlib.contextmanager
def residual_guard(*residuals: torch.Tensor) -> Iterator[None]:
    """Autograd keeps private copies of tensors that share storage with the block's residual
    inputs (the ones Flux edits in place). Every other saved tensor is checked for in-place
    edits at backward, so a host that adds new in-place ops gets an error, not wrong gradients
    (saved-tensor hooks turn autograd's own version check off)."""
    protected = {_storage(t) for t in residuals}

    def pack(t: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        if _storage(t) in protected:
            return t.clone(), None
        return t, t._version

    def unpack(packed: tuple[torch.Tensor, int | None]) -> torch.Tensor:
        t, version = packed
        if version is not None and t._version != version:
            raise RuntimeError(
                "a tensor saved for backward inside a Flux block was modified in place; "
                "the AD residual guard does not cover this ComfyUI version's blocks"
            )
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


_FEATURES = ("q", "k", "v", "out")


class FluxBlockWrapper:
    """The dit replace of one block in one AD forward (see the module docstring)."""

    def __init__(self, state: FluxPassState, key: BlockKey, block: torch.nn.Module, previous: Callable | None) -> None:
        self.state = state
        self.key = key
        self.block = block
        self.previous = previous

    def _original(self, args: dict) -> dict:
        """The block itself, called as ComfyUI's `original_block` calls it. ComfyUI's own
        `original_block` closes over its loop variable, so it names another block by the time
        a checkpointed backward recomputes this one."""
        common = dict(vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"),
                      transformer_options=args.get("transformer_options"))
        if "txt" in args:
            img, txt = self.block(img=args["img"], txt=args["txt"], **common)
            return {"img": img, "txt": txt}
        return {"img": self.block(args["img"], **common)}

    def _inner(self, args: dict, extra: dict) -> dict:
        if self.previous is not None:
            return self.previous(args, {**extra, "original_block": self._original})
        return self._original(args)

    def __call__(self, args: dict, extra: dict) -> dict:
        options = dict(args.get("transformer_options") or {})
        options["optimized_attention_override"] = ADAttention(
            self.state, self.key, options.get("optimized_attention_override"))
        args = dict(args, transformer_options=options)
        names = ("img", "txt") if "txt" in args else ("img",)
        hidden = [args[name] for name in names]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in hidden)
        if not grad:
            return self._inner(args, extra)
        constants_need_grad = any(torch.is_tensor(v) and v.requires_grad for k, v in args.items() if k not in names)
        if not self.state.checkpoint or self.key == self.state.last_key or constants_need_grad:
            with residual_guard(*hidden):
                return self._inner(args, extra)
        return self._checkpointed(args, extra, names, hidden)

    def _checkpointed(self, args: dict, extra: dict, names: tuple[str, ...], hidden: list[torch.Tensor]) -> dict:
        recorded = self.key in self.state.selected

        def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            # private copies: the block edits its inputs in place, and the inputs are what
            # the backward recomputes from
            private = [t.clone() for t in tensors]
            local: dict[BlockKey, FluxLayerRecord] = {}
            with self.state.capture(local), residual_guard(*private):
                out = self._inner(dict(args, **dict(zip(names, private))), extra)
            features = tuple(getattr(local[self.key], f) for f in _FEATURES) if recorded else ()
            return (*[out[name] for name in names], *features)

        outputs = CheckpointedBlock.apply(run, *hidden)
        result = dict(zip(names, outputs[: len(names)]))
        if recorded:
            q, k, v, out = outputs[len(names):]
            self.state.records[self.key] = FluxLayerRecord(
                q=q, k=k, v=v, out=out, hw=self.state.hw, text_tokens=self.state.text_tokens
            )
        return result


def wrapped_options(
    transformer_options: dict | None, state: FluxPassState, blocks: dict[BlockKey, torch.nn.Module]
) -> dict:
    """A fresh options dict for one AD forward: the model's own options with a wrapper on each
    of `blocks`, chained to any dit replace already there. The model's dicts are not touched."""
    options = dict(transformer_options or {})
    replaces = dict(options.get("patches_replace") or {})
    dit = dict(replaces.get("dit") or {})
    for key, block in blocks.items():
        dit[key] = FluxBlockWrapper(state, key, block, dit.get(key))
    replaces["dit"] = dit
    options["patches_replace"] = replaces
    return options
