"""
The stager against real loopback HTTP servers: a Twisted web server in the
test process whose every answer can be scripted (errors, cut or stalled
bodies, held responses), and nginx when it is installed.

Retry delays are timed with a L{StepClock} (a Clock that says when a delay
is scheduled), so no test waits for a backoff; only the stall watchdog test
uses real time (a fraction of a second).
"""

import base64
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
from types import SimpleNamespace
from urllib.parse import unquote

from twisted.internet import defer, reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server

from everest_agent.fsio import reactor_thread_guard
from everest_agent.transfer import fastpath, producer as producing, sink
from everest_agent.transfer.errors import StagingError
from everest_agent.transfer.stager import Stager
from everest_agent.transfer.urls import same_origin

PLATFORM_TOKEN = "secret-token"


def sha(data):
    return hashlib.sha256(data).hexdigest()


def payload(n, seed=b"x"):
    """n pseudo-random bytes (deterministic)."""
    out = bytearray()
    block = hashlib.sha256(seed).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


class StepClock(Clock):
    """A Clock that tells when a delay shorter than a bound is scheduled."""

    def __init__(self):
        super().__init__()
        self._watchers = []
        self.delays = []

    def callLater(self, delay, f, *args, **kwargs):
        call = super().callLater(delay, f, *args, **kwargs)
        for watcher in list(self._watchers):
            bound, d = watcher
            if delay < bound:
                self.delays.append(delay)
                self._watchers.remove(watcher)
                d.callback(delay)
        return call

    def next_delay(self, shorter_than=100):
        d = Deferred()
        self._watchers.append((shorter_than, d))
        return d

    async def drive(self, d, shorter_than=100):
        """Advance through every (short) delay scheduled until C{d} fires."""
        finished = Deferred()

        def fired(result):
            # Not from inside d's callbacks: the caller may await d next.
            reactor.callLater(0, finished.callback, None)
            return result

        d.addBoth(fired)
        delays = []
        while not d.called:
            watcher = (shorter_than, Deferred())
            self._watchers.append(watcher)
            await defer.DeferredList([watcher[1], finished], fireOnOneCallback=True)
            if watcher[1].called:
                delays.append(watcher[1].result)
                self.advance(watcher[1].result)
            else:
                self._watchers.remove(watcher)
        return delays


class Req:
    def __init__(self, request):
        self.method = request.method.decode()
        self.uri = request.uri.decode("latin-1")
        self.path = unquote(request.path.decode("latin-1"))
        self.headers = {k.decode().lower(): b",".join(v).decode("latin-1")
                        for k, v in request.requestHeaders.getAllRawHeaders()}


