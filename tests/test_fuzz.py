"""Fuzzing: the running service against its own OpenAPI document, and the image decoder against
arbitrary and mutated bytes.

Both are bounded by example counts chosen to finish in well under a minute on a loaded two-core
machine; the seeds are fixed (``derandomize``) so a failure found in CI reproduces locally.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service import imaging
from service.config import Settings

from service_helpers import random_image, running_server

pytestmark = [pytest.mark.timeout(180),
              # Pillow warns about each damaged TIFF tag it skips; the outcome is what is checked.
              pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")]

FUZZ_MAX_PIXELS = 64 * 64


@pytest.fixture(scope="module")
def server(tiny_weights):
    settings = Settings(tasks="denoising", weights_denoising=tiny_weights(5), device="cpu", tile_size=32,
                        tile_overlap=8, max_batch_size=4, max_batch_wait_ms=5, max_queued_tiles=64,
                        max_upload_bytes=200_000, max_pixels=FUZZ_MAX_PIXELS, request_timeout_s=30,
                        log_level="warning")
    with running_server(settings) as running:
        yield running


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_the_service_holds_to_its_openapi_document(server, mode):
    """No 5xx, and every answer (status, content type, headers, body) is one the document allows."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    answered: list[int] = []

    @given(case=schema.as_strategy(generation_mode=mode))
    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def check(case):
        # Not positive_data_acceptance: a schema cannot say that the bytes must decode as an
        # image, so schema-valid uploads (empty files, random bytes) rightly get 400/415.
        response = case.call_and_validate(base_url=server.url, timeout=30,
                                          excluded_checks=[schemathesis.checks.positive_data_acceptance])
        answered.append(response.status_code)

    check()
    assert answered and max(answered) < 500


# -- the decoder --------------------------------------------------------------------------------

def _sample(fmt: str, mode: str = "RGB") -> bytes:
    image = Image.fromarray(random_image(12, 9, seed=1)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


VALID_FILES = [_sample("PNG"), _sample("PNG", "P"), _sample("PNG", "LA"), _sample("JPEG"), _sample("JPEG", "CMYK"),
               _sample("WEBP"), _sample("BMP"), _sample("TIFF"), _sample("GIF")]


# TIFFs the mutation fuzz found on which Pillow raises TypeError (from n_frames and from load()),
# which service.imaging once let through, so that over HTTP they got 500 instead of 400. Kept as
# fixed cases: the fuzz's derandomized run reached them only on some machines' timings.
KNOWN_TIFF_TYPE_ERRORS = {
    "no dimensions": bytes.fromhex(
        "49492a00080000000a0000010400010000000900000001010400010000000c0000000201030003000000860000000301"
        "0300010000000100000006010300010000000200000011010400010000008c0000001501030001000000030000001601"
        "0400010000000c0000001701040001000000440100001c010300010000000100000000400000080008000800ffe42279"
        "f3bd068366a852"),
    "float strip size": bytes.fromhex(
        "49492a00080000000a0000010400010000000900000001010400010000000c0000000201030003000000860000000301"
        "0300010000000100000006010300010000000200000011010c00010000008c0000001501030001000000030000001601"
        "0400010000000c0000001701040001000000440100001c010300010000000100000000000000080008000800ffe42279"
        "f3bd068366a852c1809651f3cd18ec08f6a4e724d26facd2aeb0daf2a972cd3fa02fd44f487078de451f5f6c246dee45"
        "3351e4d3ca3aca414c46c1682afad1a4022cb28c6202f315321d0e07353297dd2e3ce6c0a49c7fd69ac2c38948994ad1"
        "3a4c69540ad5e273a876d6c94519b91f242d9e4d2e0cda1f0c7018740b8216fa818e50225db52062a5693267552564e7"
        "84a41534ecfd938092f72643f316130531e617c04597e00f4ddec84776fc8c7fc779357c4da6ef1dd79711fb0035c5bf"
        "742a2ff6de23941764d58bb90aa10b4bdcd78d8ab947c8ec8957e24619f2d2b9737d20290250945229084df82e59ce6b"
        "21121dff8891c6b9f6d8fcff4a689fa11da2745fed9cb38cd5c5ba05d4eac762646d3ec2220ad56df1b73ea05187e3a5"
        "41df5209977503723a5e5b24f60f213c0975"),
}


def _assert_decoded_or_refused(data: bytes) -> None:
    try:
        decoded = imaging.decode(data, max_pixels=FUZZ_MAX_PIXELS)
    except imaging.ImageError as error:
        assert error.status_code in (400, 413, 415) and str(error)
        return
    assert isinstance(decoded, imaging.DecodedImage)
    assert decoded.rgb.dtype == np.uint8 and decoded.rgb.ndim == 3 and decoded.rgb.shape[2] == 3
    assert 1 <= decoded.height * decoded.width <= FUZZ_MAX_PIXELS
    if decoded.alpha is not None:
        assert decoded.alpha.shape == decoded.rgb.shape[:2] and decoded.alpha.dtype == np.uint8
    # What the service does next with a decoded image must work too.
    assert imaging.encode_png(decoded.rgb, decoded)[:8] == b"\x89PNG\r\n\x1a\n"


@given(st.binary(max_size=2048))
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
def test_decode_of_arbitrary_bytes_refuses_or_decodes(data):
    _assert_decoded_or_refused(data)


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_FILES)))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if action == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            # Extreme values hit sizes, lengths and counts in headers.
            data[position] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif len(data) > 1:
            del data[position:position + draw(st.integers(1, 16))]
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


@given(mutated_files())
@settings(max_examples=1500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
def test_decode_of_mutated_images_refuses_or_decodes(data):
    _assert_decoded_or_refused(data)


def test_the_seed_files_decode_so_the_mutations_start_from_real_images():
    refused = []
    for data in VALID_FILES:
        try:
            imaging.decode(data)
        except imaging.UnsupportedImageFormat:
            refused.append(data[:3])
    assert refused == [b"GIF"]


@pytest.mark.parametrize("name", KNOWN_TIFF_TYPE_ERRORS)
def test_damaged_tiffs_that_crashed_pillow_are_invalid_images(name):
    # Found by the fuzzer below: Pillow's TIFF plugin raised TypeError on these.
    with pytest.raises(imaging.InvalidImage):
        imaging.decode(KNOWN_TIFF_TYPE_ERRORS[name], max_pixels=FUZZ_MAX_PIXELS)
