"""watermark: real RapidOCR text detection and real invisible-watermark marks on generated images; LAION's
watermark detector as a tiny random timm model with LAION's head, saved and loaded through the real loader."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydantic import ValidationError

from curate.base import ModelNotFound
from curate.kit.image_batches import decode_rgb
from curate.stages.watermark import Watermark, WatermarkConfig

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
imwatermark = pytest.importorskip("imwatermark")
pytest.importorskip("rapidocr_onnxruntime")

TINY_ARCH = "test_efficientnet"
ALL_COLUMNS = ("watermark_score", "text_area", "ai_watermark")


# --- generated images and shards ------------------------------------------------------------------


def _jpeg(img: Image.Image | np.ndarray, **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(np.ascontiguousarray(img))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _shapes(seed: int, side: int = 256) -> Image.Image:
    """Flat discs and rectangles on a flat background: no text anywhere."""
    rng = np.random.default_rng(seed)

    def colour():
        return tuple(int(v) for v in rng.integers(0, 256, 3))

    img = Image.new("RGB", (side, side), colour())
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = rng.integers(20, side - 20, 2)
        r = int(rng.integers(15, 50))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour())
        x, y = rng.integers(0, side - 60, 2)
        draw.rectangle([x, y, x + int(rng.integers(20, 60)), y + int(rng.integers(20, 60))], fill=colour())
    return img


def _with_text(img: Image.Image) -> Image.Image:
    """Two lines of large outlined text across the image, as a stock-photo overlay."""
    img = img.copy()
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=36)  # Pillow's bundled font: no system font needed
    for y, line in ((40, "SALE 50% OFF"), (150, "stockphoto.com")):
        draw.text((12, y), line, font=font, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    return img


def _natural(seed: int, side: int = 512) -> np.ndarray:
    """A smooth colour field with discs and pixel noise, as an RGB uint8 array."""
    rng = np.random.default_rng(seed)
    base = rng.normal(128, 30, (side // 16, side // 16, 3)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(base).resize((side, side), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.integers(0, side, 2)
        r = int(rng.integers(20, side // 5))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(30, 226, 3)))
    pixels = np.asarray(img).astype(np.float32) + rng.normal(0, 6, (side, side, 3))
    return pixels.clip(0, 255).astype(np.uint8)


def _embed(rgb: np.ndarray, wm_type: str, content) -> np.ndarray:
    """``rgb`` marked as Stable Diffusion's reference code marks it: BGR into the dwtDct encoder."""
    encoder = imwatermark.WatermarkEncoder()
    encoder.set_watermark(wm_type, content)
    return encoder.encode(np.ascontiguousarray(rgb[:, :, ::-1]), "dwtDct")[:, :, ::-1]


def _shard(images: list[bytes | None], status=None, drop=None) -> pa.Table:
    n = len(images)
    return pa.table(
        {
            "uid": [f"u{i}" for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)],
            "status": status or ["ok"] * n,
            "drop_reason": pa.array(drop or [None] * n, pa.string()),
            "image": pa.array(images, pa.binary()),
        }
    )


# --- a tiny LAION detector -------------------------------------------------------------------------


def _laion_net(arch: str = TINY_ARCH, hidden: tuple[int, int] = (16, 8)):
    """LAION's layout, written out as LAION's inference.py does, on a tiny timm backbone."""
    from torch import nn

    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, num_classes=2)
    net.classifier = nn.Sequential(
        nn.Linear(net.num_features, hidden[0]),
        nn.ReLU(),
        nn.Dropout(p=0.3),
        nn.Linear(hidden[0], hidden[1]),
        nn.ReLU(),
        nn.Linear(hidden[1], 2),
    )
    with torch.no_grad():  # timm's init makes nearly constant features: spread them, so images differ
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        for i in (0, 3, 5):
            net.classifier[i].weight.mul_(5)
    return net.eval()


@pytest.fixture(scope="module")
def tiny_laion(tmp_path_factory):
    net = _laion_net()
    path = tmp_path_factory.mktemp("laion") / "watermark_model_v1.pt"
    torch.save(net.state_dict(), path)
    return net, path


def _stage(**kw) -> Watermark:
    kw.setdefault("threads", 2)
    return Watermark(WatermarkConfig(**kw))


def _ready(**kw) -> Watermark:
    """The stage set up, as an executor sets it up before its first shard."""
    stage = _stage(**kw)
    stage.ensure_setup()
    return stage


def _laion_only(path) -> Watermark:
    return _ready(text=False, ai_watermark=False, laion_arch=TINY_ARCH, laion_weights=str(path))


