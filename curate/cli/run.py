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
    add: Annotated[
        list[str] | None,
        typer.Option(
            "--add",
            help="Add an input (a file, a glob or a folder) to the run: only its rows are read, into new shards; "
            "run.json keeps it for later runs. Repeatable.",
        ),
    ] = None,
) -> None:
    """Run a pipeline. Running it again resumes: finished shards are skipped. Input that is new since (files
    that now match input.path, or --add) grows the run: only the new rows are read, into new shards, and a
    global stage (dedup) decides them against the rows the run has kept."""
    from curate.core.runner import run_pipeline

    config = load_pipeline(pipeline, sets, executor, address)
    summary = run_pipeline(
        config, overwrite=overwrite, resume_anyway=resume_anyway, show_progress=not quiet, add=add or []
    )
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
    for m in models:
        if m.stand_in:
            out.print(
                f"  [yellow]{m.stage}: {m.spec.name} is a stand-in (random weights): its outputs mean nothing; "
                "`curate models fetch` replaces it[/yellow]"
            )
    fits = _check_fit(config, p)
    out.print(
        f"[green]ok[/green]: {config.name}: {len(config.stages)} stage(s), {len(p.reader.files)} input file(s), "
        f"{sum(s.rows for s in specs):,} rows in {len(specs)} shard(s), {len(models)} model(s) "
        f"({len(models) - len(later)} here); {fits}"
    )


def _check_fit(config, p) -> str:
    """Whether the plan fits where it will run, as far as that is known before the run: the local executor
    on this machine. A Ray run's cluster is known when it starts (the run checks it then, before any work);
    `curate describe --nodes --cpus --gpus --memory` checks a plan for a cluster beforehand. Raises
    ConfigError (exit 2) when it does not fit."""
    from curate.executors.local import this_machine
    from curate.executors.plan import local_plan

    if config.executor.kind == "ray":
        return "the Ray plan is checked against the cluster when the run starts (curate describe plans ahead)"
    plan = local_plan(p.phases(), this_machine())
    for note in plan.notes:
        out.print(f"  {note}", highlight=False)
    return f"fits {plan.cluster.describe()}"


