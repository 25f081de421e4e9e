"""Decoding and resizing real images of every awkward kind, with exact expectations."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps
from support.hostile import encode, png_claiming

from curate.kit.imaging import ImageOptions, _transposed_box, accept_header, output_size, process, sniff


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


def photo(w: int, h: int, seed: int = 0) -> bytes:
    """A JPEG with structure at every scale (gradients, stripes, noise), as photos have."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x / 7) % 256, (y / 5) % 256, 128 + 100 * np.sin((x + 2 * y) / 40)], -1)
    rgb += np.random.default_rng(seed).normal(0, 8, rgb.shape)
    return encode(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)), "JPEG", quality=90)


def pixels(p) -> np.ndarray:
    return np.asarray(decoded(p), dtype=np.float64)


def test_without_perceptual_hash_there_is_no_phash():
    jpg = photo(64, 48)
    on, off = process(jpg, ImageOptions()), process(jpg, ImageOptions(perceptual_hash=False))
    assert on.phash and on.phash_mirror and on.pdq is None
    assert (off.phash, off.phash_mirror, off.pdq) == (None, None, None)
    assert off.image == on.image and off.sha256 == on.sha256 and off.md5 == on.md5  # too small to reduce
    kept = process(jpg, ImageOptions(resize_mode="no", encode_format="original", perceptual_hash=False))
    assert kept.image == jpg and kept.phash is None


def test_without_perceptual_hash_a_large_jpeg_is_decoded_at_a_reduced_scale():
    jpg = photo(2048, 1536)
    opt = ImageOptions(image_size=256, resize_mode="center_crop", perceptual_hash=False)
    p = process(jpg, opt)
    # By hand, Pillow's thumbnail rule: stored at 1/6 (a 341x256 image, cropped), decoded at 1/2 (1024x768,
    # still twice 341x256 on each side; 1/4 would not be), the centred square resized from that.
    img = Image.open(io.BytesIO(jpg))
    assert img.draft(None, (683, 512)) == ("RGB", (0, 0, 1024, 768)) and img.size == (1024, 768)
    by_hand = img.resize((256, 256), Image.Resampling.BOX, box=(128, 0, 896, 768))
    assert p.image == encode(by_hand, "JPEG", quality=95)
    assert (p.width, p.height, p.orig_width, p.orig_height) == (256, 256, 2048, 1536)
    full = process(jpg, ImageOptions(image_size=256, resize_mode="center_crop"))
    assert 0 < np.abs(pixels(p) - pixels(full)).mean() < 2


def test_a_jpeg_less_than_twice_too_big_is_decoded_at_full_size():
    jpg = photo(400, 300)
    opt = ImageOptions(image_size=256, resize_mode="center_crop")
    assert (
        process(jpg, ImageOptions(**{**opt.__dict__, "perceptual_hash": False})).image
        == process(jpg, opt).image
    )


@pytest.mark.parametrize("mode", ["keep_ratio", "keep_ratio_largest", "center_crop", "border"])
@pytest.mark.parametrize("size", [(2050, 1201), (1201, 2050), (997, 3001)])
def test_a_reduced_decode_gives_the_size_and_nearly_the_pixels_of_a_full_one(mode, size):
    jpg = photo(*size)
    opt = ImageOptions(image_size=200, resize_mode=mode)
    full, reduced = (
        process(jpg, opt),
        process(jpg, ImageOptions(**{**opt.__dict__, "perceptual_hash": False})),
    )
    assert reduced.image != full.image  # reduced: every case here is at least 2x too big
    assert decoded(reduced).size == decoded(full).size == output_size(*size, opt)
    assert np.abs(pixels(reduced) - pixels(full)).mean() < 2


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_reduced_decode_of_a_turned_jpeg_is_turned_too(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = Image.open(io.BytesIO(photo(1203, 801)))
    jpg = encode(raw, "JPEG", quality=90, exif=exif)
    opt = ImageOptions(image_size=128, resize_mode="keep_ratio_largest")
    full, reduced = (
        process(jpg, opt),
        process(jpg, ImageOptions(**{**opt.__dict__, "perceptual_hash": False})),
    )
    assert decoded(reduced).size == decoded(full).size
    assert np.abs(pixels(reduced) - pixels(full)).mean() < 2


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_box_turns_with_the_image(orientation):
    size, box = (40, 30), (3, 5, 21, 12)
    marked = np.zeros((size[1], size[0]), np.uint8)
    marked[box[1] : box[3], box[0] : box[2]] = 255
    img = Image.fromarray(marked)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.info["exif"] = exif.tobytes()
    assert ImageOps.exif_transpose(img).getbbox() == _transposed_box(box, size, orientation)
