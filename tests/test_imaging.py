"""Every image mode and broken file gets its documented behaviour."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from service import imaging


def _encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_16bit(pixels: np.ndarray, colour_type: int = 2) -> bytes:
    """A 16-bit PNG written by hand (Pillow writes no 16-bit colour): colour type 2 is RGB, 4 grey and alpha."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    return (b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))


def _png_declaring(width: int, height: int) -> bytes:
    """A valid header for a huge image and a tiny body: a decompression bomb's shape."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


RGB = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)


def test_rgb_png_round_trips():
    decoded = imaging.decode(_encode(Image.fromarray(RGB)))
    assert np.array_equal(decoded.rgb, RGB) and decoded.alpha is None and not decoded.grayscale
    out = Image.open(io.BytesIO(imaging.encode_png(decoded.rgb, decoded)))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), RGB)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP", "TIFF"])
def test_supported_formats_decode(fmt):
    decoded = imaging.decode(_encode(Image.fromarray(RGB), fmt))
    assert decoded.rgb.shape == RGB.shape and decoded.format == fmt


def test_grayscale_is_restored_as_rgb_and_returned_as_grayscale():
    grey = RGB[:, :, 0]
    decoded = imaging.decode(_encode(Image.fromarray(grey, "L")))
    assert decoded.grayscale and decoded.rgb.shape == (20, 30, 3)
    assert (decoded.rgb == grey[:, :, None]).all()
    out = Image.open(io.BytesIO(imaging.encode_png(decoded.rgb, decoded)))
    assert out.mode == "L" and np.array_equal(np.asarray(out), grey)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, the weights Pillow's RGB -> L conversion uses."""
    red, green, blue = rgb.astype(np.float64).transpose(2, 0, 1)
    return 0.299 * red + 0.587 * green + 0.114 * blue


@pytest.mark.parametrize("mode", ["L", "LA"])
def test_grayscale_output_is_the_luma_of_the_restored_colour(mode):
    # The network gives a grey upload's three channels back unequal; the answer is their luma,
    # not any one channel. Channels drawn independently differ by far more than rounding.
    grey = np.dstack([RGB[:, :, 0], RGB[:, :, 1]])[:, :, :len(mode)].squeeze()
    decoded = imaging.decode(_encode(Image.fromarray(grey, mode)))
    restored = np.random.default_rng(4).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = Image.open(io.BytesIO(imaging.encode_png(restored, decoded)))
    assert out.mode == mode
    luma = np.asarray(out.getchannel("L")).astype(np.float64)
    assert np.abs(luma - _luma(restored)).max() <= 0.51  # rounded to the nearest level
    assert np.abs(luma - restored[:, :, 0]).max() > 50


def test_alpha_is_kept_and_reattached():
    alpha = np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8)
    rgba = np.dstack([RGB, alpha])
    decoded = imaging.decode(_encode(Image.fromarray(rgba, "RGBA")))
    assert np.array_equal(decoded.alpha, alpha) and np.array_equal(decoded.rgb, RGB)
    restored = 255 - decoded.rgb
    out = np.asarray(Image.open(io.BytesIO(imaging.encode_png(restored, decoded))))
    assert out.shape == (20, 30, 4) and np.array_equal(out[:, :, 3], alpha) and np.array_equal(out[:, :, :3], restored)


def test_grayscale_with_alpha():
    la = Image.fromarray(np.dstack([RGB[:, :, 0], RGB[:, :, 1]]), "LA")
    decoded = imaging.decode(_encode(la))
    assert decoded.grayscale and np.array_equal(decoded.alpha, RGB[:, :, 1])
    assert Image.open(io.BytesIO(imaging.encode_png(decoded.rgb, decoded))).mode == "LA"


def test_palette_images_expand_to_truecolour():
    palette = Image.fromarray(RGB).quantize(16)
    decoded = imaging.decode(_encode(palette))
    assert np.array_equal(decoded.rgb, np.asarray(palette.convert("RGB"))) and decoded.alpha is None
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    decoded = imaging.decode(_encode(transparent, transparency=0))
    assert decoded.alpha is not None and (decoded.alpha == 0).any()


def test_sixteen_bit_grey_is_scaled_to_eight_bits():
    values = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    decoded = imaging.decode(_encode(Image.fromarray(values)))
    assert decoded.grayscale
    assert decoded.rgb[0, :, 0].tolist() == [0, 1, 255, 128]


