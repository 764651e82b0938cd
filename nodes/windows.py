"""AD Texture Windows: textures larger than the reference in bounded memory."""

from __future__ import annotations

from typing import Any

from ..attention.family import PIXELS_PER_LATENT, ModelFamily
from ..guidance.windows import WindowSettings
from .common import CATEGORY
from .errors import require
from .inputs import whole_number

NODE = "AD Texture Windows"
AD_WINDOWS = "AD_WINDOWS"
LATENT_SCALE = PIXELS_PER_LATENT


def window_settings(node: str, windows: Any, family: ModelFamily) -> WindowSettings | None:
    """The AD_WINDOWS input of a node, checked against the model's family (a DiT's windows must
    cover whole patches)."""
    if windows is None:
        return None
    require(isinstance(windows, WindowSettings), node, "'windows' must come from AD Texture Windows")
    multiple = family.latent_multiple
    pixels = multiple * LATENT_SCALE
    require(windows.size % multiple == 0 and windows.stride % multiple == 0, node,
            f"on {family.name}, AD Texture Windows' window_size and stride must be multiples of {pixels} pixels "
            f"(the model reads its latent in {multiple}x{multiple} patches); got {windows.size * LATENT_SCALE} "
            f"and {windows.stride * LATENT_SCALE}")
    return windows


class ADTextureWindows:
    DESCRIPTION = (
        "Optimizes latents larger than a window in overlapping windows (MultiDiffusion, like the reference "
        "code's panorama mode): each window is distilled against the reference on its own and the results "
        "are averaged where they overlap, so memory stays that of one window however large the texture. "
        "Connect to the 'windows' input of Latent AD Optimize or AD Loss Guidance. On a seamless-tiling "
        "model the windows wrap around the edges."
    )
    CATEGORY = CATEGORY
    FUNCTION = "windows"
    RETURN_TYPES = (AD_WINDOWS,)
    RETURN_NAMES = ("windows",)
    OUTPUT_TOOLTIPS = ("Window size and stride for Latent AD Optimize or AD Loss Guidance.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "window_size": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 64,
                                        "tooltip": "Window side in pixels (reference code: 512 for SD1.5). "
                                        "A latent no larger than this is optimized whole."}),
                "stride": ("INT", {"default": 64, "min": 8, "max": 8192, "step": 8,
                                   "tooltip": "Distance between windows in pixels (reference code: 64). "
                                   "Larger is faster with fewer windows; keep it below window_size so "
                                   "windows overlap."}),
            }
        }

    def windows(self, window_size: int, stride: int) -> tuple[WindowSettings]:
        size = whole_number(NODE, window_size, "window_size", LATENT_SCALE, 1 << 20)
        step = whole_number(NODE, stride, "stride", LATENT_SCALE, 1 << 20)
        require(size % LATENT_SCALE == 0 and step % LATENT_SCALE == 0, NODE,
                f"window_size and stride must be multiples of {LATENT_SCALE} pixels (one latent pixel)")
        require(step <= size, NODE,
                f"stride ({step}) is larger than window_size ({size}): parts of the latent would never be optimized")
        return (WindowSettings(size=size // LATENT_SCALE, stride=step // LATENT_SCALE),)
