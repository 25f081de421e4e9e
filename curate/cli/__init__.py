"""The ``curate`` command. Exit codes: 0 success, 1 the run finished with failed shards, 2 bad config or usage."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import rich.markup
import typer
from rich.console import Console

from curate.base import ConfigError, InputError, ModelNotFound
from curate.cli.index import index_app
from curate.core.config import PipelineConfig, load_config

app = typer.Typer(
    name="curate",
    help="Curate image-text corpora for training generative models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)  # long paths and messages stay on one line, whole
out = Console(soft_wrap=True)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: a.b=value (stages by name: stages.NAME.key=v)."),
]
PipelineArg = Annotated[str, typer.Argument(help="The pipeline YAML file.")]


def _load(pipeline: str, sets: list[str] | None, executor: str | None = None, address: str | None = None):
    overrides = list(sets or [])
    if executor:
        overrides.append(f"executor.kind={executor}")
    if address:
        overrides.append(f"executor.address={address}")
        if not executor:
            overrides.append("executor.kind=ray")
    return load_config(pipeline, overrides)


@app.command()
def run(
    pipeline: PipelineArg,
    sets: SetOpt = None,
    executor: Annotated[str | None, typer.Option(help="local or ray (overrides executor.kind).")] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address to join (implies --executor ray).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Delete curate's files in the output folder and start over.")
    ] = False,
    resume_anyway: Annotated[
        bool, typer.Option(help="Keep finished shards of a run with another config and go on.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display or summary.")] = False,
) -> None:
    """Run a pipeline. Running it again resumes: finished shards are skipped."""
    from curate.core.runner import run_pipeline

    config = _load(pipeline, sets, executor, address)
    summary = run_pipeline(config, overwrite=overwrite, resume_anyway=resume_anyway, show_progress=not quiet)
    if summary.shards_failed:
        err.print(
            f"[red]{len(summary.shards_failed)} shard(s) failed: {', '.join(sorted(summary.shards_failed))}"
        )
        err.print(
            f"details: {config.output.path}/shards/<id>_failed.json; run the same command again to retry them"
        )
    raise typer.Exit(summary.exit_code)


@app.command()
def validate(pipeline: PipelineArg, sets: SetOpt = None) -> None:
    """Check a pipeline without running it: config, stage parameters, column flow, input files, and whether
    every model is here or can be downloaded (nothing is downloaded)."""
    from curate.core.pipeline import Pipeline
    from curate.models.manage import plan_weights, raise_missing

    config = _load(pipeline, sets)
    p = Pipeline(config)
    p.check()
    specs = p.reader.plan(config.shard_size)
    models = plan_weights(p)
    raise_missing([m for m in models if not m.present and m.error])
    later = [m for m in models if not m.present]
    for m in later:
        out.print(f"  {m.stage}: {m.spec.name} is not in the model directory; the run will download it")
    out.print(
        f"[green]ok[/green]: {config.name}: {len(config.stages)} stage(s), {len(p.reader.files)} input file(s), "
        f"{sum(s.rows for s in specs):,} rows in {len(specs)} shard(s), {len(models)} model(s) "
        f"({len(models) - len(later)} here)"
    )


@app.command()
def describe(
    pipeline: PipelineArg,
    sets: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    cpus: Annotated[
        float | None,
        typer.Option(help="CPUs of the Ray cluster to plan for (default: executor.num_cpus or here)."),
    ] = None,
    gpus: Annotated[
        float | None,
        typer.Option(help="GPUs of the Ray cluster to plan for (default: executor.num_gpus or 0)."),
    ] = None,
) -> None:
    """Show the plan: stages, the columns each reads and writes, resources, phases, shards, and the Ray
    operators (task groups, actor pools and their sizes) on a cluster of --cpus and --gpus."""
    import os

    from curate.core.pipeline import Pipeline
    from curate.executors.plan import plan

    config = _load(pipeline, sets)
    p = Pipeline(config)
    columns = p.check()
    stages = p.describe()
    total_cpus = cpus if cpus is not None else config.executor.num_cpus or os.cpu_count() or 1
    total_gpus = gpus if gpus is not None else config.executor.num_gpus or 0
    ray_plan = [[op.to_dict() for op in plan(phase, total_cpus, total_gpus)] for phase in p.phases()]
    if as_json:
        cluster = {"cpus": total_cpus, "gpus": total_gpus}
        doc = {
            "name": config.name,
            "stages": stages,
            "columns": columns,
            "ray": {"cluster": cluster, "phases": ray_plan},
        }
        out.print_json(json.dumps(doc))
        return
    out.print(
        f"[bold]{config.name}[/bold]: {config.executor.kind} executor, {config.shard_size:,} rows a shard, "
        f"{len(p.phases())} phase(s)"
    )
    out.print(f"input: {config.input.path}")
    out.print(f"input columns: {', '.join(p.reader.column_names())}")
    for i, s in enumerate(stages):
        res = f"cpus={s['cpus']:g} gpus={s['gpus']:g}"
        res += f" concurrency={s['concurrency']}" if s["concurrency"] else ""
        out.print(
            f"{i:>3} [bold]{s['name']}[/bold] ({s['stage']}, {s['kind']}): runs as {s['runs_as']}, {res}"
        )
        out.print(f"      reads:  {', '.join(s['reads']) or '-'}")
        out.print(f"      writes: {', '.join(s['writes']) or '-'}")
    mode, column = config.output.caption_source()
    text = f"column {column!r}" if column else f"train_caption: {mode}"
    out.print(f"output: {config.output.path} (training text: {text})")
    out.print(f"under Ray, on a cluster of {total_cpus:g} CPUs and {total_gpus:g} GPUs (--cpus, --gpus):")
    for index, phase in enumerate(p.phases()):
        out.print(f"  phase {index}:")
        for op in plan(phase, total_cpus, total_gpus):
            out.print(f"    {op.describe()}", markup=False, highlight=False)


@app.command()
def retry(
    output: Annotated[str, typer.Argument(help="The output folder of a run.")],
    statuses: Annotated[
        str,
        typer.Option("--status", help="Comma-separated statuses to retry; http_5xx matches every 5xx."),
    ] = "timeout,connection_error,http_429,http_5xx",
) -> None:
    """Fetch again only the rows that failed for a transient reason; rewrite only their shards."""
    from curate.tools.retry import retry_output

    wanted = [s.strip() for s in statuses.split(",") if s.strip()]
    summary = retry_output(output, wanted, console=err)
    still = ", ".join(f"{k}: {v}" for k, v in sorted(summary.still.items())) or "none"
    out.print(
        f"retried {summary.rows:,} row(s) in {len(summary.shards)} shard(s): {summary.recovered:,} recovered; "
        f"still failing: {still}"
    )


@app.command()
def demo(
    output: Annotated[str, typer.Option(help="Where the world and the run go.")] = "demo-output",
    size: Annotated[int, typer.Option(help="Rows in the generated world.")] = 2000,
    executor: Annotated[str | None, typer.Option(help="local or ray (default: the demo pipeline's).")] = None,
    clip: Annotated[
        str | None,
        typer.Option(
            help="A CLIP folder (open_clip hub layout + curate_calibration.json) to use instead of training one."
        ),
    ] = None,
    train_steps: Annotated[
        int | None,
        typer.Option(
            help="Steps of the curated-vs-raw training comparison (0 skips it; default: the config's)."
        ),
    ] = None,
) -> None:
    """Build the offline sample world, serve it on 127.0.0.1 and run pipelines/demo.yaml against it."""
    from curate.demo.run import run_demo

    summary, truth = run_demo(output, size, executor, err, clip=clip, train_steps=train_steps)
    out.print(f"shards: {output}/run/shards  (WebDataset tars, parquet sidecars, stats)")
    out.print(f"summary: curate status {output}/run   ground truth: {output}/world/truth.parquet")
    out.print(
        f"download statuses match the planted ground truth for {truth['agree']:,}/{truth['checked']:,} fetched rows"
    )
    for what, n in sorted(truth["differ"].items()):
        out.print(f"  [yellow]{n:,} x {what}")
    scores = truth.get("scores", {})
    out.print(
        f"scored rows: {scores.get('scored', 0):,} (clip_score by the demo CLIP: small, trained on this world only)"
    )
    for key, label in (
        ("mismatched_caption", "mismatched captions removed by clip_score"),
        ("text_overlay", "text overlays found by text_area"),
    ):
        if key in scores:
            s = scores[key]
            out.print(
                f"{label} (threshold {s['threshold']:g}): precision {s['precision']:.3f}, recall {s['recall']:.3f} "
                f"({s['correct']} of {s['flagged']} flagged, {s['actual']} planted)"
            )
    if "nsfw" in scores:
        n = scores["nsfw"]
        out.print(
            f"nsfw_score >= {n['threshold']:g}: {n['flagged']} of {n['scored']} rows (the world has no NSFW images)"
        )
    d = truth.get("dedup")
    if d:
        kinds = ", ".join(f"{n} {k}" for k, n in d["by_kind"].items()) or "none"
        out.print(
            f"duplicates removed by dedup: precision {d['precision']:.3f}, recall {d['recall']:.3f} "
            f"({d['correct']} of {d['flagged']} flagged, {d['actual']} planted; by kind: {kinds})"
        )
        planted = ", ".join(f"{k} {f}/{n}" for k, (f, n) in d["planted_found"].items())
        out.print(f"  planted copies found, by how they were made: {planted}")
    raise typer.Exit(summary.exit_code)


@app.command()
def status(
    output: Annotated[str, typer.Argument(help="The output folder of a run.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Shards done, pending and failed, and the counts so far."""
    from curate.core.progress import summary_table
    from curate.core.runner import OutputDir, collect_output, driver_alive

    info = OutputDir(output).run_json()
    if info is None:
        raise ConfigError([("OUTPUT", f"{output} holds no run.json: not a curate output folder")])
    s = collect_output(output)
    pending = s.shards_total - len(s.shards_done) - len(s.shards_failed)
    state = info.get("status")
    driver = info.get("driver") or {}
    if state == "running" and driver_alive(driver) is False:
        state = "interrupted"  # killed, or its machine went down: run.json was never finished
    report = {
        "name": info.get("name"),
        "status": state,
        "driver": driver,
        "fingerprint": info.get("fingerprint"),
        "shards": {
            "total": s.shards_total,
            "done": len(s.shards_done),
            "failed": len(s.shards_failed),
            "pending": pending,
        },
        "failed": sorted(s.shards_failed),
        "counts": s.counts,
    }
    if as_json:
        out.print_json(json.dumps(report))
        return
    out.print(
        f"{report['name']} ({report['status']}): {len(s.shards_done)}/{s.shards_total} shards done, "
        f"{len(s.shards_failed)} failed, {pending} pending"
    )
    if state == "interrupted":
        out.print(
            f"  its driver (pid {driver.get('pid')}) is gone without finishing; run the same command again "
            "to resume: finished shards are kept"
        )
    elif state == "running" and driver:
        out.print(f"  driver: pid {driver.get('pid')} on {driver.get('host')}")
    for shard in sorted(s.shards_failed):
        last = s.shards_failed[shard].strip().splitlines()[-1:] or [""]
        out.print(f"  [red]failed[/red] {shard}: {last[0]}")
    out.print(summary_table(s.counts))


