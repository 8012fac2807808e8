"""Images as every step reads them: safe loading, and the blank counterfactuals of visual dependency.

- `load_image`: RGB, size-checked from the header before decoding (decompression bombs: more than
  `max_pixels`; extreme aspect ratios such as 5000x1, which vision processors refuse), transparent pixels
  composited over white; missing, truncated, non-image and non-regular files are a `TgrlError` naming the
  file. `check_image` runs the same checks with or without decoding (`tgrl data validate --fast`).
- `image_problem`: what `schema.load_dataset` asks of each distinct image once per load: inside the
  dataset, a regular file, the bytes the manifest hashed (an image swapped after the manifest was written
  is refused), a header within the caps; the file is read once, hashed and checked from the same bytes.
- `blank_images`: uniform images of the same sizes (black, an RGB fill, or each image's background colour),
  for the visual-dependency forward.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from tgrl_lib.data.reader import open_regular, read_regular_bytes, resolve_inside
from tgrl_lib.errors import TgrlError

DEFAULT_MAX_PIXELS = 6000 * 6000  # refuse bigger images (decompression bombs) before decoding them
MAX_IMAGE_BYTES = 64 << 20  # one image file
MAX_ASPECT_RATIO = 200  # longer side / shorter side; Qwen2-VL style processors refuse more than 200


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    """Open an image as RGB, refusing missing, truncated, non-image, oversized (> `max_pixels`) and
    extremely elongated (> `MAX_ASPECT_RATIO`) files with a `TgrlError` naming the file. The size is
    checked from the header, before decoding."""
    image = check_image(path, max_pixels, decode=True)
    assert image is not None
    return image


def check_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *, decode: bool = True):
    """The checks of `load_image`; with `decode=False` only the header (format, size, aspect ratio) is
    read and None is returned."""
    path = Path(path)
    if not path.exists():
        raise TgrlError("image file not found", path=path)
    with open_regular(path) as handle:  # a FIFO or device is refused before a byte is read
        if os.fstat(handle.fileno()).st_size == 0:
            raise TgrlError("not a readable image (empty file)", path=path)
        return _open_checked(handle, path, max_pixels, decode)


def check_image_bytes(data: bytes, path: object, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """The header checks of `check_image` on bytes already read (and hashed) by the dataset reader. A PNG's
    size is read from its IHDR chunk directly (a tenth of the cost of `Image.open`); other formats go
    through PIL."""
    if not data:
        raise TgrlError("not a readable image (empty file)", path=path)
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        check_size(struct.unpack(">II", data[16:24]), max_pixels, path)
        return
    _open_checked(io.BytesIO(data), path, max_pixels, decode=False)


def _open_checked(handle: BinaryIO, path: object, max_pixels: int, decode: bool) -> Image.Image | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                check_size(image.size, max_pixels, path)
                if not decode:
                    return None
                image.load()
                return _to_rgb(image)
    except UnidentifiedImageError as err:
        raise TgrlError("not a readable image (no known image format)", path=path) from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise TgrlError(f"not a readable image: {err}", path=path) from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
        raise TgrlError(f"corrupt or truncated image: {err}", path=path) from err


def check_size(size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS, path: object = None) -> None:
    """Refuse an image size with more than `max_pixels` pixels or an aspect ratio above `MAX_ASPECT_RATIO`."""
    width, height = size
    if width < 1 or height < 1:
        raise TgrlError(f"image is {width}x{height} pixels (empty)", path=path)
    if width * height > max_pixels:
        raise TgrlError(
            f"image is {width}x{height} pixels, more than max_pixels={max_pixels}",
            path=path,
            hint="downscale it, or raise max_pixels if the file is trusted",
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise TgrlError(
            f"image is {width}x{height} pixels, an aspect ratio above {MAX_ASPECT_RATIO}:1",
            path=path,
            hint="crop or pad it to a less elongated shape",
        )


def image_problem(
    root: Path, rel: str, expected_sha256: str | None, *, root_real: Path | None = None
) -> str | None:
    """Why a dataset's image `rel` cannot be used, or None: outside `root`, missing, not a regular file,
    not the file the manifest hashed (`expected_sha256`, when it lists `rel`), or a header beyond the pixel
    and aspect-ratio caps. The file is read once: hashed and checked from the same bytes."""
    try:
        path = resolve_inside(root, rel, root_real=root_real)
        if not path.is_file():
            return f"image {rel!r} is missing"
        if expected_sha256 is None:  # not hashed by its writer (`tgrl data validate` reports it)
            check_image(path, decode=False)
            return None
        data = read_regular_bytes(path, MAX_IMAGE_BYTES)
        if hashlib.sha256(data).hexdigest() != expected_sha256:
            return f"image {rel!r} does not match its sha256 in the manifest (changed after it was written)"
        check_image_bytes(data, path)
    except TgrlError as err:
        return f"image {rel!r}: {str(err).removeprefix(f'{err.path}: ')}"
    return None
