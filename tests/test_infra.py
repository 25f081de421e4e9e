"""infra/: the cluster files parse, name only what exists, and their commands parse with the real tools.

Checked here, offline and without a cluster:

- every YAML parses; the KubeRay RayCluster and RayJob have the fields KubeRay needs (ray.io/v1, a head
  group, a GPU worker group with an ``nvidia.com/gpu`` limit, the job's entrypoint and clean-up), and every
  ``rayStartParams`` key is a ``ray start`` option (parsed by Ray's own click command);
- the RayJob's entrypoint parses with curate's CLI, its overrides (and the ``INPUT`` of its runtime env) load
  with the pipeline, and ``curate validate`` passes on that pipeline with a local input and output in place of
  the s3:// ones (no s3fs here) and with the weights check offline (no hub here: missing models are listed,
  not fatal);
- the Ray cluster launcher config passes Ray's own schema (``ray-schema.json``, after Ray fills in the AWS
  defaults as ``ray up`` does), and its ``ray start`` commands parse;
- the sbatch scripts pass ``bash -n``, have ``#SBATCH`` headers, and run end to end against stub ``srun``,
  ``scontrol``, ``ray``, ``python``, ``torchrun`` and ``curate`` commands for several nodes: the ``ray start``
  and ``torchrun`` command lines they build parse with Ray's and torch's own parsers, the ``curate`` ones with
  curate's CLI and config loaders; the Ray script makes one token per job (mode 0600, in TOKEN_DIR, deleted
  at the end, on no command line), gives every command its path, starts the head with the address asked on
  the head's node, returns curate's exit code, stops its Ray steps, and gives up with a message when the
  head exits or nodes do not join;
- the KubeRay manifests turn on Ray's token authentication (``authOptions``, a ``rayVersion`` >= 2.52);
- every other ``curate ...`` line in infra/ (README, comments) parses with curate's CLI;
- the Dockerfile has a base image, a non-root user, installs ``.[gpu]`` and runs ``curate``; the curate
  extras named in any ``pip install`` exist in pyproject.toml, and ray's in ray's metadata.

Not checked (needs what this machine lacks): ``docker build``, ``kubectl apply`` against KubeRay's CRDs,
``ray up`` on AWS, and the GPU packages (faiss-gpu-cu12) importing on a GPU node. The scripts under a real
one-node Slurm: tests/test_slurm.py.
"""

from __future__ import annotations

import copy
import importlib.metadata
import itertools
import os
import re
import shlex
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner

import curate.models.manage
from curate.cli import _load, app

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
SBATCH = {p.name: p for p in sorted((INFRA / "slurm").glob("*.sbatch"))}
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _yaml(rel: str) -> dict:
    return yaml.safe_load((INFRA / rel).read_text())


def _parse_curate(argv: list[str]):
    """Parse a curate command line (without 'curate') with the real CLI, running nothing: the context."""
    cmd, args, name = get_command(app), list(argv), "curate"
    while hasattr(cmd, "commands"):  # a group: descend to the subcommand
        assert args, f"no subcommand in curate {shlex.join(argv)}"
        name, args = args[0], args[1:]
        sub = cmd.get_command(None, name)
        assert sub is not None, f"curate has no subcommand {name!r}: curate {shlex.join(argv)}"
        cmd = sub
    try:
        return cmd.make_context(name, args)
    except Exception as e:  # click's usage errors, as typer vendors them
        pytest.fail(f"curate {shlex.join(argv)}: {e}")


def _parse_ray(argv: list[str]):
    """Parse `ray start ...` / `ray stop ...` (argv without 'ray') with Ray's own click commands."""
    from ray.scripts.scripts import start, stop

    commands = {"start": start, "stop": stop}
    assert argv and argv[0] in commands, f"ray {shlex.join(argv)}"
    try:
        return commands[argv[0]].make_context(argv[0], argv[1:])
    except Exception as e:
        pytest.fail(f"ray {shlex.join(argv)}: {e}")


