"""Attention Distillation for ComfyUI: style, appearance and texture transfer on ComfyUI's own MODEL."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# Help pages (web/docs/<node type>.md), shown by ComfyUI's frontend in the node library's help panel.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
