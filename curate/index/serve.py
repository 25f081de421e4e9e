"""``curate index serve``: an HTTP API and a search page over a :class:`~curate.index.query.Retriever`.

GET /search?text=...&k=10 and POST /search (an image as the body, or as multipart field ``image``) answer
JSON; GET /sample/<uid> is the sample's image from its shard tar; GET /info is ``index.json``; GET / is a
search page. A threading server: the Retriever serialises CLIP calls, FAISS searches run side by side.
"""

from __future__ import annotations

import email.parser
import email.policy
import html
import json
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from curate.base import RetrievalIndexError
from curate.index.query import Retriever, image_mime

__all__ = ["MAX_UPLOAD", "IndexServer", "make_server"]

MAX_UPLOAD = 20 << 20


class IndexServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], retriever: Retriever):
        self.retriever = retriever
        super().__init__(address, _Handler)


def make_server(retriever: Retriever, host: str = "127.0.0.1", port: int = 0) -> IndexServer:
    """A threading HTTP server over ``retriever``, bound but not yet serving (call ``serve_forever``)."""
    return IndexServer((host, port), retriever)


class _Handler(BaseHTTPRequestHandler):
    server: IndexServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet; a search page makes many requests
        pass

    def _send(self, code: int, body: bytes, mime: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", mime)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj).encode(), "application/json")

    def _results(self, query: dict[str, Any], results: list) -> None:
        rows = [{**n.to_dict(), "image": f"/sample/{urllib.parse.quote(n.uid)}"} for n in results]
        self._json(200, {"query": query, "results": rows})

    def _k(self, params: dict[str, list[str]]) -> int:
        try:
            return max(1, min(int(params.get("k", ["10"])[0]), 1000))
        except ValueError as e:
            raise RetrievalIndexError("k must be an integer") from e

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        params = urllib.parse.parse_qs(url.query)
        r = self.server.retriever
        try:
            if url.path == "/":
                self._send(200, _page(r).encode(), "text/html; charset=utf-8")
            elif url.path == "/search":
                text = params.get("text", [""])[0]
                if not text.strip():
                    return self._json(400, {"error": "give ?text=..."})
                k = self._k(params)
                self._results({"text": text, "k": k}, r.search_text(text, k))
            elif url.path.startswith("/sample/"):
                uid = urllib.parse.unquote(url.path[len("/sample/") :])
                try:
                    data, ext = r.image_file(uid)
                except KeyError:
                    return self._json(404, {"error": f"no sample {uid!r} in the index"})
                self._send(200, data, image_mime(ext))
            elif url.path == "/info":
                self._json(200, r.info)
            else:
                self._json(404, {"error": "unknown path: use /, /search, /sample/<uid>, /info"})
        except RetrievalIndexError as e:
            self._json(400, {"error": str(e)})

    def do_POST(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/search":
            return self._json(404, {"error": "POST an image to /search"})
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0:
            return self._json(400, {"error": "POST the image as the body, or as multipart field 'image'"})
        if length > MAX_UPLOAD:
            return self._json(413, {"error": f"the upload is over {MAX_UPLOAD >> 20} MiB"})
        body = self.rfile.read(length)
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("multipart/form-data"):
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body
            )
            files = [
                p for p in msg.iter_parts() if p.get_param("name", header="content-disposition") == "image"
            ]
            if not files:
                return self._json(400, {"error": "the form has no field named 'image'"})
            body = files[0].get_payload(decode=True) or b""
        try:
            k = self._k(urllib.parse.parse_qs(url.query))
            self._results(
                {"image": f"{len(body)} bytes", "k": k}, self.server.retriever.search_image(body, k)
            )
        except RetrievalIndexError as e:
            self._json(400, {"error": str(e)})


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
