"""Image bytes to a 28×28 picture that looks like Fashion-MNIST, at a bounded cost.

The cost of decoding grows with the pixels decoded, not with the bytes sent (a 20 kB PNG can claim 400 M
pixels), so every image is checked against a pixel cap from its header, before any pixel is decoded. The caps
keep the worst valid image well within the handler-time bound `make chaos` asserts (50 ms for its batch, on two
cores shared with the frontend and the router), and are still far more than a 28×28 classifier needs:

  * at most MAX_DECODED_PIXELS are decoded at full resolution: 384×384, 13× more pixels per side than the
    model sees (at 512×512, a lossy WebP of noise took up to 49 ms of handler time in the matrix);
  * a baseline JPEG may be larger, up to MAX_JPEG_PIXELS (2048×2048): its decoder scales by 1/2, 1/4 or 1/8
    while decoding (Pillow's `draft`), so it too yields at most 384×384 (a 4096×4096 one took 40–43 ms even at
    1/8: its blocks cost however they are scaled);
  * a progressive JPEG keeps every coefficient of the whole image in memory however it is scaled, so it gets
    the full-resolution cap;
  * at most MAX_IMAGE_BYTES: a JPEG's entropy decoding costs by the byte.

Only the formats in FORMATS are opened (Pillow can also hand EPS to Ghostscript, or parse formats nobody sends
to a classifier), and only the first frame of an animation or a multi-page TIFF is decoded.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from invalid_input import InvalidInput, quote
from PIL import Image, UnidentifiedImageError

import fashion_cnn

MAX_IMAGE_BYTES = 1024 * 1024
MAX_DECODED_PIXELS = 384 * 384
MAX_JPEG_PIXELS = 2048 * 2048  # decoded at 1/8 scale: 256×256
JPEG_SCALES = (2, 4, 8)  # what libjpeg's scaled decoding offers (Pillow's `draft`)
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")  # a camera's MPO file opens as JPEG
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA")
LIGHT_BACKGROUND = 127  # mean border intensity above which the image is taken as dark-on-light and inverted
# Shrinking by more than this factor first reduces by whole factors (box filter), then resamples with LANCZOS:
# a 1,048,576×1 image resampled in one step needs ~50 MB of filter coefficients and 0.4 s. Images up to
# 8×28 = 224 px a side resize exactly as before.
REDUCING_GAP = 8.0

Image.init()  # register every plugin now: `formats=` only looks among those already registered


def image_to_pixels(data: bytes) -> torch.Tensor:
    """Decode an image into a 28×28 uint8 tensor that looks like a Fashion-MNIST image; raises InvalidInput."""
    if not data:
        raise InvalidInput("empty body: send an image, or JSON with a 'data' field")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidInput(f"image of {len(data)} bytes is larger than the limit of {MAX_IMAGE_BYTES} bytes")
    try:
        with warnings.catch_warnings():  # Pillow only warns between 89 M and 179 M pixels: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        _check_size_and_reduce(image)
        image.load()  # the first frame only
        return _like_training_data(image)
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidInput(f"image too large to decode safely: {error}") from error
    except UnidentifiedImageError as error:  # Pillow's message names an in-memory object, not the problem
        raise InvalidInput(f"cannot decode the image: not an image in a format this model accepts "
                           f"({', '.join(FORMATS)}); {len(data)} bytes starting {quote(data[:8])}") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InvalidInput(f"cannot decode the image: {error}") from error


def _check_size_and_reduce(image: Image.Image) -> None:
    """Refuse an image whose decoding would cost more than the caps allow; set up a big JPEG to decode scaled."""
    width, height = image.size
    pixels = width * height
    if pixels <= MAX_DECODED_PIXELS:
        return
    jpeg = image.format in ("JPEG", "MPO")
    progressive = jpeg and bool(image.info.get("progressive") or image.info.get("progression"))
    if jpeg and not progressive and pixels <= MAX_JPEG_PIXELS:
        scale = next(s for s in JPEG_SCALES if pixels <= MAX_DECODED_PIXELS * s * s)
        image.draft(image.mode, (width // scale, height // scale))
        return
    kind = "a progressive JPEG" if progressive else f"a {'baseline JPEG' if jpeg else image.format} image"
    limit = MAX_JPEG_PIXELS if jpeg and not progressive else MAX_DECODED_PIXELS
    raise InvalidInput(
        f"image too large to decode safely: {kind} of {width}×{height} pixels, over the limit of "
        f"{_square(limit)} (a baseline JPEG may have up to {_square(MAX_JPEG_PIXELS)}); this model sees "
        f"{fashion_cnn.IMAGE_SIZE}×{fashion_cnn.IMAGE_SIZE} pixels: downscale the image before sending it")


def _square(pixels: int) -> str:
    side = math.isqrt(pixels)
    return f"{side}×{side} = {pixels} pixels"


def _to_gray(image: Image.Image) -> Image.Image:
    """8-bit grayscale; transparency becomes white (a cut-out garment on a light page), 16-bit keeps its range."""
    if image.mode in SIXTEEN_BIT_MODES:  # Pillow's own conversion clips 16-bit values at 255 instead of scaling
        return Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8), mode="L")
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("L")


def _like_training_data(image: Image.Image) -> torch.Tensor:
    """Grayscale, light garment on black, longer side 28 px, centred: how Fashion-MNIST images look."""
    gray = _to_gray(image)
    # One copy out of Pillow, used for the border check and, at 28×28 (what clients of this model send), as the
    # answer itself: each conversion re-encodes the image (Image.tobytes), and decoding is the largest cost of a
    # request after the model (python -m loadtest.profile_worker).
    pixels = np.array(gray, dtype=np.uint8)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    light = border.mean() > LIGHT_BACKGROUND  # photos of garments are dark on light; the data set is light on black
    size = fashion_cnn.IMAGE_SIZE
    if gray.size == (size, size):
        if light:
            np.subtract(255, pixels, out=pixels)
        return torch.from_numpy(pixels)
    if light:
        gray = Image.fromarray(255 - pixels, mode="L")
    scale = size / max(gray.size)
    resized = gray.resize((max(1, round(gray.width * scale)), max(1, round(gray.height * scale))),
                          Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return torch.from_numpy(np.array(canvas, dtype=np.uint8))
