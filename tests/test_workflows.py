"""The shipped workflows: frontend format, node types, links, widget values, API twins, and the settings
each one promises (the reference code's defaults, DESIGN §2.6)."""

from __future__ import annotations

import copy
import json

import pytest
import workflow_build
import workflow_tools as wt
from fixtures.make_object_info import CORE_TYPES, DEFAULT_SOURCE, TARGET, trim

NAMES = [
    "01_sd15_style_transfer",
    "02_sd15_appearance_transfer_regions",
    "03_sd15_texture_synthesis_optimize",
    "04_sd15_texture_synthesis_sampling",
    "05_sd15_style_text_to_image",
    "06_sdxl_style_text_to_image_1024",
    "07_sd15_controlnet_style",
    "08_sd15_lora_style",
    "09_sd15_seamless_texture",
    "10_sd15_large_texture",
    "11_sd15_label_controlled_texture",
    "12_sd15_decoder_finetune",
    "13_flux_style_text_to_image",
    "14_flux_texture_synthesis_optimize",
    "15_flux_lora_style",
]
FLUX_NAMES = [name for name in NAMES if "_flux_" in name]


@pytest.fixture(scope="module")
def defs(pack):
    return wt.all_node_defs(pack)


def _ui(name: str) -> dict:
    return wt.load_json(wt.workflow_path(name))


def _api(name: str) -> dict:
    return wt.load_json(wt.workflow_path(name, api=True))


def _only(api: dict, class_type: str) -> dict:
    found = [node for node in api.values() if node["class_type"] == class_type]
    assert len(found) == 1, f"expected one {class_type}, found {len(found)}"
    return found[0]["inputs"]


def _source(api: dict, ref: list) -> dict:
    return api[ref[0]]


def _id(api: dict, class_type: str) -> str:
    found = [node_id for node_id, node in api.items() if node["class_type"] == class_type]
    assert len(found) == 1, f"expected one {class_type}, found {len(found)}"
    return found[0]


def _note(name: str) -> str:
    return "\n".join(n["widgets_values"][0] for n in _ui(name)["nodes"] if n["type"] in wt.NOTE_TYPES)


# -- the fixture and the file set --------------------------------------------------------------------------

def test_core_fixture_is_the_trimmed_object_info_dump():
    if not DEFAULT_SOURCE.is_file():
        pytest.skip(f"no object_info dump at {DEFAULT_SOURCE.name} beside the repository")
    expected = trim(json.loads(DEFAULT_SOURCE.read_text(encoding="utf-8")))
    assert json.loads(TARGET.read_text(encoding="utf-8")) == expected


def test_fixture_holds_every_listed_core_type():
    assert sorted(wt.core_node_defs()) == sorted(CORE_TYPES)


def test_the_workflow_set():
    assert list(wt.TITLES) == NAMES
    assert [p.stem for p in wt.workflow_files()] == [wt.TITLES[name] for name in NAMES]
    assert sorted(p.stem for p in wt.API_WORKFLOWS.glob("*.json")) == [wt.TITLES[name] for name in NAMES]


def test_files_are_what_the_builder_writes(defs):
    for path, text in workflow_build.expected_files(defs).items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(wt.REPO)} differs from tests/workflow_build.py's output; "
            "run `python tests/workflow_build.py`"
        )


# -- every workflow ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_sound(name, defs):
    workflow = _ui(name)
    assert isinstance(workflow["nodes"], list) and isinstance(workflow["links"], list)
    assert wt.check_workflow(workflow, defs) == []


@pytest.mark.parametrize("version", sorted(wt.HOST_OBJECT_INFO))
def test_every_workflow_is_sound_and_converts_alike_on_every_host(pack, version, defs):
    """The files are built from v0.3.64's schemas and run in both executors: v0.33.0's schemas (new categories,
    options as dicts) must read every widget the same way, and nothing may differ but the IMAGE output v0.33.0
    gives SaveImage and PreviewImage, which the frontend adds on load and nothing links to."""
    host_defs = wt.all_node_defs(pack, wt.HOST_OBJECT_INFO[version])
    assert sorted(n for n in host_defs if host_defs[n].origin != "pack") == sorted(CORE_TYPES)
    added_outputs = {f"node {n['id']} ({n['type']}): outputs [] differ from the node's ['IMAGE']"
                     for name in NAMES for n in _ui(name)["nodes"] if n["type"] in ("SaveImage", "PreviewImage")}
    for name in NAMES:
        assert set(wt.check_workflow(_ui(name), host_defs)) <= added_outputs, (version, name)
        assert wt.ui_to_api(_ui(name), host_defs) == wt.ui_to_api(_ui(name), defs), (version, name)


