"""
C{everest-agent demo}: a parameter sweep through a real reference platform
and a real agent, both on loopback, in temporary directories.

The platform serves its agent endpoint and file store on a free loopback
port; the agent is configured from an C{agent.ini} written like a user's,
connects over a real WebSocket, fetches the sweep's script from the file
store (checked by sha256), runs each task as a real process and uploads its
result.  One parameter fails on purpose, to show what a failed task looks
like.  Nothing leaves the machine.
"""

import base64
import hashlib
import os
import shutil
import sys
import tempfile
import time

from twisted.internet import defer, task

from everest_agent import config as agent_config

SCRIPT = b"""#!/bin/sh
# One point of the sweep: the sum of i*i for i = 1 .. n*2000.
n=$(cat params.txt)
sleep 0.2   # stands for real work, so the sweep can be watched
# awk counts in doubles, exact only up to 2^53: the sum is kept in two parts
# (hi * 10^12 + lo) so that it stays exact for any n the demo uses.
awk -v n="$n" 'BEGIN {
    hi = 0; lo = 0
    for (i = 1; i <= n * 2000; i++) { lo += i * i; if (lo >= 1e12) { hi += int(lo / 1e12); lo = lo % 1e12 } }
    if (hi) printf "%d %d%012.0f\\n", n, hi, lo; else printf "%d %.0f\\n", n, lo
}' > result.txt
if [ "$n" -eq 13 ]; then
    echo "parameter 13 is unlucky: failing on purpose" >&2
    exit 3
fi
echo "point $n done"
"""

FAILING = 13


def expected_result(n):
    m = n * 2000
    return f"{n} {m * (m + 1) * (2 * m + 1) // 6}"


def _fmt(seconds):
    return "-" if seconds is None else f"{seconds:.2f}"


class Progress:
    """
    Live progress: on a terminal, one line redrawn in place (done/total, a
    bar, tasks finished per second, failures, what is running); otherwise
    one plain line per state change, for logs.

    @param clock: monotonic seconds (injected for tests).
    """

    FINISHED = ("DONE", "FAILED", "CANCELED")

    def __init__(self, platform, task_ids, out, clock=time.monotonic):
        self.platform = platform
        self.task_ids = task_ids
        self.out = out
        self.tty = out.isatty()
        self.clock = clock
        self.started = clock()
        self._seen = {t: 0 for t in task_ids}

    def line(self):
        """The terminal's progress line (without the carriage return)."""
        counts = {}
        for t in self.task_ids:
            state = self.platform.tasks[t].state or "SUBMITTED"
            counts[state] = counts.get(state, 0) + 1
        finished = sum(counts.get(s, 0) for s in self.FINISHED)
        total = len(self.task_ids)
        elapsed = max(self.clock() - self.started, 1e-9)
        width = 24
        filled = width * finished // total if total else width
        failed = counts.get("FAILED", 0) + counts.get("CANCELED", 0)
        active = "  ".join(f"{s.lower()} {n}" for s, n in sorted(counts.items()) if s not in self.FINISHED)
        return (f"[{'#' * filled}{'.' * (width - filled)}] {finished}/{total} done  "
                f"{finished / elapsed:.1f} tasks/s  {failed} failed" + (f"  ({active})" if active else ""))

    def update(self):
        if self.tty:
            self.out.write(f"\r{self.line()}\x1b[K")
        else:
            for t in self.task_ids:
                history = self.platform.tasks[t].history
                for state, info in history[self._seen[t]:]:
                    self.out.write(f"{t:10} {state}\n")
                self._seen[t] = len(history)
        self.out.flush()

    def finish(self):
        self.update()
        if self.tty:
            self.out.write("\n")


