"""reward with tiny random models of each family, saved in the published layout and loaded through the real
loading code (transformers' from_pretrained, open_clip's pretrained=<file>, ImageReward's checkpoint into
transformers' BLIP classes). Each score is checked against the family's own formula, computed here without
curate: CLIPModel's logits for PickScore, open_clip's forward for HPS v2, and for ImageReward BLIP's ViT written
out in torch from the checkpoint's own tensor names."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from conftest import score_shard
from PIL import Image
from pydantic import ValidationError

from curate.base import ModelNotFound
from curate.stages.reward import Reward, RewardConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_GOOD = 5
CAPTIONS = ["a red circle", "two blue squares on grass", "a dog", "", "A Photo of a BIG green triangle!"]


def _image(i: int) -> bytes:
    rng = np.random.default_rng(300 + i)
    pixels = rng.integers(0, 256, (28 + 7 * i, 40 + 3 * i, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG" if i % 2 else "JPEG", quality=92)
    return buf.getvalue()


def _mixed_shard() -> pa.Table:
    """Rows 0..4 scoreable; 5 not downloaded; 6 dropped earlier; 7 bytes that do not decode."""
    good = [_image(i) for i in range(N_GOOD)]
    table = score_shard(
        [*good, None, good[0], b"\x89PNG broken"],
        status=["ok"] * N_GOOD + ["http_404", "ok", "ok"],
        drop=[None] * (N_GOOD + 1) + ["clip_score<0.2", None],
    )
    return table.set_column(1, "caption", pa.array([*CAPTIONS, "x", "y", "z"]))


def _pil(i: int) -> Image.Image:
    return Image.open(io.BytesIO(_image(i))).convert("RGB")


def _stage(**cfg) -> Reward:
    stage = Reward(RewardConfig(device="cpu", decode_threads=1, **cfg))
    stage.ensure_setup()
    return stage


def _check_rows(out: pa.Table, want: np.ndarray, label: str) -> None:
    got = out["reward_score"].to_pylist()
    assert got[N_GOOD:] == [None, None, None]  # not ok, dropped, undecodable: never scored
    np.testing.assert_allclose(got[:N_GOOD], want, rtol=1e-4, atol=1e-5)
    assert out["reward_model"].to_pylist() == [label] * N_GOOD + [None] * 3
    assert out.schema.field("reward_score").type == pa.float32()


# --- PickScore ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pickscore(tmp_path_factory):
    """A CLIPModel at 32 px with CLIP's real tokenizer and a logit scale that is not CLIP's initial one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from curate.models.stand_in import clip_tokenizer

    folder = tmp_path_factory.mktemp("pickscore")
    config = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
        logit_scale_init_value=3.1,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=clip_tokenizer(),
    )
    processor.save_pretrained(folder)
    return folder


def test_pickscore_is_logit_scale_times_the_cosine(pickscore):
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(pickscore).eval()
    processor = AutoProcessor.from_pretrained(pickscore)
    inputs = processor(
        images=[_pil(i) for i in range(N_GOOD)],
        text=CAPTIONS,
        padding=True,
        truncation=True,
        max_length=77,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**inputs).logits_per_image  # logit_scale.exp() * image_n @ text_n.T
    want = torch.diagonal(logits).numpy()
    assert float(model.logit_scale.detach().exp()) == pytest.approx(np.exp(3.1), rel=1e-5)

    out = _stage(family="pickscore", model=str(pickscore), batch_size=2)(_mixed_shard())
    _check_rows(out, want, f"pickscore/{pickscore.name}")
    one = _stage(family="pickscore", model=str(pickscore), batch_size=5)(_mixed_shard())
    np.testing.assert_allclose(one["reward_score"].to_pylist()[:N_GOOD], want, rtol=1e-4, atol=1e-5)


def test_pickscore_processor_comes_from_its_own_folder_or_the_one_given(pickscore, tmp_path):
    from curate.models.reward import PICKSCORE, PICKSCORE_PROCESSOR, RewardSource, family

    adapter = family("pickscore")
    assert adapter.processor(RewardSource("pickscore")) == PICKSCORE_PROCESSOR  # as PickScore's README
    assert adapter.processor(RewardSource("pickscore", str(pickscore))) == str(pickscore)
    specs = adapter.weights(RewardSource("pickscore"))
    assert [s.hub_repo for s in specs] == [PICKSCORE, PICKSCORE_PROCESSOR]
    assert adapter.weights(RewardSource("pickscore", str(pickscore))) == []


