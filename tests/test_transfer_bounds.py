"""
The stager's stage-out bounds and thread discipline, against a real
loopback server (and treq's in-memory StubTreq for the protocol side).
"""

import os
import threading

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase
from twisted.web import resource

from everest_agent import paths
from everest_agent.transfer import fastpath
from everest_agent.transfer.jobs import run_inline
from everest_agent.transfer.stager import Stager
from tests.test_transfer_stager import FileServer, payload, serve, sha


class BoundsTests(TestCase):
    timeout = 30

    def setUp(self):
        self.server = FileServer()
        self.base = serve(self, self.server)

    def stager(self, **kwargs):
        stager = Stager.with_client(reactor, "wss://platform.example/agent", "t", **kwargs)
        self.addCleanup(stager.close)
        return stager

    def task(self, **files):
        task = os.path.abspath(self.mktemp())
        os.makedirs(task)
        for name, data in files.items():
            with open(os.path.join(task, name), "wb") as f:
                f.write(data)
        return task

    async def test_size_bound(self):
        task = self.task(a=b"a" * 600, b=b"b" * 600)
        uploaded, errors = await self.stager(max_stage_out=1000).stage_out(task, [
            {"path": "a", "uri": self.base + "/up/a"}, {"path": "b", "uri": self.base + "/up/b"},
        ])
        self.assertEqual([u["path"] for u in uploaded], ["a"])
        self.assertEqual(len(errors), 1)
        self.assertIn("output 'b'", errors[0])
        self.assertIn("max_stage_out", errors[0])
        self.assertEqual(list(self.server.uploads), ["/up/a"])

    async def test_time_bound(self):
        clock = Clock()
        self.server.plans["/up/slow"] = [("hold", None)]
        task = self.task(fast=b"f", slow=b"s")
        stager = self.stager(clock=clock, stage_out_timeout=30.0, timeout=1000.0, stall_timeout=1000.0)
        d = Deferred.fromCoroutine(stager.stage_out(task, [
            {"path": "fast", "uri": self.base + "/up/fast"}, {"path": "slow", "uri": self.base + "/up/slow"},
        ]))
        await self.server.arrived(2)
        for _ in range(1000):  # until the fast one's answer is in
            if stager.limiter.active == 1 and stager.bytes_out:
                break
            await deferLater(reactor, 0.005)
        self.assertFalse(d.called)
        clock.advance(30)
        uploaded, errors = await d
        self.assertEqual(uploaded, [{"path": "fast", "size": 1, "sha256": sha(b"f")}])
        self.assertEqual(len(errors), 1)
        self.assertIn("output 'slow': not sent within 30 s", errors[0])
        self.assertEqual(stager.limiter.active, 0)

    async def test_fifo_output_fails_the_task(self):
        task = self.task(good=b"g")
        os.mkfifo(os.path.join(task, "stdout"))
        uploaded, errors = await self.stager().stage_out(task, [
            {"path": "stdout", "uri": self.base + "/up/stdout"},
            {"pattern": "*", "uri": self.base + "/up/"},
        ])
        self.assertEqual(errors, ["output 'stdout' is a FIFO, not a regular file"])
        self.assertEqual([u["path"] for u in uploaded], ["good"])

    async def test_outputs_found_and_opened_off_the_reactor_thread(self):
        threads = []
        for name in ("find_outputs", "open_output"):
            original = getattr(paths, name)

            def spy(*args, _original=original, **kwargs):
                threads.append(threading.current_thread())
                return _original(*args, **kwargs)

            self.patch(paths, name, spy)
        task = self.task(x=b"x")
        uploaded, errors = await self.stager().stage_out(task, [
            {"path": "x", "uri": self.base + "/up/x"}, {"pattern": "*", "uri": self.base + "/p/"},
        ])
        self.assertEqual(errors, [])
        self.assertEqual(len(threads), 3)
        self.assertNotIn(threading.main_thread(), threads)


class FastPathTests(TestCase):
    """Fails when Twisted changes the attributes L{fastpath} relies on."""

    timeout = 30

    async def test_finds_the_transports(self):
        server = FileServer()
        base = serve(self, server)
        data = payload(3 << 20)
        server.files["/f"] = data
        seen = []
        for name in ("tune_download", "tune_upload"):
            original = getattr(fastpath, name)

            def spy(*args, _original=original):
                result = _original(*args)
                seen.append(result)
                return result

            self.patch(fastpath, name, spy)
        stager = Stager.with_client(reactor, "wss://platform.example/agent", "t")
        self.addCleanup(stager.close)
        task = os.path.abspath(self.mktemp())
        os.makedirs(task)
        await stager.stage_in(task, [{"path": "f", "uri": base + "/f", "sha256": sha(data)}])
        uploaded, errors = await stager.stage_out(task, [{"path": "f", "uri": base + "/up/f"}])
        self.assertEqual(errors, [])
        self.assertEqual(seen, [True, True])


class Files(resource.Resource):
    isLeaf = True

    def __init__(self, answers):
        super().__init__()
        self.answers = answers
        self.seen = []

    def render(self, request):
        self.seen.append((request.method, request.getHeader(b"authorization")))
        code, body = self.answers.pop(0)
        request.setResponseCode(code)
        return body


class StubTreqTests(TestCase):
    """The protocol side through treq's in-memory client: no sockets, no threads."""

    def stager(self, answers, **kwargs):
        files = Files(answers)
        stub = StubTreq(files)
        stager = Stager(reactor, stub, "wss://p.example/agent", "tok", run=run_inline, clock=Clock(), **kwargs)
        return stager, stub, files

    async def test_500_then_200_with_the_token_for_the_platform_only(self):
        stager, stub, files = self.stager([(500, b"no"), (200, b"data")], retry_initial_delay=0.5)
        task = os.path.abspath(self.mktemp())
        os.makedirs(task)
        d = Deferred.fromCoroutine(stager.stage_in(task, [{"path": "x", "uri": "https://p.example/f/x"}]))
        stub.flush()
        self.assertFalse(d.called)
        stager._clock.advance(1)
        stub.flush()
        await d
        with open(os.path.join(task, "x"), "rb") as f:
            self.assertEqual(f.read(), b"data")
        self.assertEqual(files.seen, [(b"GET", b"Bearer tok")] * 2)

    async def test_404_fails_at_once_and_plain_http_gets_no_token(self):
        stager, stub, files = self.stager([(404, b"gone")])
        task = os.path.abspath(self.mktemp())
        os.makedirs(task)
        d = Deferred.fromCoroutine(stager.stage_in(task, [{"path": "x", "uri": "http://p.example:443/f/x"}]))
        stub.flush()
        failure = await self.assertFailure(d, Exception)
        self.assertIn("input 'x': GET http://p.example:443/f/x answered HTTP 404", str(failure))
        self.assertEqual(files.seen, [(b"GET", None)])
