"""Loss curves as a ComfyUI IMAGE: drawn with Pillow (which ComfyUI installs), legible at 512x320.

The first series is read on the left axis and a second one on its own right axis (AD loss and
content loss differ in scale), each axis in its series' colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PLOT_WIDTH, PLOT_HEIGHT = 512, 320
COLORS = ((31, 119, 180), (230, 97, 1))  # blue, orange: told apart with most colour-vision deficiencies
BACKGROUND, INK, GRID = (255, 255, 255), (40, 40, 40), (225, 225, 225)
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 62, 62, 40, 42
MARKER_RADIUS = 2
MARKERS_UP_TO = 60  # points; more would hide the line


@dataclass(frozen=True)
class Series:
    name: str
    values: list[float]


@dataclass(frozen=True)
class PlotArea:
    """The plotting rectangle in pixels and how values map onto it."""

    left: int
    top: int
    right: int
    bottom: int
    count: int

    def x(self, index: int) -> int:
        """Column of the point at `index` (0-based) of `count` points."""
        if self.count <= 1:
            return (self.left + self.right) // 2
        return round(self.left + index * (self.right - self.left) / (self.count - 1))

    def y(self, value: float, low: float, high: float) -> int:
        """Row of `value` on an axis from `low` (bottom) to `high` (top)."""
        return round(self.bottom - (value - low) * (self.bottom - self.top) / (high - low))


def plot_area(width: int, height: int, count: int, right_axis: bool) -> PlotArea:
    right = width - (MARGIN_RIGHT if right_axis else 24)
    return PlotArea(MARGIN_LEFT, MARGIN_TOP, right, height - MARGIN_BOTTOM, count)


def axis_range(values: list[float]) -> tuple[float, float]:
    """(low, high) around the finite values with a little room; a flat series sits mid-axis."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    if high == low:
        room = abs(low) * 0.1 or 1.0
        return low - room, high + room
    room = (high - low) * 0.08
    return (low - room if low - room >= 0 or low < 0 else 0.0), high + room  # losses >= 0: no negative axis


def nice_ticks(low: float, high: float, most: int = 7) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) between `low` and `high`."""
    raw = (high - low) / max(most - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9)
    return [k * step for k in range(first, math.floor(high / step + 1e-9) + 1)]


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable font: Pillow 10.1 and later
    except TypeError:
        return ImageFont.load_default()


def _label(value: float) -> str:
    return f"{value:.4g}" if abs(value) > 1e-12 else "0"


def _draw_series(draw: ImageDraw.ImageDraw, area: PlotArea, values: list[float], color: tuple[int, int, int],
                 limits: tuple[float, float]) -> None:
    """Line through the finite points (a gap where a value is not finite), with a dot on each."""
    points = [(area.x(i), area.y(v, *limits)) if math.isfinite(v) else None for i, v in enumerate(values)]
    for a, b in zip(points, points[1:]):
        if a is not None and b is not None:
            draw.line([a, b], fill=color, width=2)
    for p in points if len(points) <= MARKERS_UP_TO else ():
        if p is not None:
            r = MARKER_RADIUS
            draw.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=color)


def _draw_axis(draw: ImageDraw.ImageDraw, area: PlotArea, limits: tuple[float, float], color: tuple[int, int, int],
               side: str, text_font: ImageFont.ImageFont, grid: bool) -> None:
    x = area.left if side == "left" else area.right
    draw.line([(x, area.top), (x, area.bottom)], fill=color, width=1)
    for value in nice_ticks(*limits):
        y = area.y(value, *limits)
        if grid:
            draw.line([(area.left + 1, y), (area.right - 1, y)], fill=GRID, width=1)
        tick = (x - 4, y, x) if side == "left" else (x, y, x + 4)
        draw.line([(tick[0], tick[1]), (tick[2], tick[1])], fill=color, width=1)
        anchor = "rm" if side == "left" else "lm"
        draw.text((x - 6 if side == "left" else x + 6, y), _label(value), fill=color, font=text_font, anchor=anchor)


def _step_ticks(count: int) -> list[int]:
    """Up to 6 evenly spread 1-based step numbers, the first and last included."""
    if count <= 6:
        return list(range(1, count + 1))
    return sorted({1 + round(k * (count - 1) / 5) for k in range(6)})


def plot_losses(series: list[Series], x_label: str = "step", title: str = "", width: int = PLOT_WIDTH,
                height: int = PLOT_HEIGHT, note: str | None = None) -> Image.Image:
    """Up to two loss series against 1..N (step or epoch) as an RGB image; `note` replaces the plot
    when there is nothing to draw (the node did not run)."""
    if len(series) > 2:
        raise ValueError("at most two series: one per axis")
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    small, large = font(12), font(14)
    draw.text((MARGIN_LEFT, 12), title, fill=INK, font=large, anchor="lm")
    count = max((len(s.values) for s in series), default=0)
    if note is not None or count == 0:
        draw.text((width // 2, height // 2), note or "no losses recorded", fill=INK, font=large, anchor="mm")
        return image
    area = plot_area(width, height, count, right_axis=len(series) == 2)
    draw.rectangle([area.left, area.top, area.right, area.bottom], outline=GRID)
    limits = [axis_range(s.values) for s in series]
    for index, side in zip(range(len(series)), ("left", "right")):
        _draw_axis(draw, area, limits[index], COLORS[index], side, small, grid=index == 0)
    for index, s in enumerate(series):  # after the axes, so that no axis hides a curve's first or last point
        _draw_series(draw, area, s.values, COLORS[index], limits[index])
    for step in _step_ticks(count):
        x = area.x(step - 1)
        draw.line([(x, area.bottom), (x, area.bottom + 4)], fill=INK, width=1)
        draw.text((x, area.bottom + 6), str(step), fill=INK, font=small, anchor="mt")
    draw.text(((area.left + area.right) // 2, height - 6), x_label, fill=INK, font=small, anchor="mb")
    legend_x = width - 12
    for index in reversed(range(len(series))):
        text = series[index].name
        legend_x -= int(draw.textlength(text, font=small))
        draw.text((legend_x, 12), text, fill=COLORS[index], font=small, anchor="lm")
        legend_x -= 22
        draw.line([(legend_x, 12), (legend_x + 16, 12)], fill=COLORS[index], width=2)
        legend_x -= 12
    return image


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as a ComfyUI IMAGE batch of one: (1, H, W, 3) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def loss_curve_image(series: list[Series], x_label: str, title: str, note: str | None = None) -> torch.Tensor:
    """The IMAGE output of a node's loss curve at the declared size."""
    return image_tensor(plot_losses(series, x_label=x_label, title=title, note=note))