def describe(
    pipeline: PipelineArg,
    sets: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    nodes: Annotated[int, typer.Option(help="Nodes of the Ray cluster to plan for, each as below.")] = 1,
    cpus: Annotated[
        float | None,
        typer.Option(help="CPUs per node (default: executor.num_cpus, else this machine's)."),
    ] = None,
    gpus: Annotated[
        float | None,
        typer.Option(help="GPUs per node (default: executor.num_gpus, else this machine's)."),
    ] = None,
    memory: Annotated[
        str | None,
        typer.Option(help="Memory per node, e.g. 48GB or 48GiB (Ray gives workers about 70% of it)."),
    ] = None,
    gpu_memory: Annotated[
        str | None, typer.Option("--gpu-memory", help="Memory of each GPU, e.g. 80GB.")
    ] = None,
) -> None:
    """Show the plan: stages, the columns each reads and writes, and on a cluster of --nodes nodes of --cpus,
    --gpus and --memory each: the device each stage runs on, its GPU share, actors, memory per actor and in
    all, and the Ray operators. Exit code 2 when the pipeline cannot fit that cluster."""
    from curate.core.pipeline import Pipeline
    from curate.executors.plan import make_plan

    config = load_pipeline(pipeline, sets)
    p = Pipeline(config)
    columns = p.check()
    stages = p.describe()
    cluster = _cluster(config, nodes, cpus, gpus, memory, gpu_memory)
    the_plan = make_plan(p.phases(), cluster)
    if as_json:
        doc = {
            "name": config.name,
            "stages": stages,
            "columns": columns,
            "ray": {
                "cluster": {"cpus": cluster.cpus, "gpus": cluster.gpus},
                "phases": [[op.to_dict() for op in phase.operators] for phase in the_plan.phases],
            },
            "plan": the_plan.to_dict(),
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
        res += f" (where the cluster has GPUs: {s['gpus_if_any']:g})" if s["gpus_if_any"] != s["gpus"] else ""
        res += f" concurrency={s['concurrency']}" if s["concurrency"] else ""
        out.print(
            f"{i:>3} [bold]{s['name']}[/bold] ({s['stage']}, {s['kind']}): runs as {s['runs_as']}, {res}"
        )
        out.print(f"      reads:  {', '.join(s['reads']) or '-'}")
        out.print(f"      writes: {', '.join(s['writes']) or '-'}")
    mode, column = config.output.caption_source()
    text = f"column {column!r}" if column else f"train_caption: {mode}"
    out.print(f"output: {config.output.path} (training text: {text})")
    _print_plan(the_plan)


def _cluster(config, nodes: int, cpus, gpus, memory, gpu_memory):
    """The cluster to plan for: the options, else the executor's settings, else this machine."""
    from curate.base import parse_bytes
    from curate.executors.local import this_machine
    from curate.executors.plan import RAY_TASK_SHARE, Cluster

    try:
        mem = parse_bytes(memory) if memory else None
        gpu_mem = parse_bytes(gpu_memory) if gpu_memory else None
    except ValueError as e:
        raise ConfigError([("--memory" if memory else "--gpu-memory", str(e))]) from None
    given = any(v is not None for v in (cpus, gpus, memory)) or nodes > 1
    here = this_machine(look_for_gpus=gpus is None and config.executor.num_gpus is None)
    node = here.nodes[0]
    cpus = cpus if cpus is not None else config.executor.num_cpus or node.cpus
    gpus = (
        gpus
        if gpus is not None
        else config.executor.num_gpus
        if config.executor.num_gpus is not None
        else node.gpus
    )
    if mem is not None:
        mem = int(mem * RAY_TASK_SHARE)
    elif not given:
        mem = node.memory
    if gpu_mem is None and gpus and not given:
        gpu_mem = node.gpu_memory
    source = "--nodes, --cpus, --gpus, --memory" if given else "this machine"
    return Cluster.uniform(nodes, cpus, gpus, mem, gpu_mem, source)


def _print_plan(the_plan) -> None:
    from curate.base import fmt_bytes

    cluster = the_plan.cluster
    out.print(f"plan on {cluster.describe()}:", highlight=False)
    rows = [("phase", "stage", "device", "GPU", "workers", "memory/worker", "GPU mem/worker", "memory, all")]

    def size(w) -> str:
        return f"{w[0]}-{w[1]}" if isinstance(w, tuple) else str(w)

    for index, phase in enumerate(the_plan.phases):
        for s in phase.stages:
            if s.need is None:
                continue
            need = s.need
            shared = bool(s.shared_with) or phase.single
            rows.append(
                (
                    str(index),
                    s.name,
                    s.device,
                    f"{s.gpus:g}" if s.gpus else "-",
                    "in each below" if shared else size(s.workers),
                    fmt_bytes(need.host),
                    fmt_bytes(need.gpu) if need.gpu else "-",
                    "" if shared else fmt_bytes(need.host * s.most_workers),
                )
            )
        if phase.single and phase.operators[0].memory:
            op = phase.operators[0]
            rows.append(
                (
                    str(index),
                    "(one worker: the whole phase)",
                    "cpu",
                    "-",
                    size(op.concurrency),
                    fmt_bytes(op.memory),
                    "-",
                    fmt_bytes(op.memory * op.concurrency),
                )
            )
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        out.print(
            "  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip(), highlight=False
        )
    n_nodes = len(cluster.nodes)
    for index, phase in enumerate(the_plan.phases):
        held = sum(
            (op.memory or 0)
            * (op.concurrency[1] if isinstance(op.concurrency, tuple) else op.concurrency or 0)
            for op in phase.operators
            if op.kind == "actors" or op.reads_writes
        )
        room = f" of {fmt_bytes(cluster.memory)}" if cluster.memory else ""
        per = f", {fmt_bytes(held / n_nodes)} per node" if n_nodes > 1 and held else ""
        out.print(f"  phase {index}: workers hold up to {fmt_bytes(held)}{room}{per}", highlight=False)
        for op in phase.operators:
            out.print(f"    {op.describe()}", markup=False, highlight=False)
    if cluster.memory is None:
        out.print("  memory not checked: give --memory (per node) to check that the plan fits")
    for note in the_plan.notes:
        out.print(f"  note: {note}", highlight=False)


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