@app.command()
def preview(
    output: Annotated[str, typer.Argument(help="The output folder of a run.")],
    rules: Annotated[
        list[str],
        typer.Option(
            "--rule", "-r", help="A rule such as 'clip_score >= 0.3'; replaces the run's rules on its column."
        ),
    ],
    html: Annotated[
        str | None, typer.Option(help="Where to write the HTML page (default OUTPUT/report/preview.html).")
    ] = None,
    per_side: Annotated[int, typer.Option(help="Images shown on each side of each threshold.")] = 24,
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
) -> None:
    """What other thresholds would keep and drop, from the sidecars alone (no recompute), with an HTML page
    of the images nearest each threshold."""
    from curate.tools.preview import preview_output, preview_table

    report = preview_output(output, rules, html, per_side)
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
        return
    out.print(preview_table(report))
    for note in report.caveats:
        out.print(f"[yellow]note:[/yellow] {note}")
    if report.html:
        out.print(f"images near the thresholds: {report.html}")


@app.command("report")
def report_(output: Annotated[str, typer.Argument(help="The output folder of a run.")]) -> None:
    """Write OUTPUT/report/report.html (funnel, drop reasons, link rot, stage times, score histograms with
    thresholds, sample grids, captions; one self-contained file) and report.json with the same numbers."""
    from curate.tools.report import write_report

    written = write_report(output)
    out.print(f"report: {written.html_path}\nnumbers: {written.json_path}")


