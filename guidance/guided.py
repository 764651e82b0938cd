"""Guided sampling (DESIGN §2.5): the AD update of one sampling step, and the post-CFG hook
that runs it inside any ComfyUI sampler.

The reference code works in VP form: after each DDIM step it optimizes the next latent
z = x'/c (c = √(σ'²+1), the UNet input) with a fresh Adam for a few iterations, then moves
on. ComfyUI's samplers work in the k-diffusion form x = x0 + σ·ε and only let a hook change
the denoised value D. The hook therefore

1. takes the deterministic (Euler/DDIM) step x' = D + (x − D)·σ'/σ the sampler is about to
   take, with σ' the next sigma of the running schedule;
2. optimizes z = x'/c against the AD loss (`ad_guidance_update`), features at the timestep
   of σ' with the reference noised to that timestep;
3. returns D* = (x'* − r·x)/(1 − r), r = σ'/σ, so that an Euler/DDIM step lands exactly
   on x'* = c·z*. Other samplers use D* like any denoised value (ancestral, SDE and
   multistep samplers get the natural generalization, not an exact landing).

The AD passes call the UNet directly with the reference's empty-prompt conditioning and
without ControlNet: the reference code's "classifier" is the plain UNet with null text, and
ControlNet residuals would both bias the attention features away from the reference's
(which are computed without them) and cost a ControlNet forward and backward per
iteration. The sampler's own CFG pass still gets the ControlNet, so the image follows it.
Because ControlNet never enters the AD graph, ComfyUI's in-place `h += ctrl` cannot
corrupt it.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from ..attention.cache import tensor_digest
from ..attention.naming import counted, one_or, shown_as_pack
from ..attention.reference import ADReference
from ..attention.session import ADModelSession
from ..attention.unet_pass import latent_dtype
from .autograd import autograd_through
from .losses import adain
from .optimize import ad_objective, region_masks
from .windows import Window, WindowSettings, coverage, is_whole, plan_windows, wrap_axes

log = logging.getLogger(__name__)

# Independent noise streams per step, as the reference code draws fresh noise for each use.
STREAM_REFERENCE = 0
STREAM_ADAIN = 1
STREAM_CONTENT = 2

_MASK64 = (1 << 64) - 1
_SCHEDULE_RTOL = 1e-5


OOM_MESSAGE = (
    "AD Loss Guidance ran out of memory in its backward pass through the UNet; lower the resolution or batch "
    "size, set gradient_checkpointing on, select fewer or lower-resolution layers, or use fewer references"
)


@shown_as_pack
class GuidanceInputError(ValueError):
    """An input of AD Loss Guidance that only turns out not to fit once sampling starts."""


@dataclass(frozen=True)
class GuidanceSettings:
    """Defaults are the reference code's style-specific text-to-image settings."""

    lr: float = 0.015
    iterations: int = 2
    adain: bool = True
    content_weight: float = 0.25


@dataclass
class GuidanceIteration:
    """One Adam iteration of one guided step, for progress, Cancel and tests."""

    step: int
    iteration: int
    sigma_next: float
    timestep: float
    ad: float
    content: float
    skipped: bool = False


# -- reproducible per-step noise ------------------------------------------------------------


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 64-bit generator seed for (seed, step, stream): nearby inputs give unrelated seeds."""
    value = _splitmix64(int(seed) & _MASK64)
    value = _splitmix64(value ^ (int(step) & _MASK64))
    return _splitmix64(value ^ (int(stream) & _MASK64))


def step_noise(shape: tuple[int, ...], seed: int, step: int, stream: int) -> torch.Tensor:
    """Standard normal float32 noise on the CPU, a pure function of (shape, seed, step, stream),
    so runs are reproducible on every device and the feature cache can key on it."""
    generator = torch.Generator(device="cpu").manual_seed(step_seed(seed, step, stream))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def noise_step_key(timestep: float) -> int:
    """The step identity the per-step noise is drawn for: the step's target timestep t'
    (thousandths, for models with continuous timesteps). Unlike the index in the running
    schedule it is the same when a run is split (KSamplerAdvanced start/end steps)."""
    return int(round(float(timestep) * 1000))


# -- VP/k-diffusion bookkeeping -------------------------------------------------------------


def vp_scale(sigma: float) -> float:
    """c = √(σ²+1): the k-diffusion latent divided by c is the reference code's latent."""
    return math.sqrt(sigma * sigma + 1.0)


