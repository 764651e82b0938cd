"""The shipped graphs as the frontend shows them: no node on another, no link behind a node it does not
connect, the note first, readable when they open and at Fit View, node sizes the frontend keeps."""

from __future__ import annotations

import copy

import pytest
import workflow_layout as wl
import workflow_tools as wt
from test_workflows import NAMES

# What frontends 1.27.10 and 1.48.7 compute for each node (LGraphNode.computeSize of a new node, measured
# in the browser with the pack loaded; the larger of the two, 1.48 measures some labels wider); the width
# grows with a long title. A saved size below it is enlarged on load.
FRONTEND_SIZES = {
    "CheckpointLoaderSimple": (210, 98), "LoraLoader": (230.4, 126), "CLIPTextEncode": (218.7, 88),
    "LoadImage": (222.8, 326), "ImageScale": (210, 130), "ImageToMask": (210, 58), "VAEEncode": (140, 46),
    "VAEDecode": (140, 46), "EmptyLatentImage": (210, 106), "KSampler": (210, 262), "SaveImage": (210, 58),
    "PreviewImage": (178.4, 26), "Canny": (210, 82), "ControlNetLoader": (210, 58),
    "ControlNetApplyAdvanced": (210, 186), "CaptureReferenceAttention": (227.5, 142),
    "LatentADOptimize": (236.6, 302), "ADLossGuidance": (236.6, 330), "ADSeamlessTiling": (210, 78),
    "ADTextureWindows": (210, 82), "ADFineTuneVAEDecoder": (221.1, 174), "Note": (210, 88),
    "UNETLoader": (210, 82), "DualCLIPLoader": (210, 130), "VAELoader": (210, 58), "LoraLoaderModelOnly": (210, 82),
    "T5TokenizerOptions": (210, 82), "ModelSamplingFlux": (210, 130), "FluxGuidance": (210, 58),
    "EmptySD3LatentImage": (210, 106),
}
# Nodes that show an image or a text box may be larger than computed; the others are saved at exactly
# the computed height (LoadImage's 326 is with its image shown).
FREE_HEIGHT = ("LoadImage", "SaveImage", "PreviewImage", "CLIPTextEncode", "Note")
# Fit View on a 1600 x 1000 window (frontend 1.48) shows the nodes' details (zoom >= DETAIL_ZOOM) for twelve
# of the fifteen; the three with four or five image and ControlNet inputs do not fit readably and open at
# 60 % on their note. Their Fit View zoom is held here.
FIT_VIEW_FLOORS = {"02_sd15_appearance_transfer_regions": 0.41, "07_sd15_controlnet_style": 0.47,
                   "11_sd15_label_controlled_texture": 0.52}
CROWDED = ("02_sd15_appearance_transfer_regions", "07_sd15_controlnet_style", "11_sd15_label_controlled_texture")


def _ui(name: str) -> dict:
    return wt.load_json(wt.workflow_path(name))


@pytest.mark.parametrize("name", NAMES)
def test_no_node_overlaps_another(name):
    assert wl.overlapping_nodes(_ui(name)) == []


@pytest.mark.parametrize("name", NAMES)
def test_no_link_runs_behind_a_node_it_does_not_connect(name):
    assert wl.links_behind_nodes(_ui(name)) == []


@pytest.mark.parametrize("name", NAMES)
def test_fit_view_shows_node_details(name):
    zoom = wl.fit_view_zoom(_ui(name))
    assert zoom >= FIT_VIEW_FLOORS.get(name, wl.DETAIL_ZOOM), f"{name}: Fit View zooms to {zoom:.3f}"


@pytest.mark.parametrize("name", NAMES)
def test_note_is_read_first_and_the_file_opens_readable(name):
    ui = _ui(name)
    note = next(n for n in ui["nodes"] if n["type"] in wt.NOTE_TYPES)
    others = [wl.box(n) for n in ui["nodes"] if n is not note]
    box = wl.box(note)
    assert box.left < min(b.left for b in others) and box.top <= min(b.top for b in others)
    view = wl.visible_area(ui)
    assert ui["extra"]["ds"]["scale"] >= wl.DETAIL_ZOOM
    assert view.left <= box.left and view.top <= box.top and view.right >= box.right, "the note is cut off"
    if name not in CROWDED:
        frame = wl.bounds(ui)
        assert view.right >= frame.right - 1 and view.bottom >= frame.bottom - 1, "the graph is cut off"