# --- HPS v2 ---------------------------------------------------------------------------------------------

TINY_HPS_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    """A tiny open_clip architecture, registered as ViT-H-14 is, and a checkpoint in hpsv2's layout
    ({"state_dict": ...}, as HPS_v2_compressed.pt)."""
    root = tmp_path_factory.mktemp("hps")
    (root / "cfg").mkdir()
    (root / "cfg" / "curate-tiny-hps.json").write_text(json.dumps(TINY_HPS_CFG))
    open_clip.add_model_config(root / "cfg")
    torch.manual_seed(1)
    net = open_clip.create_model("curate-tiny-hps", pretrained=None)
    checkpoint = root / "HPS_tiny.pt"
    torch.save({"state_dict": {k: v.clone() for k, v in net.state_dict().items()}}, checkpoint)
    return checkpoint


def test_hps_is_the_dot_product_of_normalised_features(hps):
    model, _, preprocess = open_clip.create_model_and_transforms(
        "curate-tiny-hps", pretrained=str(hps), force_quick_gelu=False, output_dict=True
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer("curate-tiny-hps")
    with torch.no_grad():
        outputs = model(torch.stack([preprocess(_pil(i)) for i in range(N_GOOD)]), tokenizer(CAPTIONS))
    want = torch.diagonal(outputs["image_features"] @ outputs["text_features"].T).numpy()  # hpsv2's score

    out = _stage(family="hpsv2", model=str(hps), architecture="curate-tiny-hps", batch_size=3)(_mixed_shard())
    _check_rows(out, want, "hpsv2/curate-tiny-hps/HPS_tiny.pt")


def test_hps_versions_are_the_published_files():
    from curate.models.reward import RewardSource, family

    (spec,) = family("hpsv2").weights(RewardSource("hpsv2"))
    assert (spec.hub_repo, spec.hub_file) == ("xswu/HPSv2", "HPS_v2.1_compressed.pt")
    assert spec.local == "open_clip/ViT-H-14/hpsv2.1/HPS_v2.1_compressed.pt"
    (spec,) = family("hpsv2").weights(RewardSource("hpsv2", "v2.0"))
    assert spec.hub_file == "HPS_v2_compressed.pt"
    with pytest.raises(ModelNotFound, match=r"'v3'.*v2\.0, v2\.1"):
        family("hpsv2").weights(RewardSource("hpsv2", "v3"))


# --- ImageReward ----------------------------------------------------------------------------------------

VIT = {"width": 64, "patch": 8, "image": 32, "mlp": 128}  # heads: width / 64 = 1, as BLIP's ViTs have
MED = {
    "architectures": ["BertModel"],
    "hidden_act": "gelu",
    "hidden_size": 32,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 64,
    "model_type": "bert",
    "num_attention_heads": 2,
    "num_hidden_layers": 1,
    "pad_token_id": 0,
    "vocab_size": 0,  # set to the vocabulary's size
    "encoder_width": 32,  # ignored: BLIP_Pretrain sets it to the ViT's width
    "add_cross_attention": True,
}
MLP_DIMS, MLP_SLOTS = [32, 16, 8, 8, 4, 1], [0, 2, 4, 6, 7]
WORDS = [
    "a",
    "red",
    "circle",
    "two",
    "blue",
    "squares",
    "on",
    "grass",
    "dog",
    "photo",
    "of",
    "big",
    "green",
    "triangle",
]


def _bert_vocab() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789!,.")
    pieces = [*WORDS, *(c for c in letters if c not in WORDS), *("##" + c for c in letters)]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces]


