"""How the pack's errors are named in ComfyUI's error dialog.

ComfyUI shows an exception's type as `<module>.<class>` (execution.py's full_type_name). A pack loaded
by path gets a module named after its folder's path, so without this the dialog would show a filesystem
path; the pack's errors name the pack instead, whatever folder it was cloned into.
"""

from __future__ import annotations

from typing import TypeVar

PACK_NAME = "attention_distillation"

E = TypeVar("E", bound=type)


def shown_as_pack(error_class: E) -> E:
    """Class decorator: the error's type reads `attention_distillation.<Class>` in the UI."""
    error_class.__module__ = PACK_NAME
    return error_class


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """'1 mask', '2 masks': counts that read naturally in messages."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def one_or(count: int, noun: str, plural: str | None = None) -> str:
    """What a batch of `count` accepts: '1 mask' when count is 1, else '1 or 3 masks'."""
    return counted(1, noun, plural) if count == 1 else f"1 or {counted(count, noun, plural)}"