@pytest.mark.parametrize("name", NAMES)
def test_saved_sizes_are_what_the_frontend_computes(name):
    for node in _ui(name)["nodes"]:
        width, height = FRONTEND_SIZES[node["type"]]
        title = node.get("title", node["type"])
        assert node["size"][0] >= width and node["size"][1] >= height, f"{title}: {node['size']}"
        if node["type"] not in FREE_HEIGHT:
            assert node["size"][1] == height, f"{title}: {node['size']} would not be {height} high"


@pytest.mark.parametrize("name", NAMES)
def test_titles_do_not_name_what_the_graph_avoids(name):
    titles = [n.get("title", "") for n in _ui(name)["nodes"]]
    assert not [t for t in titles if "(tiled" in t.lower()], "reads like core VAE Decode (Tiled)"
    assert not [t for t in titles if "also the prompt" in t]


@pytest.mark.parametrize("name", NAMES)
def test_templates_browser_has_a_picture_of_it(name):
    """Frontends 1.27 and 1.48 show a pack's workflow in the Templates browser with `<file name>.jpg` as its
    picture (scripts/check_frontend.py checks it in 1.48)."""
    from PIL import Image

    picture = wt.workflow_path(name).with_suffix(".jpg")
    with Image.open(picture) as image:
        assert image.format == "JPEG" and image.size == (512, 512)


@pytest.mark.parametrize("name", NAMES)
def test_the_templates_picture_leaves_the_badge_corner_empty(name):
    """Frontend 1.48 lays a "Node graph" badge over the top left of each card's picture (about 100 x 28 px
    at 8 px from the corners of a card at least 240 px wide): that corner of the picture is plain background."""
    from PIL import Image, ImageChops

    with Image.open(wt.workflow_path(name).with_suffix(".jpg")) as image:
        corner = image.convert("RGB").crop((0, 0, 240, 80))
    background = Image.new("RGB", corner.size, image.convert("RGB").getpixel((0, 0)))
    assert max(high for _, high in ImageChops.difference(corner, background).getextrema()) <= 16


def test_the_only_template_folder_is_workflows():
    """ComfyUI lists the JSON files of all these folders and serves each folder at the same URL, where the
    first registered one answers (app/custom_node_manager.py of v0.3.64): with `examples/` beside
    `workflows/`, every template and picture request is looked up in `examples/` and fails."""
    for folder in ("example_workflows", "example", "examples", "workflow"):
        assert not (wt.REPO / folder).exists(), f"{folder}/ would shadow workflows/ in the Templates browser"


def _two_nodes() -> dict:
    node = {"type": "LatentUpscale", "inputs": [{"name": "x", "type": "LATENT", "link": 1}],
            "outputs": [{"name": "y", "type": "LATENT"}]}
    return {"nodes": [dict(copy.deepcopy(node), id=1, pos=[0, 0], size=[200, 100], title="a"),
                      dict(copy.deepcopy(node), id=2, pos=[600, 0], size=[200, 100], title="b"),
                      dict(copy.deepcopy(node), id=3, pos=[300, 0], size=[100, 60], title="c")],
            "links": [[1, 1, 0, 2, 0, "LATENT"]]}


def test_the_checks_see_an_overlap_and_a_link_behind_a_node():
    ui = _two_nodes()
    assert wl.links_behind_nodes(ui) == ["a[0] -> b.x passes behind c"]
    ui["nodes"][2]["pos"] = [300, 200]
    assert wl.links_behind_nodes(ui) == [] and wl.overlapping_nodes(ui) == []
    ui["nodes"][2]["pos"] = [150, 50]
    assert wl.overlapping_nodes(ui) == [("a", "c")]