@pytest.mark.parametrize("name", NAMES)
def test_only_core_and_pack_nodes_and_a_note(name, defs):
    workflow = _ui(name)
    types = {node["type"] for node in workflow["nodes"]}
    notes = [n for n in workflow["nodes"] if n["type"] in wt.NOTE_TYPES]
    assert notes, "every workflow explains its knobs in a Note"
    assert any("reference code" in n["widgets_values"][0] for n in notes)
    assert types - set(wt.NOTE_TYPES) <= set(CORE_TYPES) | {d for d in defs if defs[d].origin == "pack"}
    assert {"CaptureReferenceAttention"} <= types
    for node in workflow["nodes"]:
        if node["type"] not in wt.NOTE_TYPES:
            assert node.get("title"), f"node {node['id']} needs a title (the API twin's _meta.title)"


@pytest.mark.parametrize("name", NAMES)
def test_ui_converts_to_its_api_twin(name, defs):
    assert wt.ui_to_api(_ui(name), defs) == _api(name)


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_links_connect_matching_types(name, defs):
    api = _api(name)
    for node_id, node in api.items():
        definition = defs[node["class_type"]]
        for input_name, value in node["inputs"].items():
            item = definition.input(input_name)
            assert item is not None, f"{node_id}: {node['class_type']} has no input {input_name}"
            if isinstance(value, list):
                source = api[value[0]]
                produced = defs[source["class_type"]].outputs[value[1]]
                assert produced == item.type, f"{node_id}.{input_name}: {produced} into {item.type}"
            else:
                assert item.is_widget and wt.check_widget_value(node["class_type"], item, value) is None
        for item in definition.inputs:
            if item.section == "required":
                assert item.name in node["inputs"], f"{node_id}: required {item.name} missing"


@pytest.mark.parametrize("name", NAMES)
def test_null_conditioning_is_an_empty_prompt(name):
    api = _api(name)
    for node in api.values():
        if node["class_type"] == "CaptureReferenceAttention":
            null = _source(api, node["inputs"]["null_conditioning"])
            assert null["class_type"] == "CLIPTextEncode" and null["inputs"]["text"] == ""


@pytest.mark.parametrize("name", NAMES)
def test_reference_and_consumer_share_the_model(name):
    api = _api(name)
    capture = _only(api, "CaptureReferenceAttention")
    for node in api.values():
        if node["class_type"] in ("LatentADOptimize", "ADLossGuidance"):
            assert node["inputs"]["model"] == capture["model"]


# -- what each workflow promises (DESIGN §2.6) -----------------------------------------------------------

def _checkpoint(api):
    return _only(api, "CheckpointLoaderSimple")["ckpt_name"]


@pytest.mark.parametrize("name,steps,content_weight,start", [
    ("01_sd15_style_transfer", 200, 0.25, "VAEEncode"),
    ("02_sd15_appearance_transfer_regions", 200, 0.25, "VAEEncode"),
    ("03_sd15_texture_synthesis_optimize", 300, 0.0, "EmptyLatentImage"),
    ("09_sd15_seamless_texture", 300, 0.0, "EmptyLatentImage"),
    ("11_sd15_label_controlled_texture", 300, 0.0, "EmptyLatentImage"),
    ("12_sd15_decoder_finetune", 300, 0.0, "EmptyLatentImage"),
])
def test_optimize_workflows_use_reference_defaults(name, steps, content_weight, start):
    api = _api(name)
    optimize = _only(api, "LatentADOptimize")
    assert (optimize["steps"], optimize["lr"], optimize["iterations"], optimize["content_weight"]) == (
        steps, 0.05, 1, content_weight)
    assert _source(api, optimize["latent"])["class_type"] == start
    assert _only(api, "CaptureReferenceAttention")["layers"] == "paper default"
    assert _checkpoint(api) == workflow_build.SD15
    for node in api.values():
        if node["class_type"] == "ImageScale":
            assert (node["inputs"]["width"], node["inputs"]["height"]) == (512, 512)


