"""``curate index``: build, append to, query and serve the retrieval index (see :mod:`curate.index`; the
server is :mod:`curate.index.serve`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from curate.base import RetrievalIndexError
from curate.core.output import OutputFolder
from curate.index.build import add_to_index, build_index
from curate.index.clip_back import DEFAULT_COLUMNS
from curate.index.query import Retriever
from curate.index.serve import make_server
from curate.index.store import describe_index

index_app = typer.Typer(
    help="The retrieval index: FAISS over the kept samples' CLIP embeddings; build, append, query, serve.",
    no_args_is_help=True,
)
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


@index_app.command("build")
def build(
    outputs: Annotated[list[str], typer.Argument(help="Output folder(s) of runs made with the same CLIP.")],
    index: Annotated[str | None, typer.Option(help="Index folder (default: OUTPUT/index).")] = None,
    factory: Annotated[
        str, typer.Option(help="'auto' (by size and --memory), or a FAISS factory: Flat, IVF1024,PQ64, ...")
    ] = "auto",
    memory: Annotated[str, typer.Option(help="Memory budget of the index for 'auto' (e.g. 4GB).")] = "4GB",
) -> None:
    """Build an index over the kept samples' image embeddings, from the sidecars (no recompute)."""
    run = OutputFolder(outputs[0])
    target = index or run.as_given(run.index_dir)
    info = build_index(outputs, target, factory, memory, progress=lambda m: err.print(m, highlight=False))
    out.print(f"built {target}: {describe_index(info)}", highlight=False)
    for s in info["sources"]:
        skipped = ", ".join(f"{k} {v:,}" for k, v in s["skipped"].items() if v)
        out.print(f"  {s['path']}: {s['added']:,} added" + (f" (not added: {skipped})" if skipped else ""))


@index_app.command("add")
def add(
    index: Annotated[str, typer.Argument(help="The index folder.")],
    output: Annotated[
        str, typer.Argument(help="Output folder of another run made with the same CLIP, or of one it holds.")
    ],
) -> None:
    """Append the kept samples of another run, without rebuilding. A run the index holds already (grown or
    retried since) is brought up to date: its new kept samples are added, those it no longer keeps removed."""
    info = add_to_index(index, output, progress=lambda m: err.print(m, highlight=False))
    s = info["sources"][-1]
    removed = f", removed {s['removed']:,} it no longer keeps" if s.get("removed") else ""
    out.print(
        f"added {s['added']:,} samples from {s['path']}{removed}; {index}: {describe_index(info)}",
        highlight=False,
    )


@index_app.command("query")
def query(
    index: Annotated[str, typer.Argument(help="The index folder.")],
    text: Annotated[str | None, typer.Option(help="A text prompt.")] = None,
    image: Annotated[str | None, typer.Option(help="An image file.")] = None,
    k: Annotated[int, typer.Option("-k", help="How many neighbours.")] = 10,
    device: Annotated[str, typer.Option(help="Where CLIP embeds the query: cpu, cuda, auto.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Embed a text or an image with the index's CLIP and print the nearest samples: uid, score, caption, url."""
    if (text is None) == (image is None):
        raise RetrievalIndexError("give exactly one of --text or --image")
    if k < 1:
        raise RetrievalIndexError("-k must be at least 1")
    if image is not None and not Path(image).is_file():
        raise RetrievalIndexError(f"--image {image}: no such file")
    r = Retriever(index, device=device)
    results = r.search_text(text, k) if text is not None else r.search_image(image, k)
    if as_json:
        out.print_json(json.dumps([n.to_dict() for n in results]))
        return
    for n in results:
        out.print(f"{n.score:.4f}  {n.uid}  {n.caption!r}  {n.url}", highlight=False, markup=False)


@index_app.command("serve")
def serve(
    index: Annotated[str, typer.Argument(help="The index folder.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one).")] = 8765,
    device: Annotated[str, typer.Option(help="Where CLIP embeds queries: cpu, cuda, auto.")] = "cpu",
    name: Annotated[
        str, typer.Option(help="The index's name for clip-retrieval clients (their indice_name).")
    ] = "curate",
    columns: Annotated[
        str,
        typer.Option(
            help="What clip-retrieval results carry, comma-separated: url, caption, image (base64 JPEG), uid, "
            "clip_score, shard, source, caption_vlm, caption_fused."
        ),
    ] = ",".join(DEFAULT_COLUMNS),
    allow_private: Annotated[
        list[str] | None,
        typer.Option(help="host:port an image_url may be fetched from although private (repeatable)."),
    ] = None,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds a request's line and headers may take to arrive.")
    ] = 10.0,
    body_timeout: Annotated[float, typer.Option(help="Seconds a request's body may take to arrive.")] = 30.0,
) -> None:
    """An HTTP API and a search page (GET /search?text=...&k=10, POST /search with an image, GET
    /sample/<uid>), and clip-retrieval's back end (POST /knn-service, POST /metadata, GET /indices-list)."""
    retriever = Retriever(index, device=device)
    server = make_server(
        retriever,
        host,
        port,
        name=name,
        columns=[c.strip() for c in columns.split(",") if c.strip()],
        allow_private=allow_private or (),
        header_timeout=header_timeout,
        body_timeout=body_timeout,
    )
    h, p = server.server_address[:2]
    base = f"http://{h}:{p}" if ":" not in h else f"http://[{h}]:{p}"
    out.print(
        f"serving {index} ({len(server.retriever):,} samples) at {base}/ ; clip-retrieval: "
        f"ClipClient(url='{base}/knn-service', indice_name='{name}')  (Ctrl-C stops)",
        highlight=False,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