def feature_timestep(model_sampling: Any, sigma: float) -> tuple[float, float]:
    """(UNet timestep, noise level of that timestep) for features at σ.

    σ = 0 (the last step of most schedules) maps to the model's smallest sigma, i.e.
    timestep 0 for SD models: the reference code clamps t' < 0 to 0 and noises the
    reference to timestep 0. Elsewhere the reference is noised to the timestep the UNet is
    told, which is σ itself on the DDIM grid.
    """
    target = float(sigma) if sigma > 0 else float(model_sampling.sigma_min)
    timestep = model_sampling.timestep(torch.tensor([target], dtype=torch.float32))
    sigma_ref = float(model_sampling.sigma(timestep.float()).reshape(-1)[0])
    return float(timestep.reshape(-1)[0]), sigma_ref


def deterministic_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The Euler/DDIM (η = 0) step from σ to σ': x' = D + (x − D)·σ'/σ."""
    return denoised + (x - denoised) * (sigma_next / sigma)


def landing_denoised(x: torch.Tensor, x_next: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The denoised value D* whose Euler step from (x, σ) lands exactly on x_next at σ'."""
    ratio = sigma_next / sigma
    return (x_next - ratio * x) / (1.0 - ratio)


# -- the guidance update ----------------------------------------------------------------------


def ad_guidance_update(
    session: ADModelSession,
    latent: torch.Tensor,
    sigma: float,
    reference_noise: torch.Tensor,
    settings: GuidanceSettings,
    *,
    adain_noise: torch.Tensor | None = None,
    content: torch.Tensor | None = None,
    content_noise: torch.Tensor | None = None,
    target_labels: torch.Tensor | None = None,
    step: int = 0,
    on_iteration: Callable[[GuidanceIteration], None] | None = None,
    windows: list[Window] | None = None,
) -> torch.Tensor:
    """One guidance update (DESIGN §2.5 steps 2-4) of the post-step latent.

    latent: x' in k-diffusion form and model space (after process_latent_in) at noise level
    `sigma` (σ' of the step; 0 on the last step). reference_noise: ε for the reference's
    features, shaped like the model-space reference; adain_noise: ε of the AdaIN target
    (default: reference_noise); content: model-space content latent (batch 1 or B) with its
    ε in content_noise. Returns the optimized x'* = c·z* in the same form.

    With `windows` (more than one), each window gets this update on its own (AdaIN and a
    fresh Adam, like the reference code's panorama mode) and the results are averaged where
    windows overlap.

    Must run inside `autograd_through(diffusion_model)`.
    """
    if windows is not None and not is_whole(windows):
        total = torch.zeros_like(latent, dtype=latent_dtype(latent))
        for window in windows:
            part = ad_guidance_update(
                session,
                window.crop(latent),
                sigma,
                reference_noise,
                settings,
                adain_noise=adain_noise,
                content=window.crop(content) if content is not None else None,
                content_noise=window.crop(content_noise) if content_noise is not None else None,
                target_labels=window.crop_labels(target_labels) if target_labels is not None else None,
                step=step,
                on_iteration=on_iteration,
            )
            window.add_into(total, part.to(total))
        return total / coverage(windows, *latent.shape[-2:], device=total.device).to(total.dtype)
    sigma = float(sigma)
    optimize = settings.iterations > 0 and settings.lr != 0
    if not optimize and not settings.adain:
        return latent.detach().clone()
    model_sampling = session.base_model.model_sampling
    timestep, sigma_ref = feature_timestep(model_sampling, sigma)
    scale, ref_scale = vp_scale(sigma), vp_scale(sigma_ref)
    reference = session.reference_latent
    z = latent.detach().to(reference.device, latent_dtype(latent)) / scale

    if settings.adain:
        eps = (adain_noise if adain_noise is not None else reference_noise).to(reference)
        z = adain(z, (reference + sigma_ref * eps) / ref_scale)
    if not optimize:
        return (z * scale).detach()

    # The noise is part of the cache key (by content), so re-runs with the same reference
    # noise seed reuse the features and any other noise gets its own entry.
    refs = session.reference_kv(timestep, noise=reference_noise, sigma=sigma_ref)
    masks = region_masks(session, target_labels)
    content_q = None
    if content is not None and settings.content_weight != 0:
        if content_noise is None:
            raise ValueError("content_noise is required with a content latent")
        noised = (content.to(reference) + sigma_ref * content_noise.to(reference)) / ref_scale
        content_q = session.queries(noised, timestep, cache_key=("ad-guidance-content", tensor_digest(noised)))

    z = z.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=settings.lr)
    for iteration in range(settings.iterations):
        optimizer.zero_grad(set_to_none=True)
        loss, ad, cl = ad_objective(session, z, timestep, refs, content_q, settings.content_weight, masks)
        skipped = not bool(torch.isfinite(loss))
        if skipped:
            log.warning("AD Loss Guidance: non-finite loss at sigma %.4g; update skipped", sigma)
        else:
            loss.backward()
            optimizer.step()
        if on_iteration is not None:
            on_iteration(
                GuidanceIteration(
                    step,
                    iteration,
                    sigma,
                    timestep,
                    float(ad.detach()),
                    float(cl.detach()) if cl is not None else 0.0,
                    skipped,
                )
            )
        if skipped:
            break
    return (z.detach() * scale).detach()


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


