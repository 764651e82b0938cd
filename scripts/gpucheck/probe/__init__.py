"""What the GPU check (docs/gpu-check.md) adds to the ComfyUI server under test, as a second custom node pack:

- two routes that reset and read this server process's peak memory;
- "AD GPU Check Pattern", a reference picture made from a seed. ComfyUI v0.33's Load Image decodes every image
  through PyAV, which the check does not carry (37 MB), so its prompts make their reference with this node.

Peak memory:

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


class ADGPUCheckPattern:
    """Coloured waves plus noise: a reference with structure at several scales, the same for a given seed."""

    CATEGORY = "testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        size = {"default": 512, "min": 64, "max": 4096, "step": 8}
        return {"required": {"width": ("INT", size), "height": ("INT", size),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    def make(self, width: int, height: int, seed: int) -> tuple[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        y = torch.linspace(0, 1, height)[:, None]
        x = torch.linspace(0, 1, width)[None, :]
        channels = []
        for _ in range(3):
            fx, fy, phase = (torch.rand(3, generator=generator) * torch.tensor([16.0, 16.0, 6.28])).tolist()
            channels.append(0.5 + 0.35 * torch.sin(6.28 * (fx * x + fy * y) + phase))
        image = torch.stack(channels, dim=-1) + 0.15 * torch.rand(height, width, 3, generator=generator)
        return (image.clamp(0, 1)[None],)


def _register() -> None:
    """The routes, on the running server (main.py imports `server` before it loads custom nodes); none without
    one (tests load the node alone)."""
    server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    if server is None:
        return
    routes = server.routes

    @routes.post("/ad_gpu_check/reset")
    async def reset(request):
        POLL.reset()
        return web.json_response({"ok": True})

    @routes.get("/ad_gpu_check/peak")
    async def peak(request):
        return web.json_response(POLL.read())


_register()
NODE_CLASS_MAPPINGS = {"ADGPUCheckPattern": ADGPUCheckPattern}
NODE_DISPLAY_NAME_MAPPINGS = {"ADGPUCheckPattern": "AD GPU Check Pattern"}
