"""
C{python -m everest_agent.dirworker WORK_DIR}: the agent's directory
process (L{everest_agent.taskdirs.ProcessTaskDirs} starts it), the
blocking work it does (also done in the agent's threads when it is gone),
and how its errors travel (L{encode_error}, L{decode_error}).

Its standard input is a Unix stream socket to the agent.  It reads
requests there, one JSON object a line::

    {"id": 7, "op": "make", "work_dir": "...", "name": "TASK"}
    {"id": 8, "op": "retire", "work_dir": "...", "name": "TASK", "reuse": true}

and answers each there, one line each, in the order it finishes them::

    {"id": 7, "ok": null, "taken": 3, "given": 5, "log": [["warn", "...", {...}]]}
    {"id": 8, "error": {"kind": "os", "errno": 13, "strerror": "...", "text": "..."}, ...}

Making goes in one thread, retiring in another, so that removing a big
directory does not hold up new tasks.  The spares
(L{everest_agent.spares.SpareDirs}) are this process's.  At the end of its
input it finishes what it was asked, answers, and exits.
"""

import json
import os
import queue
import socket
import sys
import threading

from everest_agent import paths
from everest_agent.retention import remove_task_dir
from everest_agent.spares import SpareDirs


def make_task_dir(work_dir, name, spares, log=None):
    """
    Make (or check) task directory C{name} of C{work_dir}: a spare renamed
    into place if there is one (L{everest_agent.spares}), else a new one.  A
    planted link or someone else's directory there is moved aside first
    (L{everest_agent.paths.open_task_dir}, which logs to C{log}).  Blocking.
    """
    os.makedirs(work_dir, mode=0o700, exist_ok=True)
    root = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        spares.take(root, name)
    finally:
        os.close(root)
    os.close(paths.open_task_dir(work_dir, name, log=log))


def retire_task_dir(work_dir, name, spares, reuse):
    """Remove task directory C{name}, or empty it into C{spares} if C{reuse}.  Blocking."""
    return remove_task_dir(work_dir, name, spares if reuse else None)


def encode_error(e):
    """An exception of the blocking work, as the directory process answers it."""
    if isinstance(e, paths.PathEscape):
        return {"kind": "escape", "text": str(e)}
    if isinstance(e, OSError):
        return {"kind": "os", "errno": e.errno, "strerror": e.strerror, "text": str(e)}
    return {"kind": "other", "text": f"{e.__class__.__name__}: {e}"}


def decode_error(fields):
    """The exception an error answer stands for (an OSError keeps its errno, so its subclass)."""
    kind = fields.get("kind")
    if kind == "escape":
        return paths.PathEscape(fields.get("text", ""))
    if kind == "os" and fields.get("errno") is not None:
        return OSError(fields["errno"], fields.get("strerror") or fields.get("text", ""))
    return RuntimeError(fields.get("text", "the directory process failed"))


class _Log:
    """Collects what the blocking work logs, for the answer to carry."""

    def __init__(self):
        self.events = []

    def _event(level):
        def emit(self, format, **fields):
            self.events.append([level, format, {k: str(v) for k, v in fields.items()}])
        return emit

    info = _event("info")
    warn = _event("warn")
    error = _event("error")
    del _event


def serve(sock, work_dir, err=None):
    """
    Answer the requests read from C{sock} (a connected Unix stream socket)
    until it ends; say what cannot be read on C{err} (default: standard
    error, which the agent logs).
    """
    err = sys.stderr if err is None else err
    spares = SpareDirs(work_dir)
    lock = threading.Lock()

    def answer(reply):
        data = json.dumps(reply, separators=(",", ":")).encode() + b"\n"
        with lock:
            sock.sendall(data)

    def work(q):
        while True:
            request = q.get()
            if request is None:
                return
            log = _Log()
            reply = {"id": request.get("id")}
            try:
                op = request["op"]
                if op == "make":
                    make_task_dir(request["work_dir"], request["name"], spares, log)
                    reply["ok"] = None
                else:
                    reply["ok"] = retire_task_dir(request["work_dir"], request["name"], spares,
                                                  request.get("reuse", False))
            except Exception as e:  # every failure is the request's, answered
                reply["error"] = encode_error(e)
            reply["taken"], reply["given"] = spares.taken, spares.given
            if log.events:
                reply["log"] = log.events
            answer(reply)

    queues = {"make": queue.SimpleQueue(), "retire": queue.SimpleQueue()}
    threads = [threading.Thread(target=work, args=(q,), name=f"everest-dirs-{name}", daemon=True)
               for name, q in queues.items()]
    for t in threads:
        t.start()
    with sock.makefile("rb") as requests:
        for line in requests:
            try:
                request = json.loads(line)
                q = queues[request["op"]]  # (making never waits behind a removal)
            except (ValueError, KeyError, TypeError):
                print(f"everest-agent directory process: unreadable request {line[:200]!r}", file=err, flush=True)
                continue
            q.put(request)
    for q in queues.values():
        q.put(None)
    for t in threads:
        t.join()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m everest_agent.dirworker WORK_DIR", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=0)  # (its socket to the agent: see the module's docstring)
    try:
        serve(sock, argv[0])
    except BrokenPipeError:
        return 1  # the agent is gone
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
