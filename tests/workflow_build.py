"""Build the shipped workflows (workflows/*.json, UI format, and workflows/api/*.json, their API twins)
from the node definitions: widget order and defaults come from the core nodes' /object_info (the
fixture) and from this pack's INPUT_TYPES, so a workflow cannot name an input that does not exist.

    python tests/workflow_build.py          # rewrite workflows/ (run with the tests' venv)
    python tests/workflow_build.py --check  # exit 1 when workflows/ differs from what would be written

tests/test_workflows.py checks the written files on their own terms (types, links, widget values,
conversion) and that they are what this script writes.
"""

from __future__ import annotations

import math
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workflow_layout as wl  # noqa: E402
import workflow_tools as wt  # noqa: E402

FRONTEND_VERSION = "1.48.7"  # comfyui-frontend-package pinned by ComfyUI v0.33.0, whose window the view fits
COMFY_VERSION = "0.3.64"
SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
LORA = "MoXinV1.safetensors"
CONTROLNET = "control_v11p_sd15_canny_fp16.safetensors"
# Flux as ComfyUI's own Flux templates load it: the diffusion model, the two text encoders and the VAE apart.
FLUX_DEV = "flux1-dev.safetensors"
CLIP_L = "clip_l.safetensors"
T5XXL = "t5xxl_fp16.safetensors"
FLUX_VAE = "ae.safetensors"
FLUX_LORA = "art_lora_comfy_converted.safetensors"
# Download links shown by the frontend's missing-models dialog (the same links as ComfyUI's own templates).
MODEL_URLS = {
    SD15: ("checkpoints", "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                          "v1-5-pruned-emaonly-fp16.safetensors?download=true"),
    SDXL: ("checkpoints", "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
                          "sd_xl_base_1.0.safetensors?download=true"),
    LORA: ("loras", "https://civitai.com/api/download/models/14856?type=Model&format=SafeTensor&size=full&fp=fp16"),
    CONTROLNET: ("controlnet", "https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/"
                               "control_v11p_sd15_canny_fp16.safetensors?download=true"),
    FLUX_DEV: ("diffusion_models", "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors"),
    CLIP_L: ("text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
    T5XXL: ("text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"),
    FLUX_VAE: ("vae", "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/"
                      "ae.safetensors"),
    FLUX_LORA: ("loras", "https://huggingface.co/XLabs-AI/flux-lora-collection/resolve/main/"
                         "art_lora_comfy_converted.safetensors"),
}
# Display names of the core nodes (ComfyUI v0.3.64's NODE_DISPLAY_NAME_MAPPINGS; /object_info dumps of
# that version carry none). Every node gets an explicit title, so the API twin's _meta.title is what
# the frontend writes. The executor tests compare this table with the running ComfyUI.
CORE_TITLES = {
    "CheckpointLoaderSimple": "Load Checkpoint",
    "CLIPTextEncode": "CLIP Text Encode (Prompt)",
    "ControlNetApplyAdvanced": "Apply ControlNet",
    "ControlNetLoader": "Load ControlNet Model",
    "Canny": "Canny",
    "EmptyLatentImage": "Empty Latent Image",
    "ImageScale": "Upscale Image",
    "ImageToMask": "Convert Image to Mask",
    "KSampler": "KSampler",
    "LoadImage": "Load Image",
    "LoraLoader": "Load LoRA",
    "PreviewImage": "Preview Image",
    "SaveImage": "Save Image",
    "VAEDecode": "VAE Decode",
    "VAEEncode": "VAE Encode",
    "DualCLIPLoader": "DualCLIPLoader",
    "EmptySD3LatentImage": "EmptySD3LatentImage",
    "FluxGuidance": "FluxGuidance",
    "LoraLoaderModelOnly": "LoraLoaderModelOnly",
    "ModelSamplingFlux": "ModelSamplingFlux",
    "T5TokenizerOptions": "T5TokenizerOptions",
    "UNETLoader": "Load Diffusion Model",
    "VAELoader": "Load VAE",
}
POSITIVE_COLORS = ("#232", "#353")
NEGATIVE_COLORS = ("#322", "#533")
NOTE_COLORS = ("#432", "#653")
PACK_COLORS = ("#223", "#335")
# Node sizes: the height (and at least the width) that frontend 1.27.10 computes for each node from its
# sockets and widgets (LGraphNode.computeSize), so nothing is resized when a file opens; wider where a
# file name or a title needs it, larger where the node shows an image or text.
# scripts/check_frontend.py fails when the real frontend resizes a node on load.
DEFAULT_SIZES = {
    "CheckpointLoaderSimple": (315, 98),
    "LoraLoader": (315, 126),
    "CLIPTextEncode": (315, 120),
    "LoadImage": (315, 326),
    "ImageScale": (250, 130),
    "ImageToMask": (250, 58),
    "VAEEncode": (210, 46),
    "VAEDecode": (210, 46),
    "EmptyLatentImage": (250, 106),
    "KSampler": (315, 262),
    "SaveImage": (340, 380),
    "PreviewImage": (250, 200),
    "Canny": (250, 82),
    "ControlNetLoader": (315, 58),
    "ControlNetApplyAdvanced": (250, 186),
    "CaptureReferenceAttention": (340, 142),
    "LatentADOptimize": (340, 302),
    "ADLossGuidance": (340, 330),
    "ADSeamlessTiling": (250, 78),
    "ADTextureWindows": (250, 82),
    "ADFineTuneVAEDecoder": (250, 174),
    "UNETLoader": (315, 82),
    "DualCLIPLoader": (315, 130),
    "VAELoader": (315, 58),
    "LoraLoaderModelOnly": (315, 82),
    "T5TokenizerOptions": (315, 82),
    "ModelSamplingFlux": (250, 130),
    "FluxGuidance": (250, 58),
    "EmptySD3LatentImage": (250, 106),
}
EMPTY_PROMPT_SIZE = (300, 88)
SMALL_SAVE = (340, 200)  # two Save Image nodes and a loss curve in one column
# The empty prompt of the texture samplers: the null text of Capture and the sampler's two prompts.
EMPTY_EVERYWHERE = "Empty prompt (null text, both prompts)"
NOTE_WIDTH = 400
Pos = tuple[float, float]
READABLE_ZOOM = 0.6
GAP = 40  # between a node and the title bar of the node under it
# Columns, left to right: the Read me note, loaders and images, image processing, AD nodes, outputs.
# Links that drop far between two neighbouring columns bulge sideways, so the first gap is wider.
A, B, C, D, E = 0, 440, 865, 1175, 1575
# With several image chains stacked, their links rise far into the AD nodes: a wide gap before those too.
D_WIDE, E_WIDE = D + 50, E + 50


def pack_identity() -> tuple[str, str]:
    """The registry id and version of this pack, from pyproject.toml (what ComfyUI-Manager looks up)."""
    text = (wt.REPO / "pyproject.toml").read_text(encoding="utf-8")
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    name = re.search(r'^name\s*=\s*"([^"]+)"', project, re.M).group(1)
    version = re.search(r'^version\s*=\s*"([^"]+)"', project, re.M).group(1)
    return name, version


def unwrap(text: str) -> str:
    """Paragraphs and "- " items as single lines: the Note's text box wraps them to its width."""
    paragraphs = []
    for block in text.strip().split("\n\n"):
        items: list[str] = []
        for line in block.splitlines():
            if line.startswith("- ") or not items:
                items.append(line.strip())
            else:
                items[-1] += " " + line.strip()
        paragraphs.append("\n".join(items))
    return "\n\n".join(paragraphs) + "\n"


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    size: tuple[float, float]
    widgets: list[Any]
    title: str | None = None
    colors: tuple[str, str] | None = None
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    properties: dict = field(default_factory=dict)

    def out(self, slot: int | str = 0) -> tuple[Node, int | str]:
        return self, slot


class Graph:
    """A UI-format workflow under construction."""

    def __init__(self, name: str, defs: dict[str, wt.NodeDef]) -> None:
        self.name = name
        self.defs = defs
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.pack_id, self.pack_version = pack_identity()

    def add(self, type_: str, pos: tuple[float, float], widgets: dict | None = None,
            inputs: dict[str, tuple[Node, int | str]] | None = None, *, title: str | None = None,
            colors: tuple[str, str] | None = None, size: tuple[float, float] | None = None) -> Node:
        definition = self.defs[type_]
        widgets = dict(widgets or {})
        values = []
        for slot in definition.widget_slots:
            if slot.kind == "control":
                values.append("fixed")
            elif slot.kind == "upload":
                values.append("image")
            elif slot.input.name in widgets:
                values.append(widgets.pop(slot.input.name))
            elif "default" in slot.input.options:
                values.append(slot.input.options["default"])
            elif slot.input.type == "COMBO" and slot.input.choices:
                values.append(slot.input.choices[0])
            else:
                raise ValueError(f"{self.name}: {type_}.{slot.input.name} needs a value")
        if widgets:
            raise ValueError(f"{self.name}: {type_} has no widgets {sorted(widgets)}")
        title = title or (definition.display_name if definition.origin == "pack" else CORE_TITLES[type_])
        node = Node(len(self.nodes) + 1, type_, pos, size or DEFAULT_SIZES.get(type_, (315, 100)), values,
                    title=title, colors=colors)
        if definition.origin == "pack":
            node.properties = {"cnr_id": self.pack_id, "ver": self.pack_version, "Node name for S&R": type_}
            node.colors = node.colors or PACK_COLORS
        else:
            node.properties = {"cnr_id": "comfy-core", "ver": COMFY_VERSION, "Node name for S&R": type_}
        models = [v for v in values if isinstance(v, str) and v in MODEL_URLS]
        if models:
            node.properties["models"] = [
                {"name": m, "url": MODEL_URLS[m][1], "directory": MODEL_URLS[m][0]} for m in models
            ]
        node.inputs = [{"name": i.name, "type": i.type, "link": None} for i in definition.inputs if not i.is_widget]
        node.outputs = [
            {"name": name, "type": kind, "slot_index": slot, "links": None}
            for slot, (name, kind) in enumerate(zip(definition.output_names, definition.outputs))
        ]
        self.nodes.append(node)
        for input_name, (source, slot) in (inputs or {}).items():
            self.connect(source, slot, node, input_name)
        return node

    def connect(self, source: Node, slot: int | str, target: Node, input_name: str) -> None:
        if isinstance(slot, str):
            slot = self.defs[source.type].output_names.index(slot)
        entry = next((e for e in target.inputs if e["name"] == input_name), None)
        if entry is None:
            raise ValueError(f"{self.name}: {target.type} has no input {input_name!r}")
        kind = source.outputs[slot]["type"]
        if entry["type"] != kind:
            raise ValueError(f"{self.name}: {source.type}[{slot}] gives {kind}, {target.type}.{input_name} wants {entry['type']}")
        link_id = len(self.links) + 1
        self.links.append([link_id, source.id, slot, target.id, target.inputs.index(entry), kind])
        entry["link"] = link_id
        source.outputs[slot]["links"] = (source.outputs[slot]["links"] or []) + [link_id]

    def note(self, text: str, title: str = "Read me") -> Node:
        """The Read me note, top left where a reader starts, as tall as the graph beside it."""
        bottom = max(node.pos[1] + node.size[1] for node in self.nodes)
        node = Node(len(self.nodes) + 1, "Note", (A, 0), (NOTE_WIDTH, max(bottom, 400)), [unwrap(text)], title=title,
                    colors=NOTE_COLORS)
        self.nodes.append(node)
        return node

    @staticmethod
    def opening_view(ui: dict) -> dict:
        """The view a file opens with: the whole graph, its top-left corner just clear of the side and tool
        bars, at the zoom Fit View would pick on a 1600 x 1000 window (not above 100 %); where that zoom
        is too small to read, the note and the first nodes at a readable zoom."""
        frame = wl.bounds(ui)
        scale = min(1.0, math.floor(wl.fit_view_zoom(ui) * 100) / 100)
        if scale < wl.DETAIL_ZOOM:  # the whole graph would be blank boxes: open on the note, readable
            scale = READABLE_ZOOM
        return {"scale": scale, "offset": [round(wl.CLEAR_ORIGIN[0] / scale - frame.left, 1),
                                           round(wl.CLEAR_ORIGIN[1] / scale - frame.top, 1)]}

    def _order(self) -> dict[int, int]:
        """Execution order as the frontend stores it: nodes without inputs first, then topologically."""
        incoming = {n.id: {link[1] for link in self.links if link[3] == n.id} for n in self.nodes}
        order, done = {}, set()
        while len(done) < len(self.nodes):
            ready = [n.id for n in self.nodes if n.id not in done and incoming[n.id] <= done]
            if not ready:
                raise ValueError(f"{self.name}: the graph has a cycle")
            for node_id in ready:
                order[node_id] = len(order)
                done.add(node_id)
        return order

    def to_ui(self) -> dict:
        order = self._order()
        nodes = []
        for node in self.nodes:
            data = {
                "id": node.id,
                "type": node.type,
                "pos": list(node.pos),
                "size": list(node.size),
                "flags": {},
                "order": order[node.id],
                "mode": wt.MODE_ACTIVE,
                "inputs": node.inputs,
                "outputs": node.outputs,
            }
            if node.title:
                data["title"] = node.title
            data["properties"] = node.properties
            data["widgets_values"] = node.widgets
            if node.colors:
                data["color"], data["bgcolor"] = node.colors
            nodes.append(data)
        ui = {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "attention-distillation-workflow/" + self.name)),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {}, "frontendVersion": FRONTEND_VERSION},
            "version": 0.4,
        }
        ui["extra"]["ds"] = self.opening_view(ui)
        return ui


