"""Live previews and progress text: what they add to a Latent AD Optimize run (issue: under 2%).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_progress.py [--size 256] [--steps 6] [--repeats 2]

Needs a ComfyUI tree with `latent_preview` (the 2024 PyPI core has none). Runs the node on a full-size
random-weight SD1.5 UNet with
  - no preview method and no server (the baseline),
  - latent2rgb previews, and TAESD previews (a random-weight TAESD decoder: the real one's cost),
    both with progress text to a stand-in server and a progress hook that encodes every preview as a JPEG of
    up to 512 pixels, the work ComfyUI's server does for each one,
repeated in turn (ABCABC...), and prints the median run times. Also prints what the node itself spent on
previews and text (NodeProgress.overhead) plus the hook's encoding time: exact however busy the machine is.
"""

from __future__ import annotations

import argparse
import io
import statistics
import struct
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from harness import PACK, build_full_unet, conditioning
from PIL import Image, ImageOps

parser = argparse.ArgumentParser()
parser.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size/8)")
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--repeats", type=int, default=2)
args = parser.parse_args()

try:
    import comfy.utils
    import folder_paths
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod
except ImportError as error:
    sys.exit(f"bench_progress: this ComfyUI has no latent_preview ({error}); set COMFYUI_PATH to a full tree")

optimize_module = sys.modules[f"{PACK.__name__}.nodes.optimize"]
from attention_distillation_pack.nodes.capture import CaptureReferenceAttention  # noqa: E402
from attention_distillation_pack.nodes.optimize import LatentADOptimize  # noqa: E402


class StandInServer:
    """send_progress_text as ComfyUI's: the message packed (node id length, id, text) and queued."""

    last_node_id = "1"

    def __init__(self) -> None:
        self.queued: list[bytes] = []

    def send_progress_text(self, text: str, node_id: str, sid=None) -> None:
        node = str(node_id).encode()
        self.queued.append(struct.pack(">I", len(node)) + node + text.encode())


class EncodingHook:
    """ComfyUI's progress hook for previews: each image resized to fit 512 and encoded as JPEG."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.previews = 0

    def __call__(self, value, total, preview=None, **_: object) -> None:
        if preview is None:
            return
        start = time.perf_counter()
        image = ImageOps.contain(preview[1], (512, 512), Image.Resampling.BILINEAR)
        image.save(io.BytesIO(), format="JPEG", quality=95)
        self.seconds += time.perf_counter() - start
        self.previews += 1


class CountedProgress(optimize_module.NodeProgress):
    made: list = []

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        CountedProgress.made.append(self)


optimize_module.NodeProgress = CountedProgress


def random_taesd_folder() -> Path:
    """A vae_approx folder with a random-weight SD TAESD decoder, registered with ComfyUI's folder_paths."""
    from comfy.taesd.taesd import TAESD
    from safetensors.torch import save_file

    folder = Path(tempfile.mkdtemp(prefix="vae_approx-"))
    torch.manual_seed(1)
    save_file({k: v.contiguous() for k, v in TAESD(latent_channels=4).taesd_decoder.state_dict().items()},
              str(folder / "taesd_decoder.safetensors"))
    folder_paths.add_model_folder_path("vae_approx", str(folder))
    return folder


patcher = build_full_unet("sd15")
side = args.size // 8
g = torch.Generator().manual_seed(0)
reference, content = torch.randn(1, 4, side, side, generator=g), torch.randn(1, 4, side, side, generator=g)
with torch.inference_mode():
    (ref,) = CaptureReferenceAttention().capture(patcher, {"samples": reference}, conditioning("sd15"), "paper default")
random_taesd_folder()
METHODS = {"none": LatentPreviewMethod.NoPreviews, "latent2rgb": LatentPreviewMethod.Latent2RGB,
           "taesd": LatentPreviewMethod.TAESD}


def run(method: str) -> dict[str, float]:
    latent_preview.args.preview_method = METHODS[method]
    hook, server = EncodingHook(), StandInServer()
    if method == "none":
        sys.modules.pop("server", None)
    else:
        sys.modules["server"] = types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=server))
    comfy.utils.set_progress_bar_global_hook(hook)
    CountedProgress.made.clear()
    start = time.perf_counter()
    with torch.inference_mode():
        LatentADOptimize().optimize(patcher, ref, {"samples": content}, args.steps, 0.05, 1, 0.25, 0)
    seconds = time.perf_counter() - start
    comfy.utils.set_progress_bar_global_hook(None)
    (progress,) = CountedProgress.made
    return {"seconds": seconds, "node": progress.overhead, "setup": progress.setup, "hook": hook.seconds,
            "previews": hook.previews, "texts": len(server.queued)}


run("none")  # warm-up: reference features cached, allocator warm
results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
for _ in range(args.repeats):
    for method in METHODS:
        results[method].append(run(method))

base = statistics.median(r["seconds"] for r in results["none"])
print(f"sd15 {args.size}x{args.size} on {patcher.load_device}, {torch.get_num_threads()} threads, {args.steps} steps, "
      f"{args.repeats} repeats each, medians; a step without previews: {1000 * base / args.steps:.0f} ms")
print("| previews | run | vs none | previews sent | previewer setup | per preview (decode + JPEG) "
      "| previews, setup and text in all | share of run |")
print("|---|---|---|---|---|---|---|---|")
for method, rows in results.items():
    def median(key: str, rows=rows) -> float:
        return statistics.median(r[key] for r in rows)

    seconds, setup, sent = median("seconds"), median("setup"), median("previews")
    spent = median("node") + median("hook")
    per_preview = (spent - setup) / sent if sent else 0.0
    print(f"| {method} | {seconds:.2f} s | {100 * (seconds / base - 1):+.1f}% | {sent:.0f}/{args.steps} | "
          f"{1000 * setup:.0f} ms | {1000 * per_preview:.1f} ms | {1000 * spent:.0f} ms | {100 * spent / seconds:.2f}% |")