class FileServer(resource.Resource):
    """
    Serves C{files} (GET, with Range support) and stores PUT bodies in
    C{uploads}.  C{plans[path]} scripts successive answers for a path:
    "ok", an int status, "drop" (close without answering), ("cut", n),
    ("stall", n), ("hold", Deferred),
    ("redirect", url), ("retry-after", status, seconds), "norange".
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.files = {}
        self.plans = {}
        self.requests = []
        self.uploads = {}
        self.etag = b'"v1"'
        self._arrivals = []

    def count(self, method=None, path=None):
        return sum(
            1 for r in self.requests
            if (method is None or r.method == method) and (path is None or r.path == path)
        )

    def arrived(self, n):
        """A Deferred that fires once C{n} requests have arrived."""
        d = Deferred()
        self._arrivals.append((n, d))
        self._notify()
        return d

    def _notify(self):
        for n, d in list(self._arrivals):
            if len(self.requests) >= n:
                self._arrivals.remove((n, d))
                reactor.callLater(0, d.callback, None)

    def render(self, request):
        self.requests.append(Req(request))
        self._notify()
        path = unquote(request.path.decode("latin-1"))
        plan = self.plans.get(path)
        action = plan.pop(0) if plan else "ok"
        if isinstance(action, int):
            request.setResponseCode(action)
            return b"no\n"
        if action == "drop":  # as a proxy whose backend is down
            request.transport.abortConnection()
            return server.NOT_DONE_YET
        if isinstance(action, tuple) and action[0] == "redirect":
            request.setResponseCode(302)
            request.setHeader(b"location", action[1].encode())
            return b""
        if isinstance(action, tuple) and action[0] == "retry-after":
            request.setResponseCode(action[1])
            request.setHeader(b"retry-after", str(action[2]).encode())
            return b""
        if request.method == b"PUT" and isinstance(action, tuple) and action[0] == "hold":
            return server.NOT_DONE_YET  # never answers
        if request.method == b"PUT":
            self.uploads[path] = request.content.read()
            request.setResponseCode(201)
            return b""
        if path not in self.files and isinstance(action, tuple) and action[0] == "hold":
            def refuse(_):  # held, then not found
                if not request.finished and not request._disconnected:
                    request.setResponseCode(404)
                    request.finish()
            action[1].addCallback(refuse)
            return server.NOT_DONE_YET
        if path not in self.files:
            request.setResponseCode(404)
            return b"not found\n"
        data = self.files[path]
        body = self._ranged(request, data, allow_range=action != "norange")
        if isinstance(action, tuple) and action[0] == "cut":
            request.write(body[: action[1]])
            # Close once what was written is sent (a registered producer
            # would otherwise keep the connection open).
            request.transport.unregisterProducer()
            request.transport.loseConnection()
            return server.NOT_DONE_YET
        if isinstance(action, tuple) and action[0] == "stall":
            request.write(body[: action[1]])
            return server.NOT_DONE_YET
        if isinstance(action, tuple) and action[0] == "hold":
            def release(_):
                if not request.finished and not request._disconnected:
                    request.write(body)
                    request.finish()
            action[1].addCallback(release)
            return server.NOT_DONE_YET
        return body

    def _ranged(self, request, data, allow_range):
        request.setHeader(b"etag", self.etag)
        start = 0
        if allow_range:
            request.setHeader(b"accept-ranges", b"bytes")
            wanted = request.getHeader(b"range")
            if_range = request.getHeader(b"if-range")
            if wanted and wanted.startswith(b"bytes=") and if_range in (None, self.etag):
                start = int(wanted[6:].split(b"-")[0])
                if start >= len(data):
                    request.setResponseCode(416)
                    request.setHeader(b"content-length", b"0")
                    return b""
                request.setResponseCode(206)
                request.setHeader(b"content-range", f"bytes {start}-{len(data) - 1}/{len(data)}".encode())
        body = data[start:]
        request.setHeader(b"content-length", str(len(body)).encode())
        return body


class TrackingSite(server.Site):
    """A Site that knows its open connections, to close them after a test."""

    def __init__(self, root):
        super().__init__(root)
        self.timeOut = None
        self.open = set()
        self._gone = []

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        original = protocol.connectionLost

        def connectionLost(reason):
            self.open.discard(protocol)
            original(reason)
            if not self.open:
                waiters, self._gone = self._gone, []
                for d in waiters:
                    d.callback(None)

        protocol.connectionLost = connectionLost
        self.open.add(protocol)
        return protocol

    def close_all(self):
        if not self.open:
            return defer.succeed(None)
        d = Deferred()
        self._gone.append(d)
        for protocol in list(self.open):
            channel = getattr(protocol, "_channel", protocol)
            channel.transport.abortConnection()
        return d


def serve(test, root):
    site = TrackingSite(root)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")

    async def cleanup():
        await site.close_all()
        await port.stopListening()

    test.addCleanup(lambda: defer.ensureDeferred(cleanup()))
    return f"http://127.0.0.1:{port.getHost().port}"


class StagingTests(TestCase):
    timeout = 30

    def setUp(self):
        self.server = FileServer()
        self.base = serve(self, self.server)
        self.platform_url = self.base.replace("http://", "ws://") + "/agent/v1"

    def stager(self, **kwargs):
        # With a fake clock, the watchdogs never fire unless a test says so.
        fake = isinstance(kwargs.get("clock"), Clock)
        kwargs.setdefault("timeout", 1000.0 if fake else 30.0)
        kwargs.setdefault("stall_timeout", 1000.0 if fake else 30.0)
        kwargs.setdefault("retries", 3)
        kwargs.setdefault("retry_initial_delay", 1.0)
        kwargs.setdefault("retry_max_delay", 60.0)
        if kwargs.get("cache_dir") is True:
            kwargs["cache_dir"] = os.path.abspath(self.mktemp())
            kwargs.setdefault("cache_size", 1 << 30)
        stager = Stager.with_client(
            reactor, kwargs.pop("platform_url", self.platform_url), kwargs.pop("token", PLATFORM_TOKEN),
            **kwargs,
        )
        self.addCleanup(stager.close)
        return stager

    def first_bytes(self):
        """A Deferred that fires when a download's body starts arriving."""
        d = Deferred()
        original = sink.BodyReceiver.dataReceived

        def dataReceived(receiver, data):
            original(receiver, data)
            if not d.called:
                d.callback(None)

        self.patch(sink.BodyReceiver, "dataReceived", dataReceived)
        return d

    def task_dir(self):
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        return d

    def put(self, path, data):
        self.server.files[path] = data
        return self.base + path

    def assertNoPartials(self, directory):
        leftovers = [
            os.path.join(top, name)
            for top, _, names in os.walk(directory) for name in names if name.endswith(".part")
        ]
        self.assertEqual(leftovers, [])

    async def assertStagingFails(self, d, *fragments):
        try:
            await d
        except StagingError as e:
            for fragment in fragments:
                self.assertIn(fragment, str(e))
            return str(e)
        self.fail("stage_in did not fail")

    # -- plain downloads --------------------------------------------------------

    async def test_download(self):
        data = payload(3 << 20)
        uri = self.put("/files/in.dat", data)
        task = self.task_dir()
        await self.stager().stage_in(task, [{"path": "sub/in.dat", "uri": uri, "size": len(data), "sha256": sha(data)}])
        with open(os.path.join(task, "sub/in.dat"), "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertNoPartials(task)

    async def test_checksum_mismatch(self):
        for cache in (None, True):
            data = payload(100000)
            uri = self.put("/files/bad.dat", data)
            task = self.task_dir()
            stager = self.stager(cache_dir=cache)
            reason = await self.assertStagingFails(
                stager.stage_in(task, [{"path": "bad.dat", "uri": uri, "sha256": sha(b"other")}]),
                "input 'bad.dat'", "checksum mismatch", sha(b"other"), sha(data),
            )
            self.assertNotIn("gave up", reason)
            self.assertFalse(os.path.exists(os.path.join(task, "bad.dat")))
            self.assertNoPartials(task)
            if cache:
                self.assertEqual(len(stager.cache), 0)
                self.assertEqual(os.listdir(stager.cache.tmp_dir), [])

    async def test_size_mismatch_announced(self):
        data = payload(5000)
        uri = self.put("/files/s.dat", data)
        task = self.task_dir()
        await self.assertStagingFails(
            self.stager().stage_in(task, [{"path": "s.dat", "uri": uri, "size": 4000}]),
            "input 's.dat'", "size mismatch", "4000", "5000",
        )
        self.assertNoPartials(task)
        self.assertEqual(self.server.count("GET"), 1)

    async def test_size_mismatch_short_body(self):
        data = payload(5000)
        uri = self.put("/files/s.dat", data)
        task = self.task_dir()
        await self.assertStagingFails(
            self.stager().stage_in(task, [{"path": "s.dat", "uri": uri, "size": 6000}]),
            "input 's.dat'", "size mismatch",
        )
        self.assertFalse(os.path.exists(os.path.join(task, "s.dat")))
        self.assertNoPartials(task)

    async def test_404_fails_at_once(self):
        clock = StepClock()
        task = self.task_dir()
        await self.assertStagingFails(
            self.stager(clock=clock).stage_in(task, [{"path": "data/missing.txt", "uri": self.base + "/files/missing.txt"}]),
            "input 'data/missing.txt'", "HTTP 404", "/files/missing.txt",
        )
        self.assertEqual(self.server.count("GET"), 1)
        self.assertEqual(clock.delays, [])
        self.assertNoPartials(task)

    async def test_500_then_success(self):
        data = payload(70000)
        uri = self.put("/files/flaky.dat", data)
        self.server.plans["/files/flaky.dat"] = [500, 503]
        clock = StepClock()
        stager = self.stager(clock=clock, retry_initial_delay=2.0)
        task = self.task_dir()
        d = defer.ensureDeferred(stager.stage_in(task, [{"path": "flaky.dat", "uri": uri, "sha256": sha(data)}]))
        first = await clock.next_delay()
        self.assertTrue(1.0 <= first <= 2.0, first)  # 2 s, jitter in its upper half
        self.assertFalse(d.called)
        clock.advance(first)
        second = await clock.next_delay()
        self.assertTrue(2.0 <= second <= 4.0, second)  # doubled
        clock.advance(second)
        await d
        self.assertEqual(self.server.count("GET"), 3)
        with open(os.path.join(task, "flaky.dat"), "rb") as f:
            self.assertEqual(f.read(), data)

    async def test_retry_after_honoured(self):
        data = payload(1000)
        uri = self.put("/files/busy.dat", data)
        self.server.plans["/files/busy.dat"] = [("retry-after", 429, 7)]
        clock = StepClock()
        stager = self.stager(clock=clock, retry_initial_delay=0.5)
        d = defer.ensureDeferred(stager.stage_in(self.task_dir(), [{"path": "busy.dat", "uri": uri}]))
        delay = await clock.next_delay()
        self.assertEqual(delay, 7)
        clock.advance(delay)
        await d

    async def test_retries_exhausted(self):
        uri = self.put("/files/down.dat", b"x")
        self.server.plans["/files/down.dat"] = [500, 500, 500, 500]
        clock = StepClock()
        stager = self.stager(clock=clock, retries=2)
        d = defer.ensureDeferred(stager.stage_in(self.task_dir(), [{"path": "down.dat", "uri": uri}]))
        for _ in range(2):
            clock.advance(await clock.next_delay())
        await self.assertStagingFails(d, "input 'down.dat'", "HTTP 500", "gave up after 3 attempts")
        self.assertEqual(self.server.count("GET"), 3)

    async def test_connection_refused_is_retried(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        clock = StepClock()
        stager = self.stager(clock=clock, retries=1)
        d = defer.ensureDeferred(
            stager.stage_in(self.task_dir(), [{"path": "x", "uri": f"http://127.0.0.1:{port}/x"}])
        )
        clock.advance(await clock.next_delay())
        await self.assertStagingFails(d, "input 'x'", "refused", "gave up after 2 attempts")

    async def test_cut_body_resumed_with_range(self):
        data = payload(600000)
        uri = self.put("/files/big.dat", data)
        self.server.plans["/files/big.dat"] = [("cut", 250000)]
        clock = StepClock()
        stager = self.stager(clock=clock)
        task = self.task_dir()
        d = defer.ensureDeferred(stager.stage_in(task, [{"path": "big.dat", "uri": uri, "sha256": sha(data), "size": len(data)}]))
        clock.advance(await clock.next_delay())
        await d
        with open(os.path.join(task, "big.dat"), "rb") as f:
            self.assertEqual(f.read(), data)
        first, second = self.server.requests
        self.assertNotIn("range", first.headers)
        self.assertEqual(second.headers["range"], "bytes=250000-")
        self.assertEqual(second.headers["if-range"], '"v1"')
        self.assertEqual(stager.bytes_in, len(data))

    async def test_cut_body_restarts_without_range_support(self):
        data = payload(300000)
        uri = self.put("/files/big.dat", data)
        self.server.plans["/files/big.dat"] = [("cut", 100000)]
        # No answer says anything about ranges: no resume, a fresh start.
        original = self.server._ranged
        self.server._ranged = lambda request, data, allow_range: original(request, data, False)
        clock = StepClock()
        stager = self.stager(clock=clock)
        task = self.task_dir()
        d = defer.ensureDeferred(stager.stage_in(task, [{"path": "big.dat", "uri": uri, "sha256": sha(data)}]))
        clock.advance(await clock.next_delay())
        await d
        self.assertNotIn("range", self.server.requests[1].headers)
        with open(os.path.join(task, "big.dat"), "rb") as f:
            self.assertEqual(f.read(), data)

    async def test_range_ignored_starts_over(self):
        data = payload(300000)
        uri = self.put("/files/big.dat", data)
        self.server.plans["/files/big.dat"] = [("cut", 100000), "norange"]
        clock = StepClock()
        stager = self.stager(clock=clock)
        task = self.task_dir()
        d = defer.ensureDeferred(stager.stage_in(task, [{"path": "big.dat", "uri": uri, "sha256": sha(data)}]))
        clock.advance(await clock.next_delay())
        await d
        self.assertEqual(self.server.requests[1].headers["range"], "bytes=100000-")
        with open(os.path.join(task, "big.dat"), "rb") as f:
            self.assertEqual(f.read(), data)

    async def test_stalled_body_watchdog(self):
        """Real time: the body stalls; the watchdog (0.2 s) ends the attempt."""
        data = payload(200000)
        uri = self.put("/files/slow.dat", data)
        self.server.plans["/files/slow.dat"] = [("stall", 1000)]
        stager = self.stager(stall_timeout=0.2, retries=0)
        task = self.task_dir()
        start = reactor.seconds()
        await self.assertStagingFails(
            stager.stage_in(task, [{"path": "slow.dat", "uri": uri}]),
            "input 'slow.dat'", "no data for 0.2 s", "gave up after 1 attempts",
        )
        self.assertLess(reactor.seconds() - start, 1.0)
        self.assertNoPartials(task)
        self.assertEqual(os.listdir(task), [])

    async def test_stalled_body_resumed(self):
        """Real time: two stalls, each resumed where it stopped."""
        data = payload(200000)
        uri = self.put("/files/slow.dat", data)
        self.server.plans["/files/slow.dat"] = [("stall", 50000), ("stall", 10)]
        stager = self.stager(stall_timeout=0.15, retries=1, retry_initial_delay=0.01)
        task = self.task_dir()
        start = reactor.seconds()
        await stager.stage_in(task, [{"path": "slow.dat", "uri": uri, "sha256": sha(data)}])
        self.assertLess(reactor.seconds() - start, 1.0)
        # One retry allowed, but each attempt brought bytes: the count restarts.
        self.assertEqual(len(self.server.requests), 3)
        self.assertEqual(self.server.requests[1].headers["range"], "bytes=50000-")
        self.assertEqual(self.server.requests[2].headers["range"], "bytes=50010-")
        with open(os.path.join(task, "slow.dat"), "rb") as f:
            self.assertEqual(f.read(), data)

    async def test_stalled_headers_timeout(self):
        other = FileServer()
        other_base = serve(self, other)
        other.files["/never.dat"] = b"x"
        other.plans["/never.dat"] = [("hold", Deferred())]
        clock = StepClock()
        stager = self.stager(clock=clock, timeout=5.0, retries=0)
        d = defer.ensureDeferred(stager.stage_in(self.task_dir(), [{"path": "never.dat", "uri": other_base + "/never.dat"}]))
        await other.arrived(1)
        clock.advance(5.0)
        await self.assertStagingFails(d, "no answer within 5 s")

    async def test_unreachable_platform_is_waited_for(self):
        """
        The platform's own file server cannot be reached (it restarts): the
        transfers keep trying beyond the retries until it is back, while
        another server's would fail.
        """
        data = payload(1000)
        uri = self.put("/files/in.dat", data)
        self.server.plans["/files/in.dat"] = ["drop", 503, "drop", 502, "drop", 504, "drop"]
        self.server.plans["/up/out.dat"] = ["drop", 503, "drop", 504, "drop", "drop"]
        clock = StepClock()
        stager = self.stager(clock=clock, retries=1, retry_initial_delay=1.0, retry_max_delay=8.0)
        task = self.task_dir()
        d = defer.ensureDeferred(stager.stage_in(task, [{"path": "in.dat", "uri": uri, "sha256": sha(data)}]))
        delays = await clock.drive(d)
        await d
        self.assertGreater(len(delays), 2)  # more than retries=1 allows
        self.assertTrue(all(x <= 8.0 for x in delays), delays)
        out = defer.ensureDeferred(stager.stage_out(task, [{"path": "in.dat", "uri": self.base + "/up/out.dat"}]))
        delays = await clock.drive(out)
        uploaded, errors = await out
        self.assertGreater(len(delays), 2)
        self.assertEqual(errors, [])
        self.assertEqual(self.server.uploads["/up/out.dat"], data)
        # A platform that answers with an error is not waited for.
        self.server.plans["/files/in.dat"] = [500, 500, 500]
        d = defer.ensureDeferred(stager.stage_in(self.task_dir(), [{"path": "in.dat", "uri": uri}]))
        self.assertEqual(len(await clock.drive(d)), 1)
        await self.assertStagingFails(d, "HTTP 500", "gave up after 2 attempts")
        # Nor is another server that cannot be reached.
        other = FileServer()
        other_base = serve(self, other)
        other.files["/x"] = b"x"
        other.plans["/x"] = ["drop"] * 6
        d = defer.ensureDeferred(stager.stage_in(self.task_dir(), [{"path": "x", "uri": other_base + "/x"}]))
        await clock.drive(d)
        await self.assertStagingFails(d, "gave up after 2 attempts")

    # -- the cache ------------------------------------------------------------------

    async def test_cache_hit_across_tasks(self):
        data = payload(200000)
        uri = self.put("/files/shared.dat", data)
        stager = self.stager(cache_dir=True)
        item = {"path": "shared.dat", "uri": uri, "sha256": sha(data), "size": len(data)}
        one, two = self.task_dir(), self.task_dir()
        await stager.stage_in(one, [item])
        await stager.stage_in(two, [item])
        self.assertEqual(self.server.count("GET"), 1)
        a, b = (os.stat(os.path.join(t, "shared.dat")) for t in (one, two))
        self.assertEqual((a.st_ino, a.st_dev), (b.st_ino, b.st_dev))  # hard links
        self.assertEqual(a.st_mode & 0o777, 0o444)
        # The executable variant: its own (local) copy, not a second download.
        three = self.task_dir()
        await stager.stage_in(three, [dict(item, executable=True)])
        c = os.stat(os.path.join(three, "shared.dat"))
        self.assertEqual(c.st_mode & 0o777, 0o555)
        self.assertNotEqual(c.st_ino, a.st_ino)
        self.assertEqual(self.server.count("GET"), 1)
        with open(os.path.join(three, "shared.dat"), "rb") as f:
            self.assertEqual(f.read(), data)

    async def test_concurrent_requests_one_fetch(self):
        data = payload(300000)
        uri = self.put("/files/shared.dat", data)
        release = Deferred()
        self.server.plans["/files/shared.dat"] = [("hold", release)]
        stager = self.stager(cache_dir=True)
        tasks = [self.task_dir() for _ in range(4)]
        items = [{"path": "in/shared.dat", "uri": uri, "sha256": sha(data), "executable": i == 3} for i in range(4)]
        ds = [defer.ensureDeferred(stager.stage_in(t, [item])) for t, item in zip(tasks, items)]
        await self.server.arrived(1)
        self.assertFalse(any(d.called for d in ds))
        release.callback(None)
        await defer.gatherResults(ds)
        self.assertEqual(self.server.count("GET"), 1)
        for t in tasks:
            with open(os.path.join(t, "in/shared.dat"), "rb") as f:
                self.assertEqual(f.read(), data)

    async def test_cancelled_waiter_leaves_the_fetch_to_others(self):
        data = payload(100000)
        uri = self.put("/files/shared.dat", data)
        release = Deferred()
        self.server.plans["/files/shared.dat"] = [("hold", release)]
        stager = self.stager(cache_dir=True)
        item = {"path": "shared.dat", "uri": uri, "sha256": sha(data)}
        first, second = self.task_dir(), self.task_dir()
        d1 = defer.ensureDeferred(stager.stage_in(first, [item]))
        d2 = defer.ensureDeferred(stager.stage_in(second, [item]))
        await self.server.arrived(1)
        d1.cancel()  # the task that started the download goes away
        self.failureResultOf(d1, CancelledError)
        release.callback(None)
        await d2
        self.assertEqual(self.server.count("GET"), 1)
        self.assertFalse(os.path.exists(os.path.join(first, "shared.dat")))

    async def test_all_waiters_cancelled_cancels_the_fetch(self):
        data = payload(100000)
        uri = self.put("/files/shared.dat", data)
        self.server.plans["/files/shared.dat"] = [("stall", 1000)]
        stager = self.stager(cache_dir=True)
        item = {"path": "shared.dat", "uri": uri, "sha256": sha(data)}
        arriving = self.first_bytes()
        ds = [defer.ensureDeferred(stager.stage_in(self.task_dir(), [item])) for _ in range(2)]
        await arriving
        (job,) = stager._cached.jobs.values()
        for d in ds:
            d.cancel()
        for d in ds:
            self.failureResultOf(d, CancelledError)
        self.assertEqual(stager._cached.jobs, {})
        # A task that comes now starts a fresh download, not waiting for the
        # abandoned one to clean up.
        later = self.task_dir()
        await stager.stage_in(later, [item])
        with open(os.path.join(later, "shared.dat"), "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(self.server.count("GET"), 2)
        await job._d  # the abandoned download cleans up, then ends
        self.assertEqual(os.listdir(stager.cache.tmp_dir), [])
        self.assertEqual(stager.limiter.active, 0)

    async def test_eviction_keeps_tasks_files(self):
        a, b = payload(60000, b"a"), payload(60000, b"b")
        ua, ub = self.put("/files/a", a), self.put("/files/b", b)
        stager = self.stager(cache_dir=True, cache_size=100000)
        one, two = self.task_dir(), self.task_dir()
        await stager.stage_in(one, [{"path": "a", "uri": ua, "sha256": sha(a)}])
        await stager.stage_in(two, [{"path": "b", "uri": ub, "sha256": sha(b)}])
        cache = stager.cache
        self.assertIsNone(cache.get(sha(a), False))  # evicted, least recently used
        self.assertIsNotNone(cache.get(sha(b), False))
        self.assertLessEqual(cache.total, 100000)
        with open(os.path.join(one, "a"), "rb") as f:
            self.assertEqual(f.read(), a)  # the task's hard link survives

    async def test_eviction_never_removes_a_file_in_use(self):
        a, b = payload(60000, b"a"), payload(60000, b"b")
        ua, ub = self.put("/files/a", a), self.put("/files/b", b)
        stager = self.stager(cache_dir=True, cache_size=100000)
        await stager.stage_in(self.task_dir(), [{"path": "a", "uri": ua, "sha256": sha(a)}])
        cache = stager.cache
        entry = cache.get(sha(a), False)
        cache.pin(entry)  # as while a task verifies or links it
        task = self.task_dir()
        await stager.stage_in(task, [{"path": "b", "uri": ub, "sha256": sha(b)}])
        # a is the least recently used, but in use: b, no longer in use
        # once its task has it, is what goes.
        self.assertTrue(os.path.exists(entry.path))
        self.assertIs(cache.get(sha(a), False), entry)
        self.assertIsNone(cache.get(sha(b), False))
        self.assertLessEqual(cache.total, 100000)
        with open(os.path.join(task, "b"), "rb") as f:
            self.assertEqual(f.read(), b)
        cache.unpin(entry)
        self.assertTrue(os.path.exists(entry.path))

    async def test_corrupt_cache_entry_refetched(self):
        data = payload(50000)
        uri = self.put("/files/c.dat", data)
        stager = self.stager(cache_dir=True)
        item = {"path": "c.dat", "uri": uri, "sha256": sha(data)}
        one = self.task_dir()
        await stager.stage_in(one, [item])
        entry = stager.cache.get(sha(data), False)
        path = entry.path
        # A task (running as root, or after chmod) writes to its input.
        os.chmod(path, 0o644)
        with open(path, "r+b") as f:
            f.write(b"garbage")
        two = self.task_dir()
        await stager.stage_in(two, [item])
        self.assertEqual(self.server.count("GET"), 2)
        with open(os.path.join(two, "c.dat"), "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(os.stat(stager.cache.get(sha(data), False).path).st_mode & 0o777, 0o444)

    async def test_cache_and_space_checks_stay_off_the_reactor_thread(self):
        """
        Once its first scan is done, the cache glue, the disk-space checks
        and the clean-up of a failed download look at, touch, rename and
        remove files only in the file-system threads: a networked
        file system that stalls them never holds the reactor.
        """
        data = payload(60000)
        uri = self.put("/files/guarded.dat", data)
        stager = self.stager(cache_dir=True)
        short = self.put("/files/short.dat", payload(5000))
        first, second, third, fourth = (self.task_dir() for _ in range(4))
        await stager._cached_inputs()  # the first scan: a thread of its own
        guard = reactor_thread_guard(SimpleNamespace(inside=False))
        for name in ("lstat", "stat", "statvfs", "utime", "unlink", "replace", "chmod", "rename", "rmdir"):
            self.patch(os, name, guard(getattr(os, name)))
        item = {"path": "g.dat", "uri": uri, "sha256": sha(data), "size": len(data)}
        await stager.stage_in(first, [item])  # fetched into the cache
        await stager.stage_in(second, [item])  # a hit: checked, linked, touched
        await stager.stage_in(third, [dict(item, executable=True)])  # the other mode: a local copy
        # A download that fails after its file was made: removed in a thread.
        failed = defer.ensureDeferred(stager.stage_in(fourth, [{"path": "short.dat", "uri": short, "size": 6000}]))
        await self.assertStagingFails(failed, "input 'short.dat'")
        await stager.close()
        self.assertEqual(os.listdir(fourth), [])
        for task in (first, second, third):
            with open(os.path.join(task, "g.dat"), "rb") as f:
                self.assertEqual(f.read(), data)

    async def test_cache_reopened_entries_are_verified(self):
        data = payload(50000)
        uri = self.put("/files/c.dat", data)
        cache_dir = os.path.abspath(self.mktemp())
        item = {"path": "c.dat", "uri": uri, "sha256": sha(data)}
        first = self.stager(cache_dir=cache_dir, cache_size=1 << 20)
        await first.stage_in(self.task_dir(), [item])
        path = first.cache.get(sha(data), False).path
        # Corrupted behind our back, with its time stamp kept.
        st = os.stat(path)
        with open(path, "r+b") as f:
            f.write(b"X" * 10)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        # An intact entry is used without a download; a corrupt one is refetched.
        second = self.stager(cache_dir=cache_dir, cache_size=1 << 20)
        task = self.task_dir()
        await second.stage_in(task, [item])
        self.assertEqual(self.server.count("GET"), 2)
        third = self.stager(cache_dir=cache_dir, cache_size=1 << 20)
        await third.stage_in(self.task_dir(), [item])
        self.assertEqual(self.server.count("GET"), 2)
        with open(os.path.join(task, "c.dat"), "rb") as f:
            self.assertEqual(f.read(), data)

    async def test_other_uri_tried_when_shared_fetch_fails(self):
        data = payload(10000)
        good = self.put("/files/good", data)
        release = Deferred()
        self.server.plans["/files/bad"] = [("hold", release)]
        stager = self.stager(cache_dir=True)
        d1 = defer.ensureDeferred(stager.stage_in(self.task_dir(), [{"path": "x", "uri": self.base + "/files/bad", "sha256": sha(data)}]))
        await self.server.arrived(1)
        # The second task asks for the same content while the first one's
        # download is in flight, so it waits for that one.
        two = self.task_dir()
        d2 = defer.ensureDeferred(stager.stage_in(two, [{"path": "x", "uri": good, "sha256": sha(data)}]))
        for _ in range(1000):
            (job,) = stager._cached.jobs.values()
            if len(job._waiters) == 2:
                break
            await deferLater(reactor, 0.002)
        self.assertEqual(len(job._waiters), 2)
        release.callback(None)  # /files/bad is not there: 404
        await self.assertStagingFails(d1, "HTTP 404")
        await d2
        with open(os.path.join(two, "x"), "rb") as f:
            self.assertEqual(f.read(), data)

    # -- limits, cancellation ---------------------------------------------------------

    async def test_max_concurrent(self):
        stager = self.stager(max_concurrent=2)
        releases = []
        items = []
        for i in range(4):
            release = Deferred()
            releases.append(release)
            path = f"/files/{i}"
            self.put(path, b"%d" % i)
            self.server.plans[path] = [("hold", release)]
            items.append({"path": f"f{i}", "uri": self.base + path})
        task = self.task_dir()
        d = defer.ensureDeferred(stager.stage_in(task, items))
        await self.server.arrived(2)
        self.assertEqual(stager.limiter.active, 2)
        self.assertEqual(stager.limiter.waiting(), 2)
        self.assertEqual(len(self.server.requests), 2)
        for release in releases[:2]:
            release.callback(None)
        await self.server.arrived(4)
        for release in releases[2:]:
            release.callback(None)
        await d
        self.assertEqual(stager.limiter.active, 0)

    async def test_cancel_removes_partial_files(self):
        data = payload(400000)
        uri = self.put("/files/big.dat", data)
        self.server.plans["/files/big.dat"] = [("stall", 100000)]
        stager = self.stager()
        task = self.task_dir()
        arriving = self.first_bytes()
        d = defer.ensureDeferred(stager.stage_in(task, [{"path": "big.dat", "uri": uri}]))
        await arriving
        self.assertTrue(os.path.exists(os.path.join(task, ".big.dat.part")))
        d.cancel()
        await self.assertFailure(d, CancelledError)  # fires once the partial file is gone
        self.assertEqual(os.listdir(task), [])
        self.assertEqual(stager.limiter.active, 0)

    async def test_first_failure_cancels_other_inputs(self):
        ok = self.put("/files/slow", b"x" * 1000)
        self.server.plans["/files/slow"] = [("stall", 10)]
        stager = self.stager()
        task = self.task_dir()
        d = defer.ensureDeferred(stager.stage_in(task, [
            {"path": "slow", "uri": ok},
            {"path": "missing", "uri": self.base + "/files/missing"},
        ]))
        await self.assertStagingFails(d, "input 'missing'", "HTTP 404")
        self.assertNoPartials(task)
        self.assertEqual(stager.limiter.active, 0)

    # -- disk space -------------------------------------------------------------------

    def small_filesystem(self, size="1m"):
        if os.geteuid() != 0:
            self.skipTest("mounting a small tmpfs needs root")
        where = os.path.abspath(self.mktemp())
        os.makedirs(where)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where],
                                capture_output=True, text=True)
        if result.returncode != 0:
            self.skipTest(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", where], check=False)
        return where

    async def test_not_enough_space_for_known_size(self):
        small = self.small_filesystem()
        task = os.path.join(small, "task")
        os.makedirs(task)
        data = payload(2 << 20)
        uri = self.put("/files/huge", data)
        await self.assertStagingFails(
            self.stager().stage_in(task, [{"path": "huge", "uri": uri, "size": len(data)}]),
            "input 'huge'", "not enough disk space", str(len(data)),
        )
        self.assertEqual(self.server.count("GET"), 0)

    async def test_enospc_while_writing(self):
        small = self.small_filesystem()
        task = os.path.join(small, "task")
        os.makedirs(task)
        data = payload(2 << 20)
        uri = self.put("/files/huge", data)
        stager = self.stager()
        await self.assertStagingFails(
            stager.stage_in(task, [{"path": "huge", "uri": uri}]), "input 'huge'", "disk full",
        )
        self.assertEqual(os.listdir(task), [])
        # The stager goes on working for other tasks.
        elsewhere = self.task_dir()
        await stager.stage_in(elsewhere, [{"path": "huge", "uri": uri, "sha256": sha(data)}])
        self.assertEqual(stager.limiter.active, 0)

    async def test_enospc_in_task_dir_with_cache_elsewhere(self):
        small = self.small_filesystem()
        task = os.path.join(small, "task")
        os.makedirs(task)
        data = payload(2 << 20)
        uri = self.put("/files/huge", data)
        stager = self.stager(cache_dir=True)
        # Fetched into the cache, but it cannot be copied into the task.
        await self.assertStagingFails(
            stager.stage_in(task, [{"path": "huge", "uri": uri, "sha256": sha(data)}]),
            "input 'huge'", "not enough disk space", "2097152 bytes needed",
        )
        self.assertEqual(os.listdir(task), [])
        self.assertEqual(self.server.count("GET"), 1)
        # Known size: refused before anything is fetched or copied.
        other = os.path.join(small, "task2")
        os.makedirs(other)
        await self.assertStagingFails(
            stager.stage_in(other, [{"path": "huge", "uri": uri, "sha256": sha(data), "size": len(data)}]),
            "not enough disk space",
        )

    # -- credentials ------------------------------------------------------------------

    async def test_token_only_to_the_platform_origin(self):
        other = FileServer()
        other_base = serve(self, other)
        other.files["/x"] = b"other"
        self.put("/files/mine", b"mine")
        self.server.plans["/files/jump"] = [("redirect", other_base + "/x")]
        stager = self.stager()
        task = self.task_dir()
        await stager.stage_in(task, [
            {"path": "mine", "uri": self.base + "/files/mine"},
            {"path": "theirs", "uri": other_base + "/x"},
            {"path": "jumped", "uri": self.base + "/files/jump"},
        ])
        await stager.stage_out(task, [{"path": "mine", "uri": self.base + "/up/mine"},
                                      {"path": "mine", "uri": other_base + "/up/mine"}])
        for r in self.server.requests:
            self.assertEqual(r.headers.get("authorization"), f"Bearer {PLATFORM_TOKEN}", r.path)
        self.assertEqual(len(other.requests), 3)
        for r in other.requests:
            self.assertNotIn("authorization", r.headers)
        with open(os.path.join(task, "jumped"), "rb") as f:
            self.assertEqual(f.read(), b"other")

    def test_same_origin(self):
        self.assertTrue(same_origin("wss://p.example/agent", "https://p.example/files/x"))
        self.assertTrue(same_origin("ws://p.example:8080/a", "http://P.EXAMPLE:8080/f"))
        self.assertFalse(same_origin("wss://p.example/agent", "https://p.example:8443/f"))
        self.assertFalse(same_origin("wss://p.example/agent", "https://evil.example/f"))
        self.assertFalse(same_origin("wss://p.example/agent", "https://p.example.evil.example/f"))

    # -- inline data, modes, paths ------------------------------------------------------

    async def test_inline_data_and_executable(self):
        task = self.task_dir()
        script = b"#!/bin/sh\necho hi\n"
        await self.stager().stage_in(task, [
            {"path": "run.sh", "data": base64.b64encode(script).decode(), "executable": True, "sha256": sha(script)},
            {"path": "p/params.txt", "data": base64.b64encode(b"a=1").decode(), "size": 3},
        ])
        with open(os.path.join(task, "run.sh"), "rb") as f:
            self.assertEqual(f.read(), script)
        self.assertTrue(os.stat(os.path.join(task, "run.sh")).st_mode & 0o100)
        self.assertFalse(os.stat(os.path.join(task, "p/params.txt")).st_mode & 0o111)
        await self.assertStagingFails(
            self.stager().stage_in(task, [{"path": "q", "data": base64.b64encode(b"abc").decode(), "size": 4}]),
            "input 'q'", "size mismatch",
        )
        await self.assertStagingFails(
            self.stager().stage_in(task, [{"path": "q", "data": base64.b64encode(b"abc").decode(), "sha256": sha(b"x")}]),
            "checksum mismatch",
        )

    async def test_downloaded_executable(self):
        uri = self.put("/files/tool", b"#!/bin/sh\n")
        task = self.task_dir()
        await self.stager().stage_in(task, [{"path": "tool", "uri": uri, "executable": True},
                                            {"path": "data", "uri": uri}])
        self.assertEqual(os.stat(os.path.join(task, "tool")).st_mode & 0o777, 0o755)
        self.assertEqual(os.stat(os.path.join(task, "data")).st_mode & 0o111, 0)

    async def test_input_path_escapes(self):
        outside = os.path.abspath(self.mktemp())
        os.makedirs(outside)
        uri = self.put("/files/f", b"payload")
        stager = self.stager()
        for path in ("../x", "a/../../x", "/etc/passwd-everest"):
            task = self.task_dir()
            await self.assertStagingFails(stager.stage_in(task, [{"path": path, "uri": uri}]), "outside")
        # A symbolic link planted in the task directory, as a parent directory.
        task = self.task_dir()
        os.symlink(outside, os.path.join(task, "sub"))
        await self.assertStagingFails(stager.stage_in(task, [{"path": "sub/x", "uri": uri}]), "input 'sub/x'", "outside")
        await self.assertStagingFails(stager.stage_in(task, [{"path": "sub/deeper/x", "uri": uri}]), "outside")
        self.assertEqual(os.listdir(outside), [])
        self.assertEqual(self.server.count("GET"), 0)
        # A link at the target itself, and at its temporary name: replaced, not followed.
        victim = os.path.join(outside, "victim")
        with open(victim, "wb") as f:
            f.write(b"precious")
        os.symlink(victim, os.path.join(task, "x"))
        os.symlink(victim, os.path.join(task, ".y.part"))
        await stager.stage_in(task, [{"path": "x", "uri": uri}, {"path": "y", "uri": uri},
                                     {"path": "z", "data": base64.b64encode(b"inline").decode()}])
        with open(victim, "rb") as f:
            self.assertEqual(f.read(), b"precious")
        self.assertFalse(os.path.islink(os.path.join(task, "x")))
        with open(os.path.join(task, "x"), "rb") as f:
            self.assertEqual(f.read(), b"payload")

    async def test_output_path_escapes(self):
        outside = os.path.abspath(self.mktemp())
        os.makedirs(outside)
        with open(os.path.join(outside, "secret"), "wb") as f:
            f.write(b"secret")
        task = self.task_dir()
        os.symlink(os.path.join(outside, "secret"), os.path.join(task, "result.txt"))
        os.makedirs(os.path.join(task, "out"))
        with open(os.path.join(task, "out", "good.dat"), "wb") as f:
            f.write(b"good")
        os.symlink(os.path.join(outside, "secret"), os.path.join(task, "out", "evil.dat"))
        os.symlink(outside, os.path.join(task, "linkdir"))
        stager = self.stager()
        uploaded, errors = await stager.stage_out(task, [
            {"path": "result.txt", "uri": self.base + "/up/result.txt"},
            {"pattern": "out/*.dat", "uri": self.base + "/up/"},
            {"pattern": "linkdir/*", "uri": self.base + "/up/"},
            {"path": "linkdir/secret", "uri": self.base + "/up/ld"},
        ])
        self.assertEqual([u["path"] for u in uploaded], ["out/good.dat"])
        self.assertEqual(len(errors), 4, errors)
        self.assertIn("output 'result.txt' leads outside", errors[0])
        self.assertTrue(all("outside" in e for e in errors), errors)
        self.assertEqual(list(self.server.uploads), ["/up/out/good.dat"])

    async def test_output_patterns_quoted(self):
        task = self.task_dir()
        names = ["out/a b.dat", "out/c#1.dat", "out/ü?.dat", "out/sub/d.dat", "out/.hidden.dat", "out/e.txt"]
        for name in names:
            os.makedirs(os.path.dirname(os.path.join(task, name)), exist_ok=True)
            with open(os.path.join(task, name), "wb") as f:
                f.write(name.encode())
        stager = self.stager()
        uploaded, errors = await stager.stage_out(task, [
            {"pattern": "out/*.dat", "uri": self.base + "/up/j1"},
            {"pattern": "out/**/d.dat", "uri": self.base + "/deep/"},
        ])
        self.assertEqual(errors, [])
        self.assertEqual(
            sorted(r.uri for r in self.server.requests),
            sorted(["/up/j1/out/a%20b.dat", "/up/j1/out/c%231.dat", "/up/j1/out/%C3%BC%3F.dat",
                    "/deep/out/sub/d.dat"]),
        )
        self.assertEqual(self.server.uploads["/up/j1/out/a b.dat"], b"out/a b.dat")
        self.assertEqual(
            [u["path"] for u in uploaded], ["out/a b.dat", "out/c#1.dat", "out/ü?.dat", "out/sub/d.dat"]
        )

    async def test_optional_and_required_missing_outputs(self):
        task = self.task_dir()
        with open(os.path.join(task, "present"), "wb") as f:
            f.write(b"here")
        uploaded, errors = await self.stager().stage_out(task, [
            {"path": "present", "uri": self.base + "/up/present"},
            {"path": "stdout", "uri": self.base + "/up/stdout", "optional": True},
            {"path": "result.txt", "uri": self.base + "/up/result.txt"},
            {"pattern": "none/*", "uri": self.base + "/up/"},
        ])
        self.assertEqual(uploaded, [{"path": "present", "size": 4, "sha256": sha(b"here")}])
        self.assertEqual(errors, ["output 'result.txt' is missing"])

    # -- uploads ----------------------------------------------------------------------------

    async def test_upload_reports_size_and_sha256(self):
        task = self.task_dir()
        # Several blocks, the last one short.
        data = payload(3 * producing.READ_SIZE + 12345)
        with open(os.path.join(task, "big"), "wb") as f:
            f.write(data)
        open(os.path.join(task, "empty"), "wb").close()
        stager = self.stager()
        uploaded, errors = await stager.stage_out(task, [
            {"path": "big", "uri": self.base + "/up/big"},
            {"path": "empty", "uri": self.base + "/up/empty"},
        ])
        self.assertEqual(errors, [])
        self.assertEqual(uploaded, [
            {"path": "big", "size": len(data), "sha256": sha(data)},
            {"path": "empty", "size": 0, "sha256": sha(b"")},
        ])
        self.assertEqual(self.server.uploads["/up/big"], data)
        self.assertEqual(self.server.uploads["/up/empty"], b"")
        self.assertEqual(stager.bytes_out, len(data))

    async def test_upload_tunes_its_tcp_transport(self):
        # The body goes through Twisted's own TCP transport, tuned to send
        # whole blocks (see UploadProducerTests for what that buys).
        seen = []
        original = fastpath.tune_upload

        def spy(consumer, block):
            seen.append(fastpath.upload_transport(consumer))
            return original(consumer, block)

        self.patch(fastpath, "tune_upload", spy)
        task = self.task_dir()
        data = payload(2 * producing.READ_SIZE + 1)
        with open(os.path.join(task, "out"), "wb") as f:
            f.write(data)
        uploaded, errors = await self.stager().stage_out(task, [{"path": "out", "uri": self.base + "/up/out"}])
        self.assertEqual((errors, uploaded), ([], [{"path": "out", "size": len(data), "sha256": sha(data)}]))
        self.assertEqual(self.server.uploads["/up/out"], data)
        self.assertEqual(len(seen), 1)
        self.assertIsInstance(seen[0], FileDescriptor)
        self.assertEqual((seen[0].bufferSize, seen[0].SEND_LIMIT), (producing.READ_SIZE - 1, producing.READ_SIZE))

    async def test_upload_500_then_success(self):
        task = self.task_dir()
        with open(os.path.join(task, "r"), "wb") as f:
            f.write(b"result")
        self.server.plans["/up/r"] = [502]
        clock = StepClock()
        d = defer.ensureDeferred(self.stager(clock=clock).stage_out(task, [{"path": "r", "uri": self.base + "/up/r"}]))
        clock.advance(await clock.next_delay())
        uploaded, errors = await d
        self.assertEqual(errors, [])
        self.assertEqual(self.server.count("PUT"), 2)
        self.assertEqual(self.server.uploads["/up/r"], b"result")

    async def test_upload_403_fails_at_once(self):
        task = self.task_dir()
        for name in ("a", "b"):
            with open(os.path.join(task, name), "wb") as f:
                f.write(name.encode())
        self.server.plans["/up/a"] = [403]
        clock = StepClock()
        uploaded, errors = await self.stager(clock=clock).stage_out(task, [
            {"path": "a", "uri": self.base + "/up/a"}, {"path": "b", "uri": self.base + "/up/b"},
        ])
        self.assertEqual(len(errors), 1)
        self.assertIn("output 'a'", errors[0])
        self.assertIn("HTTP 403", errors[0])
        self.assertEqual([u["path"] for u in uploaded], ["b"])
        self.assertEqual(clock.delays, [])

    # -- configuration ----------------------------------------------------------------------

    async def test_from_config(self):
        work = os.path.abspath(self.mktemp())
        config = SimpleNamespace(
            platform=SimpleNamespace(url=self.platform_url, token="t", ca_file=""),
            agent=SimpleNamespace(work_dir=work),
            transfer=SimpleNamespace(
                timeout=5.0, stall_timeout=7.0, retries=2, retry_initial_delay=0.5, retry_max_delay=9.0,
                max_concurrent=3, cache_dir="", cache_size=1 << 20,
            ),
        )
        stager = Stager.from_config(config, reactor)
        self.addCleanup(stager.close)
        self.assertEqual(stager.limiter.limit, 3)
        self.assertEqual((stager._stall_timeout, stager.policy.retries, stager.policy.max_delay), (7.0, 2, 9.0))
        self.assertEqual(stager.cache.directory, os.path.join(work, ".cache"))
        config.transfer.cache_size = 0
        stager = Stager.from_config(config, reactor)
        self.addCleanup(stager.close)
        self.assertIsNone(stager.cache)


class SameOriginTests(SynchronousTestCase):
    def test_scheme_counts(self):
        self.assertTrue(same_origin("wss://p.example/agent", "https://p.example/files/x"))
        self.assertTrue(same_origin("ws://p.example:8080/a", "http://P.EXAMPLE:8080/f"))
        # The token of a wss:// platform never travels in clear text.
        self.assertFalse(same_origin("wss://p.example/agent", "http://p.example:443/f"))
        self.assertFalse(same_origin("ws://p.example:8080/a", "https://p.example:8080/f"))


class NginxTests(TestCase):
    """Against a real nginx (WebDAV PUT) on loopback, when it is installed."""

    timeout = 60

    def setUp(self):
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        if nginx is None:
            raise self.skipTest("nginx is not installed (apt-get install nginx-light)")
        self.root = tempfile.mkdtemp(prefix="everest-nginx-")
        self.addCleanup(shutil.rmtree, self.root, True)
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        for d in ("www", "tmp", "logs"):
            os.makedirs(os.path.join(self.root, d))
            os.chmod(os.path.join(self.root, d), 0o777)
        os.chmod(self.root, 0o755)
        conf = os.path.join(self.root, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(root=self.root, port=self.port,
                                      user="user root root;" if os.geteuid() == 0 else ""))
        result = subprocess.run([nginx, "-c", conf, "-p", self.root], capture_output=True, text=True)
        if result.returncode != 0:
            raise self.skipTest(f"nginx does not start: {result.stderr.strip()[:300]}")
        self.addCleanup(subprocess.run, [nginx, "-c", conf, "-p", self.root, "-s", "stop"],
                        check=False, capture_output=True)
        self.base = f"http://127.0.0.1:{self.port}"

    async def test_roundtrip_through_cache(self):
        data = payload(5 << 20)
        with open(os.path.join(self.root, "www", "in.bin"), "wb") as f:
            f.write(data)
        stager = Stager.with_client(reactor, "wss://platform.example/agent", "t", cache_dir=os.path.join(self.root, "cache"),
                        cache_size=1 << 30)
        self.addCleanup(stager.close)
        item = {"path": "in.bin", "uri": self.base + "/in.bin", "sha256": sha(data), "size": len(data)}
        tasks = [os.path.join(self.root, f"task{i}") for i in range(3)]
        for t in tasks:
            os.makedirs(t)
        await defer.gatherResults([defer.ensureDeferred(stager.stage_in(t, [item])) for t in tasks])
        for t in tasks:
            with open(os.path.join(t, "in.bin"), "rb") as f:
                self.assertEqual(f.read(), data)
        uploaded, errors = await stager.stage_out(tasks[0], [{"pattern": "*.bin", "uri": self.base + "/up/j 1/"}])
        self.assertEqual(errors, [])
        self.assertEqual(uploaded, [{"path": "in.bin", "size": len(data), "sha256": sha(data)}])
        with open(os.path.join(self.root, "www", "up", "j 1", "in.bin"), "rb") as f:
            self.assertEqual(f.read(), data)
        with open(os.path.join(self.root, "logs", "access.log")) as f:
            gets = [line for line in f if line.startswith("GET /in.bin")]
        self.assertEqual(len(gets), 1)


NGINX_CONF = """\
{user}
worker_processes 1;
daemon on;
pid {root}/nginx.pid;
error_log {root}/logs/error.log;
events {{ worker_connections 64; }}
http {{
    log_format bench '$request_method $uri $status $body_bytes_sent';
    access_log {root}/logs/access.log bench;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {root}/www;
        location / {{
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 0;
        }}
    }}
}}
"""
