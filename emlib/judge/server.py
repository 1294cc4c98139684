"""A local OpenAI-compatible chat server (``/v1/chat/completions``, ``/v1/models``) bound to 127.0.0.1.

It serves any :class:`Backend` — a function from chat messages to a completion, with optional top logprobs for the
first token — so the real ``openai`` client path is what tests and offline runs exercise. Judge and generation
backends plug in here; ``latency`` injects a delay per request (for concurrency benchmarks).

It also fakes the OpenAI Batch API (``/v1/files``, ``/v1/batches``, ``/v1/batches/{id}``,
``/v1/files/{id}/content``): an uploaded JSONL of chat-completions requests is answered by the same backend once
the batch has been polled ``batch_polls`` times (see :class:`BatchStore`), so the submit / poll / resume / merge path
of :func:`emlib.judge.judge_frame_batch_api` runs against the real client offline.

    with LocalServer(backend) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="local")

Details the openai 3.x client needs (measured): HTTP/1.1 with Content-Length (it keeps connections alive), and a
listen backlog well above 5 for many concurrent calls.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import sys
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


# ---------------------------------------------------------------------------------------------- fake Batch API


@dataclass
class BatchStore:
    """In-memory files and batches of the fake Batch API.

    A batch reports ``validating``, then ``in_progress``, and is answered and ``completed`` on its ``polls``-th
    retrieve, so a client can be interrupted while it polls. ``created`` counts batch creations (a resumed client must
    not add one); ``mangle`` may rewrite the output lines before they are stored (tests inject malformed lines).
    """

    polls: int = 2
    files: dict[str, bytes] = field(default_factory=dict)
    batches: dict[str, dict] = field(default_factory=dict)
    poll_counts: dict[str, int] = field(default_factory=dict)
    created: int = 0
    retrieves: int = 0
    mangle: Callable[[list[str]], list[str]] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_file(self, data: bytes, filename: str, purpose: str) -> dict:
        file_id = f"file-{uuid.uuid4().hex[:16]}"
        self.files[file_id] = data
        return {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}

    def create(self, body: dict) -> dict:
        if body.get("input_file_id") not in self.files:
            raise ValueError(f"no file {body.get('input_file_id')!r}")
        batch_id = f"batch_{uuid.uuid4().hex[:16]}"
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": body.get("endpoint", "/v1/chat/completions"),
            "input_file_id": body["input_file_id"], "completion_window": body.get("completion_window", "24h"),
            "created_at": int(time.time()), "status": "validating", "output_file_id": None, "error_file_id": None,
            "errors": None, "request_counts": {"total": 0, "completed": 0, "failed": 0}}
        self.poll_counts[batch_id] = 0
        self.created += 1
        return self.batches[batch_id]

    def retrieve(self, batch_id: str, backend: Backend) -> dict:
        batch = self.batches[batch_id]  # KeyError: 404
        self.retrieves += 1
        self.poll_counts[batch_id] += 1
        if batch["status"] in ("validating", "in_progress"):
            if self.poll_counts[batch_id] >= self.polls:
                self._run(batch, backend)
            else:
                batch["status"] = "in_progress"
        return batch

    def _run(self, batch: dict, backend: Backend) -> None:
        """Answer every request line with the backend; per-request failures go to the error file, as OpenAI does."""
        out, errors = [], []
        for line in self.files[batch["input_file_id"]].decode().splitlines():
            if not line.strip():
                continue
            req = json.loads(line)
            body = req["body"]
            try:
                completion = backend.complete(body["messages"], body)
            except ValueError as err:
                errors.append(json.dumps({"id": f"batch_req_{uuid.uuid4().hex[:8]}", "custom_id": req["custom_id"],
                                          "response": {"status_code": 400, "body": {"error": {"message": str(err)}}},
                                          "error": None}))
                continue
            backend.calls += 1
            out.append(json.dumps({"id": f"batch_req_{uuid.uuid4().hex[:8]}", "custom_id": req["custom_id"],
                                   "response": {"status_code": 200, "request_id": uuid.uuid4().hex[:8],
                                                "body": _response(body.get("model", backend.name), completion,
                                                                  bool(body.get("logprobs")))},
                                   "error": None}))
        if self.mangle is not None:
            out = self.mangle(out)
        batch["output_file_id"] = self.add_file(("\n".join(out) + "\n").encode(), "output.jsonl",
                                                "batch_output")["id"]
        if errors:
            batch["error_file_id"] = self.add_file(("\n".join(errors) + "\n").encode(), "errors.jsonl",
                                                   "batch_output")["id"]
        batch["request_counts"] = {"total": len(out) + len(errors), "completed": len(out), "failed": len(errors)}
        batch["status"], batch["completed_at"] = "completed", int(time.time())


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart/form-data body: name -> (filename, bytes) (the stdlib ``cgi`` module is gone)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return {part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
            for part in message.iter_parts()}


# ---------------------------------------------------------------------------------------------- the handler


def make_handler(backend: Backend, latency: float = 0.0,
                 batches: BatchStore | None = None) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()
    batches = batches if batches is not None else BatchStore()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses connections

        def log_message(self, *args):  # quiet: requests would flood notebooks and test logs
            pass

        def _send(self, status: int, body: dict | bytes, content_type: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _not_found(self) -> None:
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_GET(self):
            parts = self.path.split("?")[0].rstrip("/").split("/")
            if parts[-1] == "models":
                self._send(200, {"object": "list",
                                 "data": [{"id": backend.name, "object": "model", "owned_by": "emlib"}]})
            elif len(parts) >= 2 and parts[-2] == "batches":
                with batches.lock:
                    batch = batches.batches.get(parts[-1]) and batches.retrieve(parts[-1], backend)
                self._send(200, batch) if batch else self._not_found()
            elif len(parts) >= 3 and parts[-3] == "files" and parts[-1] == "content" and parts[-2] in batches.files:
                self._send(200, batches.files[parts[-2]], "application/octet-stream")
            else:
                self._not_found()

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            route = self.path.split("?")[0].rstrip("/")
            if route.endswith("/files"):  # multipart upload: purpose + file
                form = _multipart(self.headers.get("Content-Type", ""), raw)
                if "file" not in form:
                    return self._send(400, {"error": {"message": "no 'file' field", "type": "invalid_request_error"}})
                purpose = (form.get("purpose") or (None, b"batch"))[1].decode()
                with batches.lock:
                    return self._send(200, batches.add_file(form["file"][1], form["file"][0] or "upload", purpose))
            body = json.loads(raw or b"{}")
            if route.endswith("/batches"):
                try:
                    with batches.lock:
                        return self._send(200, batches.create(body))
                except ValueError as err:
                    return self._send(400, {"error": {"message": str(err), "type": "invalid_request_error"}})
            if not route.endswith("/chat/completions"):
                return self._not_found()
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


class _QuietServer(ThreadingHTTPServer):
    """A client that hung up (a timed-out call, a cancelled task) is expected here: no traceback on stderr for it."""

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # BrokenPipeError, ConnectionResetError
            return
        super().handle_error(request, client_address)


class LocalServer:
    """Run ``backend`` on 127.0.0.1 in a background thread; use as a context manager or call start()/stop()."""

    def __init__(self, backend: Backend, port: int = 0, latency: float = 0.0, batch_polls: int = 2):
        _QuietServer.request_queue_size = 256  # the default backlog of 5 drops concurrent clients
        self.backend = backend
        self.batches = BatchStore(polls=batch_polls)
        self.httpd = _QuietServer(("127.0.0.1", port), make_handler(backend, latency, self.batches))
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