def test_sixteen_bit_grey_is_rounded_to_the_nearest_eight_bit_level():
    # One 8-bit level is 257 16-bit steps. Values 200 steps past a multiple of 257 round up and
    # values 56 steps past it round down, so flooring and ceiling each get half of them wrong.
    levels = np.arange(255)
    values = np.concatenate([257 * levels + 200, 257 * levels + 56, [0, 65535]]).astype(np.uint16)
    decoded = imaging.decode(_encode(Image.fromarray(values[None, :])))
    assert decoded.grayscale
    assert decoded.rgb[0, :, 0].tolist() == np.rint(values / 257).astype(int).tolist()


def test_sixteen_bit_rgb_is_reduced_to_eight_bits():
    pixels = np.random.default_rng(2).integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    decoded = imaging.decode(_png_16bit(pixels))
    assert decoded.rgb.dtype == np.uint8 and decoded.rgb.shape == (5, 7, 3)
    assert np.abs(decoded.rgb.astype(int) - pixels / 257.0).max() <= 1


def test_sixteen_bit_grey_with_alpha_comes_back_as_grey_with_alpha():
    pixels = np.random.default_rng(4).integers(0, 65536, (6, 9, 2)).astype(np.uint16)
    decoded = imaging.decode(_png_16bit(pixels, colour_type=4))
    assert decoded.grayscale and decoded.alpha is not None
    assert np.abs(decoded.rgb[:, :, 0].astype(int) - pixels[:, :, 0] / 257.0).max() <= 1
    restored = decoded.rgb.copy()
    restored[:, :, 0] //= 2  # a network's colour cast: the result stays grey all the same
    assert Image.open(io.BytesIO(imaging.encode_png(restored, decoded))).mode == "LA"


def _tiff(samples: np.ndarray, photometric: int = 1, sample_format: int = 1) -> bytes:
    """A one-strip little-endian TIFF written by hand, for layouts Pillow does not write."""
    height, width, channels = samples.shape
    pixels = samples.astype(samples.dtype.newbyteorder("<")).tobytes()
    bits = samples.dtype.itemsize * 8
    tags = [(256, width), (257, height), (258, bits), (259, 1), (262, photometric), (273, None), (277, channels),
            (278, height), (279, len(pixels)), (339, sample_format)]
    if channels == 2:
        tags.insert(-1, (338, 2))  # the second channel is unassociated alpha
    # Counts of 1 with per-channel tags are read as applying to every channel.
    data_offset = 8 + 2 + 12 * len(tags) + 4
    entries = b"".join(struct.pack("<HHII", tag, 4, 1, data_offset if value is None else value)
                       for tag, value in tags)
    return b"II*\x00" + struct.pack("<IH", 8, len(tags)) + entries + struct.pack("<I", 0) + pixels


def test_integers_wider_than_sixteen_bits_or_signed_are_refused():
    # Whatever values they hold: 0-255 in 32 bits is no 16-bit image, and scaling it as one
    # would return it black.
    for values in (np.arange(600, dtype=np.int32).reshape(20, 30) * 1000, np.arange(4, dtype=np.int32).reshape(1, 4)):
        with pytest.raises(imaging.UnsupportedImageFormat, match="32-bit"):
            imaging.decode(_encode(Image.fromarray(values, "I"), "TIFF"))
    with pytest.raises(imaging.UnsupportedImageFormat, match="16-bit signed"):
        imaging.decode(_tiff(np.array([[[0], [16384], [32767]]], np.int16), sample_format=2))


def test_sixteen_bit_grey_stored_white_is_zero_is_not_a_negative():
    for samples, shown in (([[0, 255]], [255, 0]), ([[0, 65535]], [255, 0])):
        dtype = np.uint8 if max(samples[0]) == 255 else np.uint16
        decoded = imaging.decode(_tiff(np.array(samples, dtype)[:, :, None], photometric=0))
        assert decoded.grayscale and decoded.rgb[0, :, 0].tolist() == shown


