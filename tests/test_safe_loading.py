"""Nothing curate loads can run code: each payload here would create a canary file if it were executed."""

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest


class _Evil:
    """Unpickling this calls ``open(canary, "w")``: the canary file exists iff the pickle ran."""

    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return (open, (self.canary, "w"))


@pytest.fixture
def canary(tmp_path) -> Path:
    path = tmp_path / "canary"
    yield path
    assert not path.exists(), "a payload was executed"


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()


def test_shard_reader_skips_pickle_members(tmp_path, canary):
    from curate.train.data import iter_samples

    evil = pickle.dumps(_Evil(canary))
    members = {
        "aaaa.jpg": _jpeg(),
        "aaaa.json": b'{"uid": "aaaa"}',
        "aaaa.txt": b"a red square",
        "aaaa.pyd": evil,
        "aaaa.pickle": evil,
        "aaaa.pth": evil,
        "bbbb.pickle": evil,  # a key with nothing but a pickle
    }
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(iter_samples(str(shard)))
    assert [(s.uid, s.ext, s.txt) for s in samples] == [("aaaa", "jpg", "a red square")]
    assert samples[0].image == members["aaaa.jpg"]


def test_inception_weights_refuse_a_malicious_pth(tmp_path, canary):
    torch = pytest.importorskip("torch")
    from curate.train.metrics import _load_state_dict

    path = tmp_path / "inception.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil(canary)}, path)
    with pytest.raises(pickle.UnpicklingError):
        _load_state_dict(path)


def test_head_weights_refuse_a_malicious_pth(tmp_path, canary):
    torch = pytest.importorskip("torch")
    from curate.models import heads

    path = tmp_path / "head.pth"
    torch.save({"w": _Evil(canary)}, path)
    with pytest.raises(ValueError, match="refused to unpickle"):
        heads.load_head_state_dict(path)


YAML_PAYLOAD = '!!python/object/apply:os.system ["touch {canary}"]\n'


def test_pipeline_config_yaml_cannot_run_code(tmp_path, canary):
    from curate.base import ConfigError
    from curate.core.config import load_config

    for text in (YAML_PAYLOAD, "name: !!python/object/apply:os.system ['touch {canary}']\n"):
        path = tmp_path / "p.yaml"
        path.write_text(text.format(canary=canary))
        with pytest.raises(ConfigError):
            load_config(path)


def test_training_config_yaml_cannot_run_code(tmp_path, canary):
    from curate.base import ConfigError
    from curate.train.config import load_train_config

    path = tmp_path / "t.yaml"
    path.write_text(YAML_PAYLOAD.format(canary=canary))
    with pytest.raises(ConfigError):
        load_train_config(path)


def test_decontamination_npy_refuses_pickled_objects(tmp_path, canary):
    from curate.stages.dedup import DecontaminateConfig, _load_eval

    path = tmp_path / "eval.npy"
    np.save(path, np.array([_Evil(canary)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        _load_eval(DecontaminateConfig(path=str(path)), None)


def test_index_embeddings_refuse_pickled_objects(tmp_path, canary):
    path = tmp_path / "emb.npy"
    np.save(path, np.array([_Evil(canary)], dtype=object), allow_pickle=True)
    # curate/index/__init__.py maps embeddings with these arguments.
    with pytest.raises(ValueError):
        np.load(path, mmap_mode="r", allow_pickle=False)
