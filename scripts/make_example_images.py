"""Rebuild example-images from the paper's full-size pictures: downscaled copies and the label maps.

The workflows and the quick start read these files (example-images/SOURCE.md says what each one is).
This script records how they were made, so a change is reviewable rather than a new opaque picture:

    python scripts/make_example_images.py --source DIR   # DIR: the paper's images, named as in SOURCE.md

The label maps are pure greys (the workflows read the red channel and resize them nearest-exact):
0 for background or paint, 255 for the animal or rust. The animals are segmented by colour (green
grass, white paper) and cleaned with morphology; the molehills behind the deer's hind legs are brown
like the deer, so a box around them is cleared and the two legs are drawn back in by hand.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

REPO = Path(__file__).resolve().parent.parent
LONG_SIDE = 512
JPEG_QUALITY = 88
COPIES = ("style-1.jpg", "style-2.jpg", "style-12.jpg", "texture-17.jpg", "content-deer.jpg")
BACKGROUND, FOREGROUND = 0, 255

# In 512×512 coordinates of the deer photo: the molehills' box and the two hind legs inside it.
MOLEHILL_BOX = (30, 412, 240, 472)
HIND_LEGS = (((80, 410), (102, 410), (96, 475), (77, 475)),
             ((100, 410), (124, 410), (132, 475), (116, 475)))


def downscaled(image: Image.Image, long_side: int = LONG_SIDE) -> Image.Image:
    scale = long_side / max(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    return image.convert("RGB").resize(size, Image.Resampling.LANCZOS)


def square(image: Image.Image, side: int = LONG_SIDE) -> Image.Image:
    """The centre square at side×side, as the workflows' Upscale Image (crop: center) takes it."""
    edge = min(image.size)
    left, top = (image.width - edge) // 2, (image.height - edge) // 2
    return image.convert("RGB").crop((left, top, left + edge, top + edge)).resize((side, side), Image.Resampling.LANCZOS)


def _clean(mask: np.ndarray, radius: int) -> np.ndarray:
    """Open and close with a square of the radius, keep the largest component, fill its holes."""
    element = np.ones((2 * radius + 1, 2 * radius + 1), dtype=bool)
    mask = ndimage.binary_closing(ndimage.binary_opening(mask, element), element)
    components, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum(mask, components, range(1, count + 1))
        mask = components == 1 + int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def _hsv(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("HSV"), dtype=np.float32) / 255.0


def _grey(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(np.where(mask, FOREGROUND, BACKGROUND).astype(np.uint8), mode="L")


def deer_labels(photo: Image.Image) -> Image.Image:
    """The deer (255) against the grass (0): everything that is not saturated green, cleaned."""
    hsv = _hsv(photo)
    grass = (hsv[..., 0] > 0.13) & (hsv[..., 0] < 0.45) & (hsv[..., 1] > 0.25)
    colour = _clean(~grass, radius=3)
    left, top, right, bottom = MOLEHILL_BOX
    deer = colour.copy()
    deer[top:bottom, left:right] = False
    legs = Image.new("L", photo.size, BACKGROUND)
    for leg in HIND_LEGS:
        ImageDraw.Draw(legs).polygon(leg, fill=FOREGROUND)
    # The legs only where the colour mask saw the deer, so they keep its outline.
    return _grey(deer | ((np.asarray(legs) > 0) & colour))


def cat_labels(painting: Image.Image) -> Image.Image:
    """The painted cat (255) against the white paper (0): the saturated part, cleaned."""
    saturation = ndimage.gaussian_filter(_hsv(painting)[..., 1], sigma=3)
    return _grey(_clean(saturation > 0.12, radius=6))


def rust_labels(texture: Image.Image) -> Image.Image:
    """Dark rust (255) against yellow paint (0) in broad patches: the luminance blurred and split at its
    median, so every region is wide enough for the coarsest attention grid the workflows guide."""
    luminance = np.asarray(texture.convert("L"), dtype=np.float32)
    smooth = ndimage.gaussian_filter(luminance, sigma=8)
    rust = smooth < np.median(smooth)
    element = np.ones((13, 13), dtype=bool)
    return _grey(ndimage.binary_closing(ndimage.binary_opening(rust, element), element))


def rust_layout(side: int = LONG_SIDE) -> Image.Image:
    """The target layout of workflow 11: a disc of rust (255) in the middle of yellow paint (0)."""
    layout = Image.new("L", (side, side), BACKGROUND)
    margin = side // 5
    ImageDraw.Draw(layout).ellipse((margin, margin, side - margin, side - margin), fill=FOREGROUND)
    return layout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="folder with the full-size pictures")
    parser.add_argument("--output", type=Path, default=REPO / "example-images", help="default: %(default)s")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)

    def source(name: str) -> Image.Image:
        with Image.open(args.source / name) as image:
            return image.convert("RGB")

    for name in COPIES:
        downscaled(source(name)).save(args.output / name, quality=JPEG_QUALITY, optimize=True)
    cat, deer = square(source("style-1.jpg")), square(source("content-deer.jpg"))
    cat.save(args.output / "appearance-reference.png", optimize=True)
    cat_labels(cat).save(args.output / "appearance-reference-labels.png", optimize=True)
    deer.save(args.output / "appearance-target.png", optimize=True)
    deer_labels(deer).save(args.output / "appearance-target-labels.png", optimize=True)
    rust_labels(downscaled(source("texture-17.jpg"))).save(args.output / "texture-labels.png", optimize=True)
    rust_layout().save(args.output / "texture-layout.png", optimize=True)
    for path in sorted(args.output.iterdir()):
        print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
