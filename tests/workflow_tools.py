"""Workflow tooling for the tests: node schemas (ComfyUI's /object_info format), a checker for
UI-format workflow files, and the frontend's UI -> API conversion (graphToPrompt).

The rules follow what ComfyUI's frontend (comfyui-frontend-package 1.27, shipped with ComfyUI
v0.3.64) does when it saves, loads and queues a workflow:

- widget values are positional: walk a node's inputs in `input_order` (required, then optional),
  keep the widget-typed ones (INT, FLOAT, STRING, BOOLEAN, COMBO) and read `widgets_values` in that
  order;
- an INT widget gets an extra "control after generate" value when its definition says
  `control_after_generate`, or, when the definition does not say, when it is named `seed` or
  `noise_seed` (the frontend's legacy convention); the value is not sent to the server;
- an input with `image_upload` (LoadImage) is followed by the upload button's value;
- a linked input wins over the widget value of the same name;
- node mode 2 (muted) drops the node, mode 4 (bypassed) connects consumers to the bypassed node's
  input of the same type; Note, MarkdownNote, Reroute and PrimitiveNode exist only in the frontend.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
API_WORKFLOWS = WORKFLOWS / "api"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CORE_OBJECT_INFO = FIXTURES / "object_info_core_v0.3.64.json"  # what the workflows are built from
# The core node schemas of every ComfyUI whose executor runs the shipped workflows, by version: the files
# must be sound against each (tests/fixtures/make_object_info.py writes them).
HOST_OBJECT_INFO = {"0.3.64": CORE_OBJECT_INFO, "0.33.0": FIXTURES / "object_info_core_v0.33.0.json"}

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
NOTE_TYPES = ("Note", "MarkdownNote")
VIRTUAL_TYPES = NOTE_TYPES + ("Reroute", "PrimitiveNode")
MODE_ACTIVE, MODE_MUTED, MODE_BYPASSED = 0, 2, 4

# Model files the shipped workflows name: common public file names, with what they are. The
# executor tests put a random-weight model of that kind under each name.
MODEL_FILES = {
    "checkpoints": {
        "v1-5-pruned-emaonly-fp16.safetensors": "sd15",
        "sd_xl_base_1.0.safetensors": "sdxl",
    },
    "loras": {"MoXinV1.safetensors": "sd15-lora", "art_lora_comfy_converted.safetensors": "flux-lora"},
    "controlnet": {"control_v11p_sd15_canny_fp16.safetensors": "sd15-controlnet"},
    "diffusion_models": {"flux1-dev.safetensors": "flux-dev"},
    "text_encoders": {"clip_l.safetensors": "flux-clip-l", "t5xxl_fp16.safetensors": "flux-t5xxl"},
    "vae": {"ae.safetensors": "flux-vae"},
}
# Which model folder each file-list combo reads (ComfyUI's folder_paths names).
FILE_COMBOS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class WorkflowError(ValueError):
    """A workflow file that ComfyUI would refuse or load wrongly."""


# -- node schemas --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputDef:
    name: str
    type: str  # "INT", "MODEL", ..., or "COMBO" for a list of choices
    options: dict
    choices: tuple | None
    section: str  # "required" or "optional"

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def has_control(self) -> bool:
        declared = self.options.get("control_after_generate")
        if self.type == "INT":
            return bool(declared) if declared is not None else self.name in ("seed", "noise_seed")
        return self.type == "COMBO" and bool(declared)

    @property
    def has_upload(self) -> bool:
        return self.type == "COMBO" and any(self.options.get(key) for key in UPLOAD_OPTIONS)


@dataclass(frozen=True)
class WidgetSlot:
    """One entry of `widgets_values`: an input's value, its control value or its upload button."""

    input: InputDef
    kind: str  # "value", "control", "upload"


@dataclass
class NodeDef:
    name: str
    display_name: str
    inputs: list[InputDef]
    outputs: list[str]
    output_names: list[str]
    output_node: bool
    origin: str = "core"
    widget_slots: list[WidgetSlot] = field(init=False)

    def __post_init__(self) -> None:
        slots = []
        for item in self.inputs:
            if not item.is_widget:
                continue
            slots.append(WidgetSlot(item, "value"))
            if item.has_control:
                slots.append(WidgetSlot(item, "control"))
            if item.has_upload:
                slots.append(WidgetSlot(item, "upload"))
        self.widget_slots = slots

    def input(self, name: str) -> InputDef | None:
        return next((i for i in self.inputs if i.name == name), None)


