"""Decoder fine-tuning (the paper's improved VAE decoding): Adam on the decoder's weights so that
decoding the reference's latent gives back the reference, L1 in the VAE's [-1, 1] pixel space.

Plain torch: the decoder is any callable from latent to pixels, trained through the parameters it
is given. Large images are trained a crop at a time (a tile plan), so memory is bounded by one
tile of one image, whatever the image size and batch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .windows import Window


@dataclass(frozen=True)
class TilePlan:
    """`tile` latent cells per tile side (0 = whole images); `seed` picks tile positions and order."""

    tile: int = 0
    seed: int = 0


@dataclass(frozen=True)
class StepReport:
    epoch: int
    step: int
    steps_in_epoch: int
    loss: float


def tiles_along(length: int, tile: int) -> int:
    """The fewest tiles of `tile` cells that cover `length` cells."""
    return 1 if tile <= 0 or length <= tile else -(-length // tile)


def axis_starts(length: int, tile: int, offset: int) -> list[int]:
    """Starts of the fewest whole tiles that cover [0, length): the grid 0, tile, 2*tile, ... moved back by
    `offset` (0 <= offset <= slack, the overlap the tiles must have) and clamped into the image."""
    count = tiles_along(length, tile)
    if count == 1:
        return [0]
    last = length - tile
    return [min(max(i * tile - offset, 0), last) for i in range(count)]


def epoch_crops(height: int, width: int, plan: TilePlan, generator: torch.Generator) -> list[Window]:
    """The tiles of one epoch, in seeded order: together they cover the whole latent.

    Where the tiles must overlap, a seeded offset moves the overlap (and the seams) each epoch."""
    tile = plan.tile
    rows, cols = tiles_along(height, tile), tiles_along(width, tile)
    if rows == cols == 1:
        return [Window(0, 0, height, width, height, width)]
    slack = (rows * tile - height if rows > 1 else 0, cols * tile - width if cols > 1 else 0)
    offsets = [int(torch.randint(0, extra + 1, (1,), generator=generator)) for extra in slack]
    tops = axis_starts(height, tile, offsets[0])
    lefts = axis_starts(width, tile, offsets[1])
    crops = [Window(r, c, min(tile, height), min(tile, width), height, width) for r in tops for c in lefts]
    order = torch.randperm(len(crops), generator=generator).tolist()
    return [crops[i] for i in order]


def check_whole_multiple(latents: torch.Tensor, targets: torch.Tensor) -> None:
    """Targets must be the latents' pixels: same batch, a whole number of pixels per latent cell."""
    if latents.ndim != 4 or targets.ndim != 4 or latents.shape[0] != targets.shape[0]:
        raise ValueError(f"latents {tuple(latents.shape)} and targets {tuple(targets.shape)} must be "
                         "(B, C, h, w) and (B, 3, H, W) with the same batch")
    scale = targets.shape[-1] // latents.shape[-1]
    if scale < 1 or targets.shape[-1] != latents.shape[-1] * scale or targets.shape[-2] != latents.shape[-2] * scale:
        raise ValueError(f"targets {tuple(targets.shape)} are not a whole multiple of latents {tuple(latents.shape)}")


def _check_trainable(params: list[torch.nn.Parameter]) -> None:
    if not params:
        raise ValueError("no parameters to train")
    if any(p.is_inference() for p in params):
        raise ValueError("trainable parameters are inference tensors; clone them outside torch.inference_mode()")


def _tile_loss(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    targets: torch.Tensor,
    crop: Window,
    device: torch.device,
) -> float:
    """Backward of the batch's mean L1 on one crop, one image at a time (gradients accumulate)."""
    pixels = crop.scaled(*targets.shape[-2:])
    batch = latents.shape[0]
    total = 0.0
    for b in range(batch):
        z = crop.crop(latents[b:b + 1]).to(device)
        target = pixels.crop(targets[b:b + 1]).to(device)
        loss = torch.nn.functional.l1_loss(decode(z).float(), target) / batch
        loss.backward()
        total += float(loss.detach())
    return total


def finetune_decoder(
    decode: Callable[[torch.Tensor], torch.Tensor],
    params: Iterable[torch.nn.Parameter],
    latents: torch.Tensor,
    targets: torch.Tensor,
    epochs: int,
    lr: float,
    plan: TilePlan = TilePlan(),
    on_step: Callable[[StepReport], None] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train `params` (in place) so `decode(latents)` approaches `targets` ([-1, 1] pixels, NCHW).

    One epoch is one Adam step per tile of the plan (one step when the image fits in a tile, as in
    the reference code). Latents and targets may stay on the CPU; each crop goes to the parameters'
    device. Returns each epoch's mean loss. Runs with grad on and inference mode off, whatever the
    caller's modes; the parameters must be normal tensors that require grad."""
    params = [p for p in params if p.requires_grad]
    _check_trainable(params)
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be a finite number >= 0, got {lr}")
    check_whole_multiple(latents, targets)
    device = params[0].device
    generator = torch.Generator().manual_seed(int(plan.seed))
    history: list[float] = []
    with torch.inference_mode(False), torch.enable_grad():
        latents = latents.detach().float().clone()
        targets = targets.detach().float().clone()
        optimizer = torch.optim.Adam(params, lr=lr)
        for epoch in range(epochs):
            crops = epoch_crops(latents.shape[-2], latents.shape[-1], plan, generator)
            losses = []
            for step, crop in enumerate(crops):
                optimizer.zero_grad(set_to_none=True)
                loss = _tile_loss(decode, latents, targets, crop, device)
                optimizer.step()
                losses.append(loss)
                if on_step is not None:
                    on_step(StepReport(epoch, step, len(crops), loss))
            history.append(sum(losses) / len(losses))
            if on_epoch is not None:
                on_epoch(epoch, history[-1])
    return history


def clone_module(
    module: torch.nn.Module,
    make: Callable[[str, torch.Tensor], torch.Tensor],
    trainable: Callable[[str], bool] = lambda name: False,
) -> torch.nn.Module:
    """A deep copy of `module` whose parameters and buffers are `make(name, tensor)`.

    `make` decides whether a tensor is shared (return it or an alias) or copied; the original
    module's Parameter objects are never reused, so moving the copy between devices later never
    moves the original."""
    memo: dict[int, torch.Tensor] = {}
    for name, param in module.named_parameters():
        memo[id(param)] = torch.nn.Parameter(make(name, param.detach()), requires_grad=trainable(name))
    for name, buffer in module.named_buffers():
        memo[id(buffer)] = make(name, buffer)
    return copy.deepcopy(module, memo)
