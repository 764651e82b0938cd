"""Features of one model for one run: reference keys/values (cached), content queries and the
differentiated pass of the latent being optimized."""

from __future__ import annotations

from typing import Any

import torch

from .cache import ReferenceKV, tensor_digest
from .families import family_of
from .family import AttentionLayer, latent_dtype
from .layers import select_layers
from .recorder import LayerRecord
from .reference import ADReference


def object_patch_identity(patcher: Any) -> tuple:
    """What a patcher's object patches are, for cache keys: clones that replace modules (seamless
    tiling) compute other features from the same weights, so their cached features must differ."""
    patches = getattr(patcher, "object_patches", None) or {}
    identities = ((name, getattr(obj, "ad_cache_identity", id(obj))) for name, obj in patches.items())
    return tuple(sorted(identities, key=lambda item: item[0]))


class ADModelSession:
    """Binds an AD_REFERENCE to a loaded ModelPatcher. Call the passes inside the autograd
    context of guidance/ so that tensors are normal (non-inference) ones."""

    def __init__(
        self,
        patcher: Any,
        reference: ADReference,
        device: torch.device | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        base = patcher.model
        self.family = family_of(base)
        self.base_model = base
        self.reference = reference
        self.device = device if device is not None else patcher.load_device
        self.layers: list[AttentionLayer] = select_layers(base.diffusion_model, reference.layer_spec)
        self.unet_pass = self.family.feature_pass(patcher, self.layers, checkpoint=gradient_checkpointing)
        self.model_key = (
            id(base),
            getattr(patcher, "patches_uuid", None),
            object_patch_identity(patcher),
            tuple(layer.patch_key for layer in self.layers),
            self.family.pass_options_identity(patcher),
        )
        self._ref_latent: torch.Tensor | None = None
        self._cond_cache: dict[tuple, tuple[Any, tuple]] = {}  # key -> (conditioning, its identity)
        self.image_hw: tuple[int, int] | None = None

    def condition_on_image(self, shape: tuple[int, ...] | torch.Size) -> None:
        """Every AD pass from now on (reference, content, the latent being optimized or a window
        of it) gets the size conditioning of the image being made, `shape` (its last two dims,
        latent pixels), whatever the size of the latent that pass feeds: the reference code gives
        all its passes the output's SDXL time ids (docs/DESIGN.md §2.2). Models without size
        conditioning (SD1.x/2.x) are unaffected."""
        self.image_hw = (int(shape[-2]), int(shape[-1]))

    # -- inputs -----------------------------------------------------------------
    def to_model_space(self, latent: torch.Tensor) -> torch.Tensor:
        """ComfyUI LATENT (raw VAE) → the scaled latent the network works on (docs/DESIGN.md §2.1)."""
        return self.base_model.process_latent_in(latent.detach().clone().to(self.device, latent_dtype(latent)))

    def to_latent_space(self, latent: torch.Tensor) -> torch.Tensor:
        return self.base_model.process_latent_out(latent.detach().clone())

    @property
    def reference_latent(self) -> torch.Tensor:
        if self._ref_latent is None:
            self._ref_latent = self.to_model_space(self.reference.latents)
        return self._ref_latent

    def null_cond(self, latent: torch.Tensor) -> Any:
        """The family's empty-prompt inputs for a pass feeding `latent`, sized by `condition_on_image`
        (a pass outside a declared image is sized by its own latent)."""
        return self._conditioned(latent)[0]

    def cond_identity(self, latent: torch.Tensor) -> tuple:
        """What a pass's conditioning adds to the reference's own null text, for cache keys (the
        family's `conditioning_identity`; SDXL: the pooled/size vector `y`, so features for one
        output size are never reused for another)."""
        return self._conditioned(latent)[1]

    def _conditioned(self, latent: torch.Tensor) -> tuple[Any, tuple]:
        key = self._cond_key(latent)
        if key not in self._cond_cache:
            cond = self.family.conditioning(
                self.base_model, self.reference.conditioning, latent.detach().clone(), self.device, image_hw=key[1]
            )
            self._cond_cache[key] = (cond, self.family.conditioning_identity(cond))
        return self._cond_cache[key]

    def _cond_key(self, latent: torch.Tensor) -> tuple:
        image_hw = self.image_hw if self.image_hw is not None else (int(latent.shape[-2]), int(latent.shape[-1]))
        return (tuple(latent.shape), image_hw, latent.device)

    # -- passes -----------------------------------------------------------------
    def reference_kv(self, timestep: float, noise: torch.Tensor | None = None, sigma: float = 0.0) -> list[ReferenceKV]:
        """Keys/values of the references at `timestep`, concatenated along tokens.

        With `noise`, the reference is noised to `sigma` the family's way (SD: VP form).
        Cached per (model weights, layers, timestep, noise content, σ, size conditioning).
        """
        noise_key = (tensor_digest(noise), round(float(sigma), 7)) if noise is not None else None
        ref_shape = tuple(self.reference_latent.shape)
        key = (self.model_key, float(timestep), noise_key, ref_shape, self.cond_identity(self.reference_latent))

        def compute() -> list[ReferenceKV]:
            ref = self.reference_latent
            if noise is not None:
                ref = self.family.noised(ref, noise, sigma)
            with torch.no_grad():
                records = self.unet_pass.run(ref, timestep, self.null_cond(ref))
            out = []
            for rec in records:
                r, h, n, d = rec.k.shape
                k = rec.k.transpose(0, 1).reshape(1, h, r * n, d).detach()
                v = rec.v.transpose(0, 1).reshape(1, h, r * n, d).detach()
                before, after = rec.keys_around_grid()
                out.append(ReferenceKV(k=k, v=v, hw=rec.hw, text_tokens=before, trailing_tokens=after))
            return out

        return self.reference.cache.get_or_compute(key, compute, self.device)

    def queries(self, model_input: torch.Tensor, timestep: float, cache_key: Any = None) -> list[torch.Tensor]:
        """Queries of a latent's image tokens (no gradient): the content-loss target. With `cache_key` (which
        must identify the latent) they are cached like the reference's keys/values."""

        def compute() -> list[torch.Tensor]:
            with torch.no_grad():
                records = self.unet_pass.run(model_input, timestep, self.null_cond(model_input))
            return [rec.image_part(rec.q).detach() for rec in records]

        if cache_key is None:
            return compute()
        key = (self.model_key, float(timestep), "content-queries", cache_key, self.cond_identity(model_input))
        return self.reference.cache.get_or_compute(key, compute, self.device)

    def features(self, model_input: torch.Tensor, timestep: float) -> list[LayerRecord]:
        """Differentiable features of the latent being optimized (a model input of the family)."""
        return self.unet_pass.run(model_input, timestep, self.null_cond(model_input))
