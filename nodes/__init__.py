"""ComfyUI node classes of the pack."""

from .capture import CaptureReferenceAttention
from .optimize import LatentADOptimize

NODE_CLASS_MAPPINGS = {
    "CaptureReferenceAttention": CaptureReferenceAttention,
    "LatentADOptimize": LatentADOptimize,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "CaptureReferenceAttention": "Capture Reference Attention",
    "LatentADOptimize": "Latent AD Optimize",
}
