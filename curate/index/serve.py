"""``curate index serve``: an HTTP API and a search page over a :class:`~curate.index.query.Retriever`, as an
ASGI app (starlette) on uvicorn, the ``serve`` extra.

curate's own endpoints: GET /search?text=...&k=10 and POST /search (an image as the body, or as multipart
field ``image``) answer JSON; GET /sample/<uid> is the sample's image from its shard tar; GET /info is
``index.json``; GET / is a search page. Beside them, clip-retrieval's back-end protocol (POST /knn-service,
POST /metadata, GET /indices-list: :mod:`curate.index.clip_back`), so its ClipClient and front end work as
they are. Every answer allows any origin (CORS, as clip-back's ``CORS(app)``), so a front end served from
elsewhere can call it.

Why this server: one event loop holds every connection, so a slow or idle client costs a socket, not a
thread; CLIP and FAISS run in a thread pool (the Retriever serialises CLIP calls, FAISS searches run side by
side). Time limits: a request's line and headers must arrive within ``header_timeout`` of the connection
(or of the previous answer on a kept-alive one), its body within ``body_timeout`` (else 408), an idle
kept-alive connection closes after ``keep_alive`` seconds, and at most ``max_connections`` are open at once
(more are answered 503).
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import html
import json
import math
import socket
import threading
import urllib.parse
from collections.abc import Sequence
from typing import Any

from curate.base import RetrievalIndexError
from curate.index.clip_back import DEFAULT_COLUMNS, MAX_IMAGE, ClipBackend, parse_knn_request
from curate.index.query import Retriever, image_mime

__all__ = ["MAX_UPLOAD", "IndexServer", "image_fetcher", "make_app", "make_server"]

MAX_UPLOAD = 20 << 20
MAX_K = 1000


def _require_serve() -> tuple[Any, Any]:
    """``(uvicorn, starlette)``, or an error that names the extra to install."""
    try:
        import starlette
        import uvicorn
    except ImportError as e:
        raise RetrievalIndexError(
            f"curate index serve needs uvicorn and starlette ({e.name} is missing): pip install 'curate[serve]'"
        ) from None
    return uvicorn, starlette


class _BodyError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def image_fetcher(allow_private: Sequence[str] = ()) -> Any:
    """``fetch(url) -> bytes`` for clip-retrieval's ``image_url``, through curate's SSRF-guarded fetcher: no
    private, loopback or link-local address (but ``allow_private`` ``host:port`` entries), 15 s and 20 MiB at
    most, no retries. The query image is fetched once on a user's behalf, as a browser would: robots.txt and
    X-Robots-Tag (which govern crawling and training) are not consulted."""
    from curate.kit.net import Fetcher, FetchPolicy

    policy = {
        "user_agent": "curate-index-serve (image_url of a clip-retrieval query)",
        "connect_timeout": 5.0,
        "read_timeout": 10.0,
        "total_timeout": 15.0,
        "max_bytes": MAX_IMAGE,
        "retries": 0,
        "allow_private": tuple(allow_private),
        # Opt-out protocols, those this fetcher knows: they govern crawling and training, not one lookup.
        **{
            k: False
            for k in ("robots_txt", "x_robots_tag", "tdmrep")
            if k in FetchPolicy.__dataclass_fields__
        },
    }
    fetcher = Fetcher(FetchPolicy(**policy))

    def fetch(url: str) -> bytes:
        result = fetcher.fetch(url)
        if result.status != "ok" or result.body is None:
            raise RetrievalIndexError(f"image_url {url!r} was not fetched: {result.status} ({result.error})")
        return result.body

    return fetch


def make_app(
    retriever: Retriever,
    *,
    name: str = "curate",
    columns: Sequence[str] = DEFAULT_COLUMNS,
    fetch_image: Any | None = None,
    body_timeout: float = 30.0,
) -> Any:
    """The ASGI app: curate's endpoints and clip-retrieval's back-end protocol over ``retriever``. ``name``
    is the index's name in clip-retrieval's requests (``indice_name``), ``columns`` what its results carry
    (:data:`curate.index.clip_back.COLUMNS`), ``fetch_image`` fetches an ``image_url`` (see
    :func:`image_fetcher`; None: refused)."""
    _require_serve()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    backend = ClipBackend(retriever, name, columns, fetch_image)

    def reply(code: int, obj: Any) -> Response:
        return Response(json.dumps(_finite(obj)).encode(), code, media_type="application/json")

    async def body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _BodyError(413, f"the body is over {limit >> 20} MiB")

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _BodyError(413, f"the body is over {limit >> 20} MiB")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), body_timeout)
        except TimeoutError:
            raise _BodyError(408, f"the body did not arrive within {body_timeout:g} s") from None

    async def json_body(request: Request) -> Any:
        data = await body(request, MAX_UPLOAD * 2)
        try:
            return json.loads(data)
        except ValueError as e:
            raise RetrievalIndexError(f"the body is not JSON: {e}") from None

    def k_of(request: Request) -> int:
        try:
            return max(1, min(int(request.query_params.get("k", "10")), MAX_K))
        except ValueError:
            raise RetrievalIndexError("k must be an integer") from None

    def results(query: dict[str, Any], found: list) -> Response:
        rows = [{**n.to_dict(), "image": f"/sample/{urllib.parse.quote(n.uid)}"} for n in found]
        return reply(200, {"query": query, "results": rows})

    async def page(request: Request) -> Response:
        return Response(_page(retriever).encode(), 200, media_type="text/html; charset=utf-8")

    async def search_text(request: Request) -> Response:
        text = request.query_params.get("text", "")
        if not text.strip():
            return reply(400, {"error": "give ?text=..."})
        k = k_of(request)
        return results({"text": text, "k": k}, await run_in_threadpool(retriever.search_text, text, k))

    async def search_image(request: Request) -> Response:
        k = k_of(request)
        data = await body(request, MAX_UPLOAD)
        if not data:
            return reply(400, {"error": "POST the image as the body, or as multipart field 'image'"})
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + data
            )
            files = [
                p for p in msg.iter_parts() if p.get_param("name", header="content-disposition") == "image"
            ]
            if not files:
                return reply(400, {"error": "the form has no field named 'image'"})
            data = files[0].get_payload(decode=True) or b""
        found = await run_in_threadpool(retriever.search_image, data, k)
        return results({"image": f"{len(data)} bytes", "k": k}, found)

    async def sample(request: Request) -> Response:
        uid = request.path_params["uid"]
        try:
            data, ext = await run_in_threadpool(retriever.image_file, uid)
        except KeyError:
            return reply(404, {"error": f"no sample {uid!r} in the index"})
        return Response(data, 200, media_type=image_mime(ext))

    async def info(request: Request) -> Response:
        return reply(200, retriever.info)

    async def knn(request: Request) -> Response:
        req = parse_knn_request(await json_body(request))
        return reply(200, await run_in_threadpool(backend.knn, req))

    async def metadata(request: Request) -> Response:
        data = await json_body(request)
        return reply(200, await run_in_threadpool(backend.metadata, data))

    async def indices(request: Request) -> Response:
        return reply(200, backend.indices())

    async def bad_request(request: Request, exc: Exception) -> Response:
        return reply(400, {"error": str(exc)})

    async def bad_body(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, _BodyError)  # noqa: S101 - registered for _BodyError only
        # The rest of an unread body would be taken for the next request: close the connection.
        return Response(
            json.dumps({"error": str(exc)}).encode(),
            exc.status,
            media_type="application/json",
            headers={"Connection": "close"},
        )

    async def not_found(request: Request, exc: Exception) -> Response:
        if request.method == "POST":
            return reply(404, {"error": "POST an image to /search, or a query to /knn-service or /metadata"})
        return reply(
            404, {"error": "unknown path: use /, /search, /sample/<uid>, /info, /knn-service, /indices-list"}
        )

    return Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/search", search_text, methods=["GET"]),
            Route("/search", search_image, methods=["POST"]),
            Route("/sample/{uid:path}", sample, methods=["GET"]),
            Route("/info", info, methods=["GET"]),
            Route("/knn-service", knn, methods=["POST"]),
            Route("/metadata", metadata, methods=["POST"]),
            Route("/indices-list", indices, methods=["GET"]),
        ],
        middleware=[
            Middleware(
                CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST"], allow_headers=["*"]
            )
        ],
        exception_handlers={
            RetrievalIndexError: bad_request,
            _BodyError: bad_body,
            404: not_found,
            405: not_found,
        },
    )


def _finite(obj: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _timed_protocol(header_timeout: float) -> type:
    """uvicorn's h11 protocol with a deadline for a request's line and headers: uvicorn times out only an
    idle kept-alive connection, so a client that connects and trickles its headers (or sends nothing)
    would hold its connection forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _header_deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
            self._header_deadline = self.loop.call_later(header_timeout, self._headers_late)

        def _headers_late(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete  # no request under way
            if waiting and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
            super().connection_lost(exc)

    return TimedH11Protocol


class IndexServer:
    """uvicorn serving :func:`make_app` on a socket bound at construction (port 0: a free one, known from
    ``server_address`` before serving). ``serve_forever()`` blocks; ``shutdown()`` (from another thread)
    stops it and waits; ``server_close()`` closes the socket."""

    def __init__(
        self,
        retriever: Retriever,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str = "curate",
        columns: Sequence[str] = DEFAULT_COLUMNS,
        allow_private: Sequence[str] = (),
        header_timeout: float = 10.0,
        body_timeout: float = 30.0,
        keep_alive: int = 5,
        max_connections: int = 1024,
    ):
        uvicorn, _ = _require_serve()
        self.retriever = retriever
        self.app = make_app(
            retriever,
            name=name,
            columns=columns,
            fetch_image=image_fetcher(allow_private),
            body_timeout=body_timeout,
        )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=2048)
        self.server_address = self.socket.getsockname()[:2]
        config = uvicorn.Config(
            self.app,
            http=_timed_protocol(header_timeout),
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_keep_alive=keep_alive,
            limit_concurrency=max_connections,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._stopped.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()


def make_server(retriever: Retriever, host: str = "127.0.0.1", port: int = 0, **options: Any) -> IndexServer:
    """An :class:`IndexServer` over ``retriever``, bound but not yet serving (call ``serve_forever``);
    ``options`` as :class:`IndexServer` takes them."""
    return IndexServer(retriever, host, port, **options)


def _page(r: Retriever) -> str:
    info = r.info
    title = f"curate index: {info['count']:,} samples, {html.escape(info['factory'])}"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
#results {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ width: 200px; margin: 0; }} img {{ max-width: 200px; max-height: 200px; }}
figcaption {{ font-size: 12px; word-break: break-word; }}
</style></head><body>
<h1>{title}</h1>
<form id="t"><input id="text" size="60" placeholder="a text prompt"> k <input id="k" value="12" size="3">
<button>search</button></form>
<form id="i"><input id="file" type="file" accept="image/*"> <button>search by image</button></form>
<div id="status"></div><div id="results"></div>
<script>
function show(p) {{
  p.then(r => r.json()).then(d => {{
    const out = document.getElementById('results'); out.innerHTML = '';
    document.getElementById('status').textContent = d.error || (d.results.length + ' results');
    for (const n of (d.results || [])) {{
      const f = document.createElement('figure'), img = document.createElement('img');
      img.src = n.image; const c = document.createElement('figcaption');
      c.textContent = n.score.toFixed(3) + ' ' + (n.caption || '') + ' (' + n.uid + ')';
      f.append(img, c); out.append(f);
    }}
  }});
}}
const k = () => encodeURIComponent(document.getElementById('k').value);
document.getElementById('t').onsubmit = e => {{ e.preventDefault();
  show(fetch('/search?k=' + k() + '&text=' + encodeURIComponent(document.getElementById('text').value))); }};
document.getElementById('i').onsubmit = e => {{ e.preventDefault();
  const fd = new FormData(); fd.append('image', document.getElementById('file').files[0]);
  show(fetch('/search?k=' + k(), {{method: 'POST', body: fd}})); }};
const asked = new URLSearchParams(location.search).get('text');  // /?text=... links to a search
if (asked) {{ document.getElementById('text').value = asked;
  show(fetch('/search?k=' + k() + '&text=' + encodeURIComponent(asked))); }}
</script></body></html>
"""
