"""Images as every step reads them: safe loading, and the blank counterfactuals of visual dependency.

- `load_image`: RGB, size-checked from the header before decoding (decompression bombs), transparent pixels
  composited over white; missing, truncated and non-image files are a `TgrlError` naming the file.
- `blank_images`: uniform images of the same sizes (black, an RGB fill, or each image's background colour),
  for the visual-dependency forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tgrl_lib.errors import TgrlError

DEFAULT_MAX_PIXELS = 6000 * 6000  # refuse bigger images (decompression bombs) before decoding them


# ----------------------------------------------------------------------------------------- images
def background_color(image: Image.Image) -> tuple[int, int, int]:
    """The image's most common RGB colour (a scene's background)."""
    rgb = image.convert("RGB")
    colors = rgb.getcolors(maxcolors=rgb.width * rgb.height)  # [(count, (r, g, b)), ...]
    return max(colors, key=lambda item: item[0])[1]


def blank_images(
    images: Sequence[Image.Image], fill: int | tuple[int, int, int] | str = 0
) -> list[Image.Image]:
    """Uniform images of the same sizes, so a blanked forward has exactly the same image-token layout as
    the real one. `fill`: a grey level (default 0, black, as VPPO blackens patches), an RGB triple,
    "black", or "background" (each image's most common colour: the synthetic scenes' white, so the
    counterfactual stays in distribution). Images of one size and fill share one blank image object
    (collation then processes it once per prompt); treat them as read-only."""
    blanks: dict[tuple, Image.Image] = {}
    out = []
    for image in images:
        if fill == "background":
            color = background_color(image)
        elif fill == "black":
            color = (0, 0, 0)
        elif isinstance(fill, int):
            color = (fill, fill, fill)
        else:
            color = tuple(fill)
        key = (image.size, color)
        if key not in blanks:
            blanks[key] = Image.new("RGB", image.size, color)
        out.append(blanks[key])
    return out


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels are composited over white instead of showing their hidden colour."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image as RGB, refusing missing, truncated, non-image and oversized (> `max_pixels`) files
    with a `TgrlError` naming the file. The size is checked from the header, before decoding."""
    path = Path(path)
    if not path.is_file():
        raise TgrlError("image file not found", path=path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise TgrlError(
                        f"image is {width}x{height} pixels, more than max_pixels={max_pixels}",
                        path=path,
                        hint="downscale it, or raise max_pixels if the file is trusted",
                    )
                image.load()
                return _to_rgb(image)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise TgrlError(f"not a readable image: {err}", path=path) from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
        raise TgrlError(f"corrupt or truncated image: {err}", path=path) from err
