"""ComfyUI node classes of the pack."""

from .capture import CaptureReferenceAttention
from .decoder import ADFineTuneVAEDecoder
from .guidance import ADLossGuidance
from .optimize import LatentADOptimize
from .tiling import ADSeamlessTiling
from .windows import ADTextureWindows

NODE_CLASS_MAPPINGS = {
    "CaptureReferenceAttention": CaptureReferenceAttention,
    "LatentADOptimize": LatentADOptimize,
    "ADLossGuidance": ADLossGuidance,
    "ADTextureWindows": ADTextureWindows,
    "ADFineTuneVAEDecoder": ADFineTuneVAEDecoder,
    "ADSeamlessTiling": ADSeamlessTiling,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "CaptureReferenceAttention": "Capture Reference Attention",
    "LatentADOptimize": "Latent AD Optimize",
    "ADLossGuidance": "AD Loss Guidance",
    "ADTextureWindows": "AD Texture Windows",
    "ADFineTuneVAEDecoder": "AD Fine-Tune VAE Decoder",
    "ADSeamlessTiling": "AD Seamless Tiling",
}
