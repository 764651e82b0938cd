"""Memory probe of the GPU check (docs/gpu-check.md), loaded into the ComfyUI server under test as a custom
node with no nodes: two routes that reset and read this server process's peak memory.

- torch's allocator: `torch.cuda.max_memory_allocated` / `max_memory_reserved` (activations, workspaces and
  whatever else goes through torch's caching allocator);
- the device: the largest `total - free` seen by a 5 ms poll of `torch.cuda.mem_get_info`, which also counts
  memory outside torch's allocator (Dynamic VRAM's weight buffers, CUDA contexts);
- comfy-aimdo's own count (`comfy_aimdo.control.get_total_vram_usage`), polled alike, where Dynamic VRAM is on.

On a CPU the poll reads this process's resident memory instead. Not part of the pack.
"""

from __future__ import annotations

import sys
import threading
import time

import psutil
import torch
from aiohttp import web

POLL_SECONDS = 0.005


class PeakPoll:
    """Largest values of a few gauges since the last reset, read on a background thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.peaks: dict[str, int] = {}
        self.thread: threading.Thread | None = None

    def gauges(self) -> dict[str, int]:
        if not torch.cuda.is_available():
            return {"process_rss": psutil.Process().memory_info().rss}
        free, total = torch.cuda.mem_get_info()
        values = {"device_used": total - free}
        if getattr(sys.modules.get("comfy.memory_management"), "aimdo_enabled", False):
            import comfy_aimdo.control

            values["aimdo_vram"] = int(comfy_aimdo.control.get_total_vram_usage())
        return values

    def sample(self) -> None:
        values = self.gauges()
        with self.lock:
            for key, value in values.items():
                self.peaks[key] = max(self.peaks.get(key, 0), value)

    def run(self) -> None:
        while True:
            self.sample()
            time.sleep(POLL_SECONDS)

    def reset(self) -> None:
        with self.lock:
            self.peaks = {}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if self.thread is None:
            self.thread = threading.Thread(target=self.run, name="ad-gpu-check-memory", daemon=True)
            self.thread.start()
        self.sample()

    def read(self) -> dict:
        self.sample()
        with self.lock:
            result = dict(self.peaks)
        result["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        if torch.cuda.is_available():
            result["torch_allocated"] = torch.cuda.max_memory_allocated()
            result["torch_reserved"] = torch.cuda.max_memory_reserved()
            result["device_total"] = torch.cuda.mem_get_info()[1]
            result["device_name"] = torch.cuda.get_device_name()
        result["aimdo_enabled"] = bool(getattr(sys.modules.get("comfy.memory_management"), "aimdo_enabled", False))
        return result


POLL = PeakPoll()


def _register() -> None:
    from server import PromptServer

    routes = PromptServer.instance.routes

    @routes.post("/ad_gpu_check/reset")
    async def reset(request):
        POLL.reset()
        return web.json_response({"ok": True})

    @routes.get("/ad_gpu_check/peak")
    async def peak(request):
        return web.json_response(POLL.read())


_register()
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