def _parse_input(name: str, spec: Any, section: str) -> InputDef:
    if not isinstance(spec, (list, tuple)) or not spec:
        raise WorkflowError(f"input {name!r}: unreadable definition {spec!r}")
    head = spec[0]
    options = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(head, (list, tuple)):
        return InputDef(name, "COMBO", options, tuple(head), section)
    if head == "COMBO":
        return InputDef(name, "COMBO", options, tuple(options.get("options", ())), section)
    return InputDef(name, str(head), options, None, section)


def node_def_from_info(info: dict, origin: str = "core") -> NodeDef:
    """A NodeDef from one /object_info entry."""
    inputs = []
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            inputs.append(_parse_input(name, info["input"][section][name], section))
    outputs = list(info.get("output", []))
    return NodeDef(
        name=info["name"],
        display_name=info.get("display_name") or info["name"],
        inputs=inputs,
        outputs=outputs,
        output_names=list(info.get("output_name") or outputs),
        output_node=bool(info.get("output_node")),
        origin=origin,
    )


def object_info_entry(name: str, cls: type, display_name: str | None) -> dict:
    """What ComfyUI's /object_info serves for a V1 node class (server.py node_info)."""
    spec = cls.INPUT_TYPES()
    return {
        "input": spec,
        "input_order": {section: list(inputs) for section, inputs in spec.items()},
        "output": list(cls.RETURN_TYPES),
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES))),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "name": name,
        "display_name": display_name or name,
        "description": getattr(cls, "DESCRIPTION", ""),
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }


def live_object_info(nodes_module: Any, name: str) -> dict:
    """/object_info of a node type of a running ComfyUI, as its server computes it (server.py node_info)."""
    cls = nodes_module.NODE_CLASS_MAPPINGS[name]
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    entry = object_info_entry(name, cls, nodes_module.NODE_DISPLAY_NAME_MAPPINGS.get(name))
    entry["output_node"] = bool(getattr(cls, "OUTPUT_NODE", False))
    return entry


def pack_node_defs(pack) -> dict[str, NodeDef]:
    names = pack.NODE_DISPLAY_NAME_MAPPINGS
    return {
        name: node_def_from_info(object_info_entry(name, cls, names.get(name)), origin="pack")
        for name, cls in pack.NODE_CLASS_MAPPINGS.items()
    }


def core_node_defs(path: Path = CORE_OBJECT_INFO) -> dict[str, NodeDef]:
    info = json.loads(path.read_text())
    return {name: node_def_from_info(entry) for name, entry in info.items()}


def all_node_defs(pack, core_path: Path = CORE_OBJECT_INFO) -> dict[str, NodeDef]:
    core = core_node_defs(core_path)
    own = pack_node_defs(pack)
    clash = set(core) & set(own)
    if clash:
        raise WorkflowError(f"the pack redefines core node types {sorted(clash)}")
    return {**core, **own}


# -- reading UI workflows -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    id: int
    origin_id: int
    origin_slot: int
    target_id: int
    target_slot: int
    type: str


def read_links(workflow: dict) -> dict[int, Link]:
    """Links in either the array form [id, origin, slot, target, slot, type] or the object form."""
    links = {}
    for raw in workflow.get("links", []):
        if isinstance(raw, dict):
            link = Link(raw["id"], raw["origin_id"], raw["origin_slot"], raw["target_id"], raw["target_slot"], raw["type"])
        else:
            link = Link(*raw)
        if link.id in links:
            raise WorkflowError(f"link id {link.id} is used twice")
        links[link.id] = link
    return links


def nodes_by_id(workflow: dict) -> dict[int, dict]:
    nodes = {}
    for node in workflow["nodes"]:
        if node["id"] in nodes:
            raise WorkflowError(f"node id {node['id']} is used twice")
        nodes[node["id"]] = node
    return nodes


