"""Where a UI-format workflow's nodes and links land on ComfyUI's canvas, computed as frontends 1.27
(ComfyUI v0.3.64) and 1.48 (ComfyUI v0.33.0) draw them, so tests can check a layout without a browser:

- a node's box is its `pos`/`size` plus the title bar above it (NODE_TITLE_HEIGHT 30);
- an input socket sits at (x + 10, y + (i + 0.7) * 20), an output socket at (x + w + 1 - 10, same y), for
  the i-th socket that is not a widget's (NODE_SLOT_HEIGHT 20);
- a link is the cubic spline from the output socket to the input socket with control points
  max(30, distance / 4) to the right of the first and to the left of the second;
- Fit View frames the nodes' boxes plus 10 px at zoom 0.75 * canvas / bounds; below a zoom of
  MinFontSizeForLOD / NODE_TEXT_SIZE = 8 / 14 nodes are drawn as blank boxes.

The window is frontend 1.48's: its canvas fills the window, under the side bar, the tab bar and the
floating tool bars. scripts/check_frontend.py checks in the real frontend that nothing is resized on load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
FIT_VIEW_ZOOM = 0.75
FIT_VIEW_PADDING = 10
DETAIL_ZOOM = 8 / 14  # LiteGraph.Canvas.MinFontSizeForLOD (8 px) over NODE_TEXT_SIZE (14 px)
# The canvas frontend 1.48 has in a 1600 x 1000 browser window: all of it (measured in Chromium), with the
# side bar (59 px wide), the tab bar (38 px) and the floating tool bars (to 82 px) over its left and top
# edges; the graph is clear of them right of CLEAR_ORIGIN[0] and below CLEAR_ORIGIN[1].
REFERENCE_CANVAS = (1600, 1000)
CLEAR_ORIGIN = (64, 90)


@dataclass(frozen=True)
class Box:
    left: float
    top: float
    right: float
    bottom: float

    def contains(self, x: float, y: float, inset: float = 1.0) -> bool:
        return self.left + inset < x < self.right - inset and self.top + inset < y < self.bottom - inset

    def overlaps(self, other: Box) -> bool:
        return self.left < other.right and other.left < self.right and self.top < other.bottom and other.top < self.bottom


def box(node: dict) -> Box:
    """The node's box on the canvas, title bar included (LGraphNode.measure)."""
    (x, y), (w, h) = node["pos"], node["size"]
    return Box(x, y - TITLE_HEIGHT, x + w, y + h)


def input_socket(node: dict, slot: int) -> tuple[float, float]:
    index = [i for i, entry in enumerate(node["inputs"]) if not entry.get("widget")].index(slot)
    return node["pos"][0] + SLOT_HEIGHT / 2, node["pos"][1] + (index + 0.7) * SLOT_HEIGHT


def output_socket(node: dict, slot: int) -> tuple[float, float]:
    return (node["pos"][0] + node["size"][0] + 1 - SLOT_HEIGHT / 2, node["pos"][1] + (slot + 0.7) * SLOT_HEIGHT)


def spline(start: tuple[float, float], end: tuple[float, float], samples: int = 200) -> list[tuple[float, float]]:
    """Points along a link as the frontend's spline mode draws it (LinkConnector's calculateControlPoints)."""
    reach = max(30.0, math.dist(start, end) * 0.25)
    p0, p1, p2, p3 = start, (start[0] + reach, start[1]), (end[0] - reach, end[1]), end
    points = []
    for k in range(1, samples):
        t = k / samples
        a, b, c, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
        points.append((a * p0[0] + b * p1[0] + c * p2[0] + d * p3[0], a * p0[1] + b * p1[1] + c * p2[1] + d * p3[1]))
    return points


def overlapping_nodes(ui: dict) -> list[tuple[str, str]]:
    """Pairs of node titles whose boxes overlap."""
    nodes = ui["nodes"]
    return [(a.get("title", a["type"]), b.get("title", b["type"]))
            for i, a in enumerate(nodes) for b in nodes[i + 1:] if box(a).overlaps(box(b))]


def links_behind_nodes(ui: dict) -> list[str]:
    """Links that run behind a node they do not connect."""
    by_id = {node["id"]: node for node in ui["nodes"]}
    problems = []
    for link_id, source_id, source_slot, target_id, target_slot, _kind in ui["links"]:
        source, target = by_id[source_id], by_id[target_id]
        start, end = output_socket(source, source_slot), input_socket(target, target_slot)
        name = f"{source.get('title')}[{source_slot}] -> {target.get('title')}.{target['inputs'][target_slot]['name']}"
        points = spline(start, end)
        for node in ui["nodes"]:
            if node["id"] in (source_id, target_id):
                continue
            if any(box(node).contains(x, y) for x, y in points):
                problems.append(f"{name} passes behind {node.get('title', node['type'])}")
    return problems


def bounds(ui: dict) -> Box:
    """What Fit View frames: every node's box plus 10 px (createBounds)."""
    boxes = [box(node) for node in ui["nodes"]]
    pad = FIT_VIEW_PADDING
    return Box(min(b.left for b in boxes) - pad, min(b.top for b in boxes) - pad,
               max(b.right for b in boxes) + pad, max(b.bottom for b in boxes) + pad)


def fit_view_zoom(ui: dict, canvas: tuple[float, float] = REFERENCE_CANVAS) -> float:
    """The zoom Fit View picks on a canvas of `canvas` pixels (DragAndScale.fitToBounds)."""
    frame = bounds(ui)
    return min(FIT_VIEW_ZOOM * canvas[0] / max(frame.right - frame.left, 300),
               FIT_VIEW_ZOOM * canvas[1] / max(frame.bottom - frame.top, 300))


def visible_area(ui: dict, canvas: tuple[float, float] = REFERENCE_CANVAS) -> Box:
    """The part of the graph the saved view (extra.ds) shows clear of the side and tool bars when the
    file opens: canvas pixel p shows graph point p / scale - offset."""
    ds = ui["extra"]["ds"]
    scale, (dx, dy) = ds["scale"], ds["offset"]
    return Box(CLEAR_ORIGIN[0] / scale - dx, CLEAR_ORIGIN[1] / scale - dy, canvas[0] / scale - dx,
               canvas[1] / scale - dy)
