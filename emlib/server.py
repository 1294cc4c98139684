"""A local OpenAI-compatible chat server (``/v1/chat/completions``, ``/v1/models``) bound to 127.0.0.1.

It serves any :class:`Backend` — a function from chat messages to a completion, with optional top logprobs for the
first token — so the real ``openai`` client path is what tests and offline runs exercise. Judge and generation
backends plug in here; ``latency`` injects a delay per request (for concurrency benchmarks).

    with LocalServer(backend) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="local")

Details the openai 3.x client needs (measured): HTTP/1.1 with Content-Length (it keeps connections alive), and a
listen backlog well above 5 for many concurrent calls.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Completion:
    """What a backend returns: the text and, when asked, the first token's top alternatives as (token, logprob)."""

    text: str
    top_logprobs: list[tuple[str, float]] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Backend:
    """A named completion function: ``complete(messages, request) -> Completion`` (request = the JSON body)."""

    name: str
    complete: Callable[[list[dict], dict], Completion]
    calls: int = field(default=0, init=False)


def _response(model: str, c: Completion, want_logprobs: bool) -> dict:
    choice = {"index": 0, "finish_reason": "stop",
              "message": {"role": "assistant", "content": c.text, "refusal": None}, "logprobs": None}
    if want_logprobs:
        tops = c.top_logprobs or []
        first = tops[0] if tops else (c.text, 0.0)
        choice["logprobs"] = {"content": [{
            "token": first[0], "logprob": first[1], "bytes": list(first[0].encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in tops]}]}
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [choice],
            "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                      "total_tokens": c.prompt_tokens + c.completion_tokens}}


def make_handler(backend: Backend, latency: float = 0.0) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses connections

        def log_message(self, *args):  # quiet: requests would flood notebooks and test logs
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, {"object": "list", "data": [{"id": backend.name, "object": "model", "owned_by": "emlib"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            if not isinstance(body.get("messages"), list) or not body["messages"]:
                return self._send(400, {"error": {"message": "'messages' must be a non-empty list",
                                                  "type": "invalid_request_error", "param": "messages"}})
            if latency:
                time.sleep(latency)
            try:
                completion = backend.complete(body["messages"], body)
            except ValueError as err:
                return self._send(400, {"error": {"message": str(err), "type": "invalid_request_error"}})
            with lock:
                backend.calls += 1
            self._send(200, _response(body.get("model", backend.name), completion, bool(body.get("logprobs"))))

    return Handler


class LocalServer:
    """Run ``backend`` on 127.0.0.1 in a background thread; use as a context manager or call start()/stop()."""

    def __init__(self, backend: Backend, port: int = 0, latency: float = 0.0):
        ThreadingHTTPServer.request_queue_size = 256  # the default backlog of 5 drops concurrent clients
        self.backend = backend
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), make_handler(backend, latency))
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> LocalServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