# -- shared pieces ----------------------------------------------------------------------------------------

Source = tuple  # (node, output slot)


def scaled_image(g: Graph, load_at: Pos, scale_at: Pos, image: str, size: int, title: str) -> Node:
    """LoadImage -> ImageScale (size x size, centre crop, like the reference code's resize)."""
    load = g.add("LoadImage", load_at, {"image": image}, title=title)
    return g.add("ImageScale", scale_at, {"upscale_method": "lanczos", "width": size, "height": size,
                                          "crop": "center"}, {"image": load.out(0)})


def below(pos: Pos, node_type: str, gap: float = GAP) -> Pos:
    """The place under a node of `node_type` at `pos`, clear of its body and the next title bar."""
    return pos[0], pos[1] + DEFAULT_SIZES[node_type][1] + wl.TITLE_HEIGHT + gap


def image_latent(g: Graph, load_at: Pos, scale_at: Pos, image: str, vae: Source, size: int, title: str,
                 gap: float = GAP) -> Node:
    """LoadImage -> ImageScale (size x size, centre crop) -> VAEEncode under the ImageScale."""
    scale = scaled_image(g, load_at, scale_at, image, size, title)
    return g.add("VAEEncode", below(scale_at, "ImageScale", gap), inputs={"pixels": scale.out(0), "vae": vae})


