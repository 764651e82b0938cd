"""Benchmark plumbing: boot ComfyUI, build full-size random-weight UNets, measure time and peak memory.

Peak memory on CPU is the resident-set peak above the level before the measured call, sampled
every 2 ms; on CUDA it is torch's peak allocation above the level before the call.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from comfy_env import boot  # noqa: E402

boot()

from pack_loader import load_pack  # noqa: E402

PACK = load_pack()


def build_full_unet(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A ModelPatcher around a full-size SD1.5 or SDXL UNet with random weights (inference tensors)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    from real_configs import SD15_UNET, SDXL_UNET

    config = sm.SD15(dict(SD15_UNET)) if kind == "sd15" else sm.SDXL(dict(SDXL_UNET))
    config.set_inference_dtype(dtype, None)
    with torch.inference_mode():
        model = config.get_model({}, "", device=torch.device("cpu"))
        generator = torch.Generator().manual_seed(seed)
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * 0.02)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        mm.load_models_gpu([patcher])
    return patcher


def conditioning(kind: str, batch: int = 1) -> list:
    if kind == "sd15":
        return [[torch.zeros(batch, 77, 768), {}]]
    return [[torch.zeros(batch, 77, 2048), {"pooled_output": torch.zeros(batch, 1280)}]]


class _RssPeak:
    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> _RssPeak:
        self.base = self.process.memory_info().rss
        self.peak = self.base
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> tuple[float, int]:
    """(seconds per call, peak bytes above the level before the calls)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats, torch.cuda.max_memory_allocated() - base
    with _RssPeak() as peak:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        seconds = (time.perf_counter() - start) / repeats
    return seconds, peak.peak - peak.base


def tensor_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of tensor storage that `fn` allocated and held at once (exact on the CPU, where the
    resident-set peak of one process is not comparable between calls: freed heap is reused)."""
    from memory_meter import peak_bytes

    return peak_bytes(fn)


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"
