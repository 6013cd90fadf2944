"""utils.image decoding: simplejpeg's pixels are cv2.imdecode's, bit for bit, and cv2 takes the rest."""

import struct

import cv2
import numpy as np
import pytest

import dataset as D
from utils.image import decode_or_none, decode_rgb


def cv2_rgb(payload: bytes) -> np.ndarray | None:
    return cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR_RGB)


def smooth_image(shape=(112, 112, 3), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (9, 9, shape[2]) if len(shape) == 3 else (9, 9), dtype=np.uint8)
    return cv2.resize(small, shape[1::-1], interpolation=cv2.INTER_CUBIC)


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 EXIF segment holding one tag, Orientation, right after SOI."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    body = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def encode(image: np.ndarray, *params: int) -> bytes:
    return cv2.imencode(".jpg", image, list(params))[1].tobytes()


@pytest.mark.parametrize("sampling", ["411", "420", "422", "440", "444"])
@pytest.mark.parametrize("progressive", [0, 1])
def test_jpeg_pixels_equal_cv2(sampling, progressive):
    factor = getattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{sampling}")
    for shape in [(112, 112, 3), (97, 113, 3), (128, 128, 3)]:
        jpeg = encode(smooth_image(shape), cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factor,
                      cv2.IMWRITE_JPEG_PROGRESSIVE, progressive, cv2.IMWRITE_JPEG_RST_INTERVAL, 2 * progressive)
        np.testing.assert_array_equal(decode_or_none(jpeg), cv2_rgb(jpeg))


def test_dataset_jpegs_equal_cv2(shared_fixtures, tmp_path):
    from synthetic import ensure_synthetic

    sources = [D.RecordIODataset(shared_fixtures / "mxnet_written", train=False),
               D.RecordIODataset(ensure_synthetic(tmp_path, 20, 4, 20, 3), train=False)]
    for ds in sources:
        payloads, _ = ds._samples(np.arange(len(ds)))
        for payload in payloads:
            np.testing.assert_array_equal(decode_or_none(payload), cv2_rgb(bytes(payload)))


def test_grey_exif_png_and_damaged_images_decode_as_cv2_does():
    grey = encode(smooth_image((112, 112)))
    np.testing.assert_array_equal(decode_or_none(grey), cv2_rgb(grey))
    rotated = with_exif_orientation(encode(smooth_image((96, 112, 3))), 6)  # 90 degrees clockwise
    assert cv2_rgb(rotated).shape == (112, 96, 3)  # cv2 applies EXIF orientation ...
    np.testing.assert_array_equal(decode_or_none(rotated), cv2_rgb(rotated))  # ... and so does decode_or_none
    png = cv2.imencode(".png", smooth_image())[1].tobytes()
    np.testing.assert_array_equal(decode_or_none(png), cv2_rgb(png))
    jpeg = encode(smooth_image())
    for damaged in (jpeg[: len(jpeg) // 2], b"\xff\xd8 not a jpeg", b"", b"\xff\xd8"):
        got, want = decode_or_none(damaged), cv2_rgb(damaged) if damaged else None
        assert (got is None and want is None) or np.array_equal(got, want)
    with pytest.raises(ValueError, match="cannot decode"):
        decode_rgb(b"\xff\xd8 not a jpeg")
    np.testing.assert_array_equal(decode_or_none(np.frombuffer(jpeg, np.uint8)), cv2_rgb(jpeg))  # .bin arrays


def test_decoding_into_an_array():
    out = np.zeros((112, 112, 3), np.uint8)
    jpeg = encode(smooth_image())
    assert decode_or_none(jpeg, out=out) is out  # decoded in place, no copy
    np.testing.assert_array_equal(out, cv2_rgb(jpeg))
    for shape in [(97, 113, 3), (128, 128, 3)]:  # another size: a new array, `out` is only scratch
        other = encode(smooth_image(shape))
        image = decode_or_none(other, out=out)
        assert image is not out and not np.shares_memory(image, out)
        np.testing.assert_array_equal(image, cv2_rgb(other))


@pytest.mark.parametrize("flip", [False, True])
def test_preprocess_batch_equals_preprocess(flip):
    from utils.image import preprocess, preprocess_batch

    batch = np.random.default_rng(1).integers(0, 256, (3, 112, 96, 3), dtype=np.uint8)
    expected = np.stack([preprocess(image, flip=flip) for image in batch])
    np.testing.assert_array_equal(preprocess_batch(batch, flip=flip), expected)
    np.testing.assert_array_equal(preprocess_batch(batch[:, :, ::2], flip=flip),  # a strided view
                                  np.stack([preprocess(image, flip=flip) for image in batch[:, :, ::2]]))
