"""Warm notebook kernels: papermill's kernels forked from one process that has already imported the stack.

Every notebook's first cell imports torch, transformers, pandas and emlib: 4.4-5.7 s of CPU per kernel, paid again
by each notebook of ``make run`` and by every notebook run of the test suite. Here one *zygote* process pays it
once per run: it imports the stack (and runs no torch op, so no thread pool exists yet), then forks one child per
kernel. The child becomes an ordinary ipykernel (``ipykernel_launcher -f <connection file>``) in the caller's folder,
with the caller's environment and standard streams. jupyter_client starts the small ``connect`` command below as the
kernel's process: it asks the zygote for a child, forwards the signals jupyter_client sends (interrupt, terminate)
and exits with the child's exit status; if it is killed, the child sees the connection close and exits too.

A module may read an environment variable when it is imported, so a kernel whose environment differs from the
zygote's in anything but per-kernel variables (:data:`PER_KERNEL`) starts the ordinary way instead, as does any
kernel when the zygote is unreachable (``EMLIB_WARM_KERNELS_DEBUG=1`` prints why a kernel started cold).
``EMLIB_WARM_KERNELS=0`` turns warm kernels off. POSIX only (fork).

    python -m emlib.warm_kernels serve SOCKET             # the zygote (emlib.run_notebooks starts one per run)
    python -m emlib.warm_kernels connect SOCKET -f FILE   # a kernel (what jupyter_client runs)

Only the standard library is imported at the top: ``connect`` must start in milliseconds.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# The heavy imports of every notebook, done once in the zygote. Order matters: ipykernel.zmqshell first, so that
# tqdm.auto (imported by transformers and emlib) picks its notebook progress bars, as it would inside a kernel.
# plotly.express is safe to preload: plotly imports its renderer module (plotly.io._renderers, which picks the default
# renderer from the running shell) only when a figure is first shown, in the kernel. nbformat is what that module
# imports (1.3-2 s: jsonschema's rfc3987_syntax builds a parser on import) and kaleido draws the static PNGs: both
# were paid again by every kernel's first figure. IPython.display is left to the kernel.
PRELOAD = ("ipykernel.zmqshell", "numpy", "pandas", "torch", "transformers", "transformers.modeling_utils", "peft",
           "safetensors.torch", "nbformat", "plotly.express", "kaleido", "emlib.evaluation", "emlib.interventions",
           "emlib.models", "emlib.generate", "emlib.judge", "emlib.train.loop", "emlib.train.protocols",
           "emlib.train.checkpoints", "emlib.analysis.directions", "emlib.analysis.phase", "emlib.analysis.probing",
           "emlib.analysis.stability", "emlib.world")
# Not ipykernel.kernelapp: its class reads JPY_PARENT_PID when imported, so each kernel imports it (0.1 s) itself.
# Variables that may differ between the zygote and a kernel: read when used, never when a PRELOAD module is imported.
# Named one by one: EMLIB_PW_LANGUAGE, for one, is read when emlib.world is imported, so it is not among them.
PER_KERNEL = {"EMLIB_THREADS", "EMLIB_STATIC_FIGURES", "EMLIB_RUNS", "EMLIB_WARM_KERNELS", "EMLIB_WARM_KERNELS_DEBUG",
              "PYTEST_CURRENT_TEST"}  # (pytest names the running test in the latter)
PER_KERNEL_PREFIXES = ("JPY_",)  # jupyter_client's, per kernel
PER_KERNEL_SUFFIXES = ("_API_KEY",)
KERNEL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def enabled() -> bool:
    return os.name == "posix" and os.environ.get("EMLIB_WARM_KERNELS", "1") != "0"


def env_conflicts(before: dict[str, str], after: dict[str, str], kernel_env: dict[str, str]) -> list[str]:
    """Variables of ``kernel_env`` that differ from the zygote's environment ``before`` its imports and ``after``
    them (an import may set defaults of its own, e.g. torch's TORCHINDUCTOR_CACHE_DIR), other than per-kernel ones:
    their value could have mattered at import time, so such a kernel must start cold."""
    keys = before.keys() | after.keys() | kernel_env.keys()
    differ = {k for k in keys if kernel_env.get(k) not in (before.get(k), after.get(k))}
    return sorted(k for k in differ
                  if k not in PER_KERNEL and not k.startswith(PER_KERNEL_PREFIXES) and not k.endswith(PER_KERNEL_SUFFIXES))


# ------------------------------------------------------------------------------------------ the zygote


class Zygote:
    """A started ``serve`` process (see :func:`start`); it exits when this process closes its stdin or exits."""

    def __init__(self, process: subprocess.Popen, path: Path):
        self.process, self.path = process, path

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.path.parent, ignore_errors=True)


_starting = threading.Lock()
_started: dict[int, Zygote | None] = {}  # pid of this process -> its zygote (a forked test worker starts its own)


def start(timeout: float = 120) -> Zygote | None:
    """This process's zygote, started on first use and ready (its imports done); None if disabled or it could not
    start (then every kernel of this process starts the ordinary way; it is not tried again)."""
    if not enabled():
        return None
    with _starting:  # notebooks run side by side start their kernels at once: one zygote for both
        if os.getpid() not in _started or (_started[os.getpid()] and _started[os.getpid()].process.poll() is not None):
            _started[os.getpid()] = _start(timeout)
        return _started[os.getpid()]


def _start(timeout: float) -> Zygote | None:
    import atexit
    import select

    path = Path(tempfile.mkdtemp(prefix="emlib-kernels-")) / "zygote.sock"
    # env: os.environ as jupyter_client passes it to kernels (the C environment may hold more: GNU readline, once
    # imported, exports LINES and COLUMNS there)
    process = subprocess.Popen([sys.executable, "-m", "emlib.warm_kernels", "serve", str(path)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, env=dict(os.environ))
    zygote = Zygote(process, path)
    atexit.register(zygote.close)
    ready, _, _ = select.select([process.stdout], [], [], timeout)  # "ready" once its imports are done
    if not ready or process.stdout.readline().strip() != b"ready":
        zygote.close()
        return None
    return zygote


def serve(path: str) -> None:
    before = dict(os.environ)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # an optional module missing: its kernels import it themselves
            pass
    if "pandas" in sys.modules:  # pandas sized its text tables for a terminal (no get_ipython here): a kernel's
        sys.modules["pandas"].set_option("display.max_columns", 20)  # default (pandas.core.config_init.is_terminal)
    after = dict(os.environ)
    added = {k: v for k, v in after.items() if k not in before}  # what a cold kernel's imports would set too
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    # the parent closing our stdin (or dying) ends the zygote; its kernels end with their clients (or, orphaned, when
    # ipykernel's parent poller sees it). Raw reads: a thread blocked in sys.stdin would hold its lock in every child.
    threading.Thread(target=_exit_at_eof, args=(0,), daemon=True).start()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        try:
            request, fds = _receive(conn)
        except Exception:
            conn.close()
            continue
        conflicts = env_conflicts(before, after, request["env"])
        request["env"] = {**added, **request["env"]}
        if conflicts:
            _send(conn, {"cold": conflicts})
            conn.close()
            for fd in fds:
                os.close(fd)
            continue
        pid = os.fork()
        if pid == 0:
            listener.close()
            _become_kernel(conn, request, fds)  # never returns
        for fd in fds:
            os.close(fd)
        _send(conn, {"pid": pid})
        threading.Thread(target=_report_exit, args=(conn, pid), daemon=True).start()


def _exit_at_eof(fd: int) -> None:
    while os.read(fd, 4096):
        pass
    os._exit(0)


def _report_exit(conn: socket.socket, pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    try:
        _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
    except OSError:  # the client is gone
        pass
    conn.close()


def _become_kernel(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: take the client's streams, folder and environment, then run ipykernel. Never returns
    (see :func:`_exit`)."""
    try:
        for target, fd in enumerate(fds):  # the client's stdin, stdout, stderr
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for signum in KERNEL_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = ["ipykernel_launcher", *request["argv"]]
        sys.path[0] = request["cwd"]  # as `python -m ipykernel_launcher` run from there would have it

        def watch():  # the client closing the connection (killed, or jupyter_client gave up) ends the kernel
            while conn.recv(1):
                pass
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="emlib-kernel-client").start()
        from ipykernel import kernelapp

        kernelapp.launch_new_instance()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    _exit(code)