@pytest.mark.parametrize("name,images", [
    ("02_sd15_appearance_transfer_regions", ("appearance-reference-labels.png", "appearance-target-labels.png")),
    ("11_sd15_label_controlled_texture", ("texture-labels.png", "texture-layout.png")),
])
def test_region_masks_are_connected(name, images):
    api = _api(name)
    reference_mask = _source(api, _only(api, "CaptureReferenceAttention")["reference_mask"])
    target_mask = _source(api, _only(api, "LatentADOptimize")["target_mask"])
    for mask, image in zip((reference_mask, target_mask), images):
        assert mask["class_type"] == "ImageToMask"
        scale = _source(api, mask["inputs"]["image"])
        assert scale["inputs"]["upscale_method"] == "nearest-exact", "label maps must not blend grey levels"
        assert _source(api, scale["inputs"]["image"])["inputs"]["image"] == image


@pytest.mark.parametrize("name,ckpt,lr,iterations,adain,cfg,size", [
    ("04_sd15_texture_synthesis_sampling", workflow_build.SD15, 0.05, 3, False, 1.0, 512),
    ("05_sd15_style_text_to_image", workflow_build.SD15, 0.015, 3, True, 7.5, 512),
    ("06_sdxl_style_text_to_image_1024", workflow_build.SDXL, 0.015, 2, True, 7.0, 1024),
    ("07_sd15_controlnet_style", workflow_build.SD15, 0.015, 3, True, 7.5, 512),
    ("08_sd15_lora_style", workflow_build.SD15, 0.015, 3, True, 7.5, 512),
])
def test_guidance_workflows_use_reference_defaults(name, ckpt, lr, iterations, adain, cfg, size):
    api = _api(name)
    guidance = _only(api, "ADLossGuidance")
    assert (guidance["lr"], guidance["iterations"], guidance["adain"]) == (lr, iterations, adain)
    sampler = _only(api, "KSampler")
    assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (
        50, cfg, "ddim", "ddim_uniform")
    assert _source(api, sampler["model"])["class_type"] == "ADLossGuidance"
    latent = _only(api, "EmptyLatentImage")
    assert (latent["width"], latent["height"]) == (size, size)
    assert _checkpoint(api) == ckpt


def test_texture_sampling_has_no_prompt():
    api = _api("04_sd15_texture_synthesis_sampling")
    sampler = _only(api, "KSampler")
    assert sampler["positive"] == sampler["negative"] == _only(api, "CaptureReferenceAttention")["null_conditioning"]


def test_controlnet_workflow_steers_the_sampler():
    api = _api("07_sd15_controlnet_style")
    sampler = _only(api, "KSampler")
    assert _source(api, sampler["positive"])["class_type"] == "ControlNetApplyAdvanced"
    assert sampler["positive"][1] == 0 and sampler["negative"][1] == 1
    apply = _only(api, "ControlNetApplyAdvanced")
    assert _source(api, apply["image"])["class_type"] == "Canny"
    assert _only(api, "ControlNetLoader")["control_net_name"] in wt.MODEL_FILES["controlnet"]


def test_lora_workflow_feeds_the_lora_model_everywhere():
    api = _api("08_sd15_lora_style")
    lora_id = next(k for k, v in api.items() if v["class_type"] == "LoraLoader")
    assert _only(api, "CaptureReferenceAttention")["model"] == [lora_id, 0]
    for node in api.values():
        if node["class_type"] == "CLIPTextEncode":
            assert node["inputs"]["clip"] == [lora_id, 1]


