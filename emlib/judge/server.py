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

A backend with ``complete_batch`` (a slow local model) is served by one :class:`BatchWorker`: requests wait in a
queue of at most ``max_queue`` and are computed ``batch_size`` at a time in one call; when the queue is full a
request is answered 429 with ``Retry-After`` at once (back-pressure, which the openai client and
:class:`emlib.judge.OpenAIJudge` honour), and a request whose client hung up (it timed out, or was cancelled) is
dropped, never computed. Open connections are capped at ``max_connections`` (one handler thread each; further clients
wait in the listen backlog), so threads and memory stay bounded however many clients call. Without
``complete_batch`` each request is computed in its own handler thread (``latency`` benchmarks need that).
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import math
import queue
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
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
    """A named completion function: ``complete(messages, request) -> Completion`` (request = the JSON body).

    ``complete_batch``, when given, answers several ``(messages, request)`` at once (one forward pass of a local
    model), each as a Completion or the exception for that request; the server then queues requests for one worker.
    ``batch_size``: how many such a backend takes at once, if it has a preference (the server's otherwise).
    """

    name: str
    complete: Callable[[list[dict], dict], Completion]
    complete_batch: Callable[[list[tuple[list[dict], dict]]], list[Completion | Exception]] | None = None
    batch_size: int | None = None
    calls: int = field(default=0, init=False)


# ---------------------------------------------------------------------------------------------- one batch worker


class QueueFull(RuntimeError):
    """The worker's queue is full; ``retry_after`` is how many seconds a slot will likely take to free up."""

    def __init__(self, retry_after: float):
        super().__init__(f"queue full: retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class BatchWorker:
    """One thread computing queued items ``batch_size`` at a time with ``run_batch(items) -> results``.

    :meth:`submit` returns a Future, or raises :class:`QueueFull` when ``max_queue`` items wait already (0: no bound,
    for callers that bound what they submit). An item whose Future was cancelled, or whose ``gone()`` says its
    client left, is dropped when its batch is formed, never computed. A result that is an exception is raised for
    that item only. ``computed`` / ``dropped`` / ``rejected`` (queue full) / ``batches`` count what happened.
    """

    def __init__(self, run_batch: Callable[[list], Sequence], batch_size: int = 8, max_queue: int = 32,
                 collect_s: float = 0.005, name: str = "emlib-batch-worker"):
        if batch_size < 1 or max_queue < 0:
            raise ValueError(f"batch_size must be >= 1 and max_queue >= 0, got {batch_size} and {max_queue}")
        self.run_batch, self.batch_size, self.collect_s = run_batch, batch_size, collect_s
        self.computed = self.dropped = self.batches = self.rejected = 0
        self.busy = False  # a batch is being computed
        self.batch_seconds: float | None = None  # a running average: what Retry-After is estimated from
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._stopped = threading.Event()
        # a daemon: a forward pass under way never holds up the process's exit (SIGTERM stops in seconds)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def retry_after(self) -> int:
        """Whole seconds until a queue slot is likely free: the batches ahead of it, at the recent batch time."""
        ahead = max(1, math.ceil(self.waiting / self.batch_size))
        return max(1, math.ceil(ahead * (self.batch_seconds or 1.0)))

    def submit(self, item, gone: Callable[[], bool] | None = None) -> Future:
        if self._stopped.is_set():
            raise RuntimeError("the batch worker has stopped")
        future: Future = Future()
        try:
            self._queue.put_nowait((item, gone, future))
        except queue.Full:
            self.rejected += 1
            raise QueueFull(self.retry_after()) from None
        return future

    def _take(self) -> list:
        try:
            batch = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.collect_s  # calls arriving together share a pass
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while not self._stopped.is_set():
            live = []
            for item, gone, future in self._take():
                if gone is not None and gone():
                    future.cancel()
                if future.set_running_or_notify_cancel():
                    live.append((item, future))
                else:
                    self.dropped += 1
            if not live:
                continue
            start, self.busy = time.perf_counter(), True
            try:
                results = list(self.run_batch([item for item, _ in live]))
                if len(results) != len(live):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} items")
            except BaseException as err:  # noqa: BLE001 - every caller of this batch gets the error
                for _, future in live:
                    future.set_exception(err)
                continue
            finally:
                self.busy = False
            for (_, future), result in zip(live, results):
                future.set_exception(result) if isinstance(result, BaseException) else future.set_result(result)
            took = time.perf_counter() - start
            self.batch_seconds = took if self.batch_seconds is None else 0.7 * self.batch_seconds + 0.3 * took
            self.computed += len(live)
            self.batches += 1

    def stop(self) -> None:
        """Stop taking work: queued items are cancelled; a batch under way finishes in the background."""
        self._stopped.set()
        while True:
            try:
                _, _, future = self._queue.get_nowait()
            except queue.Empty:
                return
            future.cancel()


