"""Running a pipeline and following it: ``curate run``, ``validate``, ``describe``, ``retry``, ``status``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from curate.base import ConfigError
from curate.cli.options import PipelineArg, SetOpt, err, load_pipeline, out
from curate.core.output import OutputFolder, collect_output, driver_alive

__all__ = ["describe", "retry", "run", "status", "validate"]


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

    config = load_pipeline(pipeline, sets, executor, address)
    summary = run_pipeline(config, overwrite=overwrite, resume_anyway=resume_anyway, show_progress=not quiet)
    if summary.shards_failed:
        err.print(
            f"[red]{len(summary.shards_failed)} shard(s) failed: {', '.join(sorted(summary.shards_failed))}"
        )
        folder = OutputFolder(config.output.path)
        err.print(
            f"details: {folder.as_given(folder.shard_failed('<id>'))}; run the same command again to retry them"
        )
    raise typer.Exit(summary.exit_code)


def validate(pipeline: PipelineArg, sets: SetOpt = None) -> None:
    """Check a pipeline without running it: config, stage parameters, column flow, input files, and whether
    every model is here or can be downloaded (nothing is downloaded)."""
    from curate.core.pipeline import Pipeline
    from curate.models.manage import plan_weights, raise_missing

    config = load_pipeline(pipeline, sets)
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

    config = load_pipeline(pipeline, sets)
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


def status(
    output: Annotated[str, typer.Argument(help="The output folder of a run.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Shards done, pending and failed, and the counts so far."""
    from curate.core.progress import summary_table

    folder = OutputFolder(output)
    info = folder.read_run()
    if info is None:
        raise ConfigError([("OUTPUT", f"{output} holds no run.json: not a curate output folder")])
    s = collect_output(folder)
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