def test_seamless_workflow_tiles_the_model_and_decodes_with_the_tiled_vae():
    api = _api("09_sd15_seamless_texture")
    ckpt, tiling_id = _id(api, "CheckpointLoaderSimple"), _id(api, "ADSeamlessTiling")
    tiling = api[tiling_id]["inputs"]
    assert (tiling["model"], tiling["vae"], tiling["tiling"]) == ([ckpt, 0], [ckpt, 2], "both")
    assert _only(api, "CaptureReferenceAttention")["model"] == [tiling_id, 0]
    assert _only(api, "LatentADOptimize")["model"] == [tiling_id, 0]
    decode = _only(api, "VAEDecode")
    assert decode["vae"] == [tiling_id, 1], "the seamless result must be decoded with the tiled VAE"
    assert _source(api, decode["samples"])["class_type"] == "LatentADOptimize"
    assert _only(api, "VAEEncode")["vae"] == [ckpt, 2]
    assert not any(node["class_type"] == "VAEDecodeTiled" for node in api.values())
    latent = _only(api, "EmptyLatentImage")
    assert (latent["width"], latent["height"]) == (512, 512)


def test_large_texture_samples_in_windows(pack):
    import importlib

    api = _api("10_sd15_large_texture")
    windows_id = _id(api, "ADTextureWindows")
    windows = api[windows_id]["inputs"]
    assert (windows["window_size"], windows["stride"]) == (512, 64)
    guidance = _only(api, "ADLossGuidance")
    assert guidance["windows"] == [windows_id, 0]
    assert (guidance["lr"], guidance["iterations"], guidance["adain"]) == (0.05, 2, False)
    assert guidance["model"] == _only(api, "CaptureReferenceAttention")["model"]
    sampler = _only(api, "KSampler")
    assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (
        50, 1.0, "ddim", "ddim_uniform")
    assert _source(api, sampler["model"])["class_type"] == "ADLossGuidance"
    assert sampler["positive"] == sampler["negative"] == _only(api, "CaptureReferenceAttention")["null_conditioning"]
    latent = _only(api, "EmptyLatentImage")
    assert (latent["width"], latent["height"]) == (1024, 512), "wider than the 512x512 reference"
    assert sampler["latent_image"] == [_id(api, "EmptyLatentImage"), 0]
    assert _only(api, "ImageScale")["width"] == 512
    plan = importlib.import_module(f"{pack.__name__}.guidance.windows").plan_windows
    node = pack.NODE_CLASS_MAPPINGS["ADTextureWindows"]()
    (settings,) = node.windows(windows["window_size"], windows["stride"])
    assert len(plan(latent["height"] // 8, latent["width"] // 8, settings)) == 9, "the note promises 9 windows"
    assert _checkpoint(api) == workflow_build.SD15


def test_label_controlled_texture_layout_covers_the_output():
    api = _api("11_sd15_label_controlled_texture")
    optimize = _only(api, "LatentADOptimize")
    latent = _source(api, optimize["latent"])["inputs"]
    layout_scale = _source(api, _source(api, optimize["target_mask"])["inputs"]["image"])["inputs"]
    assert (layout_scale["width"], layout_scale["height"]) == (latent["width"], latent["height"])
    reference_scale = _source(api, _source(api, _only(api, "CaptureReferenceAttention")["reference_mask"])
                              ["inputs"]["image"])["inputs"]
    encode = _source(api, _only(api, "CaptureReferenceAttention")["reference"])
    photo_scale = _source(api, encode["inputs"]["pixels"])["inputs"]
    assert (reference_scale["width"], reference_scale["height"], reference_scale["crop"]) == (
        photo_scale["width"], photo_scale["height"], photo_scale["crop"]), "labels are cropped like the reference"


def test_decoder_finetune_decodes_with_the_tuned_vae():
    api = _api("12_sd15_decoder_finetune")
    ckpt, tuned_id = _id(api, "CheckpointLoaderSimple"), _id(api, "ADFineTuneVAEDecoder")
    tuned = api[tuned_id]["inputs"]
    assert (tuned["epochs"], tuned["lr"], tuned["tile_size"]) == (75, 0.0001, 512)
    assert tuned["vae"] == [ckpt, 2]
    encode = _source(api, _only(api, "CaptureReferenceAttention")["reference"])
    assert tuned["images"] == encode["inputs"]["pixels"], "trained on the reference the AD result comes from"
    assert encode["inputs"]["vae"] == [ckpt, 2]
    optimize_id = _id(api, "LatentADOptimize")
    decoders = {tuple(node["inputs"]["vae"]): node_id for node_id, node in api.items()
                if node["class_type"] == "VAEDecode"}
    assert set(decoders) == {(tuned_id, 0), (ckpt, 2)}, "decoded with the fine-tuned and with the original VAE"
    prefixes = {}
    for vae, decode_id in decoders.items():
        assert api[decode_id]["inputs"]["samples"] == [optimize_id, 0]
        saves = [n for n in api.values() if n["class_type"] == "SaveImage" and n["inputs"]["images"] == [decode_id, 0]]
        assert len(saves) == 1
        prefixes[vae] = saves[0]["inputs"]["filename_prefix"]
    assert prefixes == {(tuned_id, 0): "AD/decoder_finetuned", (ckpt, 2): "AD/decoder_original"}


@pytest.mark.parametrize("name,phrases", [
    ("09_sd15_seamless_texture", ("x only", "y only", "VAE Decode (Tiled)", "no seam")),
    ("10_sd15_large_texture", ("MultiDiffusion", "one window", "larger stride is faster", "iterations 2")),
    ("11_sd15_label_controlled_texture", ("grey level", "same grey level", "nearest-exact")),
    ("12_sd15_decoder_finetune", ("epochs 75", "lr 0.0001", "train_vae.py", "THIS reference", "Cost")),
])
def test_new_notes_explain_their_knobs(name, phrases):
    note = _note(name)
    for phrase in phrases:
        assert phrase in note, phrase


def test_model_files_carry_download_links():
    for name in NAMES:
        for node in _ui(name)["nodes"]:
            named = [v for v in node.get("widgets_values") or [] if any(v in files for files in wt.MODEL_FILES.values())]
            if named:  # DualCLIPLoader names two files
                models = node["properties"]["models"]
                assert [m["name"] for m in models] == named and all(m["url"].startswith("https://") for m in models)


# -- the checker and the converter catch broken workflows ------------------------------------------------------

def _node(workflow: dict, type_: str) -> dict:
    return next(n for n in workflow["nodes"] if n["type"] == type_)


def _problems_after(defs, name: str, change) -> list[str]:
    workflow = copy.deepcopy(_ui(name))
    change(workflow)
    return wt.check_workflow(workflow, defs)


@pytest.mark.parametrize("change,expected", [
    (lambda w: _node(w, "LatentADOptimize")["widgets_values"].pop(), "widget values for"),
    (lambda w: _node(w, "LatentADOptimize")["widgets_values"].__setitem__(0, 5000), "above the maximum"),
    (lambda w: _node(w, "LatentADOptimize")["widgets_values"].__setitem__(1, -0.1), "below the minimum"),
    (lambda w: _node(w, "LatentADOptimize")["widgets_values"].__setitem__(0, 2.5), "not a whole number"),
    (lambda w: _node(w, "LatentADOptimize")["widgets_values"].__setitem__(5, "sometimes"), "control value"),
    (lambda w: _node(w, "ImageScale")["widgets_values"].__setitem__(0, "magic"), "is not among"),
    (lambda w: _node(w, "CheckpointLoaderSimple")["widgets_values"].__setitem__(0, "mine.ckpt"), "model files"),
    (lambda w: _node(w, "LoadImage")["widgets_values"].__setitem__(1, "upload"), "upload button"),
    (lambda w: _node(w, "LoadImage")["widgets_values"].__setitem__(0, "notes.txt"), "image file name"),
    (lambda w: w["nodes"].append({**_node(w, "VAEDecode"), "id": 99, "type": "ADFancyNode"}), "unknown node type"),
    (lambda w: w["links"].__setitem__(0, [*w["links"][0][:5], "IMAGE"]), "carries 'IMAGE'"),
    (lambda w: _node(w, "CaptureReferenceAttention")["inputs"][2].__setitem__("link", None), "not connected"),
    (lambda w: w.__setitem__("version", 0.3), "version"),
])
def test_checker_reports_broken_workflows(defs, change, expected):
    problems = _problems_after(defs, "01_sd15_style_transfer", change)
    assert any(expected in p for p in problems), problems


def test_checker_reports_a_link_into_the_wrong_slot(defs):
    def swap(workflow):
        capture = _node(workflow, "CaptureReferenceAttention")
        links = {link[0]: link for link in workflow["links"]}
        reference_link = links[capture["inputs"][1]["link"]]  # LATENT from VAEEncode
        reference_link[4] = 0  # now claims to end at `model`
        capture["inputs"][0]["link"], capture["inputs"][1]["link"] = reference_link[0], None

    problems = _problems_after(defs, "01_sd15_style_transfer", swap)
    assert any("'LATENT' into CaptureReferenceAttention.model" in p for p in problems), problems


def _mini_graph():
    """LoadImage -> Reroute -> ImageScale (bypassed) -> ImageScale whose width comes from a PrimitiveNode,
    and a muted ImageScale: the frontend-only rules of the conversion."""
    return {
        "last_node_id": 6, "last_link_id": 5, "version": 0.4,
        "nodes": [
            {"id": 1, "type": "LoadImage", "mode": 0, "inputs": [],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}, {"name": "MASK", "type": "MASK"}],
             "widgets_values": ["a.png", "image"]},
            {"id": 2, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}],
             "outputs": [{"name": "", "type": "IMAGE", "links": [2]}]},
            {"id": 3, "type": "ImageScale", "mode": 4, "inputs": [{"name": "image", "type": "IMAGE", "link": 2}],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [3]}],
             "widgets_values": ["lanczos", 64, 64, "center"]},
            {"id": 4, "type": "ImageScale", "mode": 0, "inputs": [
                {"name": "image", "type": "IMAGE", "link": 3},
                {"name": "width", "type": "INT", "widget": {"name": "width"}, "link": 4}],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": []}],
             "widgets_values": ["bilinear", 32, 16, "disabled"]},
            {"id": 5, "type": "PrimitiveNode", "mode": 0, "inputs": [],
             "outputs": [{"name": "INT", "type": "INT", "links": [4]}], "widgets_values": [32, "fixed"]},
            {"id": 6, "type": "ImageScale", "mode": 2, "inputs": [{"name": "image", "type": "IMAGE", "link": None}],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": []}],
             "widgets_values": ["bilinear", 8, 8, "disabled"]},
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"], [4, 5, 0, 4, 1, "INT"]],
    }


