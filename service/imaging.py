"""Bytes to RGB pixels and back, with every image mode given one defined behaviour.

The network restores 8-bit RGB. What happens to everything else:

* **EXIF orientation** is applied first, so the result looks as the photo did on screen.
* **Grayscale** (1-bit, 8-bit, 16-bit) is restored as RGB with equal channels and returned as
  grayscale (ITU-R 601 luma of the restored pixels).
* **Alpha** is kept aside, the colour is restored, and the original alpha is re-attached. A PNG's
  transparent colour (tRNS in a grey or RGB image) is alpha too.
* **Palette** images are expanded to RGB (RGBA when the palette has transparency); the result is
  a truecolour PNG, since restored pixels no longer fit a palette.
* **16-bit** channels are reduced to 8 bits; the result is 8-bit. Grey is scaled by 255/65535 and
  rounded; colour is what Pillow reads, the high byte of each sample (at most one level under
  rounding), since Pillow has no 16-bit colour mode to read the full samples into. (Pillow reads
  16-bit grey with alpha as RGBA; the PNG header says it is grey, and it comes back as LA.) Wider
  or signed integers (32-bit or signed TIFF) are refused, whatever values they hold: no scale to
  8 bits keeps what they hold. 16-bit grey stored "white is zero" is shown as a viewer would.
* **Colour profiles** (ICC) are kept: the network restores the values as stored, and the result
  carries the source's profile, so a Display P3 or Adobe RGB photo shows the colours it had. A
  profile of another colour space than the result's (a CMYK one, say) is dropped. A PNG's other
  colour chunks (gAMA, cHRM, sRGB) are kept too, where no profile is.
* **CMYK, YCbCr, LAB** are converted to RGB.
* **Several frames** (animated GIF/PNG/WebP, multi-page TIFF) are refused: which frame a user
  wants restored is not ours to guess.
* **Formats**: PNG, JPEG, WebP, BMP and TIFF. Anything else is refused as unsupported, including
  images Pillow has no reader for but whose signature says what they are (HEIC, JPEG XL, TIFF
  layouts such as 16-bit grey with alpha); bytes that are no image are invalid.
* **Size**: the pixel count is checked from the header, before any pixel is decoded, so a small
  file that declares a huge image never allocates it.

The output is always PNG.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .image_structure import jpeg_scans_past, kind_pillow_cannot_read, png_chunks_past, png_header, tiff_tag

__all__ = ["ImageError", "InvalidImage", "UnsupportedImageFormat", "ImageTooLarge", "DecodedImage",
           "SUPPORTED_FORMATS", "LARGEST_DECODABLE_PIXELS", "decode", "read_image", "encode_png", "save_png"]

# PIL names; MPO is how PIL reports JPEGs from cameras that embed a second picture.
SUPPORTED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "BMP", "TIFF"})
_SIXTEEN_BIT_GREY = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_PNG_COMPRESS_LEVEL = 1  # level 6 costs seconds on a 12-megapixel image for a few % of size
# Pillow refuses to open anything larger as a decompression bomb, whatever max_pixels says.
LARGEST_DECODABLE_PIXELS = 2 * Image.MAX_IMAGE_PIXELS

# Progressive JPEGs as encoders write them have up to a few dozen scans (libjpeg's default script
# has 10); each scan is a pass over every coefficient, so a file repeating a tiny scan thousands
# of times costs seconds of CPU per kilobyte.
MAX_JPEG_SCANS = 100
# Encoders write IDAT chunks of 8 KiB or more (a 32 MiB PNG has a few thousand chunks); Pillow
# handles each chunk in Python, so a file split into millions of 1-byte chunks costs seconds.
MAX_PNG_CHUNKS = 100_000


class ImageError(ValueError):
    """An upload that cannot be restored; ``status_code`` and ``code`` say how the API reports it."""

    status_code = 400
    code = "invalid_image"


class InvalidImage(ImageError):
    status_code = 400
    code = "invalid_image"


class UnsupportedImageFormat(ImageError):
    status_code = 415
    code = "unsupported_media_type"


class ImageTooLarge(ImageError):
    status_code = 413
    code = "image_too_large"


@dataclass(frozen=True)
class DecodedImage:
    """An upload as the network takes it, plus what is needed to give back the same kind of image."""

    rgb: np.ndarray  # (H, W, 3) uint8
    alpha: np.ndarray | None  # (H, W) uint8
    grayscale: bool
    format: str
    icc_profile: bytes | None = None  # kept only when it describes the result's colour space
    png_colour_chunks: tuple[tuple[bytes, bytes], ...] = ()  # gAMA, cHRM, sRGB: (type, data) to write back

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    if not data:
        raise InvalidImage("the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        # Past Pillow's own ceiling, which lies above any sensible max_pixels: name ours.
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{declared.group(1)} pixels" if declared else "too many pixels"
        limit = f"; the limit is {max_pixels}" if max_pixels is not None else f" ({exc})"
        raise ImageTooLarge(f"the image declares {size}{limit}") from None
    except UnidentifiedImageError:
        kind = kind_pillow_cannot_read(data)
        if kind:
            raise UnsupportedImageFormat(f"{kind} are not supported; send PNG, JPEG, WebP, BMP or TIFF "
                                         "(8-bit, or 16-bit grey or colour)") from None
        raise InvalidImage("the data is not an image in a format this service reads "
                           "(PNG, JPEG, WebP, BMP, TIFF)") from None
    except Exception as exc:  # untrusted bytes: any failure of the parser means "not readable"
        raise InvalidImage(f"the image header cannot be read ({type(exc).__name__}: {exc})") from None
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedImageFormat(f"{image.format} images are not supported; send PNG, JPEG, WebP, BMP or TIFF")
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImage(f"the image declares an empty size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    if image.format in ("JPEG", "MPO") and jpeg_scans_past(data, MAX_JPEG_SCANS):
        raise InvalidImage(f"the JPEG has more than {MAX_JPEG_SCANS} scans; no encoder writes that many")
    if image.format == "PNG" and png_chunks_past(data, MAX_PNG_CHUNKS):
        raise InvalidImage(f"the PNG has more than {MAX_PNG_CHUNKS} chunks; no encoder writes that many")
    try:
        # One frame ahead is enough to know; counting every frame would walk the whole file (a
        # TIFF with 40,000 tiny directories took 14-25 s to count). A TIFF's second directory is
        # read, not just pointed at, so a damaged one is a damaged file rather than a second page.
        animated = image.format != "MPO" and getattr(image, "is_animated", False)
        if animated and image.format == "TIFF":
            image.seek(1)
            image.seek(0)
        frames = image.n_frames if animated and image.format != "TIFF" else None
    except Exception as exc:
        raise InvalidImage(f"the {image.format} data is damaged ({type(exc).__name__}: {exc})") from None
    if animated:
        count = f"{frames} frames" if frames else "more than one frame"
        raise UnsupportedImageFormat(f"the {image.format} has {count}; send a single-frame image")
    return image


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    scaled = np.clip(pixels.astype(np.float64), 0, 65535) * (255.0 / 65535.0)
    return np.rint(scaled).astype(np.uint8)


def _refuse_samples_without_an_8_bit_scale(image: Image.Image) -> None:
    if image.mode == "F":
        raise UnsupportedImageFormat("floating-point images are not supported; send 8- or 16-bit integers")
    # Pillow reads 16-bit unsigned TIFFs as I;16 (and older Pillows read 16-bit PNGs as I), so a
    # TIFF in mode I holds 32-bit or signed samples: small values are no evidence of 16 bits.
    if image.mode == "I" and image.format == "TIFF":
        bits = tiff_tag(image.tag_v2, 258, 32)
        signed = tiff_tag(image.tag_v2, 339, 1) == 2
        raise UnsupportedImageFormat(f"{bits}-bit {'signed ' if signed else ''}integer images are not "
                                     "supported; send 8- or 16-bit unsigned integers")


def _grey_is_inverted(image: Image.Image) -> bool:
    # Pillow inverts 1- and 8-bit "white is zero" TIFFs as it reads them, but not 16-bit ones.
    return image.format == "TIFF" and image.mode in _SIXTEEN_BIT_GREY and image.tag_v2.get(262) == 0


def _colour_key(image: Image.Image, bit_depth: int) -> int | tuple[int, ...] | None:
    """A PNG's tRNS colour key of a grey or RGB image, in the units its pixels are read in: the one
    colour that stands for "transparent" (palettes are Pillow's to expand)."""
    key = image.info.get("transparency")
    if image.format != "PNG" or image.mode not in ("1", "L", "RGB", *_SIXTEEN_BIT_GREY):
        return None
    if image.mode == "L" and isinstance(key, int) and bit_depth < 8:
        return key * 255 // (2 ** bit_depth - 1)  # Pillow scales 1-, 2- and 4-bit samples to 8 bits, not the key
    if image.mode == "RGB" and isinstance(key, tuple) and bit_depth == 16:
        # Pillow reads 16-bit colour as its high bytes, so only those can be matched.
        return tuple(value >> 8 for value in key)
    return key if isinstance(key, (int, tuple)) else None


def _pixels(image: Image.Image, *, colour_key: int | tuple[int, ...] | None = None,
            grey_is_inverted: bool = False) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(rgb, alpha, grayscale) of a loaded, upright image."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_GREY or mode in ("1", "L"):
        samples = np.asarray(image)
        if grey_is_inverted:
            samples = 65535 - samples.astype(np.int32)
        grey = _to_uint8(samples)
        alpha = None
        if isinstance(colour_key, int):
            # Key and samples alike: raw for 16 bits, 0-255 otherwise (Pillow reads 1-bit as 0/255).
            keyed = samples if mode in _SIXTEEN_BIT_GREY else grey
            alpha = np.where(keyed == colour_key, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2), alpha, True
    if mode in ("LA", "La"):
        grey_alpha = np.asarray(image.convert("LA"))
        return np.repeat(grey_alpha[:, :, :1], 3, axis=2), np.ascontiguousarray(grey_alpha[:, :, 1]), True
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
    if mode in ("RGBA", "RGBa"):
        rgba = np.asarray(image.convert("RGBA"))
        return np.ascontiguousarray(rgba[:, :, :3]), np.ascontiguousarray(rgba[:, :, 3]), False
    if mode != "RGB":
        image = image.convert("RGB")
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise UnsupportedImageFormat(f"images of mode {mode} are not supported")
    rgb = np.ascontiguousarray(_to_uint8(pixels))
    alpha = None
    if isinstance(colour_key, tuple) and len(colour_key) == 3:
        alpha = np.where((rgb == np.array(colour_key)).all(axis=2), 0, 255).astype(np.uint8)
    return rgb, alpha, False


_PNG_GREY_ALPHA = 4  # IHDR colour type


def _profile_for(profile: bytes | None, grayscale: bool) -> bytes | None:
    """``profile`` if it describes the colour space of the result (grey or RGB), else None."""
    if not profile or len(profile) < 128:
        return None
    return profile if profile[16:20] == (b"GRAY" if grayscale else b"RGB ") else None


def _png_colour_chunks(info: dict) -> tuple[tuple[bytes, bytes], ...]:
    """A PNG's gamma, chromaticities and sRGB intent, as Pillow read them, as chunks to write back
    (Pillow writes none of them by itself). Both store each number in units of 1/100000."""
    chunks = []
    if isinstance(info.get("gamma"), (int, float)):
        chunks.append((b"gAMA", struct.pack(">I", round(info["gamma"] * 100_000))))
    chromaticity = info.get("chromaticity")
    if isinstance(chromaticity, tuple) and len(chromaticity) == 8:
        chunks.append((b"cHRM", struct.pack(">8I", *(round(value * 100_000) for value in chromaticity))))
    if isinstance(info.get("srgb"), int):
        chunks.append((b"sRGB", bytes([info["srgb"]])))
    return tuple(chunks)


def decode(data: bytes, max_pixels: int | None = None) -> DecodedImage:
    """Decode an upload into RGB pixels, refusing it with an :class:`ImageError` if it cannot be."""
    image = _open(data, max_pixels)
    image_format = image.format
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            _refuse_samples_without_an_8_bit_scale(image)
            png = png_header(data) if image_format == "PNG" else None  # (bit depth, colour type)
            # Read before turning upright, which gives a new image without the TIFF's tags.
            colour_key, grey_is_inverted = _colour_key(image, png[0] if png else 8), _grey_is_inverted(image)
            image = ImageOps.exif_transpose(image)
        rgb, alpha, grayscale = _pixels(image, colour_key=colour_key, grey_is_inverted=grey_is_inverted)
        grayscale = grayscale or (png is not None and png[1] == _PNG_GREY_ALPHA)
        icc_profile = _profile_for(image.info.get("icc_profile"), grayscale)
        # With a profile kept, these would only contradict it (and sRGB may not stand beside one).
        colour_chunks = _png_colour_chunks(image.info) if image_format == "PNG" and icc_profile is None else ()
    except ImageError:
        raise
    except Exception as exc:
        # Truncated data, bad checksums, corrupt compressed streams; and for fuzzed files Pillow's
        # plugins also raise TypeError, KeyError, struct.error and more. Untrusted bytes that the
        # decoder chokes on are a bad upload, whatever the exception's type.
        raise InvalidImage(f"the {image_format} data is damaged and cannot be decoded "
                           f"({type(exc).__name__}: {exc})") from None
    return DecodedImage(rgb=rgb, alpha=alpha, grayscale=grayscale, format=image_format, icc_profile=icc_profile,
                        png_colour_chunks=colour_chunks)


def read_image(path: str | Path, max_pixels: int | None = None) -> DecodedImage:
    return decode(Path(path).read_bytes(), max_pixels)


def _restored_image(restored_rgb: np.ndarray, source: DecodedImage) -> Image.Image:
    if restored_rgb.shape != source.rgb.shape or restored_rgb.dtype != np.uint8:
        raise ValueError(f"restored pixels {restored_rgb.shape} {restored_rgb.dtype} do not match "
                         f"the source {source.rgb.shape} uint8")
    image = Image.fromarray(restored_rgb, "RGB")
    if source.grayscale:
        image = image.convert("L")
    if source.alpha is not None:
        image.putalpha(Image.fromarray(source.alpha, "L"))
    return image


def encode_png(restored_rgb: np.ndarray, source: DecodedImage) -> bytes:
    """PNG bytes of the restored pixels, in the source's kind (grayscale, alpha, colour profile) at its size."""
    buffer = io.BytesIO()
    save_png(restored_rgb, source, buffer)
    return buffer.getvalue()


def save_png(restored_rgb: np.ndarray, source: DecodedImage, path: str | Path | io.BytesIO) -> None:
    options: dict = {"icc_profile": source.icc_profile} if source.icc_profile else {}
    if source.png_colour_chunks:
        options["pnginfo"] = PngImagePlugin.PngInfo()
        for chunk_type, chunk_data in source.png_colour_chunks:
            options["pnginfo"].add(chunk_type, chunk_data)
    _restored_image(restored_rgb, source).save(path, format="PNG", compress_level=_PNG_COMPRESS_LEVEL, **options)
