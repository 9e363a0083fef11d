"""What an upload's bytes say before any pixel is decoded: how many scans a JPEG has, how many
chunks a PNG has, and what kind of image lies behind a signature Pillow has no reader for.

:mod:`service.imaging` turns these facts into its refusals; nothing here decodes or raises for
the caller, so each walk stays a plain function of the bytes.
"""

from __future__ import annotations

import io
import re
import warnings

from PIL import TiffImagePlugin

__all__ = ["jpeg_scans_past", "png_chunks_past", "png_header", "kind_pillow_cannot_read", "tiff_tag"]

_JPEG_MARKER = re.compile(rb"\xff+([^\x00\xff])")  # a marker, after any fill bytes; FF00 is stuffing
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI, EOI: no length field


def jpeg_scans_past(data: bytes, limit: int) -> bool:
    """Whether a JPEG has more than ``limit`` scans, by walking its markers."""
    scans, position = 0, 2
    while (match := _JPEG_MARKER.search(data, position)) is not None:
        marker = match.group(1)[0]
        position = match.end()
        if marker == 0xD9:  # end of image
            return False
        if marker in _JPEG_STANDALONE:
            continue
        if marker == 0xDA:
            scans += 1
            if scans > limit:
                return True
        if position + 2 > len(data):
            return False
        # Skip the segment by its length, so that bytes inside headers (EXIF thumbnails, ICC
        # profiles) are never mistaken for markers; entropy-coded data after a scan header is
        # searched for the next marker.
        position += int.from_bytes(data[position:position + 2], "big")
    return False


def png_chunks_past(data: bytes, limit: int) -> bool:
    """Whether a PNG has more than ``limit`` chunks, by walking the chunk headers."""
    position, chunks = 8, 0
    while position + 8 <= len(data):
        chunks += 1
        if chunks > limit:
            return True
        if data[position + 4:position + 8] == b"IEND":
            return False
        position += 12 + int.from_bytes(data[position:position + 4], "big")
    return False


def png_header(data: bytes) -> tuple[int, int] | None:
    """A PNG's (bit depth, colour type), from the IHDR chunk that must come first."""
    # Signature (8), IHDR's length and type (8), width and height (8), bit depth, colour type.
    return (data[24], data[25]) if len(data) > 25 and data[12:16] == b"IHDR" else None


# An upload in one of these is a real image the service does not take (415), not bytes that are
# no image (400). ISO-BMFF brands name HEIF (iPhones' HEIC) and AVIF, which newer Pillows
# identify by themselves.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1",
                          b"msf1", b"avif", b"avis"})
_JPEG_XL_SIGNATURES = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")
_TIFF_SAMPLE_FORMATS = {1: "unsigned integers", 2: "signed integers", 3: "floating point"}


def kind_pillow_cannot_read(data: bytes) -> str | None:
    """What images Pillow could not identify ``data`` as ("HEIF/HEIC images", "TIFFs of 2
    channels of 16-bit unsigned integers", ...), or None when the bytes are no image it knows of."""
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "AVIF images" if data[8:12].startswith(b"avi") else "HEIF/HEIC images"
    if data.startswith(_JPEG_XL_SIGNATURES):
        return "JPEG XL images"
    if data.startswith(_TIFF_SIGNATURES):
        layout = _tiff_layout_pillow_cannot_read(data)
        return f"TIFFs of {layout}" if layout else None
    return None


def _tiff_layout_pillow_cannot_read(data: bytes) -> str | None:
    """The sample layout of a well-formed TIFF that Pillow has no reader for (16-bit grey with
    alpha, 16-bit floats, ...), or None when the header itself is damaged."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            TiffImagePlugin.TiffImageFile(io.BytesIO(data))
            return None
        except SyntaxError as exc:
            if str(exc) != "unknown pixel mode":  # what Pillow says of a layout; anything else is damage
                return None
        except Exception:
            return None
        try:
            stream = io.BytesIO(data)
            directory = TiffImagePlugin.ImageFileDirectory_v2(stream.read(8))
            stream.seek(directory.next)
            directory.load(stream)
            channels, bits = tiff_tag(directory, 277, 1), tiff_tag(directory, 258, 1)
            sample_format = tiff_tag(directory, 339, 1)
        except Exception:
            return "a sample layout this service does not read"
    kind = _TIFF_SAMPLE_FORMATS.get(sample_format, f"sample format {sample_format}")
    return f"{channels} channel{'s' if channels != 1 else ''} of {bits}-bit {kind}"


def tiff_tag(tags, number: int, default: int) -> int:
    """A TIFF tag's first value: per-channel tags (bits, sample format) repeat it for each channel."""
    value = tags.get(number, default)
    return int(value[0] if isinstance(value, tuple) and value else value)
