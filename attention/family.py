"""The model-family interface: everything AD needs to know about a model's anatomy (docs/DESIGN.md §3).

One module per family implements it (attention/sd_family.py: the SD1.x/SD2.x/SDXL UNet). guidance/
asks the family of the model it runs on and never branches on model types; nodes ask it for their
validation messages. A new family is a new module registered in attention/families.py, plus tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from .naming import shown_as_pack

# Pixels per latent pixel of the image VAE of every supported family (SD1.x, SDXL and Flux VAEs
# all downsample 8x); the one constant nodes without a MODEL input (AD Texture Windows) may use.
PIXELS_PER_LATENT = 8


def latent_dtype(latent: torch.Tensor) -> torch.dtype:
    """Latents, losses and Adam stay in float32 at least, whatever the network computes in."""
    return torch.promote_types(latent.dtype, torch.float32)


def compute_dtype(base_model: Any) -> torch.dtype:
    """The dtype ComfyUI computes the network in (manual cast where the weights are stored lower)."""
    dtype = base_model.get_dtype()
    manual = getattr(base_model, "manual_cast_dtype", None)
    return manual if manual is not None else dtype


@shown_as_pack
class UnsupportedModelError(ValueError):
    """The MODEL is not one any family of this pack can read."""


class AttentionLayer(Protocol):
    """One attention layer in the family's AD order; `patch_key` names it in the family's patches."""

    ad_index: int

    @property
    def patch_key(self) -> tuple: ...


class FeaturePass(Protocol):
    """One AD forward: features of the selected layers for a model input at a family time."""

    def run(self, model_input: torch.Tensor, time: float, cond: Any) -> list:
        """`LayerRecord`s (attention/recorder.py) of the selected layers, in layer order."""
        ...


class ModelFamily(ABC):
    """A kind of diffusion model. Times are what the family's network is called with (a UNet timestep
    for SD); model inputs are latents in the form the reference code feeds the network (for SD the
    VP latent x/√(σ²+1), where samplers hold the k-diffusion x)."""

    name: str = ""
    supported: str = ""  # the models it covers, for error messages: "an SD1.x, SD2.x or SDXL UNet"
    default_layer_count: int = 6  # what "paper default" selects: the last this many layers
    # Why AD Seamless Tiling cannot make this family's model wrap around the edges exactly, or None
    # (wrapping convolutions is exact; a transformer's positional encoding does not wrap).
    seamless_tiling_error: str | None = None
    # AD Texture Windows' size and stride, in latent pixels, must be multiples of this: a DiT reads its
    # latent in patches (Flux: 2x2), so a window must cover whole patches.
    latent_multiple: int = 1
    # Dims of the family's image LATENT: 4, (B, C, H, W); 5, (B, C, 1, H, W) (Qwen-Image's Wan21 latents).
    latent_ndim: int = 4

    # -- anatomy ------------------------------------------------------------------------------------
    @abstractmethod
    def accepts(self, diffusion_model: torch.nn.Module) -> bool:
        """True when `diffusion_model` (a BaseModel's `diffusion_model`) is of this family."""

    @abstractmethod
    def check(self, base_model: Any) -> None:
        """Raise `UnsupportedModelError` for variants of the family AD cannot run on (inpainting)."""

    @abstractmethod
    def attention_layers(self, diffusion_model: torch.nn.Module) -> list[AttentionLayer]:
        """Every attention layer AD may distill, in the reference code's counting order."""

    def default_layers(self, layers: Sequence[AttentionLayer]) -> tuple[int, ...]:
        """The AD indices "paper default" selects: the last `default_layer_count` layers."""
        return tuple(layer.ad_index for layer in layers[-self.default_layer_count:])

    def describe_layers(self, layers: Sequence[AttentionLayer]) -> str:
        """What the layers are, added to layer-selection errors ("" when their count says it all)."""
        return ""

    @abstractmethod
    def feature_pass(self, patcher: Any, layers: Sequence[AttentionLayer], stop_early: bool = True,
                     checkpoint: bool = False) -> FeaturePass:
        """The pass recording `layers` on the MODEL `patcher` wraps (a family may run the MODEL's own
        patches inside it, or none); `checkpoint`: block-wise gradient checkpointing when differentiated."""

    def pass_options_identity(self, patcher: Any) -> tuple:
        """What of the MODEL's own options `feature_pass` runs, by identity: part of the feature cache keys,
        so reference features are reused only under the options the latent's passes run (default: none)."""
        return ()

    @abstractmethod
    def needs_inplace_guard(self, diffusion_model: torch.nn.Module) -> bool:
        """True when a backward through this host's blocks breaks on in-place residual adds."""

    @abstractmethod
    def auto_checkpointing(self, base_model: Any, latent_shape: Sequence[int]) -> bool:
        """What gradient checkpointing 'auto' means for this model at this latent size."""

    # -- latents and conditioning ---------------------------------------------------------------------
    def latent_channels(self, base_model: Any) -> int:
        return int(getattr(base_model.latent_format, "latent_channels", 4))

    @abstractmethod
    def conditioning(self, base_model: Any, conditioning: list, latent: torch.Tensor, device: torch.device,
                     image_hw: tuple[int, int] | None = None) -> Any:
        """What the family's feature pass takes as `cond` from a CONDITIONING (the null text) for a pass
        feeding `latent` while making an image of `image_hw` latent pixels (default: `latent`'s own)."""

    @abstractmethod
    def conditioning_identity(self, cond: Any) -> tuple:
        """What of `cond` besides the null text can differ between passes (SDXL: the size vector), by
        content: part of the feature cache keys, so features are reused only under equal conditioning."""

    @abstractmethod
    def conditioning_mismatch(self, base_model: Any, conditioning: list) -> str | None:
        """Why `conditioning` cannot drive this model's AD passes (another model's text encoder), or None."""

    def conditioning_note(self, conditioning: list) -> str | None:
        """Where `conditioning` fits but differs from what the reference code uses (said once, not an error)."""
        return None

    # -- sampling parametrization ---------------------------------------------------------------------
    @abstractmethod
    def optimize_times(self, base_model: Any, steps: int) -> list[float]:
        """Descending times of Latent AD Optimize's `steps` (the clean latent is fed at each)."""

    @abstractmethod
    def feature_time(self, model_sampling: Any, sigma: float) -> tuple[float, float]:
        """(time, noise level of that time) at which a guided step's features are taken for σ (0: last step)."""

    @abstractmethod
    def to_model_input(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The sampler's latent at σ in the form the reference code optimizes and feeds the network."""

    @abstractmethod
    def from_model_input(self, z: torch.Tensor, sigma: float) -> torch.Tensor:
        """Inverse of `to_model_input`."""

    @abstractmethod
    def noised(self, clean: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """A clean latent noised to σ with `noise`, as a model input."""

    # -- AdaIN ----------------------------------------------------------------------------------------
    adain_dims: tuple[int, ...] = (2, 3)  # statistics of one channel, per sample, over these dims
    # True: a guided step's AdaIN target is the reference noised with the same noise as its features
    # (Flux's reference code); False: with noise of its own (the SD reference code draws it anew).
    adain_shares_reference_noise: bool = False

    def adain_view(self, latent: torch.Tensor) -> torch.Tensor:
        """`latent` viewed so that AdaIN's channel statistics are over `adain_dims` (SD: as is)."""
        return latent