def test_conversion_rules_reroute_bypass_mute_primitive_upload(defs):
    prompt = wt.ui_to_api(_mini_graph(), defs)
    assert set(prompt) == {"1", "4"}, "Reroute, PrimitiveNode, bypassed and muted nodes are not sent"
    assert prompt["1"]["inputs"] == {"image": "a.png"}, "the upload button's value is not sent"
    assert prompt["4"]["inputs"] == {"upscale_method": "bilinear", "width": 32, "height": 16, "crop": "disabled",
                                     "image": ["1", 0]}, "bypass and Reroute lead back to LoadImage"
    assert prompt["4"]["_meta"] == {"title": "ImageScale"}, "no title: the definition's display name"


def test_conversion_skips_control_values_by_declaration_and_by_legacy_name(defs):
    ksampler = defs["KSampler"]
    assert [s.kind for s in ksampler.widget_slots][:2] == ["value", "control"]
    node = {"id": 1, "type": "KSampler", "mode": 0, "inputs": [],
            "widgets_values": [7, "randomize", 20, 8.0, "euler", "normal", 1.0]}
    assert wt.widget_values(node, ksampler) == {"seed": 7, "steps": 20, "cfg": 8.0, "sampler_name": "euler",
                                                "scheduler": "normal", "denoise": 1.0}
    legacy = wt.node_def_from_info({"name": "X", "input": {"required": {"noise_seed": ["INT", {}],
                                                                        "seed": ["INT", {"control_after_generate": False}]}},
                                    "output": []})
    assert [s.kind for s in legacy.widget_slots] == ["value", "control", "value"]