def _by_hand(net, datas: list[bytes]) -> np.ndarray:
    from torchvision import transforms as T

    pre = T.Compose(
        [T.Resize((256, 256)), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    )
    x = torch.stack([pre(decode_rgb(d)) for d in datas])
    with torch.no_grad():
        return torch.nn.functional.softmax(net(x), dim=1)[:, 0].numpy()


# --- LAION detector ---------------------------------------------------------------------------------


def test_laion_score_is_softmax_of_the_watermark_class(tiny_laion):
    net, path = tiny_laion
    datas = [_jpeg(_natural(i, side=200 + 40 * i)) for i in range(5)] + [_jpeg(_shapes(7).resize((90, 300)))]
    stage = _laion_only(path)
    out = stage(_shard(datas))
    got = np.array(out["watermark_score"].to_pylist())
    assert out.schema.field("watermark_score").type == pa.float32()
    np.testing.assert_allclose(got, _by_hand(net, datas), atol=1e-5)
    assert ((got >= 0) & (got <= 1)).all()
    assert got.std() > 1e-3  # the images are told apart, not one constant


def test_laion_loads_safetensors_and_ddp_prefixes(tiny_laion, tmp_path):
    from safetensors.torch import save_file

    net, _ = tiny_laion
    datas = [_jpeg(_natural(i, side=256)) for i in range(2)]
    state = {f"module.{k}": v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    out = _laion_only(tmp_path / "w.safetensors")(_shard(datas))
    np.testing.assert_allclose(out["watermark_score"].to_numpy(), _by_hand(net, datas), atol=1e-5)


def test_laion_head_sizes_come_from_the_weights(tmp_path):
    net = _laion_net(hidden=(12, 5))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    datas = [_jpeg(_natural(3, side=256))]
    out = _laion_only(tmp_path / "w.pt")(_shard(datas))
    np.testing.assert_allclose(out["watermark_score"].to_numpy(), _by_hand(net, datas), atol=1e-5)


def test_laion_weights_for_another_backbone_say_so(tiny_laion):
    _, path = tiny_laion
    for arch in ("test_resnet", "test_efficientnet_gn"):
        stage = _stage(text=False, ai_watermark=False, laion_arch=arch, laion_weights=str(path))
        with pytest.raises(ModelNotFound, match=arch):
            stage.ensure_setup()


def test_missing_laion_weights_fail_in_setup_and_name_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    monkeypatch.setenv("CURATE_MODEL_DIR", str(tmp_path / "models"))
    stage = _stage(text=False, ai_watermark=False)
    assert [s.local for s in stage.weights()] == ["laion/watermark/watermark_model_v1.pt"]
    with pytest.raises(ModelNotFound, match="curate models fetch"):
        stage.ensure_setup()
    with pytest.raises(ModelNotFound, match="does not exist"):
        _stage(text=False, ai_watermark=False, laion_weights=str(tmp_path / "nope.pt")).ensure_setup()


def test_weights_listed_only_when_laion_resolves_them(tiny_laion):
    _, path = tiny_laion
    assert _stage(laion_weights=str(path)).weights() == []
    assert _stage(laion=False).weights() == []


# --- rows, nulls and switches -----------------------------------------------------------------------


def test_only_kept_rows_with_a_decodable_image_are_scored(tiny_laion):
    _, path = tiny_laion
    good = _jpeg(_natural(1, side=256))
    small = _jpeg(_natural(2, side=128))  # too small to carry an AI watermark
    table = _shard(
        [good, None, good, b"not an image", small],
        status=["ok", "http_404", "ok", "ok", "ok"],
        drop=[None, None, "clip_score<0.28", None, None],
    )
    stage = _ready(laion_arch=TINY_ARCH, laion_weights=str(path))
    out = stage(table)
    for col in ALL_COLUMNS:
        values = out[col].to_pylist()
        assert out.schema.field(col).type == pa.float32()
        assert values[0] is not None and values[1] is None and values[2] is None and values[3] is None, col
    assert out["watermark_score"][4].as_py() is not None and out["text_area"][4].as_py() is not None
    assert out["ai_watermark"][4].as_py() is None
    assert out.column_names[:5] == table.column_names  # input columns untouched, in place
    assert out["drop_reason"].to_pylist() == table["drop_reason"].to_pylist()


@pytest.mark.parametrize(
    "switches",
    [
        {"laion": True, "text": False, "ai_watermark": False},
        {"laion": False, "text": True, "ai_watermark": False},
        {"laion": False, "text": False, "ai_watermark": True},
        {"laion": False, "text": True, "ai_watermark": True},
    ],
)
def test_only_enabled_detectors_write_columns(tiny_laion, switches):
    _, path = tiny_laion
    stage = _ready(laion_arch=TINY_ARCH, laion_weights=str(path), **switches)
    expected = tuple(col for col, on in zip(ALL_COLUMNS, switches.values(), strict=True) if on)
    assert stage.writes == expected
    table = _shard([_jpeg(_natural(0, side=256))])
    out = stage(table)
    assert out.column_names == table.column_names + list(expected)
    assert all(out[c][0].as_py() is not None for c in expected)


def test_an_empty_shard_and_a_shard_without_scorable_rows():
    stage = _ready(laion=False)
    out = stage(_shard([]))
    assert out.num_rows == 0 and out.column_names[-2:] == ["text_area", "ai_watermark"]
    out = stage(_shard([None], status=["timeout"]))
    assert out["text_area"].to_pylist() == [None] and out["ai_watermark"].to_pylist() == [None]


def test_config_is_strict():
    with pytest.raises(ValidationError):
        WatermarkConfig(watermark=True)
    with pytest.raises(ValidationError):
        WatermarkConfig(batch_size=0)


# --- text area --------------------------------------------------------------------------------------


def test_text_area_finds_overlaid_text_and_not_flat_shapes():
    seeds = range(4)
    clean = [_jpeg(_shapes(s)) for s in seeds]
    texted = [_jpeg(_with_text(_shapes(s))) for s in seeds]
    out = _ready(laion=False, ai_watermark=False)(_shard(clean + texted))
    area = np.array(out["text_area"].to_pylist())
    # Measured: 0.0 on every clean image, 0.24-0.25 with the two lines of text.
    assert (area[: len(clean)] < 0.01).all(), area
    assert (area[len(clean) :] > 0.15).all(), area
    assert (area <= 1).all()


def test_text_area_leaves_out_squat_boxes():
    from curate.models.ocr import TextAreaModel, aspect

    rgb = np.asarray(_shapes(2))  # the detector takes one of its discs for text
    every = TextAreaModel.load(threads=1, min_aspect=1.0)
    boxes = every.boxes(rgb)
    assert len(boxes) and (aspect(boxes) < 1.5).all()
    assert every.text_area(rgb) > 0.1
    assert TextAreaModel.load(threads=1).text_area(rgb) == 0.0


def test_text_area_counts_overlapping_boxes_once():
    from curate.models.ocr import text_area

    box = np.array([[0, 0], [49, 0], [49, 9], [0, 9]], np.float32)
    one = text_area(box[None], 100, 100)
    assert one == pytest.approx(0.05, abs=0.01)
    assert text_area(np.stack([box, box, box + 5]), 100, 100) < 2 * one
    assert text_area(np.zeros((0, 4, 2)), 100, 100) == 0.0


# --- AI watermark -----------------------------------------------------------------------------------


def test_ai_watermark_reads_stable_diffusion_marks_after_jpeg():
    from curate.models.ai_watermark import MARKS

    rgb = _natural(1)
    sd = _embed(rgb, "bytes", b"StableDiffusionV1")
    sdxl = _embed(rgb, "bits", MARKS["sdxl"].astype(int).tolist())
    # JPEG without chroma subsampling: the mark lives in the U plane, which 4:2:0 halves.
    datas = [_jpeg(x, subsampling=0) for x in (sd, sdxl, rgb)] + [_jpeg(_natural(4), subsampling=0)]
    out = _ready(laion=False, text=False)(_shard(datas))
    marked_sd, marked_sdxl, unmarked, other = out["ai_watermark"].to_pylist()
    # Measured: 0.985, 1.0, 0.485, 0.583. dwtDct misreads some blocks even before compression (its
    # README says as much), so a marked image does not always decode to exactly 1.
    assert marked_sd > 0.9 and marked_sdxl > 0.9
    assert unmarked < 0.75 and other < 0.75


def test_ai_watermark_is_gone_after_a_resize():
    from curate.models.ai_watermark import AiWatermarkDetector

    sd = _embed(_natural(5), "bytes", b"StableDiffusionV1")
    detector = AiWatermarkDetector()
    assert detector.score(sd) > 0.9  # measured 0.993
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(sd)).resize((448, 448), Image.Resampling.BOX))
    assert detector.score(resized) < 0.75  # the mark is positional
    assert detector.score(sd[:200, :300]) is None  # under 256x256 pixels: no score


@pytest.mark.parametrize(("n_bits", "shape"), [(136, (512, 512)), (48, (300, 457)), (136, (257, 263))])
def test_ai_watermark_decoding_matches_invisible_watermark(n_bits, shape):
    from curate.models.ai_watermark import decode_bits

    rng = np.random.default_rng(n_bits + shape[1])
    rgb = _natural(shape[1], side=max(shape))[: shape[0], : shape[1]]
    for bgr in (
        np.ascontiguousarray(rgb[:, :, ::-1]),
        _embed(rgb, "bits", rng.integers(0, 2, n_bits).tolist())[:, :, ::-1].copy(),
    ):
        expected = np.array(imwatermark.WatermarkDecoder("bits", n_bits).decode(bgr, "dwtDct"))
        np.testing.assert_array_equal(decode_bits(bgr, n_bits), expected)