def widget_values(node: dict, definition: NodeDef) -> dict[str, Any]:
    """Input name -> widget value, read positionally from `widgets_values`."""
    values = node.get("widgets_values") or []
    if isinstance(values, dict):  # some frontends (VHS-style nodes) save by name
        return {slot.input.name: values[slot.input.name] for slot in definition.widget_slots
                if slot.kind == "value" and slot.input.name in values}
    slots = definition.widget_slots
    if len(values) != len(slots):
        raise WorkflowError(
            f"node {node['id']} ({node['type']}): {len(values)} widget values for {len(slots)} widgets "
            f"{[s.input.name + ('' if s.kind == 'value' else ':' + s.kind) for s in slots]}"
        )
    return {slot.input.name: value for slot, value in zip(slots, values) if slot.kind == "value"}


# -- UI -> API ------------------------------------------------------------------------------------------

def _resolve_source(link: Link, nodes: dict[int, dict], links: dict[int, Link], seen: frozenset = frozenset()):
    """The real (node id, output slot) behind a link, following Reroutes and bypassed nodes; None when the
    source is muted or a bypassed node has no input of the link's type; "primitive" for a PrimitiveNode."""
    if link.origin_id in seen:
        raise WorkflowError(f"link {link.id} runs in a cycle through Reroute or bypassed nodes")
    source = nodes[link.origin_id]
    seen = seen | {link.origin_id}
    if source["type"] == "PrimitiveNode":
        return "primitive"
    if source["type"] == "Reroute":
        upstream = (source.get("inputs") or [{}])[0].get("link")
        return None if upstream is None else _resolve_source(links[upstream], nodes, links, seen)
    mode = source.get("mode", MODE_ACTIVE)
    if mode == MODE_MUTED:
        return None
    if mode == MODE_BYPASSED:
        inputs = source.get("inputs") or []
        candidates = ([link.origin_slot] if link.origin_slot < len(inputs) else []) + list(range(len(inputs)))
        for index in candidates:
            entry = inputs[index]
            if entry.get("link") is not None and entry.get("type") == link.type:
                return _resolve_source(links[entry["link"]], nodes, links, seen)
        return None
    return str(link.origin_id), link.origin_slot


def node_title(node: dict, definition: NodeDef) -> str:
    return node.get("title") or definition.display_name


