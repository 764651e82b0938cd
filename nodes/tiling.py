"""AD Seamless Tiling: MODEL and VAE copies whose convolutions wrap around the image edges."""

from __future__ import annotations

from typing import Any

from ..attention.tiling import TILING_MODES, TilingError, tiled_model, tiled_vae
from ..attention.families import family_of
from ..guidance.windows import TILING_OPTION
from .common import CATEGORY
from .errors import ADNodeError, reported_as, require

NODE = "AD Seamless Tiling"
TILING_CHOICES = list(TILING_MODES)


def _check_model(model: Any) -> None:
    require(
        hasattr(model, "clone") and hasattr(model, "add_object_patch") and hasattr(model, "model"),
        NODE,
        "'model' must be a MODEL (from Load Checkpoint or a model patch node)",
    )
    family = family_of(model.model)
    require(family.seamless_tiling_error is None, NODE, family.seamless_tiling_error or "")


def _check_vae(vae: Any) -> None:
    patcher = getattr(vae, "patcher", None)
    require(
        patcher is not None and hasattr(patcher, "clone") and hasattr(patcher, "add_object_patch"),
        NODE,
        "'vae' must be a VAE (from Load Checkpoint or Load VAE)",
    )
    require(
        getattr(vae, "first_stage_model", None) is not None,
        NODE,
        "the VAE holds no model (the checkpoint has no VAE weights); load one with Load VAE",
    )


class ADSeamlessTiling:
    DESCRIPTION = (
        "Seamless textures: returns copies of the MODEL and the VAE whose convolutions pad around the image "
        "edges (both axes, x only or y only), so what leaves one edge continues on the opposite one. Put it "
        "before Latent AD Optimize or AD Loss Guidance (and the sampler) and decode with its VAE through VAE "
        "Decode: the result tiles without a seam. The input MODEL and VAE are unchanged; VAE Encode through the "
        "returned VAE encodes as before (references and photos do not tile), and VAE Decode (Tiled) runs but "
        "wraps each tile on itself, so use plain VAE Decode."
    )
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "VAE")
    RETURN_NAMES = ("model", "vae")
    OUTPUT_TOOLTIPS = (
        "A copy of the model whose UNet wraps around the edges; the input model is unchanged. Connect it to "
        "Latent AD Optimize, AD Loss Guidance or a sampler.",
        "A copy of the VAE whose decoder wraps around the edges; the input VAE is unchanged. Decode the result "
        "with it (VAE Decode).",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (
                    "MODEL",
                    {"tooltip": "An SD1.x, SD2.x or SDXL model, after LoRA if you use one."},
                ),
                "vae": ("VAE", {"tooltip": "The VAE that will decode the result (the checkpoint's or Load VAE's)."}),
                "tiling": (
                    TILING_CHOICES,
                    {
                        "default": "both",
                        "tooltip": "Axes that wrap around: both (a texture that tiles in every direction), x only "
                        "(left and right edges meet, e.g. a panorama) or y only (top and bottom edges meet).",
                    },
                ),
            }
        }

    def apply(self, model: Any, vae: Any, tiling: str = "both") -> tuple[Any, Any]:
        with reported_as(NODE):
            require(tiling in TILING_MODES, NODE, f"'tiling' must be one of {', '.join(TILING_CHOICES)}; got {tiling!r}")
            _check_model(model)
            _check_vae(vae)
            wrap_x, wrap_y = TILING_MODES[tiling]
            try:
                model_out = tiled_model(model, wrap_x, wrap_y)
                vae_out = tiled_vae(vae, wrap_x, wrap_y)
            except TilingError as error:
                raise ADNodeError(NODE, str(error)) from error
            # Read by AD Texture Windows' planning: windows wrap around the edges on these axes.
            model_out.model_options[TILING_OPTION] = {"x": wrap_x, "y": wrap_y}
            return (model_out, vae_out)