def _parse_torchrun(argv: list[str]):
    from torch.distributed.run import get_args_parser

    try:
        return get_args_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"torchrun {shlex.join(argv)} does not parse (see the usage above)")


@pytest.fixture
def laion_input(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"URL": ["http://example.com/a.jpg"], "TEXT": ["a red circle"]}), path)
    return path


def _validate(pipeline: str, sets: list[str], monkeypatch) -> str:
    """`curate validate` through the real CLI; offline, a missing model is reported, not fatal."""
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    monkeypatch.setattr(curate.models.manage, "raise_missing", lambda missing: None)
    args = ["validate", pipeline]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "ok" in result.output
    return result.output


# -- YAML ------------------------------------------------------------------------------------------------


def test_every_yaml_parses():
    files = sorted(INFRA.rglob("*.yaml"))
    assert {f.relative_to(INFRA).as_posix() for f in files} >= {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "ray-cluster.yaml",
    }
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f


def _check_ray_cluster_spec(spec: dict) -> list[str]:
    """The parts of a RayClusterSpec KubeRay needs; returns the images it names."""
    # Ray's token authentication, made and handed out by the operator (authOptions needs Ray >= 2.52).
    assert spec["authOptions"] == {"mode": "token"}
    assert tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) >= (2, 52)
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    groups = spec["workerGroupSpecs"]
    assert groups, "no worker group"
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in groups]
    gpu_groups = []
    for g in groups:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)) > 0:
            gpu_groups.append(g["groupName"])
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    images = []
    for pod in pods:
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            images.append(c["image"])
            env = {e["name"]: e for e in c["env"]}
            assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env), "the operator sets them (authOptions)"
            assert env["CURATE_MODEL_DIR"]["value"] in {m["mountPath"] for m in c["volumeMounts"]}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key
            assert {m["name"] for m in c["volumeMounts"]} <= volumes
    # Every rayStartParams key is a `ray start` flag (KubeRay passes --key=value).
    for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in groups]:
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams values are strings"
        _parse_ray(["start", *(f"--{k}={v}" for k, v in params.items())])
    return images


