"""The guarded image decoder: RGB out of every JPEG / PNG flavour, and every bad file refused with
its path and a skip reason, the oversized ones before they are decompressed or read."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest

from pipelines.images import ImageError, decode_image


@pytest.fixture
def picture() -> np.ndarray:
    """RGB (60, 80, 3): a red left half, a blue right half."""
    image = np.zeros((60, 80, 3), np.uint8)
    image[:, :40] = (255, 0, 0)
    image[:, 40:] = (0, 0, 255)
    return image


def _encode(image_rgb: np.ndarray, ext: str, *params: int) -> bytes:
    if image_rgb.ndim == 3:  # cv2 writes BGR(A)
        rgba = image_rgb.shape[2] == 4
        image_rgb = cv2.cvtColor(image_rgb, cv2.COLOR_RGBA2BGRA if rgba else cv2.COLOR_RGB2BGR)
    return cv2.imencode(ext, image_rgb, list(params))[1].tobytes()


def test_decode_returns_rgb(tmp_path, picture):
    for ext in (".png", ".jpg"):
        path = tmp_path / f"p{ext}"
        path.write_bytes(_encode(picture, ext))
        image = decode_image(path, max_pixels=10_000)
        assert image.shape == (60, 80, 3)
        np.testing.assert_allclose(image[30, 10], (255, 0, 0), atol=8)  # red stays red
        np.testing.assert_allclose(image[30, 70], (0, 0, 255), atol=8)


def test_decode_progressive_jpeg_and_trailing_bytes(tmp_path, picture):
    path = tmp_path / "p.jpg"
    path.write_bytes(_encode(picture, ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1) + b"\0" * 50)
    assert decode_image(path, max_pixels=10_000).shape == (60, 80, 3)


def test_gray_and_rgba_become_rgb(tmp_path, picture):
    (tmp_path / "g.png").write_bytes(_encode(picture[..., 0], ".png"))
    gray = decode_image(tmp_path / "g.png", max_pixels=10_000)
    assert gray.shape == (60, 80, 3) and (gray == picture[..., :1]).all()
    rgba = np.dstack([picture, np.full((60, 80), 9, np.uint8)])
    (tmp_path / "a.png").write_bytes(_encode(rgba, ".png"))
    assert (decode_image(tmp_path / "a.png", max_pixels=10_000) == picture).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path, picture):
    image_module = pytest.importorskip("PIL.Image", reason="PIL writes the CMYK JPEG; cv2 cannot")
    image_module.fromarray(picture).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    image = decode_image(tmp_path / "c.jpg", max_pixels=10_000)
    assert image.shape == (60, 80, 3)
    np.testing.assert_allclose(image[30, 10], (255, 0, 0), atol=20)
    np.testing.assert_allclose(image[30, 70], (0, 0, 255), atol=20)


def test_exif_orientation_is_ignored(tmp_path, picture):
    image_module = pytest.importorskip("PIL.Image", reason="PIL writes the EXIF orientation tag")
    exif = image_module.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": COCO's annotations use the stored pixels
    buffer = io.BytesIO()
    image_module.fromarray(picture).save(buffer, "JPEG", exif=exif.tobytes())
    (tmp_path / "e.jpg").write_bytes(buffer.getvalue())
    assert decode_image(tmp_path / "e.jpg", max_pixels=10_000).shape == (60, 80, 3)


def test_bad_images_raise_image_error_naming_the_path(tmp_path, picture):
    jpeg = _encode(picture, ".jpg")
    cases = {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "no_eoi.jpg": jpeg[:-2],
        "random.jpg": np.random.default_rng(0).bytes(2000),
        "empty.jpg": b"",
        "truncated.png": _encode(picture, ".png")[:-40],
        "header_only.jpg": jpeg[:20],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    for name in [*cases, "missing.jpg"]:
        with pytest.raises(ImageError, match=str(tmp_path / name)):
            decode_image(tmp_path / name, max_pixels=10_000)


def test_huge_declared_size_is_refused_before_decoding(tmp_path, picture):
    png = bytearray(_encode(picture, ".png"))
    png[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width, height: 10^10 pixels, bad CRC
    (tmp_path / "bomb.png").write_bytes(bytes(png))
    with pytest.raises(ImageError, match="100000x100000 pixels"):
        decode_image(tmp_path / "bomb.png", max_pixels=89_478_485)
    (tmp_path / "p.jpg").write_bytes(_encode(picture, ".jpg"))
    with pytest.raises(ImageError, match="80x60 pixels"):
        decode_image(tmp_path / "p.jpg", max_pixels=80 * 60 - 1)


def test_a_huge_file_is_refused_before_it_is_read(tmp_path, picture):
    # a small valid JPEG followed by 32 MiB of (sparse) zeros: before, the whole file was read
    # into memory first (a multi-GB file would exhaust the task's memory), then called corrupt
    path = tmp_path / "huge.jpg"
    path.write_bytes(_encode(picture, ".jpg"))
    with open(path, "r+b") as f:
        f.truncate(32 << 20)
    with pytest.raises(ImageError, match=r"huge\.jpg: file of 33,554,432 bytes") as error:
        decode_image(path, max_pixels=10_000)
    assert error.value.reason == "too_large"