@app.command()
def takedown(
    output: Annotated[str, typer.Argument(help="The output folder of a finished run.")],
    uids: Annotated[
        str | None, typer.Option(help="A file of uids to remove, one per line (# comments), or a .parquet.")
    ] = None,
    hashes: Annotated[
        str | None,
        typer.Option(
            help="A file of sha256 (64 hex) and/or pHash (16 hex) lines; sha256:/phash: prefixes allowed."
        ),
    ] = None,
    index: Annotated[
        str | None,
        typer.Option(help="A retrieval index to remove them from too (default OUTPUT/index if any)."),
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why: recorded in OUTPUT/takedown/audit.jsonl.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the audit record as JSON.")] = False,
) -> None:
    """Remove samples from a finished run: tar members, dropped/ thumbnails and index vectors go; sidecar rows
    stay, marked drop_reason=takedown with their URL, captions and embeddings nulled; stats are recounted.
    Every file is replaced atomically, an audit line is appended last, and a rerun completes a killed one."""
    from curate.tools.takedown import read_request
    from curate.tools.takedown import takedown as take_down

    if (uids is None) == (hashes is None):
        raise ConfigError(
            [("--uids/--hashes", "give exactly one of --uids FILE and --hashes FILE")], what="takedown"
        )
    wanted, listed = read_request(uids, hashes)
    record = take_down(
        output,
        uids=wanted,
        hashes=listed,
        reason=reason,
        index=index,
        source=uids or hashes,
        progress=out.print,
    )
    if as_json:
        out.print_json(json.dumps(record))
        return
    changed = [f["path"] for f in record["files"] if f.get("sha256_before") != f.get("sha256_after")]
    out.print(
        f"takedown: {len(record['found'])} row(s) matched, {len(changed)} file(s) rewritten"
        + ("" if record["removed_anything"] else "; nothing left to remove (already taken down)")
    )
    for uid in record["not_found"]:
        out.print(f"[yellow]not found:[/yellow] {uid}")
    for h in record["hashes_not_found"]:
        out.print(f"[yellow]no row has:[/yellow] {h}")


@app.command("train")
def train_(
    config: Annotated[str, typer.Argument(help="The training YAML (see pipelines/train_demo.yaml).")],
    sets: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a text-to-image diffusion model on curated shards; running it again resumes from the latest
    checkpoint. Multi-GPU / multi-node: launch with torchrun (or srun under Slurm)."""
    from curate.base import TrainError
    from curate.train.config import load_train_config
    from curate.train.trainer import train

    cfg = load_train_config(config, sets)
    say = lambda line: out.print(line, markup=False, highlight=False)  # noqa: E731
    try:
        summary = train(cfg, say=say, progress=not quiet)
    except TrainError as e:
        raise ConfigError(str(e), config, "training") from None
    out.print(
        f"trained {summary['steps']} steps in {summary['seconds']:.0f}s; checkpoints in {cfg.output}/checkpoints"
    )


@app.command()
def generate(
    checkpoint: Annotated[str, typer.Option(help="A checkpoint folder, or a training output (its latest).")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A prompt; repeat for several.")],
    output: Annotated[str, typer.Option("--out", "-o", help="Folder for the PNGs.")] = "generated",
    guidance: Annotated[float, typer.Option(help="Text guidance scale.")] = 3.0,
    rag: Annotated[
        str | None, typer.Option(help="A curate index: condition on retrieved neighbours.")
    ] = None,
    k: Annotated[int | None, typer.Option("-k", help="Neighbours per prompt (the model's k).")] = None,
    rag_guidance: Annotated[float, typer.Option(help="Retrieval guidance scale.")] = 1.0,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 25,
    sampler: Annotated[str, typer.Option(help="ddim or dpm.")] = "ddim",
    n: Annotated[int, typer.Option("-n", help="Images per prompt.")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Generate images from a trained checkpoint, optionally with retrieval augmentation (--rag INDEX)."""
    from curate.train.generate import generate as run_generate

    if sampler not in ("ddim", "dpm"):
        raise ConfigError([("--sampler", f"{sampler!r}: use ddim or dpm")])
    try:
        result = run_generate(
            checkpoint,
            prompt,
            out=output,
            rag=rag,
            k=k,
            guidance=guidance,
            rag_guidance=rag_guidance,
            steps=steps,
            sampler=sampler,
            seed=seed,
            device=device,
            images_per_prompt=n,
        )
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    for path in result["paths"]:
        out.print(path)
    out.print(f"{len(result['paths'])} image(s) from {result['checkpoint']} (step {result['step']})")


models_app = typer.Typer(
    help="Model weights: list what a pipeline needs, fetch it for air-gapped clusters, train the demo's CLIP.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")
app.add_typer(index_app, name="index")


@models_app.command("list")
def models_list(pipeline: PipelineArg, sets: SetOpt = None) -> None:
    """The weights files a pipeline's stages load, where they come from, and whether they are here."""
    from rich.table import Table

    from curate.core.pipeline import Pipeline
    from curate.models.manage import status
    from curate.models.weights import model_dir

    rows = status(Pipeline(_load(pipeline, sets)))
    table = Table("stage", "model", "source", "local path", "here", title=f"model directory: {model_dir()}")
    for r in rows:
        table.add_row(
            r.stage, r.spec.name, r.spec.source, str(r.path), "[green]yes" if r.present else "[red]no"
        )
    out.print(table if rows else "this pipeline loads no weights from the hub (bundled ones need nothing)")


@models_app.command("fetch")
def models_fetch(pipeline: PipelineArg, sets: SetOpt = None) -> None:
    """Download every model a pipeline needs into the model directory (CURATE_MODEL_DIR); offline, list what
    is missing and where to put it. Exit code 2 when something is still missing."""
    from curate.core.pipeline import Pipeline
    from curate.models.manage import fetch_weights
    from curate.models.weights import model_dir

    results = fetch_weights(Pipeline(_load(pipeline, sets)))
    for r in results:
        mark = "[green]ok[/green]" if r.present else "[red]missing[/red]"
        out.print(f"{mark} {r.stage}: {r.spec.name} -> {r.path}")
        if r.error:
            out.print(f"    put {r.spec.source} there; {r.error}")
    missing = [r for r in results if not r.present]
    if missing:
        err.print(
            f"[red]{len(missing)} model(s) missing[/red] from {model_dir()}: run this where the hub is "
            "reachable and copy the model directory here (CURATE_MODEL_DIR), or put each file at its path"
        )
        raise typer.Exit(2)
    out.print(f"all {len(results)} model file(s) are in {model_dir()}" if results else "nothing to fetch")


@models_app.command("train-demo-clip")
def models_train_demo_clip(
    output: Annotated[str, typer.Argument(help="Folder for the checkpoint (open_clip hub layout).")],
    steps: Annotated[int | None, typer.Option(help="Training steps (default: the trainer's).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train the small open_clip model the demo scores with, on the sample world's drawn scenes (CPU, minutes)."""
    from curate.demo.run import train_demo_clip

    info = train_demo_clip(output, err, steps, seed)
    out.print(
        f"saved {output}: {info['steps']} steps in {info['seconds']:.0f}s; calibrated threshold "
        f"{info['threshold']:.3f} (held-out precision {info['heldout_precision']:.3f}, "
        f"recall {info['heldout_recall']:.3f}); load it with model: local-dir:{output}"
    )


def main() -> None:
    try:
        rc = app(standalone_mode=False)  # click returns an Exit's code instead of raising it here
    except (ConfigError, InputError, ModelNotFound) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except typer.TyperException as e:  # click's usage errors, as typer vendors them
        if hasattr(e, "show"):
            e.show()
        sys.exit(getattr(e, "exit_code", 2))
    except Exception as e:
        problem = storage_problem(e)
        if problem is None:
            raise
        err.print("[red]error:[/red] " + rich.markup.escape(problem), highlight=False)
        sys.exit(2)
    sys.exit(rc if isinstance(rc, int) else 0)


_STORAGE_EXTRAS = {"s3fs": "s3", "gcsfs": "gcs", "adlfs": "azure"}
_STORAGE_MODULES = (
    "botocore",
    "aiobotocore",
    "google.auth",
    "google.api_core",
    "azure.core",
    "azure.identity",
)


def storage_problem(e: BaseException) -> str | None:
    """A clear line for a failure to reach object storage (a missing fsspec backend, missing or refused
    credentials), which the user fixes in their environment, not in curate; None for anything else."""
    if isinstance(e, ImportError):
        for module, extra in _STORAGE_EXTRAS.items():
            if module in str(e):
                return (
                    f"{e}: pip install 'curate[{extra}]'" if extra == "s3" else f"{e}: pip install {module}"
                )
        return None
    if type(e).__module__.startswith(_STORAGE_MODULES):
        return (
            f"object storage: {type(e).__name__}: {e} (check the credentials and endpoint in the environment)"
        )
    return None


__all__ = ["PipelineConfig", "app", "main"]
