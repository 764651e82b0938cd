"""Errors a ComfyUI user can act on: the node's name, what is wrong, what to do."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..attention.layers import LayerSpecError
from ..attention.family import UnsupportedModelError
from ..attention.naming import shown_as_pack


@shown_as_pack
class ADNodeError(ValueError):
    """Raised by a node for bad input or a failed AD pass; the message is shown in the UI."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"[{node}] {message}")
        self.node = node


OOM_ADVICE = (
    "out of memory during an Attention Distillation pass; set gradient_checkpointing to 'on', lower the "
    "resolution or batch size, select fewer or lower-resolution layers, or use fewer references"
)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


@contextlib.contextmanager
def reported_as(node: str, oom_advice: str = OOM_ADVICE) -> Iterator[None]:
    """Turn known failures into ADNodeError naming `node` (out of memory with `oom_advice`); let
    Cancel and others through."""
    try:
        yield
    except ADNodeError:
        raise
    except (LayerSpecError, UnsupportedModelError) as error:
        raise ADNodeError(node, str(error)) from error
    except RuntimeError as error:
        if _is_oom(error):
            import comfy.model_management

            comfy.model_management.soft_empty_cache()
            raise ADNodeError(node, oom_advice) from error
        raise


def require(condition: bool, node: str, message: str) -> None:
    if not condition:
        raise ADNodeError(node, message)
