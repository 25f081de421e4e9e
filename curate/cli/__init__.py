"""The ``curate`` command. Exit codes: 0 success, 1 the run finished with failed shards, 2 bad config or usage.

The commands live by group; they are registered here, in the order ``curate --help`` lists them:

    run.py      run, validate, describe, retry, status
    demo.py     demo
    tools.py    preview, report, takedown: on a finished run
    train.py    train, generate, eval, export
    models.py   models list, fetch, train-demo-clip
    index.py    index build, add, query, serve
    options.py  what they share: consoles, common options, loading a pipeline with overrides
"""

from __future__ import annotations

import sys

import rich.markup
import typer

from curate.base import ConfigError, InputError, ModelNotFound
from curate.cli import demo, run, tools, train
from curate.cli.index import index_app
from curate.cli.models import models_app
from curate.cli.options import err
from curate.cli.options import load_pipeline as _load  # noqa: F401 - the name tests/test_infra.py imports

app = typer.Typer(
    name="curate",
    help="Curate image-text corpora for training generative models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(run.run)
app.command()(run.validate)
app.command()(run.describe)
app.command()(run.retry)
app.command()(demo.demo)
app.command()(run.status)
app.command()(tools.preview)
app.command("report")(tools.report_)
app.command()(tools.takedown)
app.command("train")(train.train_)
app.command()(train.generate)
app.command("eval")(train.eval_)
app.command("export")(train.export_)
app.add_typer(models_app, name="models")
app.add_typer(index_app, name="index")


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


__all__ = ["app", "main", "storage_problem"]
