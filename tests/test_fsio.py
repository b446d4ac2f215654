"""Tests for everest_agent.fsio: the seam for file-system work off the reactor."""

import threading

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from everest_agent.fsio import (
    IFileIO, InlineFileIO, StallingFileIO, ThreadedFileIO, reactor_thread_guard,
)


class ProvidersTests(SynchronousTestCase):
    def test_interface(self):
        for files in (InlineFileIO(), StallingFileIO(Clock()), ThreadedFileIO(Clock())):
            self.assertTrue(verifyObject(IFileIO, files))


class InlineTests(SynchronousTestCase):
    def test_run_result_and_error(self):
        files = InlineFileIO()
        self.assertEqual(self.successResultOf(files.run(lambda a, b=0: a + b, 1, b=2)), 3)
        self.failureResultOf(files.run(lambda: 1 / 0), ZeroDivisionError)
        self.assertEqual(files.calls, 2)

    def test_batch_runs_at_once(self):
        files = InlineFileIO()
        call = files.batch(lambda x: x * 2)
        self.assertEqual(self.successResultOf(call(4)), 8)


class StallingTests(SynchronousTestCase):
    def test_stalls_for_delay(self):
        clock = Clock()
        files = StallingFileIO(clock, delay=2.0)
        seen = []
        d = files.run(lambda: seen.append(files.inside) or "ok")
        clock.advance(1.9)
        self.assertNoResult(d)
        self.assertEqual(files.pending, 1)
        clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), "ok")
        self.assertEqual(seen, [True])
        self.assertFalse(files.inside)

    def test_release(self):
        files = StallingFileIO(Clock(), delay=None)
        d = files.run(lambda: 1 / 0)
        self.assertNoResult(d)
        files.release()
        self.failureResultOf(d, ZeroDivisionError)
        self.assertEqual(files.pending, 0)

    def test_batch_one_hop_per_turn(self):
        clock = Clock()
        files = StallingFileIO(clock, delay=1.0)
        order = []

        def work(item):
            order.append(item)
            if item == "bad":
                raise ValueError(item)
            return item.upper()

        call = files.batch(work)
        ds = [call("a"), call("bad"), call("c")]
        clock.advance(0)
        self.assertEqual(files.calls, 1)  # three items, one hop
        clock.advance(1.0)
        self.assertEqual(order, ["a", "bad", "c"])
        self.assertEqual(self.successResultOf(ds[0]), "A")
        self.failureResultOf(ds[1], ValueError)
        self.assertEqual(self.successResultOf(ds[2]), "C")
        # The next turn's items go in a hop of their own.
        d = call("d")
        clock.advance(0)
        self.assertEqual(files.calls, 2)
        clock.advance(1.0)
        self.assertEqual(self.successResultOf(d), "D")

    def test_guard(self):
        files = StallingFileIO(Clock(), delay=None)
        guarded = reactor_thread_guard(files)(lambda: "done")
        self.assertRaises(AssertionError, guarded)
        d = files.run(guarded)
        files.release()
        self.assertEqual(self.successResultOf(d), "done")


class ThreadedTests(TestCase):
    def setUp(self):
        self.files = ThreadedFileIO(reactor, threads=2)
        self.files.startService()
        self.addCleanup(self.files.stopService)

    @defer.inlineCallbacks
    def test_runs_in_another_thread(self):
        here = threading.get_ident()
        there = yield self.files.run(threading.get_ident)
        self.assertNotEqual(here, there)

    @defer.inlineCallbacks
    def test_error(self):
        with self.assertRaises(ZeroDivisionError):
            yield self.files.run(lambda: 1 / 0)

    @defer.inlineCallbacks
    def test_batch(self):
        threads_seen = []

        def work(item):
            threads_seen.append(threading.get_ident())
            return item + 1

        call = self.files.batch(work)
        results = yield defer.gatherResults([call(i) for i in range(5)])
        self.assertEqual(results, [1, 2, 3, 4, 5])
        self.assertEqual(len(set(threads_seen)), 1)  # one hop
        self.assertNotIn(threading.get_ident(), threads_seen)