def schedule_step(sigmas: torch.Tensor, sigma: float) -> tuple[int, float] | None:
    """(step index i, σ_{i+1}) for a model call at σ in a descending schedule.

    i is the last schedule entry at or above σ, so calls at a schedule sigma, at a
    sampler's midpoint (dpm_2, dpmpp_sde, dpmpp_2s) or above the first sigma (churn) all
    aim at the next schedule sigma below them. None when nothing is below σ.
    """
    values = [float(v) for v in sigmas.detach().flatten().cpu()]
    threshold = sigma * (1.0 - _SCHEDULE_RTOL)
    index = None
    for i, value in enumerate(values):
        if value >= threshold:
            index = i
    if index is None:  # above the first sigma (churn): the first step
        index = 0
    if index + 1 >= len(values):
        return None
    nxt = values[index + 1]
    if not nxt < threshold:
        return None
    return index, nxt


def sigma_range(model_sampling: Any, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(highest, lowest) σ at which guidance is active, like ComfyUI's other guidance nodes."""
    return float(model_sampling.percent_to_sigma(start_percent)), float(model_sampling.percent_to_sigma(end_percent))


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

    def _session(self, patcher: Any, latent: torch.Tensor) -> ADModelSession:
        checkpoint = bool(self.checkpointing(patcher, tuple(latent.shape))) if self.checkpointing is not None else False
        return ADModelSession(patcher, self.reference, device=latent.device, gradient_checkpointing=checkpoint)

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
        noise_step = noise_step_key(feature_timestep(model.model_sampling, sigma_next)[0])
        with autograd_through(model.diffusion_model):
            patcher = self._patcher(model, patcher, x)
            windows = self.plan(tuple(x.shape), patcher)
            session = self._session(patcher, x if not windows else windows[0].crop(x))
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
                adain_noise=step_noise(ref_shape, self.seed, noise_step, STREAM_ADAIN),
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
