"""Decoding and resizing real images of every awkward kind, with exact expectations."""

import io

import numpy as np
import pytest
from PIL import Image
from support.hostile import encode, png_claiming

from curate.kit.imaging import ImageOptions, accept_header, process, sniff


def decoded(p) -> Image.Image:
    assert p.status == "ok", p
    return Image.open(io.BytesIO(p.image))


@pytest.mark.parametrize(
    "mode, size, expected",
    [
        ("no", (300, 200), (300, 200)),
        ("keep_ratio", (300, 200), (96, 64)),
        ("keep_ratio_largest", (300, 200), (64, 43)),
        ("center_crop", (300, 200), (64, 64)),
        ("border", (300, 200), (64, 64)),
    ],
)
def test_resize_modes_as_img2dataset(mode, size, expected):
    p = process(encode(Image.new("RGB", size, "red"), "JPEG"), ImageOptions(image_size=64, resize_mode=mode))
    img = decoded(p)
    assert img.size == expected and (p.width, p.height) == expected
    assert (p.orig_width, p.orig_height) == size and p.mime == "image/jpeg"


def test_border_pads_with_black_and_center_crop_keeps_the_middle():
    img = Image.new("RGB", (200, 100), "white")
    img.paste(Image.new("RGB", (100, 100), "blue"), (50, 0))
    bordered = np.asarray(
        decoded(
            process(
                encode(img, "PNG"), ImageOptions(image_size=100, resize_mode="border", encode_format="png")
            )
        )
    )
    assert (
        bordered.shape == (100, 100, 3)
        and bordered[0, 50].tolist() == [0, 0, 0]
        and bordered[50, 50].tolist() == [0, 0, 255]
    )
    cropped = np.asarray(
        decoded(
            process(
                encode(img, "PNG"),
                ImageOptions(image_size=100, resize_mode="center_crop", encode_format="png"),
            )
        )
    )
    assert cropped.shape == (100, 100, 3) and (cropped == [0, 0, 255]).all()


def test_resize_only_if_bigger_never_upscales():
    p = process(
        encode(Image.new("RGB", (40, 30)), "PNG"),
        ImageOptions(image_size=64, resize_mode="keep_ratio", resize_only_if_bigger=True),
    )
    assert (p.width, p.height) == (40, 30)


def test_cmyk_16bit_palette_and_alpha_become_8bit_rgb():
    cmyk = encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG")  # pure red in CMYK
    p = process(cmyk, ImageOptions(resize_mode="no", encode_format="png"))
    assert decoded(p).mode == "RGB" and decoded(p).getpixel((5, 5))[0] > 240

    sixteen = Image.fromarray(np.full((16, 16), 65535 // 2, dtype=np.uint16))  # mid grey, 16 bits
    p = process(encode(sixteen, "PNG"), ImageOptions(resize_mode="no", encode_format="png"))
    assert decoded(p).getpixel((0, 0)) == (127, 127, 127)

    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    p = process(encode(pal, "PNG", transparency=0), ImageOptions(resize_mode="no", encode_format="png"))
    assert decoded(p).getpixel((1, 1)) == (255, 255, 255)  # transparent over white

    la = Image.new("LA", (8, 8), (0, 128))  # black at half opacity
    p = process(encode(la, "PNG"), ImageOptions(resize_mode="no", encode_format="png"))
    assert 120 <= decoded(p).getpixel((0, 0))[0] <= 135


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (60, 20), "green")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 when displayed
    p = process(encode(img, "JPEG", exif=exif), ImageOptions(resize_mode="no"))
    assert (p.orig_width, p.orig_height) == (20, 60) and decoded(p).size == (20, 60)


def test_first_frame_of_an_animation():
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    p = process(gif, ImageOptions(resize_mode="no", encode_format="png"))
    assert p.mime == "image/gif" and decoded(p).getpixel((3, 3))[0] > 200
    webp = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    assert (
        decoded(process(webp, ImageOptions(resize_mode="no", encode_format="png"))).getpixel((3, 3))[0] > 200
    )


def test_bombs_are_refused_before_decoding():
    p = process(png_claiming(100_000, 100_000), ImageOptions())
    assert p.status == "too_many_pixels" and "10000000000 pixels" in p.error
    p = process(encode(Image.new("RGB", (640, 480)), "JPEG"), ImageOptions(max_pixels=1000))
    assert p.status == "too_many_pixels"


@pytest.mark.parametrize(
    "data, status",
    [
        (b"<!DOCTYPE html><html><body>not found</body></html>", "not_an_image"),
        (b"", "not_an_image"),
        (b"\xff\xd8\xff\xe0 then garbage", "decode_error"),
    ],
)
def test_bytes_that_are_no_image(data, status):
    assert process(data, ImageOptions()).status == status


def test_truncated_jpeg_and_disallowed_format_and_size_limits():
    jpg = encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG"
    )
    assert process(jpg[: len(jpg) // 2], ImageOptions()).status == "decode_error"
    bmp = encode(Image.new("RGB", (8, 8)), "BMP")
    p = process(bmp, ImageOptions())
    assert p.status == "unsupported_format" and "bmp" in p.error
    assert process(bmp, ImageOptions(formats=("bmp",))).status == "ok"
    assert process(jpg, ImageOptions(min_image_size=100)).status == "too_small"
    wide = encode(Image.new("RGB", (300, 50)), "PNG")
    assert process(wide, ImageOptions(max_aspect_ratio=3)).status == "bad_aspect_ratio"


def test_original_bytes_are_kept_when_asked():
    jpg = encode(Image.new("RGB", (30, 20), "red"), "JPEG")
    p = process(jpg, ImageOptions(resize_mode="no", encode_format="original"))
    assert p.image == jpg and (p.width, p.height) == (30, 20)


def test_sniff():
    assert sniff(encode(Image.new("RGB", (2, 2)), "WEBP")) == ("webp", "image/webp")
    assert sniff(b"GIF89a...") == ("gif", "image/gif")
    assert sniff(b"<svg xmlns=") is None


def test_sniff_knows_avif_and_heif_by_their_ftyp_brands():
    avif = encode(Image.new("RGB", (8, 8)), "AVIF", speed=10)
    assert sniff(avif) == ("avif", "image/avif")
    assert sniff(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic") == ("heic", "image/heic")
    assert sniff(b"\x00\x00\x00\x14ftypmif1\x00\x00\x00\x00avif") == (
        "avif",
        "image/avif",
    )  # a compatible brand
    assert sniff(b"\x00\x00\x00\x14ftypisom\x00\x00\x00\x00mp41") is None  # an MP4 video


def test_the_accept_header_lists_the_decoded_formats():
    assert accept_header(["jpeg", "heic"]) == "image/jpeg,image/heic,image/heif,*/*;q=0.1"