def keep_running(platform, agent, out):
    """
    Say how to look at the kept platform and agent and submit more tasks.

    The curl command reads the API token's header from a file (0600, next
    to the platform's C{api-token}), so that the token is not on a command
    line other users can see.
    """
    from everest_agent.platform import page_url

    auth = ""
    token = getattr(platform, "api_token", "") or ""
    token_file = getattr(platform, "api_token_file", None)
    if token and token_file:
        header_file = os.path.join(os.path.dirname(token_file), "api-header")
        fd = os.open(header_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"Authorization: Bearer {token}\n")
        auth = f"-H @{header_file} "
    monitor = getattr(agent, "monitor_service", None)
    out.write(
        "\nThe platform and the agent keep running (Ctrl-C stops them):\n"
        f"  platform page: {page_url(platform)}\n"
        + (f"  agent page:    {monitor.url}/\n" if monitor is not None and monitor.url else "")
        + "  submit more tasks through the API, e.g.:\n"
        f"    curl {auth}-H 'Content-Type: application/json' "
        f"-d '{{\"spec\": {{\"command\": \"hostname\"}}}}' {platform.http_url}/api/tasks\n"
    )
    out.flush()


def until_shutdown(reactor):
    """
    A Deferred firing when the reactor begins to shut down (Ctrl-C); the
    shutdown then waits for the Deferred this returns second, fired by the
    caller once it has cleaned up.
    """
    stopping, cleaned = defer.Deferred(), defer.Deferred()

    def before_shutdown():
        stopping.callback(None)
        return cleaned

    reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)
    return stopping, cleaned


async def run_demo(reactor, tasks=20, out=sys.stdout, keep=False, stop=None):
    """
    The sweep; with C{keep}, the platform and the agent then keep running
    (and the directory is kept) until C{stop} fires, by default at the
    reactor's shutdown (Ctrl-C).
    """
    from everest_agent.agent import EverestAgent
    from everest_agent.platform import Platform, listen, page_url

    root = tempfile.mkdtemp(prefix="everest-demo-")
    out.write(f"everest-agent demo: a {tasks}-point parameter sweep, everything in {root}\n")
    token = base64.urlsafe_b64encode(os.urandom(24)).decode()
    platform = Platform({token: "demo-agent"}, reactor, heartbeat=5, files_dir=os.path.join(root, "platform-files"),
                        api_token_dir=os.path.join(root, "platform"))
    agent = None
    try:
        await listen(platform, reactor, 0)
        out.write(f"reference platform listening on {platform.http_url}\n"
                  f"watch it in a browser: {page_url(platform)}\n")
        out.write(f"its JSON API ({platform.http_url}/api/tasks) needs Authorization: Bearer "
                  f"<the token in {platform.api_token_file}>\n")

        token_file = os.path.join(root, "token")
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, token.encode())
        os.close(fd)
        ini = os.path.join(root, "agent.ini")
        fd = os.open(ini, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, (
            "[platform]\n"
            f"url = {platform.ws_url}\n"
            f"token_file = {token_file}\n"
            "[agent]\n"
            f"work_dir = {root}/agent/tasks\n"
            f"state_dir = {root}/agent/state\n"
            f"max_tasks = {max(2, os.cpu_count() or 1)}\n"
            "[handler]\n"
            "type = local\n"
            + ("[monitor]\nlisten = 127.0.0.1:0\n" if keep else "")
        ).encode())
        os.close(fd)
        config = agent_config.load(ini)
        agent = EverestAgent(config, reactor)
        agent.startService()
        await platform.wait_connected()
        out.write(f"agent connected ({config.agent.max_tasks} slots, local handler)\n")

        platform.put_file("sweep/sweep.sh", SCRIPT)
        script = {
            "path": "sweep.sh", "uri": platform.file_url("sweep/sweep.sh"),
            "sha256": hashlib.sha256(SCRIPT).hexdigest(), "size": len(SCRIPT), "executable": True,
        }
        started = time.monotonic()
        task_ids = []
        for n in range(1, tasks + 1):
            task_id = f"sweep-{n}-0"
            spec = {
                "command": "./sweep.sh",
                "inputs": [script, {"path": "params.txt", "data": base64.b64encode(str(n).encode()).decode()}],
                "outputs": [
                    {"path": "result.txt", "uri": platform.file_url(f"sweep/{task_id}/result.txt")},
                    {"path": "stdout", "uri": platform.file_url(f"sweep/{task_id}/stdout"), "optional": True},
                    {"path": "stderr", "uri": platform.file_url(f"sweep/{task_id}/stderr"), "optional": True},
                ],
                "resourceRequirements": {"coresPerNode": 1, "timeLimit": 120},
            }
            platform.submit(spec, task_id=task_id)
            task_ids.append(task_id)

        progress = Progress(platform, task_ids, out)
        ticker = task.LoopingCall(progress.update)
        ticker.clock = reactor
        ticker.start(0.1 if progress.tty else 0.05)
        try:
            await defer.gatherResults([platform.wait_for(t) for t in task_ids])
        finally:
            ticker.stop()
        elapsed = time.monotonic() - started
        progress.finish()
        api_states = await _api_states(reactor, platform)
        code = _report(platform, task_ids, elapsed, out, api_states)
        if keep:
            cleaned = None
            if stop is None:
                stop, cleaned = until_shutdown(reactor)
            keep_running(platform, agent, out)
            try:
                await stop
            finally:
                out.write("stopping the platform and the agent\n")
                await _stop(agent, platform)
                if cleaned is not None:
                    cleaned.callback(None)
        return code
    finally:
        await _stop(agent, platform)
        if keep:
            out.write(f"files kept in {root}\n")
        else:
            shutil.rmtree(root, ignore_errors=True)