def test_raycluster_manifest():
    doc = _yaml("kuberay/raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    assert set(_check_ray_cluster_spec(doc["spec"])) == {"curate:latest"}  # the placeholder users replace


def test_rayjob_manifest():
    doc = _yaml("kuberay/rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("curate run ")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert set(_check_ray_cluster_spec(spec["rayClusterSpec"])) == {"curate:latest"}


def test_rayjob_entrypoint_runs_the_pipeline_with_the_real_cli(tmp_path, laion_input, monkeypatch):
    spec = _yaml("kuberay/rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "curate"
    params = _parse_curate(argv[1:]).params
    assert params["executor"] == "ray"
    output = next(s for s in params["sets"] if s.startswith("output.path="))
    assert output.startswith("output.path=s3://YOUR-BUCKET/"), "keep the placeholder bucket obvious"
    # The config as the job's driver loads it: the image's WORKDIR is the checkout, INPUT from the runtime env.
    monkeypatch.chdir(ROOT)
    for key, value in yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"].items():
        monkeypatch.setenv(key, value)
    config = _load(params["pipeline"], params["sets"], params["executor"], params["address"])
    assert config.executor.kind == "ray"
    assert config.output.path == output.split("=", 1)[1]
    assert config.input.path == os.environ["INPUT"]
    # `curate validate` on the same pipeline and overrides, with local stand-ins for the s3:// paths.
    local = [s for s in params["sets"] if not s.startswith("output.path=")]
    sets = [*local, f"input.path={laion_input}", f"output.path={tmp_path / 'out'}"]
    _validate(params["pipeline"], sets, monkeypatch)


# -- the Ray cluster launcher ----------------------------------------------------------------------------


def _ray_start_lines(commands: list[str]) -> list[list[str]]:
    out = []
    for command in commands:
        for part in re.split(r";|&&", command):
            argv = shlex.split(part)
            if argv[:1] == ["ray"]:
                out.append(argv[1:])
    return out


def test_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _yaml("ray-cluster.yaml")
    assert config["cluster_name"]
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert config["head_node_type"] in config["available_node_types"]
    assert isinstance(config["max_workers"], int) and config["max_workers"] > 0
    workers = [n for n in config["available_node_types"] if n != config["head_node_type"]]
    assert workers, "no worker node type"
    # What `ray up` does first: fill in the provider's defaults, then check against ray-schema.json.
    validate_config(prepare_config(copy.deepcopy(config)))

    starts = _ray_start_lines(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert any(a[0] == "start" and "--head" in a for a in starts)
    assert any(a[0] == "start" and any(x.startswith("--address") for x in a) for a in starts)
    for argv in starts:
        _parse_ray(argv)
    assert any("pip install" in c for c in config["setup_commands"])


# -- the Dockerfile and pip extras -----------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile():
    instructions = _dockerfile_instructions()
    words = [w for w, _ in instructions]
    assert "FROM" in words
    users = [rest for w, rest in instructions if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as a non-root user"
    # The last USER comes after every install.
    assert max(i for i, w in enumerate(words) if w == "RUN") < max(
        i for i, w in enumerate(words) if w == "USER"
    )
    runs = " ".join(rest for w, rest in instructions if w == "RUN")
    assert re.search(r"pip install [^&]*[\"']?\.\[gpu\][\"']?", runs)
    entrypoint = next(rest for w, rest in instructions if w == "ENTRYPOINT")
    assert yaml.safe_load(entrypoint) == ["curate"]  # exec form, a JSON list
    # The paths it copies exist in the checkout.
    for w, rest in instructions:
        if w == "COPY":
            sources = [s for s in rest.split() if not s.startswith("--")][:-1]
            assert all((ROOT / s).exists() for s in sources), rest


def _pip_requirements(text: str) -> list[str]:
    """The requirement arguments of every `pip install` in a text (quotes removed, options skipped)."""
    reqs = []
    for m in re.finditer(r"pip install ([^\n&;|]+)", text.replace("\\\n", " ")):
        for token in shlex.split(m.group(1)):
            if not token.startswith("-"):
                reqs.append(token)
    return reqs


def test_pip_extras_exist():
    assert "gpu" in EXTRAS
    checked = 0
    for rel in ("Dockerfile", "ray-cluster.yaml"):
        for req in _pip_requirements((INFRA / rel).read_text()):
            m = re.fullmatch(r"(.*?)\[([\w,\s-]+)\](.*)", req)
            if not m:
                continue
            target, extras = m.group(1), [e.strip() for e in m.group(2).split(",")]
            if target in (".", "curate") or target.endswith(("/curate", "/.")):  # this project
                known = set(EXTRAS)
            else:  # another package, e.g. ray[default]: its installed metadata
                known = set(importlib.metadata.metadata(target).get_all("Provides-Extra") or [])
            assert set(extras) <= known, f"{rel}: {req}: no such extra"
            checked += 1
    assert checked >= 3


# -- Slurm -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ray-cluster.sbatch", "train.sbatch"])
def test_sbatch_syntax_and_headers(name):
    path = SBATCH[name]
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert text.startswith("#!/bin/bash")
    headers = re.findall(r"^#SBATCH\s+(--[\w-]+)", text, re.M)
    assert "--nodes" in headers
    assert {"--gres", "--gpus-per-node"} & set(headers)
    # No command before the #SBATCH lines: sbatch stops reading them at the first one.
    first_command = min(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    last_header = max(i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    assert last_header < first_command
    assert re.search(r"^\s*srun\b", text, re.M)


STUB_LOG = r"""line=$(printf '%s\x1f' "${0##*/}" "$@"); printf '%s\n' "$line" >> "$STUB_LOG"
# What Ray's token settings were for this command: mode, path, the file's permissions and content.
t=${RAY_AUTH_TOKEN_PATH:-}; [[ -f $t ]] && tp=$(stat -c %a "$t") tc=$(cat "$t") || tp="" tc=""
printf '%s\x1f%s\x1f%s\x1f%s\x1f%s\n' "${0##*/}" "${RAY_AUTH_MODE:-}" "$t" "$tp" "$tc" >> "$STUB_LOG.env"
"""
STUBS = {
    # srun OPTION=VALUE... COMMAND: runs COMMAND once (the scripts write srun's options as --opt=value).
    "srun": 'while [[ $1 == -* ]]; do shift; done\nexec "$@"\n',
    "scontrol": 'for ((i = 1; i <= STUB_NODES; i++)); do echo "node$i"; done\n',
    # `ray start --block` waits until the script stops it; the rest return at once.
    "ray": 'for a in "$@"; do [[ $a == --block ]] && exec "$STUB_SLEEP" 60; done\nexit 0\n',
    # The head's address as Ray picks it, and the wait loop's count of live Ray nodes: the `ray start` calls
    # so far.
    "python": "[[ $* == *get_node_ip_address* ]] && exec echo 10.0.0.1\n"
    "grep -c $'^ray\\x1fstart\\x1f' \"$STUB_LOG\" || true\n",
    # `timeout N bash -c ...` is the wait loop's check that the head's port answers (it does, here).
    "timeout": 'shift; [[ $1 == bash ]] && exit 0; exec "$@"\n',
    "sleep": "exit 0\n",
    # `curate validate` (before any Ray process starts), then `curate run`.
    "curate": '[[ $1 == validate ]] && exit "${STUB_VALIDATE_RC:-0}"\nexit "${STUB_CURATE_RC:-0}"\n',
    "torchrun": 'echo "MASTER=$MASTER_ADDR:$MASTER_PORT"\n',
}


def _run_with_stub_slurm(
    tmp_path, script: str, env: dict[str, str], nodes: int = 3, stubs: dict[str, str] | None = None
):
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir()
    for name, body in {**STUBS, **(stubs or {})}.items():
        stub = bin_dir / name
        stub.write_text("#!/bin/bash\n" + STUB_LOG + body)
        stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    full_env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "STUB_LOG": str(log),
        "STUB_NODES": str(nodes),
        "STUB_SLEEP": shutil.which("sleep"),
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": f"node[1-{nodes}]",
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NNODES": str(nodes),
        "SLURM_CPUS_PER_TASK": "16",
        "SLURM_GPUS_PER_NODE": "a100:4",
        **env,
    }
    proc = subprocess.run(
        ["bash", str(SBATCH[script])], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=30
    )
    calls = [line.split("\x1f")[:-1] for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


@pytest.mark.parametrize("curate_rc", [0, 1])
def test_ray_cluster_sbatch_runs_curate_on_the_cluster(tmp_path, laion_input, monkeypatch, curate_rc):
    output = tmp_path / "out"
    proc, calls = _run_with_stub_slurm(
        tmp_path,
        "ray-cluster.sbatch",
        {"INPUT": str(laion_input), "OUTPUT": str(output), "STUB_CURATE_RC": str(curate_rc)},
    )
    assert proc.returncode == curate_rc, proc.stderr  # curate's exit code is the job's
    # One token for the job, in ~/.ray (TOKEN_DIR's default), only the user's while the job ran, gone after;
    # every Ray process and curate were told where it is, and it is on no command line and in no output.
    token_file = tmp_path / ".ray" / "curate-ray-42.token"
    seen = [line.split("\x1f") for line in (tmp_path / "calls.log.env").read_text().splitlines()]
    told = [e for e in seen if e[0] in ("ray", "curate") or (e[0] == "python" and e[2])]
    validated = [e for e in told if e[0] == "curate" and not e[2]]  # `curate validate`, before the token
    assert len(validated) == 1
    told = [e for e in told if e not in validated]
    assert {e[0] for e in told} == {"ray", "curate", "python"}
    assert {(mode, path, perms) for _, mode, path, perms, _ in told} == {("token", str(token_file), "600")}
    ((token,),) = {(e[4],) for e in told}
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert not token_file.exists()
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    assert not [c for c in calls if any(token in a for a in c)]
    assert token not in proc.stdout + proc.stderr
    starts = [c[1:] for c in calls if c[:2] == ["ray", "start"]]
    assert len(starts) == 3, calls  # a head and two workers
    parsed = [_parse_ray(argv).params for argv in starts]
    heads = [p for p in parsed if p["head"]]
    assert len(heads) == 1 and heads[0]["node_ip_address"] == "10.0.0.1"
    for p in parsed:
        assert p["block"] and p["num_cpus"] == 16 and p["num_gpus"] == 4
        assert p["head"] or p["address"] == "10.0.0.1:6379"
    # The head's address was asked on the head's node, as Ray would pick it there.
    (ip_srun,) = [c for c in calls if c[0] == "srun" and "python" in c]
    assert "--nodelist=node1" in ip_srun and any("get_node_ip_address" in a for a in ip_srun)
    # Every Ray step was started through srun, on its own node.
    ray_sruns = [c for c in calls if c[0] == "srun" and "ray" in c]
    assert sorted(a for c in ray_sruns for a in c if a.startswith("--nodelist=")) == [
        "--nodelist=node1",
        "--nodelist=node2",
        "--nodelist=node3",
    ]

    # The pipeline was validated first, with the same settings, before any Ray process started.
    (check,), (run,) = ([c[1:] for c in calls if c[:2] == ["curate", verb]] for verb in ("validate", "run"))
    first_ray = min(i for i, c in enumerate(calls) if c[:2] == ["ray", "start"])
    assert calls.index(["curate", *check]) < first_ray
    assert check[1:] == [a for a in run[1:] if a not in ("--address", "10.0.0.1:6379")]
    params = _parse_curate(run).params
    assert params["address"] == "10.0.0.1:6379"
    assert params["pipeline"] == "pipelines/laion_subset.yaml"
    monkeypatch.chdir(ROOT)
    config = _load(params["pipeline"], params["sets"], params["executor"], params["address"])
    assert (config.executor.kind, config.executor.address) == ("ray", "10.0.0.1:6379")
    assert (config.input.path, config.output.path) == (str(laion_input), str(output))
    if curate_rc == 0:
        _validate(params["pipeline"], params["sets"], monkeypatch)


def test_ray_cluster_sbatch_refuses_a_pipeline_that_does_not_validate_before_starting_ray(tmp_path):
    proc, calls = _run_with_stub_slurm(tmp_path, "ray-cluster.sbatch", {"STUB_VALIDATE_RC": "2"})
    assert proc.returncode == 2  # curate's code for a bad config
    assert [c[:2] for c in calls] == [["curate", "validate"]]  # no srun, no ray start, no run
    assert not (tmp_path / ".ray").exists() or not list((tmp_path / ".ray").iterdir())  # no token left


def test_ray_cluster_sbatch_gives_up_when_nodes_do_not_join(tmp_path):
    # One node never joins: the wait loop sees one live node fewer than the allocation has.
    never_joins = {
        "python": "[[ $* == *get_node_ip_address* ]] && exec echo 10.0.0.1\necho $((STUB_NODES - 1))\n"
    }
    proc, calls = _run_with_stub_slurm(tmp_path, "ray-cluster.sbatch", {"RAY_WAIT_S": "2"}, stubs=never_joins)
    assert proc.returncode == 1
    assert "Ray node(s) joined" in proc.stderr
    assert not [c for c in calls if c[:2] == ["curate", "run"]]


def test_ray_cluster_sbatch_stops_waiting_when_the_head_exits(tmp_path):
    # `ray start --head` fails (a bad option, a port in use): the job says so at once, not after RAY_WAIT_S.
    head_fails = {"ray": 'for a in "$@"; do [[ $a == --head ]] && exit 1; done\nexec "$STUB_SLEEP" 60\n'}
    no_answer = {"timeout": "exit 1\n"}  # the head's port never answers
    proc, calls = _run_with_stub_slurm(tmp_path, "ray-cluster.sbatch", {}, stubs={**head_fails, **no_answer})
    assert proc.returncode == 1
    assert "error: the Ray head on node1 exited while waiting for the head" in proc.stderr
    assert not [
        c for c in calls if c[:2] == ["curate", "run"] or c[:3] == ["ray", "start", "--address=10.0.0.1:6379"]
    ]
    assert not list((tmp_path / ".ray").iterdir())  # the token is deleted however the job ends


def test_ray_cluster_sbatch_wait_snippet_compiles():
    snippets = re.findall(r"(?:python -c |count_nodes=)'([^']*)'", SBATCH["ray-cluster.sbatch"].read_text())
    assert len(snippets) == 2  # the head's address, the count of live nodes
    for snippet in snippets:
        compile(snippet, "ray-cluster.sbatch", "exec")


def test_train_sbatch_runs_torchrun_on_every_node(tmp_path, monkeypatch):
    proc, calls = _run_with_stub_slurm(tmp_path, "train.sbatch", {"TRAIN_SET": "schedule.steps=10"}, nodes=2)
    assert proc.returncode == 0, proc.stderr
    (srun,) = [c for c in calls if c[0] == "srun" and "torchrun" in c]
    assert "--nodes=2" in srun and "--ntasks-per-node=1" in srun
    (torchrun,) = [c[1:] for c in calls if c[0] == "torchrun"]
    args = _parse_torchrun(torchrun)
    assert (args.nnodes, args.nproc_per_node) == ("2", "4")
    assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == ("c10d", "node1:29500", "42")
    assert "MASTER=node1:29500" in proc.stdout
    # -m curate train CONFIG ...: the same argv `python -m curate` hands to the CLI.
    assert args.module and args.training_script == "curate"
    params = _parse_curate(args.training_script_args).params
    assert params["sets"] == ["schedule.steps=10"]

    from curate.train.config import load_train_config

    monkeypatch.chdir(ROOT)
    cfg = load_train_config(params["config"], params["sets"])
    assert cfg.schedule.steps == 10


# -- every other curate command line ---------------------------------------------------------------------

SHELL_OPERATORS = {"||", "&&", ";", "|", "&", ">", ">>", "2>&1"}
CURATE_AT = re.compile(
    r"(?:^|&&|\s--(?=\s)|\bexec|^srun(?:\s+-\S+)*|entrypoint:|')\s*(?:[A-Z_][A-Z0-9_]*=\S+\s+)*curate\s+([^'\n]*)"
)


def _curate_lines() -> list[tuple[str, list[str]]]:
    """(file, argv without 'curate') for every line in infra/ that runs curate, continuations joined and
    shell variables replaced by their names (arrays by nothing), cut at the first shell operator."""
    found = []
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        text = re.sub(r"\\\n\s*(?:#\s*)?", " ", path.read_text())
        for line in text.splitlines():
            line = line.strip().lstrip("#").strip()
            for m in CURATE_AT.finditer(line):
                rest = re.sub(r"\s#\s.*$", "", m.group(1))  # a trailing comment
                argv = list(itertools.takewhile(lambda t: t not in SHELL_OPERATORS, shlex.split(rest)))
                argv = [t for t in argv if not re.fullmatch(r"\$\{\w+\[@\]\}", t)]
                argv = [re.sub(r"\$\{?(\w+)[^}\s]*\}?", r"\1", t) for t in argv]
                found.append((path.relative_to(INFRA).as_posix(), argv))
    return found


def test_every_curate_command_line_in_infra_parses():
    found = _curate_lines()
    files = {f for f, _ in found}
    assert {"README.md", "kuberay/rayjob.yaml", "slurm/ray-cluster.sbatch", "ray-cluster.yaml"} <= files
    for _, argv in found:
        _parse_curate(argv)