def label_mask(g: Graph, load_at: Pos, scale_at: Pos, image: str, size: int, title: str) -> Node:
    """A region-label map: grey levels of the red channel, resized without blending labels."""
    load = g.add("LoadImage", load_at, {"image": image}, title=title)
    scale = g.add("ImageScale", scale_at, {"upscale_method": "nearest-exact", "width": size, "height": size,
                                           "crop": "center"}, {"image": load.out(0)})
    return g.add("ImageToMask", below(scale_at, "ImageScale"), {"channel": "red"}, {"image": scale.out(0)})


def checkpoint(g: Graph, name: str, pos: Pos = (0, 0)) -> Node:
    return g.add("CheckpointLoaderSimple", pos, {"ckpt_name": name})


def empty_text(g: Graph, clip: Source, pos: tuple[float, float], title: str) -> Node:
    return g.add("CLIPTextEncode", pos, {"text": ""}, {"clip": clip}, title=title, colors=NEGATIVE_COLORS,
                 size=EMPTY_PROMPT_SIZE)


def decode_and_save(g: Graph, pos: Pos, latent: Node, vae: Source, prefix: str,
                    titles: tuple[str, str] | None = None, save_size: Pos | None = None) -> Node:
    """VAEDecode with SaveImage under it."""
    decode_title, save_title = titles or (None, None)
    decode = g.add("VAEDecode", pos, inputs={"samples": latent.out(0), "vae": vae}, title=decode_title,
                   size=(DEFAULT_SIZES["SaveImage"][0], 46) if decode_title else None)
    return g.add("SaveImage", below(pos, "VAEDecode"), {"filename_prefix": prefix}, {"images": decode.out(0)},
                 title=save_title, size=save_size)


LOSS_CURVE_SIZE = (340, 250)  # the 512x320 plot at about two thirds of its size
LOSS_CURVE_Y = 566  # under a Save Image at the top of the output column


def loss_curve(g: Graph, pos: Pos, source: Node, title: str = "Loss curve", size: Pos = LOSS_CURVE_SIZE) -> Node:
    """Preview Image of a node's `loss_curve` output: the run's losses, to judge it and compare settings."""
    return g.add("PreviewImage", pos, inputs={"images": source.out("loss_curve")}, title=title, size=size)


HEALTHY_CURVE = """
Loss curve: in a healthy run the AD loss falls fast over the first tenth to fifth of the steps,
then levels off; one that jumps or climbs means lr is too high.
"""
HEALTHY_TRANSFER_CURVE = """
Loss curve: in a healthy run the AD loss (blue) falls fast over the first tenth to fifth of the
steps, then levels off, and the content loss (orange) rises from 0 and levels off; an AD loss
that jumps or climbs means lr is too high.
"""

COMMON_NOTE = """
Every knob, its default and when to change it: README.md of the pack, or the "?" help of each
node in the node library. When an input is wrong, the nodes stop with a message that says what
to connect or change.
"""


def _capture(g: Graph, pos, model: Source, reference: Node, null: Node, mask: Node | None = None) -> Node:
    inputs = {"model": model, "reference": reference.out(0), "null_conditioning": null.out(0)}
    if mask is not None:
        inputs["reference_mask"] = mask.out(0)
    return g.add("CaptureReferenceAttention", pos, {"layers": "paper default", "attn_scale": 1.0}, inputs)


# -- the workflows ----------------------------------------------------------------------------------------

def style_transfer(defs) -> Graph:
    g = Graph("01_sd15_style_transfer", defs)
    ckpt = checkpoint(g, SD15, (B, 0))
    null = empty_text(g, ckpt.out(1), (B, 140), "Empty prompt (null text)")
    style = image_latent(g, (B, 280), (C, 380), "style-12.jpg", ckpt.out(2), 512, "Style reference")
    content = image_latent(g, (B, 646), (C, 700), "content-deer.jpg", ckpt.out(2), 512, "Content photo")
    ref = _capture(g, (D, 150), ckpt.out(0), style, null)
    result = g.add("LatentADOptimize", (D, 330), {"steps": 200, "lr": 0.05, "iterations": 1, "content_weight": 0.25,
                                                    "seed": 0, "gradient_checkpointing": "auto"},
                   {"model": ckpt.out(0), "reference": ref.out(0), "latent": content.out(0)})
    decode_and_save(g, (E, 0), result, ckpt.out(2), "AD/style_transfer")
    loss_curve(g, (E, LOSS_CURVE_Y), result)
    g.note("""
SD1.5 style transfer by optimization (Attention Distillation, the reference code's defaults).

Pick an SD1.5 checkpoint, a style image and a content photo (both are cropped to 512x512, as
in the reference code). Latent AD Optimize starts from the content latent and moves it so that
its self-attention matches the style's, while the content loss keeps the layout.

Knobs (reference code defaults):
- steps 200: timesteps of the DDIM schedule, one Adam step each.
- lr 0.05: Adam learning rate on the latent.
- iterations 1: Adam steps per timestep.
- content_weight 0.25: lower it when the photo shows through too much, raise it when the
  content dissolves.
- layers "paper default": the last 6 self-attention layers (SD1.5: 10-15).
- Capture Reference Attention needs CLIP Text Encode with EMPTY text, never your prompt.
""" + HEALTHY_TRANSFER_CURVE + COMMON_NOTE)
    return g