def ui_to_api(workflow: dict, defs: dict[str, NodeDef]) -> dict[str, dict]:
    """The API-format prompt the frontend queues for this UI workflow (graphToPrompt)."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("subgraphs are not supported by this converter")
    nodes = nodes_by_id(workflow)
    links = read_links(workflow)
    prompt: dict[str, dict] = {}
    for node_id in sorted(nodes):
        node = nodes[node_id]
        if node["type"] in VIRTUAL_TYPES or node.get("mode", MODE_ACTIVE) in (MODE_MUTED, MODE_BYPASSED):
            continue
        definition = defs.get(node["type"])
        if definition is None:
            raise WorkflowError(f"node {node_id}: unknown node type {node['type']!r}")
        inputs: dict[str, Any] = dict(widget_values(node, definition))
        for entry in node.get("inputs") or []:
            if entry.get("link") is None:
                continue
            source = _resolve_source(links[entry["link"]], nodes, links)
            if source == "primitive":
                continue  # the target widget already holds the primitive's value
            if source is None:
                if definition.input(entry["name"]) is None or not definition.input(entry["name"]).is_widget:
                    inputs.pop(entry["name"], None)
                continue
            inputs[entry["name"]] = [source[0], source[1]]
        prompt[str(node_id)] = {
            "inputs": inputs,
            "class_type": node["type"],
            "_meta": {"title": node_title(node, definition)},
        }
    return prompt


# -- checking UI workflows --------------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_widget_value(node_type: str, item: InputDef, value: Any) -> str | None:
    """Why `value` does not fit widget `item`, or None."""
    options = item.options
    if item.type == "INT":
        if not (_is_number(value) and float(value).is_integer()):
            return f"{value!r} is not a whole number"
    elif item.type == "FLOAT":
        if not _is_number(value):
            return f"{value!r} is not a number"
    elif item.type == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{value!r} is not true/false"
    elif item.type == "STRING":
        if not isinstance(value, str):
            return f"{value!r} is not text"
    elif item.type == "COMBO":
        return _check_combo(node_type, item, value)
    if item.type in ("INT", "FLOAT"):
        if "min" in options and value < options["min"]:
            return f"{value} is below the minimum {options['min']}"
        if "max" in options and value > options["max"]:
            return f"{value} is above the maximum {options['max']}"
    return None


def _check_combo(node_type: str, item: InputDef, value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return f"{value!r} is not a choice"
    folder = FILE_COMBOS.get((node_type, item.name))
    if folder is not None:
        known = MODEL_FILES.get(folder, {})
        if value not in known:
            return f"{value!r} is not one of the model files the workflows may name in {folder}/: {sorted(known)}"
        return None
    if item.has_upload:  # a file of the input folder, whatever the server listed when the schema was dumped
        if "/" in value or "\\" in value or not value.lower().endswith(IMAGE_EXTENSIONS):
            return f"{value!r} is not an image file name of the input folder"
        return None
    if value not in (item.choices or ()):
        return f"{value!r} is not among {list(item.choices or ())}"
    return None


def check_workflow(workflow: dict, defs: dict[str, NodeDef]) -> list[str]:
    """Everything wrong with a UI-format workflow, as readable lines; empty when it is sound."""
    problems: list[str] = []
    try:
        nodes = nodes_by_id(workflow)
        links = read_links(workflow)
    except (WorkflowError, KeyError, TypeError) as error:
        return [f"unreadable workflow: {error}"]
    if workflow.get("version") != 0.4:
        problems.append(f"version is {workflow.get('version')!r}, the frontend's format is 0.4")
    if nodes and workflow.get("last_node_id", -1) < max(nodes):
        problems.append("last_node_id is below the highest node id")
    if links and workflow.get("last_link_id", -1) < max(links):
        problems.append("last_link_id is below the highest link id")

    for node_id, node in nodes.items():
        where = f"node {node_id} ({node.get('type')})"
        kind = node.get("type")
        if kind in NOTE_TYPES:
            text = node.get("widgets_values") or [""]
            if not (isinstance(text[0], str) and text[0].strip()):
                problems.append(f"{where}: empty note")
            continue
        if kind in VIRTUAL_TYPES:
            continue
        definition = defs.get(kind)
        if definition is None:
            problems.append(f"{where}: unknown node type")
            continue
        if node.get("mode", MODE_ACTIVE) not in (MODE_ACTIVE, MODE_MUTED, MODE_BYPASSED):
            problems.append(f"{where}: unknown mode {node.get('mode')!r}")
        problems += _check_node_slots(where, node, definition, links)
        try:
            values = node.get("widgets_values") or []
            widget_values(node, definition)
        except WorkflowError as error:
            problems.append(str(error))
            continue
        for slot, value in zip(definition.widget_slots, values):
            if slot.kind == "control":
                if value not in CONTROL_VALUES:
                    problems.append(f"{where}: {slot.input.name} control value {value!r} is not one of {CONTROL_VALUES}")
            elif slot.kind == "upload":
                if value != "image":
                    problems.append(f"{where}: the upload button's value is {value!r}, the frontend saves 'image'")
            else:
                why = check_widget_value(kind, slot.input, value)
                if why:
                    problems.append(f"{where}: {slot.input.name} = {why}")

    for link in links.values():
        problems += _check_link(link, nodes, defs)
    return problems


def _check_node_slots(where: str, node: dict, definition: NodeDef, links: dict[int, Link]) -> list[str]:
    problems = []
    names = set()
    for index, entry in enumerate(node.get("inputs") or []):
        name = entry.get("name")
        names.add(name)
        item = definition.input(name)
        if item is None:
            problems.append(f"{where}: input {name!r} is not an input of {definition.name}")
            continue
        wanted = item.type
        if entry.get("type") != wanted and not (item.type == "COMBO" and entry.get("type") == "COMBO"):
            problems.append(f"{where}: input {name!r} has type {entry.get('type')!r}, the node wants {wanted!r}")
        if item.is_widget and (entry.get("widget") or {}).get("name") != name:
            problems.append(f"{where}: widget input {name!r} lacks widget.name")
        link_id = entry.get("link")
        if link_id is not None:
            link = links.get(link_id)
            if link is None:
                problems.append(f"{where}: input {name!r} refers to missing link {link_id}")
            elif (link.target_id, link.target_slot) != (node["id"], index):
                problems.append(f"{where}: link {link_id} does not end at input {index} ({name})")
    for item in definition.inputs:
        if item.section == "required" and not item.is_widget:
            entry = next((e for e in node.get("inputs") or [] if e.get("name") == item.name), None)
            if entry is None or entry.get("link") is None:
                problems.append(f"{where}: required input {item.name!r} ({item.type}) is not connected")
    outputs = node.get("outputs") or []
    if [o.get("type") for o in outputs] != definition.outputs:
        problems.append(f"{where}: outputs {[o.get('type') for o in outputs]} differ from the node's {definition.outputs}")
    for slot, output in enumerate(outputs):
        for link_id in output.get("links") or []:
            link = links.get(link_id)
            if link is None or (link.origin_id, link.origin_slot) != (node["id"], slot):
                problems.append(f"{where}: output {slot} lists link {link_id}, which does not start there")
    return problems


def _check_link(link: Link, nodes: dict[int, dict], defs: dict[str, NodeDef]) -> list[str]:
    where = f"link {link.id}"
    origin, target = nodes.get(link.origin_id), nodes.get(link.target_id)
    if origin is None or target is None:
        return [f"{where}: connects a missing node"]
    problems = []
    origin_def, target_def = defs.get(origin["type"]), defs.get(target["type"])
    if origin_def is not None:
        if link.origin_slot >= len(origin_def.outputs):
            return [f"{where}: {origin['type']} has no output {link.origin_slot}"]
        if origin_def.outputs[link.origin_slot] != link.type:
            problems.append(f"{where}: starts at {origin['type']} output {origin_def.outputs[link.origin_slot]!r}, "
                            f"but carries {link.type!r}")
        if link.id not in ((origin.get("outputs") or [{}] * (link.origin_slot + 1))[link.origin_slot].get("links") or []):
            problems.append(f"{where}: missing from the links of {origin['type']} output {link.origin_slot}")
    inputs = target.get("inputs") or []
    if link.target_slot >= len(inputs):
        return problems + [f"{where}: {target['type']} has no input slot {link.target_slot}"]
    entry = inputs[link.target_slot]
    if entry.get("link") != link.id:
        problems.append(f"{where}: input {entry.get('name')!r} of {target['type']} does not refer back to it")
    if target_def is not None:
        item = target_def.input(entry.get("name"))
        if item is not None and item.type != link.type:
            problems.append(f"{where}: carries {link.type!r} into {target['type']}.{item.name}, which wants {item.type!r}")
    return problems


# -- files ------------------------------------------------------------------------------------------------

# Each workflow has a slug (its number and what it does, e.g. "01_sd15_style_transfer": the tests' and the
# pictures' name for it) and a file named by its title ("01 Style transfer, SD1.5.json"), because ComfyUI's
# Templates browser shows a custom node pack's workflow by its file name.
TITLES = {
    "01_sd15_style_transfer": "01 Style transfer, SD1.5",
    "02_sd15_appearance_transfer_regions": "02 Appearance transfer by regions, SD1.5",
    "03_sd15_texture_synthesis_optimize": "03 Texture synthesis by optimization, SD1.5",
    "04_sd15_texture_synthesis_sampling": "04 Texture synthesis by guided sampling, SD1.5",
    "05_sd15_style_text_to_image": "05 Text to image styled by a reference, SD1.5",
    "06_sdxl_style_text_to_image_1024": "06 Text to image styled by a reference, SDXL",
    "07_sd15_controlnet_style": "07 ControlNet with a reference style, SD1.5",
    "08_sd15_lora_style": "08 LoRA with a reference style, SD1.5",
    "09_sd15_seamless_texture": "09 Seamless texture that tiles, SD1.5",
    "10_sd15_large_texture": "10 Texture larger than its reference, SD1.5",
    "11_sd15_label_controlled_texture": "11 Texture laid out by label maps, SD1.5",
    "12_sd15_decoder_finetune": "12 Texture decoded by a tuned VAE decoder, SD1.5",
    "13_flux_style_text_to_image": "13 Text to image styled by a reference, Flux",
    "14_flux_texture_synthesis_optimize": "14 Texture synthesis by optimization, Flux",
    "15_flux_lora_style": "15 LoRA with a reference style, Flux",
}


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.json"))


def workflow_path(slug: str, api: bool = False) -> Path:
    """The UI file (or its API twin) of the workflow named `slug`."""
    return (API_WORKFLOWS if api else WORKFLOWS) / f"{TITLES[slug]}.json"


def slug_of(path: Path) -> str:
    return next(slug for slug, title in TITLES.items() if title == path.stem)


def api_twin(path: Path) -> Path:
    return API_WORKFLOWS / path.name


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
