"""
Fault-injection harness (issue 5): the agent as a real process, the reference
platform in the test process, and between them a TCP proxy under the test's
control.

 - L{ChaosProxy}: a TCP proxy on loopback that forwards to the platform and
   can cut every connection (abort both sides), stall them (stop forwarding
   both ways without closing: a half-open connection), delay them, or refuse
   new ones.
 - L{AgentProcess}: C{twistd -n everest-agent --config agent.ini} spawned
   with C{reactor.spawnProcess}; L{AgentProcess.kill9}, L{terminate
   <AgentProcess.terminate>}, L{restart <AgentProcess.restart>} (same
   configuration and state directory).
 - L{PlatformHandle}: the in-process reference platform with a state file,
   restartable on the same port, gracefully or as a crash (the state file
   keeps only what was saved before).  A L{SeqRecorder} sees every reliable
   message the platform applies, across platform restarts.
 - L{HoldServer}: an HTTP server for inputs (C{GET /in/<name>}) and outputs
   (C{PUT /out/<name>}) that can hold requests, to keep a task in
   C{STAGING_IN} or C{STAGING_OUT}.
 - L{TaskFactory}: task specs whose commands count their own runs (one line
   per run in C{runs/<taskId>}), can wait for a gate file (to hold a task in
   C{RUNNING}), and produce outputs whose bytes the test knows in advance;
   each comes with its L{Expect}.
 - L{check}: the verdict for a scenario, as a L{Row} of the table printed at
   the end of the run (and written to C{fault-table.txt} in trial's
   working directory): tasks, lost, duplicated, wrong.
"""

import atexit
import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ConnectionDone
from twisted.web import resource, server

from everest_agent import protocol as P
from everest_agent.platform import Platform, listen
from everest_agent import statedir
from tests.support import TOKEN, write_private

AGENT_NAME = "agent"