def appearance_transfer(defs) -> Graph:
    g = Graph("02_sd15_appearance_transfer_regions", defs)
    ckpt = checkpoint(g, SD15, (B, 0))
    null = empty_text(g, ckpt.out(1), (B, 150), "Empty prompt (null text)")
    appearance = image_latent(g, (B, 300), (C, 380), "appearance-reference.png", ckpt.out(2), 512,
                              "Appearance reference")
    ref_labels = label_mask(g, (B, 680), (C, 700), "appearance-reference-labels.png", 512, "Reference region labels")
    target = image_latent(g, (B, 1060), (C, 1080), "appearance-target.png", ckpt.out(2), 512, "Target photo")
    target_labels = label_mask(g, (B, 1440), (C, 1460), "appearance-target-labels.png", 512, "Target region labels")
    ref = _capture(g, (D_WIDE, 150), ckpt.out(0), appearance, null, ref_labels)
    result = g.add("LatentADOptimize", (D_WIDE, 330), {"steps": 200, "lr": 0.05, "iterations": 1, "content_weight": 0.25,
                                                    "seed": 0, "gradient_checkpointing": "auto"},
                   {"model": ckpt.out(0), "reference": ref.out(0), "latent": target.out(0),
                    "target_mask": target_labels.out(0)})
    decode_and_save(g, (E_WIDE, 0), result, ckpt.out(2), "AD/appearance_transfer")
    loss_curve(g, (E_WIDE, LOSS_CURVE_Y), result)
    g.note("""
SD1.5 appearance transfer with region masks (controlled synthesis).

The target photo keeps its structure and takes the appearance of the reference, region by
region: a target region attends only to the reference region with the same label.

Label maps: images where each region is painted in one grey level (black, white, mid grey...);
the red channel is read, so use pure greys. Give the reference and the target the same levels
for regions that belong together. They are resized with nearest-exact so labels never blend,
and cropped like their photos.

Knobs (reference code defaults): steps 200, lr 0.05, iterations 1, content_weight 0.25,
layers "paper default" (SD1.5: 10-15). Lower content_weight for a stronger transfer.
The null conditioning of Capture Reference Attention is CLIP Text Encode with EMPTY text.
""" + HEALTHY_TRANSFER_CURVE + COMMON_NOTE)
    return g


def texture_optimize(defs) -> Graph:
    g = Graph("03_sd15_texture_synthesis_optimize", defs)
    ckpt = checkpoint(g, SD15, (B, 0))
    null = empty_text(g, ckpt.out(1), (B, 150), "Empty prompt (null text)")
    texture = image_latent(g, (B, 300), (C, 380), "texture-17.jpg", ckpt.out(2), 512, "Texture reference")
    empty = g.add("EmptyLatentImage", (C, 660), {"width": 512, "height": 512, "batch_size": 1})
    ref = _capture(g, (D, 150), ckpt.out(0), texture, null)
    result = g.add("LatentADOptimize", (D, 330), {"steps": 300, "lr": 0.05, "iterations": 1, "content_weight": 0.0,
                                                    "seed": 0, "gradient_checkpointing": "auto"},
                   {"model": ckpt.out(0), "reference": ref.out(0), "latent": empty.out(0)})
    decode_and_save(g, (E, 0), result, ckpt.out(2), "AD/texture_optimize")
    loss_curve(g, (E, LOSS_CURVE_Y), result)
    g.note("""
SD1.5 texture synthesis by optimization.

An Empty Latent Image asks Latent AD Optimize to start from seeded noise (the seed widget) and
optimize it until its self-attention matches the texture's. Any output size works: make the
Empty Latent Image larger than the reference for a bigger texture; batch_size gives variations.

Knobs (reference code defaults for textures): steps 300, lr 0.05, iterations 1,
content_weight 0 (there is no content), layers "paper default" (SD1.5: 10-15).
Change the seed for another texture from the same reference.
The null conditioning is CLIP Text Encode with EMPTY text.
""" + HEALTHY_CURVE + COMMON_NOTE)
    return g


def texture_sampling(defs) -> Graph:
    g = Graph("04_sd15_texture_synthesis_sampling", defs)
    ckpt = checkpoint(g, SD15, (B, 130))
    null = empty_text(g, ckpt.out(1), (B, 0), EMPTY_EVERYWHERE)
    texture = image_latent(g, (B, 580), (C, 660), "texture-17.jpg", ckpt.out(2), 512, "Texture reference")
    empty = g.add("EmptyLatentImage", (D, 100), {"width": 512, "height": 512, "batch_size": 1})
    ref = _capture(g, (D, 420), ckpt.out(0), texture, null)
    guided = g.add("ADLossGuidance", (D, 600), {"lr": 0.05, "iterations": 3, "adain": False, "start_percent": 0.0,
                                                  "end_percent": 1.0, "noise_seed": 0},
                   {"model": ckpt.out(0), "reference": ref.out(0)})
    sampled = g.add("KSampler", (E, 0), {"seed": 0, "steps": 50, "cfg": 1.0, "sampler_name": "ddim",
                                          "scheduler": "ddim_uniform", "denoise": 1.0},
                    {"model": guided.out(0), "positive": null.out(0), "negative": null.out(0),
                     "latent_image": empty.out(0)})
    decode_and_save(g, (E, 320), sampled, ckpt.out(2), "AD/texture_sampling")
    g.note("""
SD1.5 texture synthesis by AD-guided sampling.

AD Loss Guidance patches the model: after every sampler step the next latent is optimized a
few Adam iterations against the AD loss (the paper's improved classifier guidance). The
prompt is empty and cfg is 1, as in the reference code; ddim + ddim_uniform reproduces its
timesteps, but any sampler and scheduler work.

Knobs (reference code defaults for textures): steps 50, cfg 1, lr 0.05, iterations 3,
AdaIN off, layers "paper default" (SD1.5: 10-15).
- iterations: each costs a forward and backward pass up to the last selected layer.
- start_percent / end_percent: guide only part of the schedule.
- noise_seed: noise added to the reference at each step; keep it fixed so re-runs reuse the
  cached reference features. The image seed is the KSampler's.
""" + COMMON_NOTE)
    return g


T2I_ROWS = {"checkpoint": 290, "lora": 430, "prompt": 0, "empty": 160, "style": 660, "capture": 540, "decode": 462}