def _exit(code: int) -> None:
    """End the kernel as interpreter shutdown would, minus tearing down every module (with torch and transformers
    loaded that alone takes ~1.2 s, paid while papermill waits for the kernel to end): non-daemon threads joined,
    atexit handlers run (e.g. the static-figure browser closed), every open file flushed, then exit."""
    import atexit
    import gc
    import io

    try:
        threading._shutdown()  # what Py_FinalizeEx does first
        atexit._run_exitfuncs()
        writers = (io.BufferedWriter, io.BufferedRandom, io.BufferedRWPair, io.TextIOWrapper)
        for obj in gc.get_objects():  # by exact type: an isinstance check would run torch's deprecated properties
            if type(obj) in writers and not obj.closed:
                try:
                    obj.flush()
                except Exception:
                    pass
    finally:
        os._exit(code)


# ------------------------------------------------------------------------------------------ the kernel's process


def _send(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode() + b"\n"
    if fds:
        socket.send_fds(conn, [data], fds)
    else:
        conn.sendall(data)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 8)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            raise ConnectionError("connection closed mid-message")
        data += more
    return json.loads(data), list(fds)


def _read_line(reader) -> dict:
    line = reader.readline()
    if not line:
        raise ConnectionError("the zygote closed the connection")
    return json.loads(line)


def connect(path: str, argv: list[str]) -> int:
    """Run a kernel forked by the zygote at ``path``; if it cannot (gone, or environments differ), an ordinary one."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
        _send(conn, {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}, fds=[0, 1, 2])
        reader = conn.makefile("rb")
        reply = _read_line(reader)
    except (OSError, ConnectionError, ValueError):
        reply = {"cold": ["zygote unreachable"]}
    if "pid" not in reply:
        if os.environ.get("EMLIB_WARM_KERNELS_DEBUG"):
            print(f"[emlib] kernel started cold: {', '.join(reply['cold'])}", file=sys.stderr, flush=True)
        os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", *argv])
    child = reply["pid"]
    for signum in KERNEL_SIGNALS:
        signal.signal(signum, lambda s, _frame: _forward(child, s))
    try:
        return int(_read_line(reader)["exit"])
    except (OSError, ConnectionError, ValueError, KeyError):
        _forward(child, signal.SIGKILL)
        return 1


def _forward(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 2 and args[0] == "serve":
        serve(args[1])
        return 0
    if len(args) >= 2 and args[0] == "connect":
        return connect(args[1], args[2:])
    print(__doc__.split("\n\n")[-2], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