@pytest.mark.parametrize("name,data,message", [
    ("16-bit grey with alpha TIFF", _tiff(np.zeros((4, 5, 2), np.uint16)), "2 channels of 16-bit unsigned"),
    ("16-bit float TIFF", _tiff(np.zeros((4, 5, 1), np.float16), sample_format=3), "16-bit floating point"),
    ("HEIC", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(100), "HEIF/HEIC"),
    ("JPEG XL", b"\x00\x00\x00\x0cJXL \r\n\x87\n" + bytes(100), "JPEG XL"),
], ids=["16-bit grey with alpha TIFF", "16-bit float TIFF", "HEIC", "JPEG XL"])
def test_real_images_pillow_cannot_read_are_unsupported_not_invalid(name, data, message):
    with pytest.raises(imaging.UnsupportedImageFormat, match=message) as error:
        imaging.decode(data)
    assert error.value.status_code == 415


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_a_tiff_with_a_damaged_header_is_still_invalid():
    with pytest.raises(imaging.InvalidImage):
        imaging.decode(b"II*\x00\x08\x00\x00\x00" + bytes(3))


def _png_with_colour_key(rows: bytes, width: int, bit_depth: int, colour_type: int, key: bytes) -> bytes:
    return (b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, 1, bit_depth, colour_type, 0, 0, 0))
            + _png_chunk(b"tRNS", key) + _png_chunk(b"IDAT", zlib.compress(b"\x00" + rows)) + _png_chunk(b"IEND", b""))


@pytest.mark.parametrize("kind,data,transparent", [
    ("rgb", _png_with_colour_key(bytes([10, 20, 30, 10, 20, 31, 10, 20, 30]), 3, 8, 2, struct.pack(">3H", 10, 20, 30)),
     [True, False, True]),
    ("grey", _png_with_colour_key(bytes([7, 8, 7]), 3, 8, 0, struct.pack(">H", 7)), [True, False, True]),
    ("2-bit grey", _png_with_colour_key(bytes([0b00011011]), 4, 2, 0, struct.pack(">H", 2)),
     [False, False, True, False]),
    ("1-bit grey", _png_with_colour_key(bytes([0b10110000]), 4, 1, 0, struct.pack(">H", 0)),
     [False, True, False, False]),
    ("16-bit grey", _png_with_colour_key(struct.pack(">3H", 700, 701, 700), 3, 16, 0, struct.pack(">H", 700)),
     [True, False, True]),
    # Pillow reads 16-bit colour as high bytes: the key matches on those.
    ("16-bit rgb", _png_with_colour_key(struct.pack(">6H", 1000, 2000, 3000, 1000, 2300, 3000), 2, 16, 2,
                                        struct.pack(">3H", 1000, 2000, 3000)), [True, False]),
], ids=["rgb", "grey", "2-bit grey", "1-bit grey", "16-bit grey", "16-bit rgb"])
def test_a_pngs_transparent_colour_key_becomes_alpha(kind, data, transparent):
    decoded = imaging.decode(data)
    assert decoded.alpha is not None and (decoded.alpha == 0)[0].tolist() == transparent
    assert decoded.grayscale == ("grey" in kind)
    result = Image.open(io.BytesIO(imaging.encode_png(decoded.rgb, decoded)))
    assert result.mode == ("LA" if "grey" in kind else "RGBA")
    assert (np.asarray(result)[..., -1] == 0)[0].tolist() == transparent


def _icc(space: bytes) -> bytes:
    from PIL import ImageCms
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return profile[:16] + space + profile[20:]  # the header's colour space field


@pytest.mark.parametrize("kind", ["rgb jpeg", "rgb png", "rotated jpeg", "grey png"])
def test_a_colour_profile_is_carried_to_the_result(kind):
    image = Image.fromarray(RGB[:, :, 0] if kind == "grey png" else RGB)
    profile = _icc(b"GRAY" if kind == "grey png" else b"RGB ")
    options = {"icc_profile": profile}
    if kind == "rotated jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6
        options["exif"] = exif.tobytes()
    decoded = imaging.decode(_encode(image, "JPEG" if "jpeg" in kind else "PNG", **options))
    result = Image.open(io.BytesIO(imaging.encode_png(decoded.rgb, decoded)))
    assert result.info.get("icc_profile") == profile