@pytest.mark.parametrize("name", NAMES)
def test_every_loss_curve_is_previewed_and_explained(name):
    """A Latent AD Optimize or AD Fine-Tune VAE Decoder shows its loss curve, and the note says what a healthy
    one looks like."""
    api = _api(name)
    producers = {k for k, v in api.items() if v["class_type"] in ("LatentADOptimize", "ADFineTuneVAEDecoder")}
    previewed = {node["inputs"]["images"][0] for node in api.values()
                 if node["class_type"] == "PreviewImage" and node["inputs"]["images"][1] == 1
                 and node["_meta"]["title"].startswith("Loss curve")}
    assert previewed == producers
    if producers:
        assert "healthy" in _note(name)


# -- the Flux workflows (issue 11 section 5: the reference code's flux_ad settings) --------------------------

@pytest.mark.parametrize("name", FLUX_NAMES)
def test_flux_workflows_load_flux_as_its_users_do(name):
    """Load Diffusion Model, DualCLIPLoader (type flux), Load VAE; ModelSamplingFlux at the image size feeds
    every AD node; the null text is padded to the reference code's 512 T5 tokens."""
    api = _api(name)
    assert _only(api, "UNETLoader")["unet_name"] == workflow_build.FLUX_DEV
    clip = _only(api, "DualCLIPLoader")
    assert ({clip["clip_name1"], clip["clip_name2"]}, clip["type"]) == (
        {workflow_build.CLIP_L, workflow_build.T5XXL}, "flux")
    assert _only(api, "VAELoader")["vae_name"] == workflow_build.FLUX_VAE
    sampling_id = _id(api, "ModelSamplingFlux")
    sampling = api[sampling_id]["inputs"]
    assert (sampling["max_shift"], sampling["base_shift"], sampling["width"], sampling["height"]) == (1.15, 0.5, 512, 512)
    for node in api.values():
        if node["class_type"] in ("CaptureReferenceAttention", "ADLossGuidance", "LatentADOptimize"):
            assert node["inputs"]["model"] == [sampling_id, 0], node["class_type"]
    null = _source(api, _only(api, "CaptureReferenceAttention")["null_conditioning"])
    padding = _source(api, null["inputs"]["clip"])
    assert padding["class_type"] == "T5TokenizerOptions" and padding["inputs"]["min_length"] == 512
    assert _source(api, padding["inputs"]["clip"])["class_type"] == "DualCLIPLoader"
    assert "512" in _note(name) and "guidance 1.0" in _note(name)
    for node in api.values():
        assert node["class_type"] not in ("CheckpointLoaderSimple", "EmptyLatentImage", "ADSeamlessTiling")