def _t2i(defs, name: str, ckpt_name: str, size: int, style: str, prompt: str, lr: float, iterations: int,
         cfg: float, prefix: str, note: str, lora: bool = False, controlnet: bool = False) -> Graph:
    g = Graph(name, defs)
    y = T2I_ROWS
    # ControlNet's nodes sit under the AD nodes; their links rise far, so both gaps around the AD column widen.
    d, e = (D_WIDE + 40, E_WIDE + 90) if controlnet else (D, E)
    ckpt = checkpoint(g, ckpt_name, (B, y["checkpoint"]))
    model, clip = ckpt.out(0), ckpt.out(1)
    if lora:
        lora_node = g.add("LoraLoader", (B, y["lora"]), {"lora_name": LORA, "strength_model": 0.6,
                                                         "strength_clip": 0.6},
                          {"model": model, "clip": clip})
        model, clip = lora_node.out(0), lora_node.out(1)
    positive = g.add("CLIPTextEncode", (C, y["prompt"]), {"text": prompt}, {"clip": clip},
                     title="Prompt", colors=POSITIVE_COLORS, size=(250, 120))
    null = empty_text(g, clip, (C, y["empty"]), "Empty prompt (null text, negative)")
    style_latent = image_latent(g, (B, y["style"]), (C, y["style"] + 80), style, ckpt.out(2), size,
                                "Style reference")
    empty = g.add("EmptyLatentImage", (e, 0), {"width": size, "height": size, "batch_size": 1})
    ref = _capture(g, (d, y["capture"]), model, style_latent, null)
    guided = g.add("ADLossGuidance", (d, y["capture"] + 180), {"lr": lr, "iterations": iterations, "adain": True,
                                                  "start_percent": 0.0, "end_percent": 1.0, "noise_seed": 0},
                   {"model": model, "reference": ref.out(0)})
    positive_cond, negative_cond = (positive, 0), (null, 0)
    if controlnet:
        control = image_latent_free_structure(g, (B, 1050), (C, 1130), (d, 1340), size)
        loader = g.add("ControlNetLoader", (C, 1460), {"control_net_name": CONTROLNET}, size=(250, 58))
        apply = g.add("ControlNetApplyAdvanced", (d, 1100), {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0},
                      {"positive": positive.out(0), "negative": null.out(0), "control_net": loader.out(0),
                       "image": control.out(0)}, size=(DEFAULT_SIZES["ADLossGuidance"][0], 186))
        positive_cond, negative_cond = (apply, 0), (apply, 1)
    sampled = g.add("KSampler", (e, 150), {"seed": 0, "steps": 50, "cfg": cfg, "sampler_name": "ddim",
                                            "scheduler": "ddim_uniform", "denoise": 1.0},
                    {"model": guided.out(0), "positive": positive_cond, "negative": negative_cond,
                     "latent_image": empty.out(0)})
    decode_and_save(g, (e, y["decode"]), sampled, ckpt.out(2), prefix)
    g.note(note + COMMON_NOTE)
    return g


def image_latent_free_structure(g: Graph, load_at: Pos, scale_at: Pos, preview_at: Pos, size: int) -> Node:
    """The control image: a photo, cropped like the output, through the Canny edge detector."""
    scale = scaled_image(g, load_at, scale_at, "content-deer.jpg", size, "Structure photo")
    edges = g.add("Canny", below(scale_at, "ImageScale"), {"low_threshold": 0.4, "high_threshold": 0.8},
                  {"image": scale.out(0)})
    g.add("PreviewImage", preview_at, inputs={"images": edges.out(0)}, title="Control image (edges)")
    return edges


T2I_KNOBS = """
Knobs (reference code defaults for style-specific text-to-image): steps 50, cfg {cfg},
lr 0.015, iterations {iterations}, AdaIN on, layers "paper default" ({layers}).
- lr / iterations: stronger style with more; each iteration costs a forward and backward pass.
- adain: matches the latent's per-channel mean/std to the noised reference before optimizing.
- start_percent / end_percent: guide only part of the schedule.
- noise_seed: keep it fixed so re-runs reuse the cached reference features; the image seed is
  the KSampler's.
The null conditioning is CLIP Text Encode with EMPTY text; it is also the negative prompt.
ddim + ddim_uniform reproduces the reference code's timesteps; other samplers work too.
"""


def t2i_sd15(defs) -> Graph:
    return _t2i(defs, "05_sd15_style_text_to_image", SD15, 512, "style-2.jpg", "a photo of a lighthouse on a cliff",
                0.015, 3, 7.5, "AD/style_t2i_sd15", """
SD1.5 style-specific text-to-image: AD Loss Guidance + KSampler.

The prompt says what to draw, the style reference how it looks. AD Loss Guidance patches the
model so that after every sampler step the latent is optimized a few Adam iterations against
the AD loss (the paper's improved classifier guidance).
""" + T2I_KNOBS.format(cfg=7.5, iterations=3, layers="SD1.5: 10-15"))


def t2i_sdxl(defs) -> Graph:
    return _t2i(defs, "06_sdxl_style_text_to_image_1024", SDXL, 1024, "style-2.jpg",
                "a photo of a lighthouse on a cliff", 0.015, 2, 7.0, "AD/style_t2i_sdxl", """
SDXL style-specific text-to-image at 1024x1024: AD Loss Guidance + KSampler.

Same graph as the SD1.5 one with an SDXL checkpoint and 1024x1024 images. "paper default"
selects SDXL's self-attention layers 64-69 (output blocks 3-5). gradient_checkpointing "auto"
turns checkpointing on for SDXL at 1024x1024 to save memory (about one more forward pass per
iteration); set it to "off" when memory is plentiful.
""" + T2I_KNOBS.format(cfg=7, iterations=2, layers="SDXL: 64-69"))


def controlnet_ad(defs) -> Graph:
    return _t2i(defs, "07_sd15_controlnet_style", SD15, 512, "style-12.jpg", "a deer in a forest", 0.015, 3, 7.5,
                "AD/controlnet_style", """
ControlNet + AD (SD1.5): structure from a control image, style from the reference.

The structure photo goes through the Canny edge detector into ControlNet (control_v11p_sd15_canny);
the style comes from the reference through AD Loss Guidance. ControlNet steers the normal
sampling pass; the AD passes use the empty prompt without ControlNet, like the reference code's
classifier. Lower the ControlNet strength or end_percent when the edges dominate the style.
""" + T2I_KNOBS.format(cfg=7.5, iterations=3, layers="SD1.5: 10-15"), controlnet=True)


def lora_ad(defs) -> Graph:
    return _t2i(defs, "08_sd15_lora_style", SD15, 512, "style-1.jpg", "shuimobysim, a crane over a lake", 0.015, 3,
                7.5, "AD/lora_style", """
LoRA + AD (SD1.5): Load LoRA feeds both the sampler and Capture Reference Attention, so the
AD features come from the same LoRA-patched model that samples (any SD1.5 LoRA works; the one
named here is MoXin, a Chinese ink-painting style, with its trigger word in the prompt).
Lower the LoRA strengths when the LoRA's look overrides the reference.
""" + T2I_KNOBS.format(cfg=7.5, iterations=3, layers="SD1.5: 10-15"), lora=True)


TEXTURE_OPTIMIZE = {"steps": 300, "lr": 0.05, "iterations": 1, "content_weight": 0.0, "seed": 0,
                    "gradient_checkpointing": "auto"}
TEXTURE_KNOBS = """
Knobs (reference code defaults for textures): steps 300, lr 0.05, iterations 1,
content_weight 0 (there is no content), layers "paper default" (SD1.5: 10-15).
Change the seed for another texture from the same reference.
The null conditioning is CLIP Text Encode with EMPTY text.
"""


