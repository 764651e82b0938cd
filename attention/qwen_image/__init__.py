"""The Qwen-Image model family (docs/DESIGN.md §2.8)."""

from .family import QWEN_IMAGE, QwenImageFamily

__all__ = ["QWEN_IMAGE", "QwenImageFamily"]