def client_gone(sock: socket.socket) -> bool:
    """True when the peer of ``sock`` has closed it (an HTTP client never half-closes: end of stream = it left)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # reset, or already closed here
        return True


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


MAX_BODY_BYTES = 16 * 2**20  # a request body larger than this is refused (413) rather than read into memory
IDLE_TIMEOUT_S = 60.0  # a kept-alive connection idle this long is closed, freeing its handler thread


def make_handler(backend: Backend, latency: float = 0.0, batches: BatchStore | None = None,
                 worker: BatchWorker | None = None) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()
    batches = batches if batches is not None else BatchStore()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses connections
        timeout = IDLE_TIMEOUT_S

        def log_message(self, *args):  # quiet: requests would flood notebooks and test logs
            pass

        def _send(self, status: int, body: dict | bytes, content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            headers = dict(headers or {})
            if self.close_connection:  # say so: a client reusing the connection would meet a closed socket
                headers["Connection"] = "close"
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _queued(self, messages: list[dict], body: dict) -> Completion | None:
            """The completion from the batch worker; None when the answer was already sent or the client left."""
            # one request per connection: a kept-alive idle connection would hold one of the capped handler slots
            # while clients wait in the backlog (a new local connection costs far less than a forward pass)
            self.close_connection = True
            try:
                future = worker.submit((messages, body), gone=lambda: client_gone(self.connection))
            except QueueFull as full:
                self._send(429, {"error": {"message": f"the judge is busy ({worker.waiting} requests queued); "
                                                      f"retry in {full.retry_after} s", "type": "rate_limit"}},
                           headers={"Retry-After": str(full.retry_after)})
                return None
            except RuntimeError:  # the worker has stopped
                self._send(503, {"error": {"message": "the judge server is stopping", "type": "unavailable"}},
                           headers={"Retry-After": "5"})
                return None
            while True:
                try:
                    return future.result(timeout=0.25)
                except FutureTimeout:
                    if client_gone(self.connection):  # it gave up: drop its request, free this thread
                        future.cancel()
                        return None
                except CancelledError:  # dropped (client left) or the server is stopping
                    if not client_gone(self.connection):
                        self._send(503, {"error": {"message": "the judge server is stopping", "type": "unavailable"}},
                                   headers={"Retry-After": "5"})
                    return None

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
            length = int(self.headers.get("Content-Length", 0))
            if length > MAX_BODY_BYTES:
                self.close_connection = True
                return self._send(413, {"error": {"message": f"request body over {MAX_BODY_BYTES} bytes",
                                                  "type": "invalid_request_error"}})
            raw = self.rfile.read(length)
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
                if worker is None:
                    completion = backend.complete(body["messages"], body)
                else:
                    completion = self._queued(body["messages"], body)
                    if completion is None:
                        return None
            except ValueError as err:
                return self._send(400, {"error": {"message": str(err), "type": "invalid_request_error"}})
            with lock:
                backend.calls += 1
            self._send(200, _response(body.get("model", backend.name), completion, bool(body.get("logprobs"))))

    return Handler


class _QuietServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once: the next client waits in the listen backlog
    until one closes. A client that hung up (a timed-out call, a cancelled task) is expected here: no traceback."""

    request_queue_size = 256  # the default backlog of 5 drops concurrent clients
    daemon_threads = True

    def __init__(self, address, handler, max_connections: int):
        self.slots = threading.BoundedSemaphore(max_connections)
        self.stopping = threading.Event()
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        while not self.slots.acquire(timeout=0.2):
            if self.stopping.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # BrokenPipe, reset, idle keep-alive
            return
        super().handle_error(request, client_address)


class LocalServer:
    """Run ``backend`` on 127.0.0.1 in a background thread; use as a context manager or call start()/stop().

    ``batch_size`` / ``max_queue``: the batch worker's, for a backend with ``complete_batch``; ``max_connections``
    caps the handler threads.
    """

    def __init__(self, backend: Backend, port: int = 0, latency: float = 0.0, batch_polls: int = 2,
                 batch_size: int = 8, max_queue: int = 32, max_connections: int = 256):
        self.backend = backend
        self.batches = BatchStore(polls=batch_polls)
        self.batch_size = batch_size
        self.worker = None if backend.complete_batch is None else BatchWorker(
            backend.complete_batch, batch_size=batch_size, max_queue=max_queue, name=f"emlib-serve-{backend.name}")
        self.httpd = _QuietServer(("127.0.0.1", port), make_handler(backend, latency, self.batches, self.worker),
                                  max_connections)
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> LocalServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop within a second: no new connections, queued requests answered 503, a batch under way abandoned."""
        self.httpd.stopping.set()
        if self.worker is not None:
            self.worker.stop()
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
