"""The plan: which device each stage runs on, which stages fuse into task operators and which become actor
pools, how big each pool is, and whether it fits the cluster's memory, as `curate describe` prints it,
`curate validate` checks it, and the executors run it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_pipeline

from curate.base import GIB, ConfigError, MemoryNeed, Resources
from curate.core.config import load_config
from curate.core.pipeline import BoundStage, Pipeline
from curate.core.stage import Stage, StageResources
from curate.executors.plan import Cluster, combined, local_plan, make_plan, plan_phase
from curate.models.footprint import PROCESS_BASE

STAGES = [
    {"stage": "basic_filter", "min_words": 1},
    {"stage": "synthetic_image"},
    {"stage": "caption_chars", "resources": {"gpus": 0.25}},
    {"stage": "caption_chars", "name": "chars2", "resources": {"concurrency": [2, 5]}},
    {"stage": "basic_filter", "name": "late_filter"},
]
LAION = Path(__file__).parent.parent / "pipelines" / "laion_subset.yaml"


def _pipeline(tmp_path, stages=STAGES, **top):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"URL": ["http://x/1"], "TEXT": ["a b c"]}), tmp_path / "in.parquet")
    return write_pipeline(tmp_path / "p.yaml", tmp_path / "in.parquet", tmp_path / "out", stages, **top)


class Model(Stage):
    """A stage with a model of a given size, for the plan alone (it is never run)."""

    name = "model"

    def __init__(self, host: float, gpu: float = 0.0):
        super().__init__()
        self.host, self.gpu = host, gpu

    def memory(self, device, upstream=()):
        return MemoryNeed(int(self.host * GIB), int(self.gpu * GIB) if device == "cuda" else 0)


def _bound(name: str, host: float, gpu: float = 0.0, **resources) -> BoundStage:
    res = StageResources(cpus=1, uses_model=True, gpus_if_any=resources.pop("gpus_if_any", 0.25))
    return BoundStage(name, Model(host, gpu), res.merged(Resources(**resources)))


def test_the_plan_fuses_cpu_stages_and_sizes_actor_pools(tmp_path):
    p = Pipeline(load_config(_pipeline(tmp_path), []))
    ops = plan_phase(p.phases()[0], Cluster.uniform(1, 16, 2))
    assert [(o.kind, o.stages) for o in ops.operators] == [
        ("read", ()),
        ("tasks", ("basic_filter", "synthetic_image")),
        ("actors", ("caption_chars",)),
        ("actors", ("chars2",)),
        ("tasks", ("late_filter",)),
        ("write", ()),
    ]
    gpu, ranged = ops.operators[2], ops.operators[3]
    assert gpu.num_gpus == 0.25 and gpu.concurrency == 8  # four actors share each of the two GPUs
    assert ranged.concurrency == (2, 5) and ranged.num_gpus is None
    assert (
        "2-5 actors, each 0.5 CPU" in ranged.describe()
        and "8 actors, each 0.5 CPU, 0.25 GPU" in gpu.describe()
    )


def test_cpu_pools_share_what_the_read_and_write_tasks_leave():
    one = plan_phase([_bound("a", 1, gpus=0)], Cluster.uniform(1, 2))
    assert one.single  # CPU models without pool sizes: one operator, each worker runs the whole phase
    two = [_bound("a", 1, gpus=0, concurrency=(1, 2)), _bound("b", 1, gpus=0, concurrency=(1, 2))]
    ops = plan_phase(two, Cluster.uniform(1, 2)).operators
    assert [o.num_cpus for o in ops if o.kind == "actors"] == [0.5, 0.5]  # never a hang on 2 CPUs


def test_a_model_stage_takes_its_gpu_share_only_where_the_cluster_has_gpus():
    stage = _bound("clip", 2, 1)
    on_gpus = make_plan([[stage]], Cluster.uniform(1, 8, 1, 32 * GIB, 80 * GIB))
    s = on_gpus.stage("clip")
    assert (s.device, s.gpus, s.workers) == ("cuda", 0.25, 4)
    assert s.need.gpu == 1 * GIB
    on_cpus = make_plan([[stage]], Cluster.uniform(1, 8, 0, 32 * GIB))
    assert on_cpus.stage("clip").device == "cpu" and on_cpus.phases[0].single
    assert "no GPUs: every model stage runs on CPUs (in fp32 where its precision is auto)" in on_cpus.notes
    kept_on_cpu = make_plan([[_bound("clip", 2, 1, gpus=0)]], Cluster.uniform(1, 8, 1, 32 * GIB, 80 * GIB))
    assert kept_on_cpu.stage("clip").device == "cpu"  # an explicit gpus: 0 wins
    with pytest.raises(ConfigError, match=r"stages\.clip\.resources\.gpus.*no GPUs"):
        make_plan([[_bound("clip", 2, 1, gpus=0.5)]], Cluster.uniform(1, 8))


def test_gpu_stages_of_a_phase_split_the_gpus_and_shares_grow_to_fit_gpu_memory():
    vlm, llm = _bound("vlm", 6, 30, gpus_if_any=0.5), _bound("llm", 5, 4, gpus_if_any=0.5)
    one = make_plan([[vlm, llm]], Cluster.uniform(1, 8, 1, 32 * GIB, 80 * GIB))
    assert [(s.gpus, s.workers) for s in one.phases[0].stages] == [(0.5, 1), (0.5, 1)]
    two = make_plan([[vlm, llm]], Cluster.uniform(2, 8, 1, 32 * GIB, 80 * GIB))
    assert [(s.gpus, s.workers) for s in two.phases[0].stages] == [(0.5, 2), (0.5, 2)]
    # 30 GB on a 40 GB GPU: two of them would not fit on one, so the default share goes up to a whole GPU.
    small = make_plan(
        [[_bound("vlm", 6, 30, gpus_if_any=0.25)]], Cluster.uniform(1, 8, 2, 32 * GIB, 40 * GIB)
    )
    assert (small.stage("vlm").gpus, small.stage("vlm").workers) == (1.0, 2)


def test_plans_that_cannot_fit_name_the_stage_and_the_numbers():
    gpus = Cluster.uniform(1, 8, 1, 32 * GIB, 40 * GIB)
    with pytest.raises(
        ConfigError, match=r"stages\.vlm\.resources\.gpus.*4 actors on a GPU.*ask for at least 1"
    ):
        make_plan([[_bound("vlm", 6, 30, gpus=0.25)]], gpus)  # explicit: never raised behind the user's back
    with pytest.raises(ConfigError, match=r"one actor needs 50\.0 GiB of GPU memory.*40\.0 GiB"):
        make_plan([[_bound("big", 6, 50)]], gpus)
    with pytest.raises(ConfigError, match=r"phase 0.*need 2 GPUs at once \(a 1, b 1\).*has 1"):
        make_plan([[_bound("a", 1, 1, gpus=1), _bound("b", 1, 1, gpus=1)]], gpus)
    with pytest.raises(
        ConfigError, match=r"phase 0 \(a, b\).*every model of it \(a, b\).*19\.1 GiB.*16\.0 GiB"
    ):
        make_plan([[_bound("a", 12, gpus=0), _bound("b", 8, gpus=0)]], Cluster.uniform(4, 8, 0, 16 * GIB))


def test_a_cpu_phase_runs_as_many_workers_per_node_as_its_memory_holds():
    # Both captioning models in fp32 on 8-CPU nodes: 8 workers of 20 GB each would need 160 GB a node.
    stages = [_bound("recaption", 11, gpus=0), _bound("fuse", 10, gpus=0)]
    plan = make_plan([stages], Cluster.uniform(4, 8, 0, 48 * GIB))
    op = plan.phases[0].operators[0]
    assert op.reads_writes and op.concurrency == 8  # two per node
    assert op.memory == combined([s.stage.memory("cpu") for s in stages]).host == (21 * GIB - PROCESS_BASE)
    roomy = make_plan([stages], Cluster.uniform(1, 8, 0, 512 * GIB))
    assert roomy.phases[0].operators[0].concurrency == 8  # then the CPUs are the limit


def test_a_worker_holding_several_models_reaches_one_stage_peak_at_a_time():
    # Loading's checkpoint and a batch's working set come and go; the models stay.
    vlm = MemoryNeed(PROCESS_BASE + 12 * GIB, 0, ("vlm",), transient=4 * GIB)
    llm = MemoryNeed(PROCESS_BASE + 9 * GIB, 3 * GIB, ("llm",), transient=3 * GIB, gpu_transient=1 * GIB)
    both = combined([vlm, llm])
    assert both.resident == PROCESS_BASE + 8 * GIB + 6 * GIB
    assert both.host == PROCESS_BASE + 14 * GIB + 4 * GIB  # not 12 + 9
    assert (both.gpu, both.gpu_transient) == (3 * GIB, 1 * GIB)
    assert both.parts[:2] == ("vlm", "llm") and "4.0 GiB" in both.parts[-1]
    # The estimates of real models say which part is transient: on a CPU the larger of the checkpoint
    # (bf16, beside the fp32 model while loading) and a batch's working set.
    from curate.models.footprint import generator_need

    need = generator_need(None, 1_000_000_000, "cpu", 1, 16, 16)
    assert need.resident == PROCESS_BASE + 4_000_000_000 and need.transient == 2_000_000_000
    assert combined([need]) == need


def test_cpu_pools_are_capped_by_the_memory_gpu_pools_leave():
    stages = [_bound("clip", 2, 1), _bound("heads", 3, gpus=0, gpus_if_any=0)]
    plan = make_plan([stages], Cluster.uniform(1, 16, 1, 12 * GIB, 80 * GIB))
    clip, heads = plan.phases[0].stages
    assert (clip.gpus, clip.workers) == (0.25, 4)  # 4 x 2 GB = 8 GB, leaving 4 GB: one 3 GB actor
    assert heads.workers == (1, 1)
    with pytest.raises(ConfigError, match=r"stages\.heads.*needs 5\.0 GiB.*after the GPU stages"):
        make_plan(
            [[stages[0], _bound("heads", 5, gpus=0, gpus_if_any=0)]], Cluster.uniform(1, 16, 1, 12 * GIB)
        )


def test_the_local_executor_holds_every_model_at_once():
    phases = [[_bound("clip", 2, 1)], [_bound("vlm", 9, 5)]]
    plan = local_plan(phases, Cluster.uniform(1, 2, 0, 24 * GIB))
    assert [s.device for p in plan.phases for s in p.stages] == ["cpu", "cpu"]
    assert "one process holds every model" in plan.notes[0]
    with pytest.raises(ConfigError, match=r"executor\.kind: local.*\(clip, vlm\).*10\.\d GiB.*8\.0 GiB"):
        local_plan(phases, Cluster.uniform(1, 2, 0, 8 * GIB))


def test_bad_concurrency_ranges_and_sizes_fail_at_config_time(tmp_path):
    bad = [{"stage": "caption_chars", "resources": {"concurrency": [4, 2]}}]
    with pytest.raises(ConfigError, match="concurrency"):
        load_config(_pipeline(tmp_path, bad), [])
    with pytest.raises(ConfigError, match="not a size"):
        load_config(_pipeline(tmp_path, [{"stage": "caption_chars", "resources": {"memory": "lots"}}]), [])
    ok = load_config(_pipeline(tmp_path, [{"stage": "caption_chars", "resources": {"memory": "2GiB"}}]), [])
    assert ok.stages[0].resources.memory == 2 * GIB


def test_describe_prints_the_plan_for_a_cluster(tmp_path, cli):
    path = _pipeline(tmp_path)
    r = cli("describe", path, "--cpus", 16, "--gpus", 2)
    assert r.code == 0, r.err
    assert "plan on 16 CPUs, 2 GPUs" in r.out
    assert "actor pool [caption_chars]: 8 actors, each 0.5 CPU, 0.25 GPU" in r.out
    assert "tasks [basic_filter, synthetic_image]: 1 CPU per task" in r.out
    assert "memory not checked: give --memory" in r.out
    r = cli("describe", path, "--json", "--cpus", 4, "--gpus", 1)
    doc = json.loads(r.out)
    ops = doc["ray"]["phases"][0]
    assert doc["ray"]["cluster"] == {"cpus": 4, "gpus": 1}
    assert ops[2] == {
        "kind": "actors",
        "stages": ["caption_chars"],
        "num_cpus": 0.5,
        "num_gpus": 0.25,
        "concurrency": 4,
        "memory": None,
    }
    r = cli("describe", path, "--gpus", 0)
    assert r.code == 2 and "no GPUs" in r.err


def test_a_plan_that_cannot_fit_is_refused_before_any_work(tmp_path, cli):
    huge = [{"stage": "synthetic_image"}, {"stage": "caption_chars", "resources": {"memory": "100TB"}}]
    path = _pipeline(tmp_path, huge)
    for command in ("validate", "run"):
        r = cli(command, path)
        assert r.code == 2, r
        assert "executor.kind: local" in r.err and "caption_chars" in r.err and "93132.3 GiB" in r.err
    assert not (tmp_path / "out").exists()  # no run.json, nothing written
    r = cli("describe", path, "--cpus", 8, "--memory", "48GB")
    assert r.code == 2 and "phase 0 (synthetic_image, caption_chars)" in r.err and "93132.3 GiB" in r.err


@pytest.mark.parametrize("gpus", [1, 0])
def test_describe_sizes_the_flagship_for_a_kuberay_pod(tmp_path, cli, monkeypatch, gpus):
    """laion_subset.yaml on the KubeRay GPU pods (8 CPUs, 48 GiB, 1 GPU of 80 GB), and on the same pods
    without GPUs, sized from the models' configs without any weights here."""
    monkeypatch.setenv("CURATE_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    monkeypatch.setenv("INPUT", str(Path(_pipeline(tmp_path)).parent / "in.parquet"))
    args = ["--nodes", 4, "--cpus", 8, "--gpus", gpus, "--memory", "48GiB", "--gpu-memory", "80GB", "--json"]
    r = cli("describe", LAION, *args)
    assert r.code == 0, r
    plan = json.loads(r.out)["plan"]
    stages = {s["name"]: s for p in plan["phases"] for s in p["stages"]}
    if gpus:
        assert {
            n: stages[n]["device"] for n in ("clip_score", "watermark", "recaption", "fuse_captions")
        } == {
            "clip_score": "cuda",
            "watermark": "cuda",
            "recaption": "cuda",
            "fuse_captions": "cuda",
        }
        # The heads reuse clip_score's ViT-L/14 embeddings: no CLIP of their own, so no GPU either.
        assert stages["nsfw"]["device"] == stages["aesthetic"]["device"] == "cpu"
        assert stages["nsfw"]["memory_per_worker"] < 1.5 * GIB
        # Qwen2-VL-2B in bf16 on the GPU: 2.2B x 2 bytes of weights, plus the generation's working set.
        assert 4.4 * GIB < stages["recaption"]["gpu_memory_per_worker"] < 12 * GIB
        assert stages["recaption"]["gpus"] == 0.5 and stages["recaption"]["workers"] == 4  # 2 of 4 GPUs
    else:
        single = plan["phases"][1]["operators"][0]
        assert single["reads_writes"] and single["concurrency"] == 4  # one 20 GB worker per 48 GiB pod
        assert 15 * GIB < single["memory"] < 33.6 * GIB