@pytest.mark.parametrize("chunks", [
    [(b"gAMA", struct.pack(">I", 100_000))],  # linear: shown far darker if the result forgot it
    [(b"gAMA", struct.pack(">I", 55_556)), (b"cHRM", struct.pack(">8I", 31270, 32900, 64000, 33000, 30000,
                                                                  60000, 15000, 6000))],
    [(b"sRGB", b"\x00"), (b"gAMA", struct.pack(">I", 45_455))],
], ids=["linear gamma", "gamma 1.8 and chromaticities", "srgb"])
def test_a_pngs_gamma_chromaticities_and_srgb_chunks_are_kept(chunks):
    info = PngImagePlugin.PngInfo()
    for chunk_type, data in chunks:
        info.add(chunk_type, data)
    source = Image.open(io.BytesIO(_encode(Image.fromarray(RGB), pnginfo=info)))
    decoded = imaging.decode(_encode(Image.fromarray(RGB), pnginfo=info))
    result = Image.open(io.BytesIO(imaging.encode_png(decoded.rgb, decoded)))
    described = ("gamma", "chromaticity", "srgb")
    assert {key: result.info.get(key) for key in described} == {key: source.info.get(key) for key in described}
    assert any(key in source.info for key in described)


def test_a_profile_for_another_colour_space_is_dropped():
    cmyk = _encode(Image.fromarray(RGB).convert("CMYK"), "JPEG", icc_profile=_icc(b"CMYK"))
    decoded = imaging.decode(cmyk)
    assert decoded.icc_profile is None
    assert "icc_profile" not in Image.open(io.BytesIO(imaging.encode_png(decoded.rgb, decoded))).info
    # An RGB profile on a grey image describes neither what is stored nor what comes back.
    grey = imaging.decode(_encode(Image.fromarray(RGB[:, :, 0]), "PNG", icc_profile=_icc(b"RGB ")))
    assert grey.icc_profile is None


def test_exif_orientation_is_applied():
    image = Image.fromarray(RGB)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    decoded = imaging.decode(_encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert decoded.rgb.shape == (30, 20, 3)


def test_cmyk_jpeg_becomes_rgb():
    decoded = imaging.decode(_encode(Image.fromarray(RGB).convert("CMYK"), "JPEG"))
    assert decoded.rgb.shape == (20, 30, 3)


def test_one_bit_images():
    decoded = imaging.decode(_encode(Image.fromarray(RGB[:, :, 0] > 128)))
    assert decoded.grayscale and set(np.unique(decoded.rgb)) <= {0, 255}


def test_animations_and_multipage_files_are_refused():
    frames = [Image.fromarray(RGB), Image.fromarray(255 - RGB)]
    apng = _encode(frames[0], save_all=True, append_images=frames[1:])
    tiff = _encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    # A TIFF's pages are not counted (that walks every directory of the file): one ahead is enough.
    for data, count in ((apng, "2 frames"), (tiff, "more than one frame")):
        with pytest.raises(imaging.UnsupportedImageFormat, match=count):
            imaging.decode(data)


def test_other_formats_are_unsupported():
    with pytest.raises(imaging.UnsupportedImageFormat) as error:
        imaging.decode(_encode(Image.fromarray(RGB), "GIF"))
    assert error.value.status_code == 415


def test_pixel_limit_is_checked_from_the_header():
    bomb = _png_declaring(100_000, 100_000)
    assert len(bomb) < 200
    with pytest.raises(imaging.ImageTooLarge) as error:
        imaging.decode(bomb, max_pixels=50_000_000)
    assert error.value.status_code == 413
    # Past Pillow's own ceiling as well: the message names the declared size and this limit.
    assert str(error.value) == "the image declares 10000000000 pixels; the limit is 50000000"
    with pytest.raises(imaging.ImageTooLarge):
        imaging.decode(_encode(Image.fromarray(RGB)), max_pixels=599)
    assert imaging.decode(_encode(Image.fromarray(RGB)), max_pixels=600).rgb.shape == RGB.shape


@pytest.mark.parametrize("name,data", [
    ("empty", b""),
    ("random", np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
    ("text", b"hello, this is not an image\n" * 20),
    ("truncated png", _encode(Image.fromarray(RGB))[:200]),
    ("truncated jpeg", _encode(Image.fromarray(RGB), "JPEG")[:300]),
])
def test_broken_data_is_an_invalid_image(name, data):
    with pytest.raises(imaging.InvalidImage) as error:
        imaging.decode(data)
    assert error.value.status_code == 400


def test_corrupt_png_checksum_is_an_invalid_image():
    data = bytearray(_encode(Image.fromarray(RGB)))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF
    with pytest.raises(imaging.InvalidImage):
        imaging.decode(bytes(data))