def seamless_texture(defs) -> Graph:
    g = Graph("09_sd15_seamless_texture", defs)
    ckpt = checkpoint(g, SD15, (B, 0))
    null = empty_text(g, ckpt.out(1), (B, 150), "Empty prompt (null text)")
    texture = image_latent(g, (B, 300), (C, 380), "texture-17.jpg", ckpt.out(2), 512, "Texture reference")
    empty = g.add("EmptyLatentImage", (C, 660), {"width": 512, "height": 512, "batch_size": 1})
    tiling = g.add("ADSeamlessTiling", (C, 0), {"tiling": "both"}, {"model": ckpt.out(0), "vae": ckpt.out(2)})
    ref = _capture(g, (D, 150), tiling.out("model"), texture, null)
    result = g.add("LatentADOptimize", (D, 330), dict(TEXTURE_OPTIMIZE),
                   {"model": tiling.out("model"), "reference": ref.out(0), "latent": empty.out(0)})
    decode_and_save(g, (E, 0), result, tiling.out("vae"), "AD/seamless_texture",
                    ("VAE Decode (VAE of AD Seamless Tiling)", None))
    loss_curve(g, (E, LOSS_CURVE_Y), result)
    g.note("""
SD1.5 seamless texture: a texture that tiles without a visible seam.

AD Seamless Tiling returns copies of the MODEL and the VAE whose convolutions pad around the
image edges, so whatever leaves one edge continues on the opposite one. Capture Reference
Attention and Latent AD Optimize use the tiled MODEL, and VAE Decode uses the tiled VAE: place
the saved image next to copies of itself and no seam shows.

- tiling "both": the texture repeats in every direction. "x only" makes only the left and right
  edges meet (a horizontal strip, a panorama); "y only" only the top and bottom edges.
- Decode with plain VAE Decode and the VAE from AD Seamless Tiling. Do NOT use VAE Decode
  (Tiled): each of its tiles wraps around on itself, which puts seams inside the image. The
  checkpoint's own VAE does not wrap either and leaves a seam at the edges.
- The reference is encoded with the checkpoint's VAE; the tiled VAE's encoder is not tiled
  anyway (the reference photo does not tile).
- Make the Empty Latent Image larger for a bigger tile.
""" + TEXTURE_KNOBS + HEALTHY_CURVE + COMMON_NOTE)
    return g


def large_texture(defs) -> Graph:
    g = Graph("10_sd15_large_texture", defs)
    ckpt = checkpoint(g, SD15, (B, 130))
    null = empty_text(g, ckpt.out(1), (B, 0), EMPTY_EVERYWHERE)
    texture = image_latent(g, (B, 540), (C, 620), "texture-17.jpg", ckpt.out(2), 512, "Texture reference", gap=20)
    empty = g.add("EmptyLatentImage", (D, 100), {"width": 1024, "height": 512, "batch_size": 1})
    windows = g.add("ADTextureWindows", (C, 876), {"window_size": 512, "stride": 64})
    ref = _capture(g, (D, 380), ckpt.out(0), texture, null)
    guided = g.add("ADLossGuidance", (D, 560), {"lr": 0.05, "iterations": 2, "adain": False, "start_percent": 0.0,
                                                  "end_percent": 1.0, "noise_seed": 0},
                   {"model": ckpt.out(0), "reference": ref.out(0), "windows": windows.out(0)})
    sampled = g.add("KSampler", (E, 0), {"seed": 0, "steps": 50, "cfg": 1.0, "sampler_name": "ddim",
                                          "scheduler": "ddim_uniform", "denoise": 1.0},
                    {"model": guided.out(0), "positive": null.out(0), "negative": null.out(0),
                     "latent_image": empty.out(0)})
    decode_and_save(g, (E, 320), sampled, ckpt.out(2), "AD/large_texture")
    g.note("""
SD1.5 texture larger than the reference: AD-guided sampling in overlapping windows.

The output (1024x512 here) is larger than the 512x512 reference. With AD Texture Windows
connected, AD Loss Guidance updates the latent window by window after every sampler step, like
the reference code's MultiDiffusion ("panorama") mode: each 512x512 window is compared with the
whole reference on its own, and the windows are averaged where they overlap.

Memory: only one window is in the UNet during an AD pass, so the memory of an AD pass is that
of one window however large the texture is (the sampler's own step runs on the whole latent).

Knobs (reference code defaults for MultiDiffusion textures):
- window_size 512: about the reference's size; SD1.5 works best with 512.
- stride 64: distance between windows. The cost grows with the number of windows (here 9 per
  step), so a larger stride is faster; keep it below window_size so that windows overlap.
- AD Loss Guidance: lr 0.05, iterations 2, AdaIN off.
- KSampler: the empty prompt on both sides, cfg 1, 50 steps, ddim + ddim_uniform.
- Empty Latent Image: any size (multiples of 8); a latent no larger than one window is
  optimized whole.
With AD Seamless Tiling before Capture and Guidance (and its VAE in VAE Decode) the windows wrap
around the edges and the large texture tiles as well.
""" + COMMON_NOTE)
    return g


def label_controlled_texture(defs) -> Graph:
    g = Graph("11_sd15_label_controlled_texture", defs)
    ckpt = checkpoint(g, SD15, (B, 0))
    null = empty_text(g, ckpt.out(1), (B, 150), "Empty prompt (null text)")
    empty = g.add("EmptyLatentImage", (D_WIDE, 700), {"width": 512, "height": 512, "batch_size": 1})
    texture = image_latent(g, (B, 300), (C, 380), "texture-17.jpg", ckpt.out(2), 512, "Texture reference")
    ref_labels = label_mask(g, (B, 680), (C, 700), "texture-labels.png", 512, "Reference region labels")
    layout = label_mask(g, (B, 1060), (C, 1080), "texture-layout.png", 512, "Target layout (labels)")
    ref = _capture(g, (D_WIDE, 150), ckpt.out(0), texture, null, ref_labels)
    result = g.add("LatentADOptimize", (D_WIDE, 330), dict(TEXTURE_OPTIMIZE),
                   {"model": ckpt.out(0), "reference": ref.out(0), "latent": empty.out(0),
                    "target_mask": layout.out(0)})
    decode_and_save(g, (E_WIDE, 0), result, ckpt.out(2), "AD/label_controlled_texture")
    loss_curve(g, (E_WIDE, LOSS_CURVE_Y), result)
    g.note("""
SD1.5 texture synthesis controlled by label maps (controlled synthesis).

Two label maps, each painted in a few grey levels (black, mid grey, white, ...), one level per
region: the reference's labels say which part of the texture reference is which, and the
target layout says where each part goes in the output. Each region of the layout draws only
from the reference region with the same grey level: paint the reference's moss black and its
stones white, then paint the layout black where moss should grow and white where stones go.

- Reference region labels -> reference_mask of Capture Reference Attention; crop it like the
  reference (same Upscale Image settings).
- Target layout -> target_mask of Latent AD Optimize; it covers the whole output (the Empty
  Latent Image, 512x512 here: change both sizes together).
- The red channel is read, so use pure greys; both maps are resized with nearest-exact so grey
  levels never blend. A layout level that the reference lacks draws from the whole reference.
""" + TEXTURE_KNOBS + HEALTHY_CURVE + COMMON_NOTE)
    return g


