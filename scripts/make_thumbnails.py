"""Write the Templates browser's picture of every workflow: workflows/<file name>.jpg.

    python scripts/make_thumbnails.py [--images DIR]

ComfyUI's frontend (1.27, and 1.48 of ComfyUI v0.33) shows a custom node pack's workflow in its Templates
browser with the JPEG of the same name as its picture. The picture shows what the graph starts from, never
a result: the images its Load Image nodes name (taken from --images, by default the example images in
example-images), its prompt, and one line on what it makes; and, top right, the model family, which the
card's one-line title cuts off. Frontend 1.48 lays a "Node graph" badge over the top left of the picture,
so nothing else is drawn in that band.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
SIZE = 512
BACKGROUND = (30, 32, 38)
TEXT = (235, 235, 235)
MUTED = (160, 165, 175)
ACCENT = (120, 150, 255)
BADGE_BAND = 88  # the top of the picture, under frontend 1.48's "Node graph" badge at half size
# What each graph makes, by the number its file name starts with.
MAKES = {
    "01": "the photo, repainted in the style",
    "02": "the target, with the appearance region by region",
    "03": "a new texture like it, any size",
    "04": "a new texture like it, by guided sampling",
    "05": "the prompt, drawn in the style",
    "06": "the prompt at 1024x1024, in the style",
    "07": "the prompt on the photo's edges, in the style",
    "08": "the prompt with the LoRA, in the style",
    "09": "a texture that tiles without a seam",
    "10": "a 1024x512 texture from the 512x512 one",
    "11": "a texture laid out as the layout map says",
    "12": "a texture, decoded with a decoder tuned on it",
    "13": "the prompt on FLUX.1-dev, in the style",
    "14": "a new texture like it, on FLUX.1-dev",
    "15": "the prompt with a Flux LoRA, in the style",
}


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def inputs_of(ui: dict) -> tuple[list[tuple[str, str]], str | None]:
    """(image file, node title) of each Load Image, in graph order, and the prompt text if there is one."""
    images = [(n["widgets_values"][0], n.get("title", "Load Image")) for n in ui["nodes"] if n["type"] == "LoadImage"]
    prompt = next((n["widgets_values"][0] for n in ui["nodes"]
                   if n["type"] == "CLIPTextEncode" and n.get("title") == "Prompt"), None)
    return images, prompt


def wrap(draw: ImageDraw.ImageDraw, text: str, face: ImageFont.ImageFont, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=face) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + [line] if line else lines


def square(path: Path, side: int) -> Image.Image:
    with Image.open(path) as picture:
        picture = picture.convert("RGB")
        crop = min(picture.size)
        left, top = (picture.width - crop) // 2, (picture.height - crop) // 2
        return picture.crop((left, top, left + crop, top + crop)).resize((side, side), Image.LANCZOS)


def thumbnail(path: Path, images: Path) -> Image.Image:
    """The family top right, the inputs in a grid with their node titles, the prompt, then what the graph
    makes. The card shows its title under the picture and draws the picture at half size, hence the large
    type."""
    ui = json.loads(path.read_text(encoding="utf-8"))
    loads, prompt = inputs_of(ui)
    number = path.stem.split(" ", 1)[0]
    canvas = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    text_lines = [(line, 26, TEXT) for line in wrap(draw, f"prompt: \u201c{prompt}\u201d", font(26), SIZE - 40)[:2]]
    text_lines += [(line, 30, ACCENT) for line in wrap(draw, "makes " + MAKES[number], font(30), SIZE - 40)[:2]]
    text_height = sum(size + 8 for _, size, _ in text_lines if prompt or size == 30)
    columns = 2 if len(loads) > 1 else 1
    rows = (len(loads) + columns - 1) // columns
    family = path.stem.rsplit(", ", 1)[-1]
    draw.text((SIZE - 20 - draw.textlength(family, font=font(32)), 24), family, font=font(32), fill=ACCENT)
    label = 30
    room = SIZE - BADGE_BAND - 20 - text_height - 16
    side = min((SIZE - 40 - (columns - 1) * 16) // columns, room // rows - label)
    x0 = (SIZE - columns * side - (columns - 1) * 16) // 2
    size = min((next((s for s in (22, 20, 18) if draw.textlength(title, font=font(s)) <= side), 18)
                for _, title in loads), default=22)
    for index, (name, title) in enumerate(loads):
        x = x0 + (index % columns) * (side + 16)
        y = BADGE_BAND + (index // columns) * (side + label)
        canvas.paste(square(images / name, side), (x, y))
        while draw.textlength(title, font=font(size)) > side:
            title = title[:-2] + "\u2026"
        draw.text((x, y + side + 2), title, font=font(size), fill=MUTED)
    y = BADGE_BAND + rows * (side + label) + 16
    for line, size, colour in text_lines:
        if size == 26 and not prompt:
            continue
        draw.text((20, y), line, font=font(size), fill=colour)
        y += size + 8
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=REPO / "example-images",
                        help="folder with the images the workflows' Load Image nodes name")
    args = parser.parse_args(argv)
    for path in sorted(WORKFLOWS.glob("*.json")):
        target = path.with_suffix(".jpg")
        thumbnail(path, args.images).save(target, quality=85, optimize=True)
        print(f"wrote {target.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