def _blip_vit_state(g: torch.Generator) -> dict[str, torch.Tensor]:
    """BLIP's ViT (vit.py, timm's names) with random weights: what ImageReward.pt holds under
    blip.visual_encoder."""
    w, p, n = VIT["width"], VIT["patch"], (VIT["image"] // VIT["patch"]) ** 2

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    return {
        "cls_token": r(1, 1, w),
        "pos_embed": r(1, n + 1, w),
        "patch_embed.proj.weight": r(w, 3, p, p),
        "patch_embed.proj.bias": r(w),
        "blocks.0.norm1.weight": 1 + r(w),
        "blocks.0.norm1.bias": r(w),
        "blocks.0.attn.qkv.weight": r(3 * w, w),
        "blocks.0.attn.qkv.bias": r(3 * w),
        "blocks.0.attn.proj.weight": r(w, w),
        "blocks.0.attn.proj.bias": r(w),
        "blocks.0.norm2.weight": 1 + r(w),
        "blocks.0.norm2.bias": r(w),
        "blocks.0.mlp.fc1.weight": r(VIT["mlp"], w),
        "blocks.0.mlp.fc1.bias": r(VIT["mlp"]),
        "blocks.0.mlp.fc2.weight": r(w, VIT["mlp"]),
        "blocks.0.mlp.fc2.bias": r(w),
        "norm.weight": 1 + r(w),
        "norm.bias": r(w),
    }


def _blip_vit_by_hand(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """BLIP's VisionTransformer.forward, written out: patches + cls + pos, pre-norm blocks, final norm."""
    import torch.nn.functional as F

    w = VIT["width"]
    x = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=VIT["patch"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + s["pos_embed"]
    h = F.layer_norm(x, (w,), s["blocks.0.norm1.weight"], s["blocks.0.norm1.bias"], eps=1e-6)
    q, k, v = F.linear(h, s["blocks.0.attn.qkv.weight"], s["blocks.0.attn.qkv.bias"]).chunk(3, dim=-1)
    attn = (q @ k.transpose(-2, -1) * w**-0.5).softmax(-1)  # one head of width 64
    x = x + F.linear(attn @ v, s["blocks.0.attn.proj.weight"], s["blocks.0.attn.proj.bias"])
    h = F.layer_norm(x, (w,), s["blocks.0.norm2.weight"], s["blocks.0.norm2.bias"], eps=1e-6)
    h = F.linear(F.gelu(F.linear(h, s["blocks.0.mlp.fc1.weight"], s["blocks.0.mlp.fc1.bias"])), *_fc2(s))
    return F.layer_norm(x + h, (w,), s["norm.weight"], s["norm.bias"], eps=1e-6)


def _fc2(s):
    return s["blocks.0.mlp.fc2.weight"], s["blocks.0.mlp.fc2.bias"]


@pytest.fixture(scope="module")
def imagereward(tmp_path_factory):
    """ImageReward.pt in the published layout (blip.visual_encoder.*, blip.text_encoder.*, blip.vision_proj,
    blip.text_proj, mlp.layers.*), med_config.json beside it, and a BERT vocab.txt."""
    from transformers import BlipTextConfig, BlipTextModel

    from curate.models.heads import AestheticHead

    root = tmp_path_factory.mktemp("imagereward")
    vocab = _bert_vocab()
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    med = {**MED, "vocab_size": len(vocab)}
    (root / "med_config.json").write_text(json.dumps(med))
    g = torch.Generator().manual_seed(2)
    vit = _blip_vit_state(g)
    text_cfg = BlipTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        encoder_hidden_size=VIT["width"],
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        bos_token_id=2,
        sep_token_id=3,
    )
    torch.manual_seed(3)
    text = BlipTextModel(text_cfg, add_pooling_layer=False)  # BLIP's med.py BERT: the same names
    mlp = AestheticHead(MLP_DIMS, MLP_SLOTS)
    state = {f"blip.visual_encoder.{k}": v for k, v in vit.items()}
    state |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64).expand(1, -1)  # as old BERTs saved
    state |= {
        "blip.vision_proj.weight": torch.zeros(8, VIT["width"]),
        "blip.text_proj.weight": torch.zeros(8, 32),
    }
    state |= {f"mlp.{k}": v for k, v in mlp.state_dict().items()}
    torch.save(state, root / "ImageReward.pt")
    return root


def test_imagereward_is_the_normalised_mlp_of_the_cross_attended_cls(imagereward):
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
    from transformers import BertTokenizerFast, BlipTextConfig, BlipTextModel

    from curate.models.heads import AestheticHead

    state = torch.load(imagereward / "ImageReward.pt", weights_only=True)
    part = lambda prefix: {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    vit = part("blip.visual_encoder.")
    med = json.loads((imagereward / "med_config.json").read_text())
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=med["vocab_size"],
            hidden_size=32,
            encoder_hidden_size=VIT["width"],
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=64,
        ),
        add_pooling_layer=False,
    ).eval()
    text_state = part("blip.text_encoder.")
    text_state.pop("embeddings.position_ids")
    text.load_state_dict(text_state)
    mlp = AestheticHead(MLP_DIMS, MLP_SLOTS)
    mlp.load_state_dict(part("mlp."))
    preprocess = Compose(  # ImageReward.py's _transform(224), at the checkpoint's 32 px
        [
            Resize(32, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(32),
            ToTensor(),
            Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    tokenizer = BertTokenizerFast.from_pretrained(imagereward, do_lower_case=True)
    vocab = _bert_vocab()
    assert tokenizer("A Red circle")["input_ids"] == [
        vocab.index(t) for t in ["[CLS]", "a", "red", "circle", "[SEP]"]
    ]
    want = []
    with torch.no_grad():
        for i, caption in enumerate(CAPTIONS):  # one pair at a time, as ImageReward.score does
            tokens = tokenizer(
                caption, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
            )
            image_embeds = _blip_vit_by_hand(vit, preprocess(_pil(i)).unsqueeze(0))
            out = text(
                tokens.input_ids,
                attention_mask=tokens.attention_mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
            )
            reward = mlp(out.last_hidden_state[:, 0, :].float())
            want.append(float((reward - 0.16717362830052426) / 1.0333394966054072))
    assert len(set(np.round(want, 4))) == N_GOOD  # the image and the caption reach the reward

    out = _stage(
        family="imagereward",
        model=str(imagereward / "ImageReward.pt"),
        processor=str(imagereward),
        batch_size=2,
    )(_mixed_shard())
    _check_rows(out, np.array(want), "imagereward/ImageReward.pt")


def test_imagereward_checkpoint_that_is_something_else_is_refused(tmp_path):
    from curate.models.reward import imagereward_state_dict

    with pytest.raises(
        ValueError, match=r"not an ImageReward checkpoint.*unknown keys: \['blip.itm_head.weight'\]"
    ):
        imagereward_state_dict(
            {"blip.visual_encoder.norm.weight": torch.ones(2), "blip.itm_head.weight": torch.ones(2)}, "x.pt"
        )
    with pytest.raises(ValueError, match="some are missing"):
        imagereward_state_dict({"mlp.layers.0.weight": torch.ones(2)}, "x.pt")


def test_imagereward_default_files_and_published_size():
    from curate.models.reward import RewardSource, family

    adapter = family("imagereward")
    specs = adapter.weights(RewardSource("imagereward"))
    assert [(s.hub_repo, s.hub_file) for s in specs] == [
        ("THUDM/ImageReward", "ImageReward.pt"),
        ("THUDM/ImageReward", "med_config.json"),
        ("google-bert/bert-base-uncased", "vocab.txt"),
    ]
    need = adapter.memory(RewardSource("imagereward"), "cpu", 8, "auto")
    assert "imagereward/ImageReward-v1.0: 4" in need.parts[0]  # ~0.45 B parameters: ViT-L/16 + BERT-base


# --- the stage --------------------------------------------------------------------------------------------


def test_config_names_the_families_and_columns_are_declared():
    from curate.core.registry import STAGES
    from curate.core.schema import COLUMNS

    with pytest.raises(
        ValidationError, match="no reward family 'clip'; one of hpsv2, imagereward, pickscore"
    ):
        RewardConfig(family="clip")
    assert STAGES["reward"] is Reward
    assert COLUMNS["reward_score"].type == pa.float32() and COLUMNS["reward_model"].type == pa.string()
    assert Reward.writes == ("reward_score", "reward_model")


def test_a_model_that_cannot_be_had_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    monkeypatch.setenv("CURATE_MODEL_DIR", str(tmp_path / "empty"))
    with pytest.raises(ModelNotFound, match="curate models fetch") as e:
        Reward(RewardConfig(family="hpsv2", device="cpu")).ensure_setup()
    assert "HPS_v2.1_compressed.pt" in str(e.value)
    with pytest.raises(ModelNotFound, match="yuvalkirstain/PickScore_v1"):
        Reward(RewardConfig(family="pickscore", device="cpu")).ensure_setup()
    with pytest.raises(ModelNotFound, match="does not exist"):
        Reward(RewardConfig(family="imagereward", model=str(tmp_path / "no.pt"), device="cpu")).ensure_setup()


def test_stand_ins_of_imagereward_and_hps_load_and_score(tmp_path, monkeypatch, hps):
    """`curate models stand-in` writes ImageReward's three files and HPS's checkpoint where the real ones go;
    the stage loads them through the same code and marks what it writes. ImageReward's published sizes are
    swapped for tiny ones here (the real stand-in is 0.45 B parameters)."""
    from conftest import write_pipeline
    from support.data import make_input

    from curate.core.config import load_config
    from curate.core.pipeline import Pipeline
    from curate.models import reward
    from curate.models.stand_in import write_stand_ins

    monkeypatch.setenv("CURATE_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    monkeypatch.setattr(
        reward, "IMAGEREWARD_VIT", {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1}
    )
    monkeypatch.setattr(reward, "IMAGEREWARD_MED_CONFIG", {**MED, "hidden_size": 768, "vocab_size": 30524})
    stages = [
        {"stage": "synthetic_image"},
        {"stage": "reward", "name": "imagereward", "family": "imagereward", "device": "cpu"},
        {
            "stage": "reward",
            "name": "hps",
            "family": "hpsv2",
            "architecture": "curate-tiny-hps",
            "device": "cpu",
        },
    ]
    path = write_pipeline(
        tmp_path / "p.yaml", make_input(tmp_path / "in.parquet", 2), tmp_path / "out", stages
    )
    pipeline = Pipeline(load_config(str(path)))
    results = write_stand_ins(pipeline)
    assert [(r.stage, r.model, r.action) for r in results] == [
        ("imagereward", "ImageReward v1.0", "written"),
        ("imagereward", "ImageReward v1.0 text encoder config", "written"),
        ("imagereward", "BERT uncased vocabulary (ImageReward's tokenizer)", "written"),
        ("hps", "HPS v2.1 (curate-tiny-hps)", "written"),
    ]
    from transformers import BertTokenizerFast

    vocab = BertTokenizerFast.from_pretrained(results[2].path.parent)
    assert len(vocab) == 30522 and vocab.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]"]) == [
        0,
        100,
        101,
        102,
    ]
    table = _mixed_shard()
    for bound, label in zip(pipeline.stages[1:], ["imagereward/ImageReward-v1.0", "hpsv2/v2.1"], strict=True):
        bound.stage.ensure_setup()
        out = bound.stage(table)
        assert out["reward_model"].to_pylist()[:N_GOOD] == [f"{label} (stand-in)"] * N_GOOD
        assert all(np.isfinite(out["reward_score"].to_pylist()[:N_GOOD]))


def test_a_stand_in_of_pickscore_loads_through_its_real_code_and_tokenizes_as_clip(tmp_path, monkeypatch):
    """PickScore's model and its processor's repository (LAION's ViT-H/14) are written from their published
    configs with CLIP's real tokenizer; shrunk here (the real stand-in is ViT-H/14, 0.99 B parameters)."""
    from conftest import write_pipeline
    from support.data import make_input
    from transformers import AutoProcessor

    from curate.core.config import load_config
    from curate.core.pipeline import Pipeline
    from curate.models.reward import PICKSCORE, PICKSCORE_PROCESSOR
    from curate.models.stand_in import published_config, write_stand_ins

    published = published_config(PICKSCORE)
    assert published["vision_config"]["num_hidden_layers"] == 32 and published["projection_dim"] == 1024
    monkeypatch.setenv("CURATE_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    stages = [{"stage": "synthetic_image"}, {"stage": "reward", "family": "pickscore", "device": "cpu"}]
    path = write_pipeline(
        tmp_path / "p.yaml", make_input(tmp_path / "in.parquet", 2), tmp_path / "out", stages
    )
    pipeline = Pipeline(load_config(str(path)))
    small = {
        "projection_dim": 16,
        "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                        "num_hidden_layers": 1, "projection_dim": 16},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                          "num_hidden_layers": 1, "patch_size": 32, "projection_dim": 16},
    }  # fmt: skip
    results = write_stand_ins(pipeline, overrides={PICKSCORE: small, PICKSCORE_PROCESSOR: small})
    assert [(r.model, r.action) for r in results] == [
        (f"PickScore model {PICKSCORE}", "written"),
        (f"PickScore processor {PICKSCORE_PROCESSOR}", "written"),
    ]
    assert results[0].architecture.startswith("CLIPModel")
    processor = AutoProcessor.from_pretrained(results[1].path)
    # OpenAI's CLIP ids: <|startoftext|> a photo of a cat <|endoftext|>
    assert processor.tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert processor.image_processor.crop_size["height"] == 224
    bound = pipeline.stages[1]
    bound.stage.ensure_setup()
    out = bound.stage(_mixed_shard())
    assert out["reward_model"].to_pylist()[:N_GOOD] == [f"pickscore/{PICKSCORE} (stand-in)"] * N_GOOD
    assert all(np.isfinite(out["reward_score"].to_pylist()[:N_GOOD]))