def twistd_argv():
    """How to run twistd with this Python (a CI venv has it next to python)."""
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(twistd, os.X_OK):
        return [twistd]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def sleep(seconds):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def eventually(predicate, timeout=20.0, what="condition", step=0.02, diagnose=None):
    """Poll C{predicate} until true; fail naming C{what} (plus C{diagnose()})."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = ""
            if diagnose is not None:
                try:
                    extra = "\n" + diagnose()
                except Exception as e:  # pragma: no cover - diagnostics only
                    extra = f"\n(diagnostics failed: {e!r})"
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        await sleep(step)


def with_timeout(d, seconds, what):
    """C{d}, failing with a readable AssertionError after C{seconds}."""
    result = defer.Deferred()
    timer = reactor.callLater(
        seconds,
        lambda: result.called or result.errback(AssertionError(f"timed out after {seconds:g} s waiting for {what}")),
    )

    def done(value):
        if timer.active():
            timer.cancel()
        if not result.called:
            result.callback(value)
        return None

    def failed(f):
        if timer.active():
            timer.cancel()
        if not result.called:
            result.errback(f)
        return None

    d.addCallbacks(done, failed)
    return result


# ---------------------------------------------------------------------------
# The proxy.


class _Pair:
    """One proxied connection: the agent's side and the platform's side."""

    def __init__(self, proxy, agent_side):
        self.proxy = proxy
        self.agent_side = agent_side
        self.platform_side = None
        self.stalled = False
        self.agent_gone = False
        self.platform_gone = False
        self.agent_gone_at = None
        self.opened_at = time.monotonic()
        self.kind = None
        self._early = []  # agent bytes before the platform side is connected
        self._queues = {"up": [], "down": []}  # (due, data) while delaying
        self._timers = {"up": None, "down": None}

    def _target(self, direction):
        side = self.platform_side if direction == "up" else self.agent_side
        return side.transport if side is not None and side.transport is not None else None

    def forward(self, direction, data):
        if direction == "up" and self.platform_side is None:
            self._early.append(data)
            return
        queue = self._queues[direction]
        if self.stalled:
            # Nothing gets through; TCP would deliver it if the route came back.
            queue.append((0.0, data))
            return
        if self.proxy.delay_seconds > 0 or queue:
            queue.append((time.monotonic() + self.proxy.delay_seconds, data))
            self._drain(direction)
            return
        target = self._target(direction)
        if target is not None:
            target.write(data)

    def _drain(self, direction):
        timer = self._timers[direction]
        if timer is not None and timer.active():
            timer.cancel()
        self._timers[direction] = None
        queue = self._queues[direction]
        now = time.monotonic()
        while queue and queue[0][0] <= now and not self.stalled:
            _, data = queue.pop(0)
            target = self._target(direction)
            if target is not None:
                target.write(data)
        if queue and not self.stalled and not self.proxy.stopped:
            self._timers[direction] = reactor.callLater(max(0.0, queue[0][0] - now), self._drain, direction)
        elif not queue:
            self._close_if_done()

    def platform_connected(self, side):
        self.platform_side = side
        early, self._early = self._early, []
        for data in early:
            self.forward("up", data)
        if self.agent_gone:
            self._close_if_done()
        else:
            self.agent_side.transport.resumeProducing()

    def _close_if_done(self):
        if self.stalled:
            return
        if self.agent_gone and not self.platform_gone and not self._queues["up"] and self.platform_side is not None:
            self.platform_side.transport.loseConnection()
        if self.platform_gone and not self.agent_gone and not self._queues["down"]:
            self.agent_side.transport.loseConnection()

    def side_lost(self, which):
        if which == "agent":
            self.agent_gone = True
            self.agent_gone_at = time.monotonic()
        else:
            self.platform_gone = True
        if self.agent_gone and self.platform_gone:
            self.proxy.pairs.discard(self)
            self.cancel_timers()
            return
        # A stalled pair does not tell the other side (half-open).
        self._close_if_done()

    def cancel_timers(self):
        for direction, timer in self._timers.items():
            if timer is not None and timer.active():
                timer.cancel()
            self._timers[direction] = None

    def abort(self):
        for side in (self.agent_side, self.platform_side):
            if side is not None and side.transport is not None:
                side.transport.abortConnection()

    def unstall(self):
        self.stalled = False
        if self.agent_gone or self.platform_gone:
            # The route is back but one end has forgotten the connection:
            # the other end gets a reset.
            self.abort()
            return
        for direction in ("up", "down"):
            if self._queues[direction]:
                self._drain(direction)


class _AgentSide(protocol.Protocol):
    """
    The agent's end.  The first line of what the agent sends tells a
    WebSocket session (C{GET /compute/agent/...}) from a file transfer;
    only then is the platform side connected (or the connection refused).
    """

    pair = None
    kind = None

    def connectionMade(self):
        self._head = b""

    def _classify(self):
        proxy = self.factory.proxy
        first = self._head.split(b"\r\n", 1)[0]
        self.kind = "ws" if b" /compute/agent/" in first else "http"
        refuse = proxy.refuse if self.kind == "ws" else proxy.refuse_files
        if refuse:
            proxy.refused += 1
            self.transport.abortConnection()
            return
        proxy.accepted += 1
        if self.kind == "http":
            proxy.accepted_files += 1
        else:
            proxy.accepted_ws += 1
        self.pair = _Pair(proxy, self)
        self.pair.kind = self.kind
        proxy.pairs.add(self.pair)
        self.transport.pauseProducing()
        head, self._head = self._head, b""
        self.pair.forward("up", head)
        factory = protocol.ClientFactory()
        factory.protocol = _PlatformSide
        factory.pair = self.pair

        def failed(connector, reason):
            proxy.upstream_failures[self.kind] = proxy.upstream_failures.get(self.kind, 0) + 1
            self.pair.platform_gone = True
            self.transport.abortConnection()

        factory.clientConnectionFailed = failed
        reactor.connectTCP(proxy.target_host, proxy.target_port, factory, timeout=5)

    def dataReceived(self, data):
        if self.pair is not None:
            self.pair.forward("up", data)
            return
        if self.kind is not None:
            return  # refused
        self._head += data
        if b"\r\n" in self._head or len(self._head) > 8192:
            self._classify()

    def connectionLost(self, reason=ConnectionDone):
        if self.pair is not None:
            self.pair.side_lost("agent")


class _PlatformSide(protocol.Protocol):
    def connectionMade(self):
        self.pair = self.factory.pair
        self.pair.platform_connected(self)

    def dataReceived(self, data):
        self.pair.forward("down", data)

    def connectionLost(self, reason=ConnectionDone):
        self.pair.side_lost("platform")


class ChaosProxy:
    """
    A TCP proxy on 127.0.0.1 between the agent and the platform.

    Faults apply to the agent's WebSocket sessions; file transfers to the
    platform (same host and port, so that they carry the token) go through
    too, and are cut or refused only when asked (C{files=True},
    L{refuse_files}).

    @ivar refuse: when true, new WebSocket connections are closed at once.
    @ivar refuse_files: when true, new file-transfer connections are closed at once.
    @ivar delay_seconds: latency added to every chunk, each way.
    @ivar accepted: connections forwarded so far.
    @ivar refused: connections refused so far.
    """

    def __init__(self, target_port, target_host="127.0.0.1"):
        self.target_host = target_host
        self.target_port = target_port
        self.refuse = False
        self.refuse_files = False
        self.stopped = False
        self.delay_seconds = 0.0
        self.accepted = 0
        self.accepted_ws = 0
        self.accepted_files = 0
        self.upstream_failures = {}  # kind -> connections the platform refused
        self.refused = 0
        self.pairs = set()
        self._port = None

    def start(self):
        factory = protocol.Factory()
        factory.protocol = _AgentSide
        factory.proxy = self
        self._port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self._port.getHost().port
        return self

    def url(self, path="/compute/agent/v1"):
        return f"ws://127.0.0.1:{self.port}{path}"

    def retarget(self, port, host="127.0.0.1"):
        """New connections go to C{host:port}."""
        self.target_host, self.target_port = host, port

    def http_url(self):
        return f"http://127.0.0.1:{self.port}"

    def cut(self, files=False):
        """
        Abort every WebSocket connection (and file transfer, with C{files}),
        both sides; the agent reconnects unless L{refuse}.
        """
        for pair in list(self.pairs):
            if pair.kind == "ws" or files:
                pair.abort()

    def stall(self):
        """
        Stop forwarding on every current connection, both ways, without
        closing anything: each end keeps a connection the other cannot hear,
        and a close on one end does not reach the other.  New connections
        are not affected (a NAT that lost its mapping, a dead route).
        """
        stalled = [pair for pair in self.pairs if pair.kind == "ws"]
        for pair in stalled:
            pair.stalled = True
        return stalled

    def unstall(self):
        for pair in list(self.pairs):
            if pair.stalled:
                pair.unstall()

    def delay(self, seconds):
        """Add C{seconds} of latency to everything forwarded from now on (0: none)."""
        self.delay_seconds = float(seconds)

    @property
    def live(self):
        """WebSocket pairs whose both ends are open."""
        return [p for p in self.pairs if p.kind == "ws" and not p.agent_gone and not p.platform_gone]

    def stop(self):
        self.stopped = True
        for pair in list(self.pairs):
            pair.stalled = False
            pair.cancel_timers()
            pair.abort()
        if self._port is not None:
            return defer.maybeDeferred(self._port.stopListening)
        return defer.succeed(None)


# ---------------------------------------------------------------------------
# The agent as a process.


class _AgentProtocol(protocol.ProcessProtocol):
    def __init__(self):
        self.ended = defer.Deferred()
        self.output = []
        self.status = None

    def outReceived(self, data):
        self.output.append(data)

    def errReceived(self, data):
        self.output.append(data)

    def processEnded(self, reason):
        self.status = reason.value
        self.ended.callback(reason.value)


class AgentProcess:
    """
    The agent run as C{twistd -n --pidfile= --logfile LOG everest-agent
    --config INI}, in its own process.
    """

    def __init__(self, ini, log_path, env, cwd):
        self.ini = ini
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.proto = None
        self.pid = None
        self.starts = 0
        self.exits = []

    def start(self):
        argv = twistd_argv() + [
            "-n", "--pidfile=", "--logfile", self.log_path, "everest-agent", "--config", self.ini,
        ]
        self.proto = _AgentProtocol()
        self.proto.ended.addCallback(self.exits.append)
        transport = reactor.spawnProcess(self.proto, argv[0], argv, env=self.env, path=self.cwd)
        self.pid = transport.pid
        self.starts += 1
        return self

    @property
    def alive(self):
        return self.proto is not None and not self.proto.ended.called

    def signal(self, sig):
        if self.alive:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill9_now(self):
        """SIGKILL at once, without waiting (e.g. from inside a callback)."""
        self.signal(signal.SIGKILL)

    def kill9(self):
        self.kill9_now()
        return self.wait_exit()

    def terminate(self, timeout=15):
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def wait_exit(self, timeout=10):
        if self.proto is None:
            return defer.succeed(None)
        d = defer.Deferred()
        if self.proto.ended.called:
            return defer.succeed(self.proto.status)
        self.proto.ended.addBoth(lambda r: (d.callback(r), r)[1])
        return with_timeout(d, timeout, f"agent pid {self.pid} to exit")

    async def restart(self):
        """Kill it if alive (-9), then start it again with the same configuration."""
        if self.alive:
            await self.kill9()
        self.start()

    def log_tail(self, lines=80):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        output = b"".join(self.proto.output).decode("utf-8", "replace") if self.proto else ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- agent log tail ({self.log_path}) ---\n{tail}\n--- agent stdout/stderr ---\n{output[-4000:]}"

    def log_text(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def write_agent_ini(root, url, handler="local", sections=None):
    """An agent.ini for a fault scenario; short timers everywhere."""
    token_file = write_private(os.path.join(root, "token"), TOKEN + "\n")
    values = {
        "platform": {
            "url": url,
            "token_file": token_file,
            "ping_interval": "1",
            "ping_timeout": "2",
            "reconnect_initial_delay": "0.1",
            "reconnect_max_delay": "1",
            "welcome_timeout": "5",
        },
        "agent": {
            "work_dir": os.path.join(root, "work"),
            "state_dir": os.path.join(root, "state"),
            "max_tasks": "4",
            "kill_grace": "1",
            "hostname": "faults",
        },
        "handler": {"type": handler},
        "transfer": {"timeout": "60"},
    }
    from everest_agent import config as agent_config

    transfer_keys = agent_config.SCHEMA.get("transfer", {})
    if "retries" in transfer_keys:
        # Ride out a platform restart of several seconds, quickly.
        values["transfer"].update(retries="30", retry_initial_delay="0.2", retry_max_delay="1")
    if handler != "local":
        values["handler"].update(poll_interval="0.2", command_timeout="3")
    for section, keys in (sections or {}).items():
        values.setdefault(section, {}).update(keys)
    text = "".join(
        f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) for section, keys in values.items()
    )
    return write_private(os.path.join(root, "agent.ini"), text)


def kill_marked(mark):
    """SIGKILL every process whose environment holds C{EVEREST_FAULTS_MARK=mark}."""
    needle = f"EVEREST_FAULTS_MARK={mark}".encode()
    killed = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            try:
                os.kill(int(name), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


# ---------------------------------------------------------------------------
# Reading the agent's state directory from outside (read only).


def read_outbox(state_dir):
    """C{(last_seq, acked, {seq: message} pending)} from C{outbox.jsonl}."""
    pending, last, acked = statedir.read_outbox(state_dir)
    return last, acked, dict(pending)


def durable_seqs(state_dir):
    """C{(seqs written as messages, highest ack written)} in C{outbox.jsonl}."""
    seqs, acked = set(), 0
    for record in statedir.read_journal(os.path.join(state_dir, statedir.OUTBOX_FILE)):
        if isinstance(record.get("seq"), int):
            seqs.add(record["seq"])
        elif isinstance(record.get("ack"), int):
            acked = max(acked, record["ack"])
    return seqs, acked


read_registry = statedir.read_registry


# ---------------------------------------------------------------------------
# The platform.


class SeqRecorder:
    """
    Every reliable message applied by the platform(s), in order, as the
    agent's C{seq} at the moment it was applied.
    """

    def __init__(self):
        self.applied = []
        self.reports = []  # (seq, taskId, state) of every TASK_STATE applied
        self.dropped = 0

    def attach(self, platform):
        original = platform._received

        def received(session, payload, binary):
            agent = session.agent if session.welcomed else None
            before = agent.last_seq if agent is not None else None
            duplicates = platform.duplicates
            original(session, payload, binary)
            if agent is not None and agent.last_seq != before:
                self.applied.append(agent.last_seq)
                try:
                    message = json.loads(payload)
                    if message[0] == P.TASK_STATE:
                        self.reports.append((agent.last_seq, message[1], message[2]))
                except (ValueError, LookupError, TypeError):
                    pass
            self.dropped += platform.duplicates - duplicates

        platform._received = received

    def truncate(self, last_seq):
        """A crashed platform lost what it applied after its last save."""
        self.applied = [s for s in self.applied if s <= last_seq]
        self.reports = [r for r in self.reports if r[0] <= last_seq]

    def terminal_reports(self, task_id):
        return [state for _, t, state in self.reports if t == task_id and state in P.TERMINAL]


class PlatformHandle:
    """
    The reference platform of a scenario, in this process, with a state
    file; L{restart} brings up a new instance on the same port.
    """

    def __init__(self, root, heartbeat=1, ping_interval=2, ping_timeout=3, public_url=None):
        self.root = root
        self.public_url = public_url
        self.files_dir = os.path.join(root, "files")
        self.state_file = os.path.join(root, "platform-state.json")
        self.heartbeat = heartbeat
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.recorder = SeqRecorder()
        self.platform = None
        self.port = 0
        self.instances = []
        self.duplicates = 0  # over every instance
        self.violations = []

    async def start(self):
        platform = Platform(
            {TOKEN: AGENT_NAME}, reactor, heartbeat=self.heartbeat, files_dir=self.files_dir,
            state_file=self.state_file,
        )
        self.recorder.attach(platform)
        port = None
        for _ in range(50):  # the old port may take a moment to be free again
            try:
                port = await listen(platform, reactor, self.port, ping_interval=self.ping_interval,
                                    ping_timeout=self.ping_timeout, public_url=self.public_url)
                break
            except Exception:
                if not self.port:
                    raise
                await sleep(0.1)
        if port is None:
            raise AssertionError(f"cannot listen again on port {self.port}")
        self.port = port.getHost().port
        self.platform = platform
        self.instances.append(platform)
        return platform

    def _retire(self, platform):
        self.duplicates += platform.duplicates
        self.violations.extend(platform.violations)

    async def stop(self, crash=False):
        platform = self.platform
        if platform is None:
            return
        if crash:
            # Whatever was not saved yet is lost with the process.
            platform.state_file = None
            platform._dirty = False
        await platform.close()
        self._retire(platform)
        self.platform = None

    async def restart(self, crash=False, while_down=None):
        await self.stop(crash=crash)
        if while_down is not None:
            await while_down()
        platform = await self.start()
        if crash:
            self.recorder.truncate(platform.agent(AGENT_NAME).last_seq)
        return platform

    @property
    def all_duplicates(self):
        return self.duplicates + (self.platform.duplicates if self.platform else 0)

    @property
    def all_violations(self):
        return self.violations + (list(self.platform.violations) if self.platform else [])

    def task(self, task_id):
        return self.platform.tasks.get(task_id) if self.platform else None

    def state(self, task_id):
        task = self.task(task_id)
        return task.state if task is not None else None

    def reached(self, task_id, state):
        """Whether the task reached C{state} (or passed it, or ended)."""
        task = self.task(task_id)
        if task is None or task.state is None:
            return False
        return task.terminal or state in task.states or P.STATE_RANK[task.state] > P.STATE_RANK[state]

    def terminal(self, task_id):
        task = self.task(task_id)
        return task is not None and task.terminal

    def close(self):
        if self.platform is not None:
            platform, self.platform = self.platform, None
            return platform.close()
        return defer.succeed(None)


# ---------------------------------------------------------------------------
# Inputs and outputs that can be held.


class _HoldResource(resource.Resource):
    isLeaf = True

    def __init__(self, holder):
        super().__init__()
        self.holder = holder

    def render(self, request):
        holder = self.holder
        method = request.method.decode("ascii", "replace")
        segments = [s.decode("utf-8", "replace") for s in request.postpath]
        name = "/".join(segments[1:])  # after "in" or "out"
        holder.requests.append((method, name))
        if method == "PUT":
            request.content.seek(0)
            holder.stored[name] = request.content.read()
            holder.puts[name] = holder.puts.get(name, 0) + 1
        if name in holder.held:
            entry = (method, name, request)
            holder.waiting.append(entry)

            def gone(_):
                if entry in holder.waiting:
                    holder.waiting.remove(entry)

            request.notifyFinish().addBoth(gone)
            return server.NOT_DONE_YET
        return holder.answer(method, name, request)


class HoldServer:
    """
    C{GET /in/<name>} serves C{files[name]}; C{PUT /out/<name>} stores the
    body in C{stored[name]} (at once) and answers 201.  A held name's
    requests wait for L{release}.
    """

    def __init__(self):
        self.files = {}
        self.stored = {}
        self.puts = {}
        self.held = set()
        self.waiting = []  # (method, name, request) held now
        self.requests = []
        self._port = None

    def start(self):
        self._port = reactor.listenTCP(0, server.Site(_HoldResource(self)), interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self._port.getHost().port}"
        return self

    def input_url(self, name):
        return f"{self.base}/in/{name}"

    def output_url(self, name):
        return f"{self.base}/out/{name}"

    def hold(self, name):
        self.held.add(name)

    def holding(self, method, name):
        """Whether a request for C{name} is waiting now."""
        return any(m == method and n == name for m, n, _ in self.waiting)

    def answer(self, method, name, request):
        if method == "GET":
            data = self.files.get(name)
            if data is None:
                request.setResponseCode(404)
                return b"no such file\n"
            request.setHeader(b"content-type", b"application/octet-stream")
            return data
        if method == "PUT":
            request.setResponseCode(201)
            return b""
        request.setResponseCode(405)
        return b""

    def release(self, name):
        self.held.discard(name)
        for entry in [e for e in self.waiting if e[1] == name]:
            self.waiting.remove(entry)
            method, _, request = entry
            body = self.answer(method, name, request)
            if body:
                request.write(body)
            request.finish()

    def release_all(self):
        for name in list(self.held):
            self.release(name)

    def stop(self):
        self.held.clear()
        for _, _, request in list(self.waiting):
            try:
                request.transport.abortConnection()
            except Exception:
                pass
        self.waiting = []
        return defer.maybeDeferred(self._port.stopListening) if self._port else defer.succeed(None)


# ---------------------------------------------------------------------------
# Tasks that count their runs, and what to expect of them.


class Expect:
    """
    What one task must end with.

    @ivar states: acceptable terminal states.
    @ivar exit_code: the exit code the platform must get (None: not checked
        when C{states} allows several outcomes).
    @ivar outputs: C{[(label, fetch, expected bytes)]}; C{fetch()} returns
        the bytes that arrived, or None.
    @ivar runs: acceptable numbers of runs of the command.
    """

    def __init__(self, task_id, states=("DONE",), exit_code=0, outputs=(), runs=(1,), check_exit=True):
        self.task_id = task_id
        self.states = tuple(states)
        self.exit_code = exit_code
        self.outputs = list(outputs)
        self.runs = tuple(runs)
        self.check_exit = check_exit

    def __repr__(self):
        return f"<Expect {self.task_id} {self.states} exit={self.exit_code}>"


def _blob(task_id, size=3000):
    """Deterministic bytes for a task (all 256 byte values appear)."""
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{task_id}:{counter}".encode()).digest()
        counter += 1
    return out[:size]


class TaskFactory:
    """
    Builds task specs for a scenario.  Each command:

     1. appends a line to C{runs/<taskId>} (so a second run shows), with
        the SLURM job id it runs in, if any,
     2. waits for C{gates/<taskId>} if the task is gated (held in RUNNING),
     3. writes C{result.txt} (text + the input fetched over HTTP, if any)
        and C{blob.bin} (a copy of an inline binary input), prints a line,
     4. touches C{ends/<taskId>} and exits with the chosen code.

    Outputs go to the platform's file store (C{<taskId>/result.txt},
    C{<taskId>/blob.bin}, C{<taskId>/stdout}) or, for a held stage-out, to
    the L{HoldServer}.
    """

    def __init__(self, root, prefix, platform, hold_server):
        self.runs = os.path.join(root, "runs")
        self.gates = os.path.join(root, "gates")
        self.ends = os.path.join(root, "ends")
        for d in (self.runs, self.gates, self.ends):
            os.makedirs(d, exist_ok=True)
        self.prefix = prefix
        self.plat = platform
        self.hold_server = hold_server
        self.count = 0
        self.task_ids = []

    def new_id(self, label="t"):
        self.count += 1
        task_id = f"{self.prefix}{label}-{self.count}-0"
        self.task_ids.append(task_id)
        return task_id

    def runs_of(self, task_id):
        try:
            with open(os.path.join(self.runs, task_id)) as f:
                return len(f.read().splitlines())
        except FileNotFoundError:
            return 0

    def run_job_ids(self, task_id):
        """The batch job id each run ran in ("" outside a SLURM job)."""
        try:
            with open(os.path.join(self.runs, task_id)) as f:
                return [line[4:].strip() for line in f.read().splitlines()]
        except FileNotFoundError:
            return []

    def ended(self, task_id):
        return os.path.exists(os.path.join(self.ends, task_id))

    def open_gate(self, task_id):
        with open(os.path.join(self.gates, task_id), "w"):
            pass

    def make(self, label="t", exit_code=0, gate=False, hold_input=False, hold_output=False, http_input=False,
             platform=None, seconds=0, platform_input=False):
        """
        @return: C{(task_id, spec, Expect)}.
        """
        task_id = self.new_id(label)
        plat = platform or self.plat.platform
        text = f"result of {task_id}\n".encode() * 3
        blob = _blob(task_id)
        steps = [f'echo "run ${{SLURM_JOB_ID:-${{JOB_ID:-}}}}" >> {self.runs}/{task_id}']
        if gate:
            steps.append(f"while [ ! -e {self.gates}/{task_id} ]; do sleep 0.05; done")
        if seconds:
            steps.append(f"sleep {seconds}")
        steps.append(f"printf '%s' '{text.decode()}' > result.txt")
        inputs = [{"path": "blob.in", "data": base64.b64encode(blob).decode(),
                   "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}]
        expected_result = text
        if hold_input or http_input:
            served = f"input of {task_id}\n".encode() * 5
            self.hold_server.files[task_id] = served
            if hold_input:
                self.hold_server.hold(task_id)
            inputs.append({"path": "fetched.txt", "uri": self.hold_server.input_url(task_id),
                           "sha256": hashlib.sha256(served).hexdigest(), "size": len(served)})
            steps.append("cat fetched.txt >> result.txt")
            expected_result = text + served
        if platform_input:
            served = f"platform input of {task_id}\n".encode() * 4
            plat.put_file(f"inputs/{task_id}", served)
            inputs.append({"path": "from-platform.txt", "uri": plat.file_url(f"inputs/{task_id}"),
                           "sha256": hashlib.sha256(served).hexdigest(), "size": len(served)})
            steps.append("cat from-platform.txt >> result.txt")
            expected_result += served
        steps.append("cp blob.in blob.bin")
        steps.append(f"echo out-{task_id}")
        steps.append(f"touch {self.ends}/{task_id}")
        steps.append(f"exit {exit_code}")
        command = "; ".join(steps)
        stdout = f"out-{task_id}\n".encode()
        if hold_output:
            self.hold_server.hold(task_id)
            outputs = [{"path": "result.txt", "uri": self.hold_server.output_url(task_id)}]
            checks = [("result.txt (held PUT)", lambda: self.hold_server.stored.get(task_id), expected_result)]
        else:
            outputs = [{"path": "result.txt", "uri": plat.file_url(f"{task_id}/result.txt")}]
            checks = [("result.txt", self._stored(f"{task_id}/result.txt"), expected_result)]
        outputs += [
            {"path": "blob.bin", "uri": plat.file_url(f"{task_id}/blob.bin")},
            {"path": "stdout", "uri": plat.file_url(f"{task_id}/stdout")},
        ]
        checks += [
            ("blob.bin", self._stored(f"{task_id}/blob.bin"), blob),
            ("stdout", self._stored(f"{task_id}/stdout"), stdout),
        ]
        spec = {"command": command, "inputs": inputs, "outputs": outputs}
        state = "DONE" if exit_code == 0 else "FAILED"
        return task_id, spec, Expect(task_id, (state,), exit_code, checks)

    def _stored(self, path):
        def fetch():
            full = os.path.join(self.plat.files_dir, *path.split("/"))
            try:
                with open(full, "rb") as f:
                    return f.read()
            except OSError:
                return None

        return fetch


# ---------------------------------------------------------------------------
# The verdict.


class Row:
    def __init__(self, scenario, tasks=0, lost=0, duplicated=0, wrong=0, seconds=0.0, details=(), note=""):
        self.scenario = scenario
        self.tasks = tasks
        self.lost = lost
        self.duplicated = duplicated
        self.wrong = wrong
        self.seconds = seconds
        self.details = list(details)
        self.note = note

    @property
    def clean(self):
        return self.lost == 0 and self.duplicated == 0 and self.wrong == 0


RESULTS = []
_TABLE_PATHS = set()


def check(scenario, plat, expectations, factory, agent_last_seq=None, ignore_unknown_prefix=None):
    """
    The verdict on the platform side.

     - lost: a task without a terminal state; or a gap in the seqs the
       platform applied (a message lost for good: the platform would drop
       it as a duplicate if it came later).
     - duplicated: a task that ran more than once, or reached more than one
       terminal state, or a seq applied twice / out of order.
     - wrong: a wrong terminal state or exit code, an output whose bytes
       differ, a task reported without running when it should have run, a
       platform-made state (lost by the agent), a contract violation, or
       a task the platform never submitted.

    @param agent_last_seq: the agent's highest seq (from its outbox), once
        everything is acknowledged: the applied seqs must be exactly 1..it.
    """
    row = Row(scenario, tasks=len(expectations))
    platform = plat.platform
    for e in expectations:
        task = platform.tasks.get(e.task_id)
        runs = factory.runs_of(e.task_id) if factory is not None else None
        if task is None or not task.terminal:
            row.lost += 1
            row.details.append(f"{e.task_id}: lost (state {task.state if task else 'unknown'}; runs {runs})")
            continue
        terminals = [s for s, _ in task.history if s in P.TERMINAL]
        task_seqs = [info.get("seq") for _, info in task.history if info.get("seq") is not None]
        duplicated = []
        sent = plat.recorder.terminal_reports(e.task_id) if hasattr(plat.recorder, "terminal_reports") else []
        if len(terminals) > 1:
            duplicated.append(f"terminal states {terminals}")
        elif len(sent) > 1 + task.repeats:
            duplicated.append(f"the agent reported {len(sent)} terminal states {sent} (repeats asked: {task.repeats})")
        if runs is not None and runs > max(e.runs):
            duplicated.append(f"ran {runs} times")
        if len(set(task_seqs)) != len(task_seqs):
            duplicated.append(f"seqs {task_seqs}")
        if duplicated:
            row.duplicated += 1
            row.details.append(f"{e.task_id}: duplicated: {'; '.join(duplicated)}")
        wrong = []
        info = task.info or {}
        if task.state not in e.states:
            wrong.append(f"state {task.state} (reason {info.get('reason')!r}), expected {'/'.join(e.states)}")
        if info.get("platform"):
            wrong.append(f"terminal state made by the platform: {info.get('reason')}")
        if e.check_exit and task.state in e.states and info.get("exitCode") != e.exit_code:
            wrong.append(f"exitCode {info.get('exitCode')!r}, expected {e.exit_code!r} (reason {info.get('reason')!r})")
        if runs is not None and runs < min(e.runs):
            wrong.append(f"ran {runs} times, expected {e.runs}")
        if task.state == "DONE" or (e.states == ("FAILED",) and e.exit_code is not None):
            for label, fetch, expected in e.outputs:
                actual = fetch()
                if actual != expected:
                    shown = "missing" if actual is None else (
                        f"{len(actual)} bytes, sha256 {hashlib.sha256(actual).hexdigest()[:12]}")
                    wrong.append(f"output {label}: {shown}, expected {len(expected)} bytes")
        if wrong:
            row.wrong += 1
            row.details.append(f"{e.task_id}: wrong: {'; '.join(wrong)}")
    # Tasks the platform never submitted.
    for task in platform.tasks.values():
        if task.unknown and not (ignore_unknown_prefix and task.task_id.startswith(ignore_unknown_prefix)):
            row.wrong += 1
            row.details.append(f"{task.task_id}: reported by the agent but never submitted")
    violations = plat.all_violations
    if ignore_unknown_prefix:
        # Tasks sent raw (not through the platform's API) may be submitted
        # twice without the platform knowing: their repeated state is fine.
        violations = [v for v in violations if not (
            str(v.get("taskId", "")).startswith(ignore_unknown_prefix)
            and getattr(platform.tasks.get(v.get("taskId")), "unknown", False))]
    if violations:
        row.wrong += len(violations)
        row.details.append(f"contract violations: {violations[:5]}")
    # The seq rule.
    applied = plat.recorder.applied
    repeats = sum(1 for a, b in zip(applied, applied[1:]) if b <= a)
    if repeats:
        row.duplicated += repeats
        row.details.append(f"seqs applied out of order or twice: {applied}")
    gaps = [(a, b) for a, b in zip(applied, applied[1:]) if b > a + 1]
    if applied and applied[0] != 1:
        gaps.insert(0, (0, applied[0]))
    if agent_last_seq is not None and (applied[-1] if applied else 0) != agent_last_seq:
        gaps.append((applied[-1] if applied else 0, agent_last_seq + 1))
    if gaps:
        row.lost += len(gaps)
        row.details.append(f"seq gaps (last applied, next applied): {gaps[:10]}; agent's last seq {agent_last_seq}")
    return row


def record(row):
    RESULTS.append(row)
    path = os.path.abspath("fault-table.txt")
    _TABLE_PATHS.add(path)
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(format_table(RESULTS))
    except OSError:
        pass


def format_table(rows):
    header = ("scenario", "tasks", "lost", "duplicated", "wrong", "seconds")
    body = [(r.scenario, str(r.tasks), str(r.lost), str(r.duplicated), str(r.wrong), f"{r.seconds:.1f}")
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)] if body else [len(h) for h in header]
    line = lambda cells: " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(header), "-+-".join("-" * w for w in widths)]
    out += [line(cells) for cells in body]
    totals = [sum(getattr(r, k) for r in rows) for k in ("tasks", "lost", "duplicated", "wrong")]
    out.append("-+-".join("-" * w for w in widths))
    out.append(line(("total",) + tuple(str(t) for t in totals) + (f"{sum(r.seconds for r in rows):.1f}",)))
    notes = [f"  {r.scenario}: {d}" for r in rows for d in r.details[:8] if not r.clean]
    notes += [f"  {r.scenario}: {r.note}" for r in rows if r.note]
    if notes:
        out.append("")
        out.append("details:")
        out += notes
    return "\n".join(out) + "\n"


@atexit.register
def _print_table():
    if RESULTS:
        sys.stdout.write("\n\nFault-injection table (issue 5)\n" + format_table(RESULTS))
        for path in sorted(_TABLE_PATHS):
            sys.stdout.write(f"(also in {path})\n")
        sys.stdout.flush()


# ---------------------------------------------------------------------------
# SLURM.


def slurm_problem():
    """Why the SLURM scenarios cannot run here, or None."""
    from tests.test_slurm import REAL_SLURM_PROBLEM

    return REAL_SLURM_PROBLEM


SCHEDULER_WRAPPER = """#!/bin/sh
# Stand-in for {name}: fails, hangs or lies as {control}/{name} says, else runs the real one.
echo "$$ {name} $*" >> {control}/calls.log
mode=$(cat {control}/{name} 2>/dev/null)
case "$mode" in
  fail) echo "{name}: error: Unable to contact slurm controller (connect failure)" >&2; exit 1 ;;
  hang) exec sleep 600 ;;
  lie) {real} "$@" > /dev/null 2>&1; echo "{name}: error: Socket timed out on send/recv operation" >&2; exit 1 ;;