@pytest.mark.parametrize("name", ["13_flux_style_text_to_image", "15_flux_lora_style"])
def test_flux_text_to_image_uses_the_reference_codes_settings(name):
    api = _api(name)
    guidance = _only(api, "ADLossGuidance")
    assert (guidance["lr"], guidance["iterations"], guidance["adain"]) == (0.01, 2, True)
    sampler = _only(api, "KSampler")
    assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (
        50, 1.0, "euler", "simple")
    assert _source(api, sampler["model"])["class_type"] == "ADLossGuidance"
    positive = _source(api, sampler["positive"])
    assert positive["class_type"] == "FluxGuidance" and positive["inputs"]["guidance"] == 3.5
    assert _source(api, positive["inputs"]["conditioning"])["inputs"]["text"].strip()
    latent = _only(api, "EmptySD3LatentImage")
    assert (latent["width"], latent["height"]) == (512, 512)


def test_flux_texture_optimizes_seeded_noise_of_flux_latents():
    api = _api("14_flux_texture_synthesis_optimize")
    optimize = _only(api, "LatentADOptimize")
    assert (optimize["steps"], optimize["lr"], optimize["iterations"], optimize["content_weight"]) == (300, 0.05, 1, 0.0)
    assert _source(api, optimize["latent"])["class_type"] == "EmptySD3LatentImage"
    decode = _only(api, "VAEDecode")
    assert _source(api, decode["samples"])["class_type"] == "LatentADOptimize"
    assert decode["vae"] == [_id(api, "VAELoader"), 0]


def test_flux_lora_workflow_feeds_the_lora_model_everywhere():
    api = _api("15_flux_lora_style")
    lora_id = _id(api, "LoraLoaderModelOnly")
    assert api[lora_id]["inputs"]["model"] == [_id(api, "UNETLoader"), 0]
    assert api[lora_id]["inputs"]["lora_name"] in wt.MODEL_FILES["loras"]
    assert _only(api, "ModelSamplingFlux")["model"] == [lora_id, 0]
