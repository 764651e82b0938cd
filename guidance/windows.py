"""Overlapping latent windows (MultiDiffusion-style) for textures larger than the reference.

Each window is optimized against the reference on its own and the results are averaged where
windows overlap, so the memory of an AD pass is bounded by the window, not the latent. On a
seamless-tiling axis the windows wrap around the edge, so the wrap-around seam is optimized
like any other place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..attention.family import PIXELS_PER_LATENT

TILING_OPTION = "ad_seamless_tiling"  # model_options entry set by AD Seamless Tiling: {"x": bool, "y": bool}


def wrap_axes(patcher: Any) -> tuple[bool, bool]:
    """(x, y): the axes on which a ModelPatcher tiles seamlessly, where windows wrap around."""
    tiling = (getattr(patcher, "model_options", None) or {}).get(TILING_OPTION) or {}
    return bool(tiling.get("x", False)), bool(tiling.get("y", False))


@dataclass(frozen=True)
class WindowSettings:
    """Window size and stride in latent pixels (AD_WINDOWS of the AD Texture Windows node)."""

    size: int = 64
    stride: int = 8


@dataclass(frozen=True)
class Window:
    """A window of `height`×`width` latent pixels at (top, left) of a latent of (rows, cols);
    it wraps around the edge where it runs past it."""

    top: int
    left: int
    height: int
    width: int
    rows: int
    cols: int

    @property
    def wraps(self) -> bool:
        return self.top + self.height > self.rows or self.left + self.width > self.cols

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column indices of a window that wraps."""
        rows = (torch.arange(self.height, device=device) + self.top) % self.rows
        cols = (torch.arange(self.width, device=device) + self.left) % self.cols
        return rows, cols

    def crop(self, tensor: torch.Tensor) -> torch.Tensor:
        """The window of the last two dims of `tensor` (a view unless it wraps)."""
        if not self.wraps:
            return tensor[..., self.top : self.top + self.height, self.left : self.left + self.width]
        rows, cols = self._indices(tensor.device)
        return tensor.index_select(-2, rows).index_select(-1, cols)

    def scaled(self, rows: int, cols: int) -> Window:
        """The same window on a grid of (rows, cols), an integer multiple of this latent's."""
        sy, sx = rows // self.rows, cols // self.cols
        return Window(self.top * sy, self.left * sx, self.height * sy, self.width * sx, rows, cols)

    def crop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The window of region labels (B, H, W) given at any resolution (resized nearest to the
        latent's pixel size when it is not an integer multiple of it)."""
        rows, cols = labels.shape[-2:]
        if rows % self.rows or cols % self.cols or rows < self.rows or cols < self.cols:
            size = (self.rows * PIXELS_PER_LATENT, self.cols * PIXELS_PER_LATENT)
            labels = torch.nn.functional.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0]
            labels = labels.to(torch.int64)
            rows, cols = size
        return self.scaled(rows, cols).crop(labels)

    def add_into(self, total: torch.Tensor, value: torch.Tensor) -> None:
        """total[window] += value, wrapping like `crop`."""
        if not self.wraps:
            total[..., self.top : self.top + self.height, self.left : self.left + self.width] += value
            return
        rows, cols = self._indices(total.device)
        total[..., rows[:, None], cols[None, :]] += value  # indices are unique within a window


def window_starts(length: int, size: int, stride: int, wrap: bool) -> tuple[list[int], int]:
    """(start offsets, window length) along one axis of `length` latent pixels.

    Without wrap the windows stay inside and the last one ends at the edge; with wrap they
    start every `stride` pixels and run past the edge, so every pixel is covered equally.
    """
    if size <= 0 or stride <= 0:
        raise ValueError("window size and stride must be positive")
    if size >= length:
        return [0], length
    if wrap:
        return list(range(0, length, stride)), size
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts, size


def plan_windows(rows: int, cols: int, settings: WindowSettings, wrap_y: bool = False, wrap_x: bool = False) -> list[Window]:
    """Windows covering a rows×cols latent, row-major."""
    tops, height = window_starts(rows, settings.size, settings.stride, wrap_y)
    lefts, width = window_starts(cols, settings.size, settings.stride, wrap_x)
    return [Window(top, left, height, width, rows, cols) for top in tops for left in lefts]


def coverage(windows: list[Window], rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    """How many windows cover each latent pixel: (rows, cols)."""
    count = torch.zeros(rows, cols, device=device)
    for window in windows:
        window.add_into(count, torch.ones(window.height, window.width, device=device))
    return count


def is_whole(windows: list[Window]) -> bool:
    """One window that is the whole latent: the windowed path would change nothing."""
    return len(windows) == 1 and windows[0].height == windows[0].rows and windows[0].width == windows[0].cols