def decoder_finetune(defs) -> Graph:
    g = Graph("12_sd15_decoder_finetune", defs)
    ckpt = checkpoint(g, SD15, (B, 0))
    null = empty_text(g, ckpt.out(1), (B, 150), "Empty prompt (null text)")
    # The Upscale Image feeds the VAE Encode above it and the fine-tuning below it.
    scaled = scaled_image(g, (B, 360), (C, 440), "texture-17.jpg", 512, "Texture reference")
    texture = g.add("VAEEncode", (C, 340), inputs={"pixels": scaled.out(0), "vae": ckpt.out(2)})
    empty = g.add("EmptyLatentImage", (C, 850), {"width": 512, "height": 512, "batch_size": 1})
    ref = _capture(g, (D, 150), ckpt.out(0), texture, null)
    result = g.add("LatentADOptimize", (D, 330), dict(TEXTURE_OPTIMIZE),
                   {"model": ckpt.out(0), "reference": ref.out(0), "latent": empty.out(0)})
    tuned = g.add("ADFineTuneVAEDecoder", (C, 620), {"epochs": 75, "lr": 0.0001, "tile_size": 512, "seed": 0},
                  {"vae": ckpt.out(2), "images": scaled.out(0)})
    decode_and_save(g, (E, 0), result, ckpt.out(2), "AD/decoder_original",
                    ("VAE Decode (original decoder)", "Save Image (original decoder)"), SMALL_SAVE)
    loss_curve(g, (E, 386), result, "Loss curve (Latent AD Optimize)", (340, 164))
    decode_and_save(g, (E, 620), result, tuned.out(0), "AD/decoder_finetuned",
                    ("VAE Decode (fine-tuned decoder)", "Save Image (fine-tuned decoder)"), SMALL_SAVE)
    loss_curve(g, (D, 702), tuned, "Loss curve (decoder fine-tuning)")
    g.note("""
SD1.5 improved VAE decoding: a decoder fine-tuned on the reference (the paper's improved VAE
decoding).

The stock VAE decoder loses some of a texture's fine detail. AD Fine-Tune VAE Decoder trains a
copy of the checkpoint's VAE decoder so that decoding the reference's latent gives the
reference back (L1 loss, Adam on the decoder only, like the reference code's train_vae.py) and
returns a VAE with that decoder. The texture from Latent AD Optimize (as in workflow 03) is
decoded twice, with the fine-tuned decoder (AD/decoder_finetuned) and with the original one
(AD/decoder_original), so you can compare.

Knobs (reference code defaults):
- epochs 75: one Adam step per epoch (per tile when the image is larger than tile_size).
- lr 0.0001: higher learns faster, but the decoder forgets more of how to decode anything else.
- tile_size 512: the reference is 512x512 here (as in the reference code), one tile; lower it
  when memory runs out.

Cost: each epoch is a forward and a backward pass of the decoder at the reference's size, and
training holds a float32 copy of the decoder with its gradients and Adam state (about 0.8 GB)
plus one tile's activations. ComfyUI keeps the node's result, so changing the seed of Latent AD
Optimize does not train again.

The fine-tuned VAE is for decoding AD results of THIS reference only: it is tuned to reproduce
this texture. Fine-tune again for another reference and use the checkpoint's VAE for everything
else (VAE Encode of the reference here uses the original VAE).

Latent AD Optimize (reference code defaults for textures): steps 300, lr 0.05, iterations 1,
content_weight 0, layers "paper default" (SD1.5: 10-15). The null conditioning is CLIP Text
Encode with EMPTY text.

Loss curves: a healthy fine-tuning curve falls steadily and flattens out towards the last epochs
(still falling steeply: more epochs help; climbing or jumping: lr is too high); a healthy Latent
AD Optimize curve falls fast over the first fifth of the steps, then levels off.
""" + COMMON_NOTE)
    return g


# -- Flux -------------------------------------------------------------------------------------------------

FLUX_SIZE = 512  # the reference code's Flux notebook
FLUX_COMMON = """
Flux needs ComfyUI v0.3.64 or newer. What differs from SD: layers count the double blocks, then
the single blocks ("paper default" = the last 7, FLUX.1: 50-56, the reference's (50, 57)); the
text tokens are in the attention features, so the null text matters; every AD pass runs at
guidance 1.0, whatever FluxGuidance sets. T5TokenizerOptions (min_length 512) pads the empty
prompt to 512 T5 tokens as the reference code does (ComfyUI pads to 256, and Flux's features
depend on the padded length); it pads the prompt the same way, as the reference's pipeline does.
Memory: on a 24 GB card load the model with weight_dtype fp8_e4m3fn (or an fp8 file) and keep
gradient_checkpointing "auto" (on for Flux).
"""


def flux_loaders(g: Graph, rows: dict[str, float]) -> tuple[Source, Source, Source]:
    """DualCLIPLoader -> T5TokenizerOptions (512 tokens), Load Diffusion Model, Load VAE in the loaders' column:
    (model, padded clip, vae)."""
    clip = g.add("DualCLIPLoader", (B, rows["clip"]), {"clip_name1": CLIP_L, "clip_name2": T5XXL, "type": "flux"})
    padded = g.add("T5TokenizerOptions", (B, rows["t5"]), {"min_padding": 0, "min_length": 512},
                   {"clip": clip.out(0)}, title="T5TokenizerOptions (512 tokens)")
    unet = g.add("UNETLoader", (B, rows["unet"]), {"unet_name": FLUX_DEV, "weight_dtype": "default"})
    vae = g.add("VAELoader", (B, rows["vae"]), {"vae_name": FLUX_VAE})
    return unet.out(0), padded.out(0), vae.out(0)


def flux_sampling(g: Graph, pos: Pos, model: Source) -> Node:
    """ModelSamplingFlux at the image size (the shift of FLUX.1-dev's schedule)."""
    return g.add("ModelSamplingFlux", pos, {"max_shift": 1.15, "base_shift": 0.5, "width": FLUX_SIZE,
                                            "height": FLUX_SIZE}, {"model": model})


FLUX_T2I_KNOBS = """
Settings of the reference code's Flux notebook: FLUX.1-dev, 512x512, 50 steps euler + simple,
cfg 1, ModelSamplingFlux (max_shift 1.15, base_shift 0.5, the image size), FluxGuidance 3.5,
AD Loss Guidance lr 0.01 (SD's 0.015 is the node's default), 2 iterations, AdaIN on.
- lr / iterations: stronger style with more; each iteration costs a forward to the last
  selected block and its backward.
- noise_seed: keep it fixed so re-runs reuse the cached reference features; the image seed is
  the KSampler's.
The null conditioning is CLIP Text Encode with EMPTY text; it is also the negative prompt (cfg 1
does not use it).
"""


