"""What a long-running node shows while it works: ComfyUI's progress bar with live previews, the
progress text on the node, and a console bar for the server log.

Every host feature is optional. `latent_preview` (the previewer KSampler uses), the server's
`send_progress_text` and the executing-node context exist in ComfyUI v0.3.64; where one is missing
(an older core, or no server at all as in tests) that part is skipped and the run goes on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch

# Share of a run's wall time that live previews may take: a preview is sent whenever the time spent
# on previews so far is at most this share of the time elapsed, so previews come every few steps
# (every step when they are cheap) and cost under 2% of the run on any hardware (docs/nodes.md: Watching
# a run).
PREVIEW_BUDGET = 0.01


def prompt_server() -> Any:
    """ComfyUI's running PromptServer, or None (no server loaded: tests, scripts)."""
    server_module = sys.modules.get("server")
    return getattr(getattr(server_module, "PromptServer", None), "instance", None)


def executing_node_id() -> str | None:
    """The id of the node being executed: from the execution context where the host has one, else
    the server's last executed node (what ComfyUI's own progress hook falls back to)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        get_executing_context = None
    context = get_executing_context() if get_executing_context is not None else None
    if context is not None:
        return str(context.node_id)
    node_id = getattr(prompt_server(), "last_node_id", None)
    return str(node_id) if node_id is not None else None


def send_progress_text(text: str, node_id: str | None) -> bool:
    """Show `text` on node `node_id` in the UI where the host supports it; True when sent."""
    send = getattr(prompt_server(), "send_progress_text", None)
    if send is None or node_id is None:
        return False
    send(text, node_id)
    return True


def host_previewer(patcher: Any) -> Any:
    """The previewer that KSampler would use for this model: the user's --preview-method on the model's
    latent format (latent2rgb or TAESD), or None when previews are off or the host has no
    `latent_preview`."""
    try:
        import latent_preview
    except ImportError:
        return None
    latent_format = getattr(getattr(patcher, "model", None), "latent_format", None)
    if latent_format is None:
        return None
    return latent_preview.get_previewer(patcher.load_device, latent_format)


class LivePreview:
    """Preview images of a latent (model space, like a sampler's x0) within the time budget."""

    def __init__(self, previewer: Any, budget: float = PREVIEW_BUDGET,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.previewer = previewer
        self.budget = budget
        self.clock = clock
        self.started = clock()
        self.spent = 0.0
        self.sent = 0

    def due(self) -> bool:
        return self.spent <= self.budget * (self.clock() - self.started)

    def image(self, latent: torch.Tensor) -> Any:
        """("JPEG", PIL image, max size) for ComfyUI's progress hook, or None when it is not time."""
        if self.previewer is None or not self.due():
            return None
        start = self.clock()
        with torch.no_grad():
            preview = self.previewer.decode_latent_to_preview_image("JPEG", latent.detach())
        self.spent += self.clock() - start
        self.sent += 1
        return preview


def console_bar(total: int, desc: str, unit: str) -> Any:
    """A tqdm bar like the samplers print, off where ComfyUI's progress bars are disabled."""
    import comfy.utils
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not getattr(comfy.utils, "PROGRESS_BAR_ENABLED", True))


class NodeProgress:
    """The progress of one node run: the UI bar (with previews when a patcher is given), the
    console bar and the text on the node. Use as a context manager so the console bar closes."""

    def __init__(self, node: str, total: int, unit: str = "step", patcher: Any = None) -> None:
        import comfy.utils

        self.total = total
        self.bar = comfy.utils.ProgressBar(total)
        self.console = console_bar(total, node, unit)
        self.node_id = executing_node_id()
        start = time.perf_counter()
        self.preview = LivePreview(host_previewer(patcher)) if patcher is not None else None
        self.setup = time.perf_counter() - start  # loading the previewer (TAESD), as KSampler does each run
        self.overhead = self.setup  # seconds on previews, their setup and the text: for the benchmark

    def update(self, done: int, text: str, latent: torch.Tensor | None = None, **postfix: float) -> None:
        """`done` of `total` finished; `text` goes on the node, `postfix` on the console bar."""
        start = time.perf_counter()
        preview = self.preview.image(latent) if self.preview is not None and latent is not None else None
        send_progress_text(text, self.node_id)
        self.overhead += time.perf_counter() - start
        if postfix:
            self.console.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self.console.update(max(0, done - self.console.n))
        self.bar.update_absolute(done, self.total, preview)

    def close(self) -> None:
        self.console.close()

    def __enter__(self) -> NodeProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
