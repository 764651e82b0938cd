"""The GPU check's prompts in ComfyUI's API format, one per family and mode, built from the shipped workflows:
the AD nodes take their settings from workflows/api (05/06/13 guided, 03/14 optimize, 12 decoder fine-tune),
the loaders and samplers are wired as those workflows wire them, and only sizes and step counts change. The
reference picture comes from the check's own pattern node (scripts/gpucheck/probe), not Load Image: v0.33's
Load Image decodes through PyAV, which the check does not carry.

Every prompt of a family shares its upstream nodes (same ids, same inputs), so ComfyUI's cache runs the loaders,
text encoders and VAE Encode once (in the warm-up) and each timed prompt runs only its mode's nodes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import models

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a photo of a lighthouse on a cliff"
MODES = ("plain", "guided", "optimize", "decoder")


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    resolution: dict  # scale → pixels (square)
    steps: dict  # scale → sampling / optimization steps of the timed prompts
    sampler: str
    scheduler: str
    cfg: float
    guided_workflow: str  # number of the shipped workflow whose ADLossGuidance settings are used
    optimize_workflow: str  # ... whose LatentADOptimize settings are used


FAMILIES = {
    "sd15": Family("sd15", "SD1.5", {"full": 512, "tiny": 64}, {"full": 20, "tiny": 3}, "ddim", "ddim_uniform",
                   7.5, "05", "03"),
    "sdxl": Family("sdxl", "SDXL", {"full": 1024, "tiny": 64}, {"full": 10, "tiny": 3}, "ddim", "ddim_uniform",
                   7.0, "06", "03"),
    "flux": Family("flux", "FLUX.1-dev fp8", {"full": 1024, "tiny": 64}, {"full": 6, "tiny": 3}, "euler", "simple",
                   1.0, "13", "14"),
}
DECODER_WORKFLOW = "12"
DECODER_EPOCHS = {"full": 4, "tiny": 2}
T5_MIN_LENGTH = {"full": 512, "tiny": 77}  # workflow 13 pads T5 to 512 tokens as the reference code does


def shipped_workflow(number: str) -> dict:
    matches = sorted((REPO / "workflows" / "api").glob(f"{number} *.json"))
    if len(matches) != 1:
        raise FileNotFoundError(f"workflows/api/{number} *.json: found {len(matches)} files")
    return json.loads(matches[0].read_text())


def shipped_settings(number: str, class_type: str) -> dict:
    """The widget values (not the links) of the one `class_type` node of a shipped workflow."""
    nodes = [n for n in shipped_workflow(number).values() if n["class_type"] == class_type]
    if len(nodes) != 1:
        raise ValueError(f"workflow {number} has {len(nodes)} {class_type} nodes")
    return {k: v for k, v in nodes[0]["inputs"].items() if not isinstance(v, list)}


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def _sd_upstream(family: Family, scale: str, size: int) -> tuple[dict, dict]:
    nodes = {
        "1": node("CheckpointLoaderSimple", ckpt_name=models.file_name(family.name, scale)),
        "2": node("CLIPTextEncode", text=PROMPT, clip=["1", 1]),
        "3": node("CLIPTextEncode", text="", clip=["1", 1]),
        "7": node("EmptyLatentImage", width=size, height=size, batch_size=1),
    }
    wires = {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2], "empty": ["7", 0]}
    return nodes, wires


def _flux_upstream(scale: str, size: int) -> tuple[dict, dict]:
    nodes = {
        "1": node("DualCLIPLoader", clip_name1=models.file_name("clip_l", scale),
                  clip_name2=models.file_name("t5xxl", scale), type="flux", device="default"),
        "2": node("T5TokenizerOptions", min_padding=0, min_length=T5_MIN_LENGTH[scale], clip=["1", 0]),
        "3": node("UNETLoader", unet_name=models.file_name("flux", scale), weight_dtype="default"),
        "4": node("VAELoader", vae_name=models.file_name("flux_vae", scale)),
        "5": node("ModelSamplingFlux", max_shift=1.15, base_shift=0.5, width=size, height=size, model=["3", 0]),
        "6": node("CLIPTextEncode", text=PROMPT, clip=["2", 0]),
        "7": node("CLIPTextEncode", text="", clip=["2", 0]),
        "11": node("FluxGuidance", guidance=3.5, conditioning=["6", 0]),
        "12": node("EmptySD3LatentImage", width=size, height=size, batch_size=1),
    }
    wires = {"model": ["5", 0], "positive": ["11", 0], "negative": ["7", 0], "vae": ["4", 0], "empty": ["12", 0]}
    return nodes, wires


def build_prompt(family_name: str, mode: str, scale: str, seed: int = 0, steps: int | None = None) -> dict:
    """The API prompt of one (family, mode): "warmup" (the shared nodes and a 2-step plain sampling), or a
    timed "plain", "guided", "optimize" or "decoder" prompt. Output nodes: "21" SaveLatent (sampling modes),
    "26" SaveImage and "27" PreviewImage (decoder)."""
    family = FAMILIES[family_name]
    size = family.resolution[scale]
    steps = steps if steps is not None else (2 if mode == "warmup" else family.steps[scale])
    nodes, wires = _flux_upstream(scale, size) if family_name == "flux" else _sd_upstream(family, scale, size)
    nodes["8"] = node("ADGPUCheckPattern", width=size, height=size, seed=0)  # the probe's node: see its docstring
    nodes["10"] = node("VAEEncode", pixels=["8", 0], vae=wires["vae"])
    prefix = f"ad_gpu_check/{family_name}_{mode}"

    def sampler(model: list) -> dict:
        return node("KSampler", seed=seed, steps=steps, cfg=family.cfg, sampler_name=family.sampler,
                    scheduler=family.scheduler, denoise=1.0, model=model, positive=wires["positive"],
                    negative=wires["negative"], latent_image=wires["empty"])

    if mode in ("guided", "optimize"):
        capture = shipped_settings(family.guided_workflow, "CaptureReferenceAttention")
        nodes["13"] = node("CaptureReferenceAttention", **capture, model=wires["model"], reference=["10", 0],
                           null_conditioning=wires["negative"])
    if mode in ("warmup", "plain"):
        nodes["20"] = sampler(wires["model"])
        nodes["21"] = node("SaveLatent", samples=["20", 0], filename_prefix=prefix)
        if mode == "warmup":  # runs VAE Encode once, so the timed prompts find it cached
            nodes["28"] = node("SaveLatent", samples=["10", 0], filename_prefix=prefix + "_reference")
    elif mode == "guided":
        settings = shipped_settings(family.guided_workflow, "ADLossGuidance")
        nodes["22"] = node("ADLossGuidance", **settings, model=wires["model"], reference=["13", 0])
        nodes["20"] = sampler(["22", 0])
        nodes["21"] = node("SaveLatent", samples=["20", 0], filename_prefix=prefix)
    elif mode == "optimize":
        settings = dict(shipped_settings(family.optimize_workflow, "LatentADOptimize"), steps=steps, seed=seed)
        nodes["23"] = node("LatentADOptimize", **settings, model=wires["model"], reference=["13", 0],
                           latent=wires["empty"])
        nodes["21"] = node("SaveLatent", samples=["23", 0], filename_prefix=prefix)
    elif mode == "decoder":
        settings = dict(shipped_settings(DECODER_WORKFLOW, "ADFineTuneVAEDecoder"), epochs=DECODER_EPOCHS[scale],
                        seed=seed)
        nodes["24"] = node("ADFineTuneVAEDecoder", **settings, vae=wires["vae"], images=["8", 0])
        nodes["25"] = node("VAEDecode", samples=["10", 0], vae=["24", 0])
        nodes["26"] = node("SaveImage", filename_prefix=prefix, images=["25", 0])
        nodes["27"] = node("PreviewImage", images=["24", 1])
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return nodes


def progress_node(mode: str) -> str:
    """The node whose progress events time the steps of a mode."""
    return {"plain": "20", "guided": "20", "optimize": "23", "decoder": "24", "warmup": "20"}[mode]


def steps_of(prompt: dict, mode: str) -> int:
    inputs = prompt[progress_node(mode)]["inputs"]
    return int(inputs["epochs"] if mode == "decoder" else inputs["steps"])