esac
exec {real} "$@"
"""


def make_scheduler_wrappers(directory, control, names=("sbatch", "squeue", "sacct", "scancel", "sinfo")):
    """A directory for the front of PATH with controllable SLURM commands."""
    os.makedirs(directory, exist_ok=True)
    os.makedirs(control, exist_ok=True)
    for name in names:
        real = shutil.which(name)
        if real is None:
            continue
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(SCHEDULER_WRAPPER.format(name=name, real=real, control=control))
        os.chmod(path, 0o755)
    return directory


def scancel_prefix(prefix):
    """Cancel every SLURM job whose name starts with C{prefix}."""
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return
    rows = [line.split() for line in out.splitlines()]
    ids = [row[0] for row in rows if len(row) == 2 and row[1].startswith(prefix)]
    if ids:
        subprocess.run(["scancel"] + ids, capture_output=True, timeout=20)


def qdel_prefix(prefix, sge_bin):
    """Delete every Grid Engine job whose name (C{e} + task id) starts with C{e} + C{prefix}."""
    try:
        out = subprocess.run([os.path.join(sge_bin, "qstat")], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return
    rows = [line.split() for line in out.splitlines()[2:]]
    ids = [row[0] for row in rows if len(row) > 2 and row[2].startswith("e" + prefix)]
    if ids:
        subprocess.run([os.path.join(sge_bin, "qdel"), "-f"] + ids, capture_output=True, timeout=20)


def unique_prefix():
    return "f" + uuid.uuid4().hex[:5]