def _flux_t2i(defs, name: str, prompt: str, style_image: str, prefix: str, note: str, lora: bool = False) -> Graph:
    g = Graph(name, defs)
    model, clip, vae = flux_loaders(g, {"clip": 0, "t5": 200, "unet": 352, "vae": 504})
    sampling_y = 352
    if lora:
        lora_node = g.add("LoraLoaderModelOnly", (C, 352), {"lora_name": FLUX_LORA, "strength_model": 0.8},
                          {"model": model}, size=(250, 82))
        model, sampling_y = lora_node.out(0), 560  # leaves the VAE's link to VAE Decode a way through
    sampled_model = flux_sampling(g, (C, sampling_y), model)
    positive = g.add("CLIPTextEncode", (C, 0), {"text": prompt}, {"clip": clip}, title="Prompt",
                     colors=POSITIVE_COLORS, size=(250, 120))
    null = empty_text(g, clip, (C, 160), "Empty prompt (null text, negative)")
    style = image_latent(g, (B, 632), (C, 740), style_image, vae, FLUX_SIZE, "Style reference")
    guidance = g.add("FluxGuidance", (D, 0), {"guidance": 3.5}, {"conditioning": positive.out(0)})
    empty = g.add("EmptySD3LatentImage", (E, 0), {"width": FLUX_SIZE, "height": FLUX_SIZE, "batch_size": 1})
    ref = _capture(g, (D, 540), sampled_model.out(0), style, null)
    guided = g.add("ADLossGuidance", (D, 720), {"lr": 0.01, "iterations": 2, "adain": True, "start_percent": 0.0,
                                                  "end_percent": 1.0, "noise_seed": 0},
                   {"model": sampled_model.out(0), "reference": ref.out(0)})
    sampled = g.add("KSampler", (E, 150), {"seed": 0, "steps": 50, "cfg": 1.0, "sampler_name": "euler",
                                            "scheduler": "simple", "denoise": 1.0},
                    {"model": guided.out(0), "positive": guidance.out(0), "negative": null.out(0),
                     "latent_image": empty.out(0)})
    decode_and_save(g, (E, 462), sampled, vae, prefix)
    g.note(note + FLUX_T2I_KNOBS + FLUX_COMMON + COMMON_NOTE)
    return g


def t2i_flux(defs) -> Graph:
    return _flux_t2i(defs, "13_flux_style_text_to_image", "a photo of a lighthouse on a cliff", "style-2.jpg",
                     "AD/style_t2i_flux",
                     """
Flux style-specific text-to-image (FLUX.1-dev): AD Loss Guidance + KSampler, the reference
code's flux_ad.

The prompt says what to draw, the style reference how it looks. AD Loss Guidance patches the
model so that after every sampler step the latent is optimized a few Adam iterations against
the AD loss of the reference's attention (the last 7 single blocks).
""")


def lora_flux(defs) -> Graph:
    return _flux_t2i(defs, "15_flux_lora_style", "a crane over a lake", "style-1.jpg", "AD/lora_style_flux", """
LoRA + AD on Flux: LoraLoaderModelOnly feeds both the sampler and Capture Reference Attention,
so the AD features come from the same LoRA-patched model that samples (any Flux LoRA works; the
one named here is XLabs' art LoRA in ComfyUI's format). Lower strength_model when the LoRA's
look overrides the reference.
""", lora=True)


def texture_flux(defs) -> Graph:
    g = Graph("14_flux_texture_synthesis_optimize", defs)
    model, clip, vae = flux_loaders(g, {"vae": 0, "clip": 128, "t5": 328, "unet": 480})
    # Narrower than the SD graphs' empty prompt: the links rising from the column below pass beside it.
    null = g.add("CLIPTextEncode", (C, 150), {"text": ""}, {"clip": clip}, title="Empty prompt (null text)",
                 colors=NEGATIVE_COLORS, size=(230, 88))
    texture = image_latent(g, (B, 632), (C, 380), "texture-17.jpg", vae, FLUX_SIZE, "Texture reference")
    empty = g.add("EmptySD3LatentImage", (C, 660), {"width": FLUX_SIZE, "height": FLUX_SIZE, "batch_size": 1})
    sampled_model = flux_sampling(g, (C, 836), model)
    ref = _capture(g, (D, 150), sampled_model.out(0), texture, null)
    result = g.add("LatentADOptimize", (D, 330), dict(TEXTURE_OPTIMIZE),
                   {"model": sampled_model.out(0), "reference": ref.out(0), "latent": empty.out(0)})
    decode_and_save(g, (E, 0), result, vae, "AD/texture_flux")
    loss_curve(g, (E, LOSS_CURVE_Y), result)
    g.note("""
Flux texture synthesis by optimization (FLUX.1-dev): no reference implementation exists, this
is the pack's own.

An EmptySD3LatentImage (Flux's 16-channel latent) asks Latent AD Optimize to start from seeded
noise and optimize it until its attention matches the texture's. The clean latent is fed at
the model's own simple sigmas (ModelSamplingFlux's shift included), with the null text and
guidance 1.0, one Adam for the whole run.

Knobs: the SD texture defaults (steps 300, lr 0.05, iterations 1, content_weight 0, layers
"paper default" = the last 7 single blocks); they are not tuned on real Flux weights. Change
the seed for another texture; make the latent larger for a bigger one (with AD Texture
Windows for much larger ones). AD Seamless Tiling does not work on Flux (its positions do not
wrap).
""" + HEALTHY_CURVE + FLUX_COMMON + COMMON_NOTE)
    return g


BUILDERS = (style_transfer, appearance_transfer, texture_optimize, texture_sampling, t2i_sd15, t2i_sdxl,
            controlnet_ad, lora_ad, seamless_texture, large_texture, label_controlled_texture, decoder_finetune,
            t2i_flux, texture_flux, lora_flux)


def build_all(defs: dict[str, wt.NodeDef]) -> dict[str, dict]:
    """File name -> UI workflow."""
    return {wt.TITLES[g.name] + ".json": g.to_ui() for g in (build(defs) for build in BUILDERS)}


def expected_files(defs: dict[str, wt.NodeDef]) -> dict[Path, str]:
    files = {}
    for name, ui in build_all(defs).items():
        files[wt.WORKFLOWS / name] = wt.dump_json(ui)
        files[wt.API_WORKFLOWS / name] = wt.dump_json(wt.ui_to_api(ui, defs))
    return files


def main(argv: list[str]) -> int:
    from comfy_env import boot
    from pack_loader import load_pack

    boot()
    defs = wt.all_node_defs(load_pack())
    files = expected_files(defs)
    if "--check" in argv:
        stale = [str(p.relative_to(wt.REPO)) for p, text in files.items()
                 if not p.is_file() or p.read_text(encoding="utf-8") != text]
        print("\n".join(stale) if stale else "workflows/ is up to date")
        return 1 if stale else 0
    wt.API_WORKFLOWS.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(wt.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