async def _stop(agent, platform):
    if agent is not None and agent.running:
        await agent.stopService()
    await platform.close()


async def _api_states(reactor, platform):
    """The tasks' states as the JSON API reports them, asked with its token."""
    import treq

    response = await treq.get(
        f"{platform.http_url}/api/tasks", reactor=reactor,
        headers={"Authorization": "Bearer " + platform.api_token}, persistent=False,
    )
    body = await response.json() if response.code == 200 else await response.text()
    if response.code != 200:
        return {"error": f"GET /api/tasks: {response.code} {str(body)[:200]}"}
    return {t["taskId"]: t["state"] for t in body}


def _report(platform, task_ids, elapsed, out, api_states=None):
    header = f"{'task':12} {'state':8} {'exit':>4} {'stage-in':>9} {'run':>7} {'stage-out':>9}  note"
    out.write("\n" + header + "\n" + "-" * len(header) + "\n")
    problems = []
    verified = 0
    for task_id in task_ids:
        record = platform.tasks[task_id]
        info = record.info or {}
        n = int(task_id.split("-")[1])
        note = info.get("reason", "")
        if record.state == "DONE":
            result = platform.get_file(f"sweep/{task_id}/result.txt").decode().strip()
            if result == expected_result(n):
                verified += 1
                note = "result verified"
            else:
                problems.append(f"{task_id}: wrong result {result!r}")
        expected_state = "FAILED" if n == FAILING else "DONE"
        if record.state != expected_state:
            problems.append(f"{task_id}: {record.state}, expected {expected_state}")
        exit_code = info.get("exitCode")
        out.write(
            f"{task_id:12} {record.state:8} {'-' if exit_code is None else exit_code:>4} "
            f"{_fmt(info.get('stageInTime')):>9} {_fmt(info.get('runTime')):>7} "
            f"{_fmt(info.get('stageOutTime')):>9}  {note}\n"
        )
    if api_states is not None:
        if "error" in api_states:
            problems.append(f"the JSON API: {api_states['error']}")
        elif any(api_states.get(t) != platform.tasks[t].state for t in task_ids):
            problems.append("the JSON API reports other states than the platform holds")
    if platform.violations:
        problems.append(f"protocol violations seen by the platform: {platform.violations}")
    out.write(
        f"\n{len(task_ids)} tasks in {elapsed:.2f} s: {len(task_ids) / elapsed:.1f} tasks/s "
        f"end to end (submit to last terminal state), {verified} results verified, "
        f"{platform.duplicates} duplicate reports dropped\n"
    )
    for problem in problems:
        out.write(f"PROBLEM: {problem}\n")
    return 1 if problems else 0


def main(argv):
    import argparse

    parser = argparse.ArgumentParser(prog="everest-agent demo", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20, help="points in the sweep (default 20)")
    parser.add_argument("--keep", action="store_true",
                        help="after the sweep, keep the platform and the agent running (until Ctrl-C) to look "
                             "at their pages and submit more tasks through the API; keep the directory")
    args = parser.parse_args(argv)
    if args.tasks < FAILING:
        parser.error(f"--tasks must be at least {FAILING}")

    def run(reactor):
        def check(code):
            if code:
                raise SystemExit(code)

        return defer.Deferred.fromCoroutine(run_demo(reactor, args.tasks, keep=args.keep)).addCallback(check)

    task.react(run)
