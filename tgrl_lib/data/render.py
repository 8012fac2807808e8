"""Scenes for the synthetic benchmark: vocabulary, random layouts, and deterministic PNG drawing.

A scene is described by its `facts` (the ground truth every other module reads) and drawn from them, so the
image is a pure function of the facts. Facts structure (JSON, stored in `Problem.facts`)::

    {
      "kind": "shapes" | "bar_chart",
      "width": 56, "height": 56,                 # pixels
      "objects": [                                # shapes scenes ([] for charts)
        {"shape": "circle|square|triangle", "color": "red|green|blue|yellow",
         "size": "small|medium|large", "px": 14,  # side of the bounding box in pixels
         "bbox": [x0, y0, x1, y1],                # x1/y1 exclusive; y grows downwards
         "center": [cx, cy]}                      # integers (px is even)
      ],
      "bars": [                                   # bar charts, left to right ([] for scenes)
        {"label": "A", "color": "red", "value": 3, "bbox": [x0, y0, x1, y1]}
      ]
    }

"left of" compares centre x, "above" compares centre y (smaller y is higher). Drawing uses PIL without
anti-aliasing on a white background and saves PNG without metadata, so identical facts give identical bytes.
"""

from __future__ import annotations

import io
import random
from typing import Any

from tgrl_lib.errors import TgrlError

BASE_SIZE = 56  # sizes below are for 56 px images and scale linearly
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 190, 0),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 10, "medium": 14, "large": 18}  # bounding-box side in pixels at 56 px
BACKGROUND = (255, 255, 255)
AXIS = (60, 60, 60)
GRID = (215, 215, 215)
GAP = 2  # minimum free pixels between two objects, and between an object and the border


class LayoutError(Exception):
    """Random placement failed; the caller draws a new scene."""


def check_image_size(image_size: int) -> None:
    if image_size < BASE_SIZE or image_size % 28:
        raise TgrlError(
            f"image size {image_size} is not supported",
            hint=f"use a multiple of 28 that is at least {BASE_SIZE} (objects need >= 10 px)",
        )


def size_px(size: str, image_size: int) -> int:
    """Bounding-box side of a size tier at this image size (even, so centres are integers)."""
    return 2 * round(SIZES[size] * image_size / BASE_SIZE / 2)


def make_object(shape: str, color: str, size: str, x0: int, y0: int, px: int) -> dict[str, Any]:
    return {
        "shape": shape,
        "color": color,
        "size": size,
        "px": px,
        "bbox": [x0, y0, x0 + px, y0 + px],
        "center": [x0 + px // 2, y0 + px // 2],
    }


def _overlaps(bbox: list[int], others: list[dict[str, Any]]) -> bool:
    x0, y0, x1, y1 = bbox
    for other in others:
        a0, b0, a1, b1 = other["bbox"]
        if x0 < a1 + GAP and a0 < x1 + GAP and y0 < b1 + GAP and b0 < y1 + GAP:
            return True
    return False


def place_objects(
    rng: random.Random, specs: list[tuple[str, str, str]], image_size: int, tries: int = 200
) -> list[dict[str, Any]]:
    """Place `(shape, color, size)` specs at random without overlap; raises LayoutError when it cannot."""
    placed: list[dict[str, Any]] = []
    for shape, color, size in specs:
        px = size_px(size, image_size)
        high = image_size - GAP - px
        for _ in range(tries):
            x0, y0 = rng.randint(GAP, high), rng.randint(GAP, high)
            obj = make_object(shape, color, size, x0, y0, px)
            if not _overlaps(obj["bbox"], placed):
                placed.append(obj)
                break
        else:
            raise LayoutError("no room")
    return placed


def shapes_facts(objects: list[dict[str, Any]], image_size: int) -> dict[str, Any]:
    return {"kind": "shapes", "width": image_size, "height": image_size, "objects": objects, "bars": []}


def bar_chart_facts(
    rng: random.Random, colors: list[str], values: list[int], image_size: int, max_value: int
) -> dict[str, Any]:
    """Bars left to right in the given colours, with a little random jitter in width and spacing."""
    scale = image_size / BASE_SIZE
    n = len(values)
    left, bottom, top = round(8 * scale), image_size - round(5 * scale), round(5 * scale)
    unit = (bottom - top) // max_value
    slot = (image_size - round(3 * scale) - left) // n
    bars = []
    for i, (color, value) in enumerate(zip(colors, values, strict=True)):
        width = rng.randint(max(4, slot // 2), max(4, slot - round(3 * scale)))
        x0 = left + i * slot + rng.randint(1, max(1, slot - width))
        bars.append(
            {
                "label": "ABCDEFGH"[i],
                "color": color,
                "value": value,
                "bbox": [x0, bottom - value * unit, x0 + width, bottom],
            }
        )
    return {
        "kind": "bar_chart",
        "width": image_size,
        "height": image_size,
        "objects": [],
        "bars": bars,
        "axis": {"left": left, "bottom": bottom, "unit": unit, "max_value": max_value},
    }


# ------------------------------------------------------------------------------------------ drawing
def draw_png(facts: dict[str, Any]) -> bytes:
    """The scene as PNG bytes: same facts, same bytes (no anti-aliasing, no metadata, fixed zlib level)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (facts["width"], facts["height"]), BACKGROUND)
    draw = ImageDraw.Draw(image)
    if facts["kind"] == "bar_chart":
        _draw_chart(draw, facts)
    for obj in facts["objects"]:
        _draw_object(draw, obj)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _draw_object(draw: Any, obj: dict[str, Any]) -> None:
    x0, y0, x1, y1 = obj["bbox"]
    fill = COLORS[obj["color"]]
    if obj["shape"] == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif obj["shape"] == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    else:  # triangle pointing up
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) // 2, y0)], fill=fill)


def _draw_chart(draw: Any, facts: dict[str, Any]) -> None:
    axis = facts["axis"]
    left, bottom, unit = axis["left"], axis["bottom"], axis["unit"]
    right = facts["width"] - 2
    for level in range(1, axis["max_value"] + 1):  # one faint grid line per unit: values can be read off
        y = bottom - level * unit
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.line([(left - 3, y), (left - 1, y)], fill=AXIS)
    for bar in facts["bars"]:
        x0, y0, x1, y1 = bar["bbox"]
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=COLORS[bar["color"]])
    draw.line([(left, bottom), (right, bottom)], fill=AXIS)
    draw.line([(left, bottom), (left, bottom - axis["max_value"] * unit)], fill=AXIS)
