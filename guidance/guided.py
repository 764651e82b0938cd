"""Guided sampling (docs/DESIGN.md §2.5): the post-CFG hook that runs the AD update of each step inside
any ComfyUI sampler.

The reference code optimizes the next latent after each DDIM step with a fresh Adam for a few
iterations, then moves on. ComfyUI's samplers work in the k-diffusion form x = x0 + σ·ε and only
let a hook change the denoised value D. The hook therefore

1. takes the deterministic (Euler/DDIM) step x' = D + (x − D)·σ'/σ the sampler is about to take,
   with σ' the next sigma of the running schedule (guidance/step_algebra.py);
2. optimizes x' against the AD loss (guidance/guided_update.py) in the form the model's family
   says the reference code optimizes (SD: z = x'/√(σ'²+1)), with per-step noise
   (guidance/step_noise.py);
3. returns D* = (x'* − r·x)/(1 − r), r = σ'/σ, so that an Euler/DDIM step lands exactly on x'*.
   Other samplers use D* like any denoised value (ancestral, SDE and multistep samplers get the
   natural generalization, not an exact landing).

The AD passes call the network directly with the reference's empty-prompt conditioning and
without ControlNet: the reference code's "classifier" is the plain network with null text, and
ControlNet residuals would both bias the attention features away from the reference's (which are
computed without them) and cost a ControlNet forward and backward per iteration. The sampler's
own CFG pass still gets the ControlNet, so the image follows it. Because ControlNet never enters
the AD graph, ComfyUI's in-place `h += ctrl` cannot corrupt it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from ..attention.naming import counted, one_or, shown_as_pack
from ..attention.reference import ADReference
from ..attention.family import latent_dtype
from .ad_pass import ad_pass
from .guided_update import GuidanceIteration, GuidanceSettings, ad_guidance_update
from .step_algebra import deterministic_step, landing_denoised, schedule_step, sigma_range
from .step_noise import STREAM_ADAIN, STREAM_CONTENT, STREAM_REFERENCE, noise_step_key, step_noise
from .windows import Window, WindowSettings, plan_windows, wrap_axes

log = logging.getLogger(__name__)

OOM_MESSAGE = (
    "AD Loss Guidance ran out of memory in its backward pass through the model; lower the resolution or batch "
    "size, set gradient_checkpointing on, select fewer or lower-resolution layers, or use fewer references"
)


@shown_as_pack
class GuidanceInputError(ValueError):
    """An input of AD Loss Guidance that only turns out not to fit once sampling starts."""


# -- where the sampler is --------------------------------------------------------------------


def _sampler_frame_owner() -> Any:
    """The nearest `comfy.samplers.KSamplerX0Inpaint` on the call stack (every KSAMPLER
    sampler calls the model through one), or None."""
    import comfy.samplers

    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, comfy.samplers.KSamplerX0Inpaint):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame


def sampling_context(args: dict) -> tuple[torch.Tensor | None, Any]:
    """(schedule of the running sampler, its ModelPatcher) as far as the host tells.

    Current ComfyUI puts the schedule in `transformer_options["sample_sigmas"]` and the
    patcher in `model.current_patcher`; the November 2024 core has neither, so walk the
    stack to the sampler's `KSamplerX0Inpaint` (its `.sigmas`, and the guider's
    `.model_patcher`).
    """
    options = args.get("model_options") or {}
    sigmas = (options.get("transformer_options") or {}).get("sample_sigmas")
    patcher = getattr(args.get("model"), "current_patcher", None)
    if sigmas is None or patcher is None:
        owner = _sampler_frame_owner()
        if owner is not None:
            if sigmas is None:
                sigmas = getattr(owner, "sigmas", None)
            if patcher is None:
                patcher = getattr(getattr(owner, "inner_model", None), "model_patcher", None)
    return sigmas, patcher


# -- the post-CFG hook -------------------------------------------------------------------------


class ADGuidanceHook:
    """`sampler_post_cfg_function` of AD Loss Guidance. Stateless across calls: every model
    call of every run recomputes what it needs, so interrupted runs leave nothing behind and
    stacked hooks (several references) simply apply in order.

    ModelPatcher.clone() deep-copies model options; the hook holds the reference and its
    feature cache, which must be shared, so copies return the same object.
    """

    def __init__(
        self,
        reference: ADReference,
        settings: GuidanceSettings,
        seed: int,
        start_percent: float = 0.0,
        end_percent: float = 1.0,
        content: torch.Tensor | None = None,
        target_labels: torch.Tensor | None = None,
        fallback_patcher: Any = None,
        on_iteration: Callable[[GuidanceIteration], None] | None = None,
        checkpointing: Callable[[Any, tuple[int, ...]], bool] | None = None,
        windows: WindowSettings | None = None,
    ) -> None:
        self.reference = reference
        self.settings = settings
        self.seed = int(seed)
        self.start_percent = float(start_percent)
        self.end_percent = float(end_percent)
        self.content = content
        self.target_labels = target_labels
        self.fallback_patcher = fallback_patcher
        self.on_iteration = on_iteration
        self.checkpointing = checkpointing
        self.windows = windows
        self._warned_schedule = False

    def __deepcopy__(self, memo: dict) -> ADGuidanceHook:
        return self

    def active(self, model_sampling: Any, sigma: float) -> bool:
        high, low = sigma_range(model_sampling, self.start_percent, self.end_percent)
        return low <= sigma <= high

    def _patcher(self, model: Any, patcher: Any, latent: torch.Tensor) -> Any:
        """The ModelPatcher that runs `model`: the sampler's, else this hook's clone, else a stand-in."""
        if patcher is None or getattr(patcher, "model", None) is not model:
            patcher = self.fallback_patcher
        if patcher is None or getattr(patcher, "model", None) is not model:
            patcher = SimpleNamespace(model=model, load_device=latent.device, patches_uuid=None)
        return patcher

    def _checkpoint(self, patcher: Any, pass_shape: tuple[int, ...]) -> bool:
        return bool(self.checkpointing(patcher, pass_shape)) if self.checkpointing is not None else False

    def plan(self, shape: tuple[int, ...], patcher: Any) -> list[Window] | None:
        """Windows for a latent of `shape` (wrapping on the patcher's seamless-tiling axes), or None."""
        if self.windows is None:
            return None
        wrap_x, wrap_y = wrap_axes(patcher)
        return plan_windows(shape[-2], shape[-1], self.windows, wrap_y=wrap_y, wrap_x=wrap_x)

    def _check_batch(self, batch: int, content: torch.Tensor | None, latent: torch.Tensor) -> None:
        if content is not None:
            if content.shape[0] not in (1, batch):
                raise GuidanceInputError(
                    f"AD Loss Guidance: the content latent has {counted(content.shape[0], 'image')} for a batch of "
                    f"{batch}; give {one_or(batch, 'image')}"
                )
            if tuple(content.shape[-2:]) != tuple(latent.shape[-2:]):
                raise GuidanceInputError(
                    f"AD Loss Guidance: the content latent is {tuple(content.shape[-2:])} but the sampled latent is "
                    f"{tuple(latent.shape[-2:])} (latent pixels); encode the content at the size you sample"
                )
        if self.target_labels is not None and self.target_labels.shape[0] not in (1, batch):
            raise GuidanceInputError(
                f"AD Loss Guidance: the target mask has {counted(self.target_labels.shape[0], 'mask')} for a batch "
                f"of {batch}; give {one_or(batch, 'mask')}"
            )

    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        if self.settings.iterations <= 0:
            return denoised
        model = args["model"]
        sigma = float(args["sigma"].reshape(-1)[0])
        if sigma <= 0 or not self.active(model.model_sampling, sigma):
            return denoised
        sigmas, patcher = sampling_context(args)
        if sigmas is None:
            if not self._warned_schedule:
                log.warning("AD Loss Guidance: this sampler does not expose its sigma schedule; guidance is skipped")
                self._warned_schedule = True
            return denoised
        found = schedule_step(sigmas, sigma)
        if found is None:
            return denoised
        step, sigma_next = found
        if step == 0:
            self.reference.cache.begin_run()
        if not 0 <= sigma_next < sigma:
            return denoised

        try:
            return self._guided(args, model, denoised, sigma, sigma_next, step, patcher)
        except torch.OutOfMemoryError as error:  # keep the type: ComfyUI frees memory on it
            raise torch.OutOfMemoryError(f"{OOM_MESSAGE} ({error})") from error

    def _guided(
        self, args: dict, model: Any, denoised: torch.Tensor, sigma: float, sigma_next: float, step: int, patcher: Any
    ) -> torch.Tensor:
        x = args["input"]
        patcher = self._patcher(model, patcher, x)
        windows = self.plan(tuple(x.shape), patcher)
        pass_shape = tuple(x.shape[:-2]) + ((windows[0].height, windows[0].width) if windows else tuple(x.shape[-2:]))
        checkpoint = self._checkpoint(patcher, pass_shape)
        with ad_pass(patcher, self.reference, device=x.device, gradient_checkpointing=checkpoint) as session:
            noise_step = noise_step_key(session.family.feature_time(model.model_sampling, sigma_next)[0])
            x_k = x.detach().clone().to(latent_dtype(x))
            d_k = denoised.detach().clone().to(x_k.dtype)
            x_next = deterministic_step(x_k, d_k, sigma, sigma_next)
            ref_shape = tuple(session.reference_latent.shape)
            content = session.to_model_space(self.content) if self.content is not None else None
            self._check_batch(x_k.shape[0], content, x_k)
            use_content = content is not None and self.settings.content_weight != 0
            x_star = ad_guidance_update(
                session,
                x_next,
                sigma_next,
                step_noise(ref_shape, self.seed, noise_step, STREAM_REFERENCE),
                self.settings,
                adain_noise=None
                if session.family.adain_shares_reference_noise
                else step_noise(ref_shape, self.seed, noise_step, STREAM_ADAIN),
                content=content if use_content else None,
                content_noise=step_noise(tuple(content.shape), self.seed, noise_step, STREAM_CONTENT)
                if use_content
                else None,
                target_labels=self.target_labels,
                step=step,
                on_iteration=self.on_iteration,
                windows=windows,
            )
            result = landing_denoised(x_k, x_star.to(x_k), sigma, sigma_next).to(denoised.dtype)
        if denoised.is_inference():
            with torch.inference_mode():
                result = result.clone()
        return result
