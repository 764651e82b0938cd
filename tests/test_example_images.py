"""The example images in example-images: every file the quick start and the workflows name, label
maps that survive the workflows' resize into every region of the coarsest guided grid, small files."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch
import workflow_tools as wt
from PIL import Image

EXAMPLES = wt.REPO / "example-images"
# (the reference picture, its labels, the target's labels or layout)
LABEL_SETS = {
    "02 appearance": ("appearance-reference.png", "appearance-reference-labels.png", "appearance-target-labels.png"),
    "11 texture": ("texture-17.jpg", "texture-labels.png", "texture-layout.png"),
}
TARGET_PICTURES = {"appearance-target-labels.png": "appearance-target.png"}
WORKFLOW_SIZE = 512
COARSEST_GRID = (16, 16)  # SD1.5's 16x16 attention at 512 px; "paper default" guides finer grids only
MIN_CELLS = 12  # of each region in that grid: a region must keep a few tokens, not vanish


def loaded_images() -> set[str]:
    return {v for path in wt.workflow_files() for n in wt.load_json(path)["nodes"] if n["type"] == "LoadImage"
            for v in n["widgets_values"][:1]}


def workflow_labels(name: str, losses) -> torch.Tensor:
    """The labels a workflow makes of a map: Upscale Image (nearest-exact, centre crop) to 512², the red
    channel (Convert Image to Mask), then the pack's own mask-to-labels conversion."""
    import comfy.utils

    with Image.open(EXAMPLES / name) as image:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
    scaled = comfy.utils.common_upscale(pixels.movedim(-1, 1), WORKFLOW_SIZE, WORKFLOW_SIZE, "nearest-exact", "center")
    return losses.labels_from_mask(scaled[:, 0])


@pytest.fixture(scope="module")
def losses(pack):
    return importlib.import_module(f"{pack.__name__}.guidance.losses")


def test_every_image_the_workflows_load_is_shipped():
    names = loaded_images()
    assert len(names) >= 11
    assert sorted(n for n in names if not (EXAMPLES / n).is_file()) == []


def test_the_quick_start_defaults_to_the_shipped_images():
    sys.path.insert(0, str(wt.REPO / "scripts"))
    try:
        run_ad = importlib.import_module("run_ad")
    finally:
        sys.path.remove(str(wt.REPO / "scripts"))
    assert run_ad.DEFAULT_IMAGES == EXAMPLES
    for name in (run_ad.CONTENT_IMAGE, run_ad.STYLE_IMAGE, run_ad.TEXTURE_IMAGE):
        assert (EXAMPLES / name).is_file(), name


def test_every_file_is_small_and_has_its_source_noted():
    source = (EXAMPLES / "SOURCE.md").read_text()
    files = [p for p in EXAMPLES.iterdir() if p.name != "SOURCE.md"]
    assert {p.name for p in files} == loaded_images()
    for path in files:
        assert f"`{path.name}`" in source, f"SOURCE.md does not say where {path.name} comes from"
        with Image.open(path) as image:
            assert max(image.size) <= WORKFLOW_SIZE, path.name
        assert path.stat().st_size < 512 * 1024, path.name


@pytest.mark.parametrize("name", sorted({n for s in LABEL_SETS.values() for n in s[1:]}))
def test_label_maps_are_pure_greys_of_a_few_levels(name):
    with Image.open(EXAMPLES / name) as image:
        rgb = np.asarray(image.convert("RGB"))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all(), "not pure grey"
    assert 2 <= len(np.unique(rgb[..., 0])) <= 8


@pytest.mark.parametrize("task", sorted(LABEL_SETS))
def test_label_maps_fit_their_pictures_and_keep_every_region(task, losses):
    picture, reference_labels, target_labels = LABEL_SETS[task]
    pairs = [(picture, reference_labels)]
    if target_labels in TARGET_PICTURES:
        pairs.append((TARGET_PICTURES[target_labels], target_labels))
    for image_name, labels_name in pairs:  # cropped alike only if they are the same size
        with Image.open(EXAMPLES / image_name) as image, Image.open(EXAMPLES / labels_name) as labels:
            assert image.size == labels.size, (image_name, labels_name)

    reference = losses.labels_at(workflow_labels(reference_labels, losses), COARSEST_GRID)
    target = losses.labels_at(workflow_labels(target_labels, losses), COARSEST_GRID)
    reference_levels, target_levels = set(reference.unique().tolist()), set(target.unique().tolist())
    assert len(target_levels) >= 2 and target_levels <= reference_levels, (target_levels, reference_levels)
    for grid in (reference, target):
        for level in grid.unique():
            assert int((grid == level).sum()) >= MIN_CELLS, f"region {int(level)} nearly vanishes at {COARSEST_GRID}"

