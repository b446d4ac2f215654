"""The download sink (L{everest_agent.transfer.sink}): backpressure and write errors."""

import errno
import os

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone

from everest_agent.transfer import errors, exchange, sink
from tests.test_transfer_stager import payload, sha


class FakeWorkers:
    """Thread jobs that run only when the test says so."""

    def __init__(self):
        self.jobs = []

    def run(self, f, *args):
        d = Deferred()
        self.jobs.append((f, args, d))
        return d

    def step(self):
        f, args, d = self.jobs.pop(0)
        d.callback(f(*args))

    def finish(self):
        while self.jobs:
            self.step()


def _fired(result):
    d = Deferred()
    d.callback(result)
    return d


class FakeTransport:
    def __init__(self):
        self.paused = False
        self.stopped = False
        self.pauses = 0

    def pauseProducing(self):
        self.paused = True
        self.pauses += 1

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.stopped = True


class BackpressureTests(SynchronousTestCase):
    """A disk slower than the network pauses the socket: memory stays bounded."""

    def test_slow_disk_pauses_the_transport(self):
        path = os.path.abspath(self.mktemp())
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(lambda: os.path.exists(path) and os.unlink(path))
        workers = FakeWorkers()
        writer = sink.FileWriter(fd, workers.run)
        watchdog = exchange.Watchdog(Clock(), None)
        receiver = sink.BodyReceiver(writer, None, watchdog, 10.0)
        transport = FakeTransport()
        receiver.makeConnection(transport)
        chunk = 256 * 1024
        data = payload(80 * chunk)
        sent = 0
        while not transport.paused and sent < len(data):
            receiver.dataReceived(data[sent:sent + chunk])
            sent += chunk
        self.assertTrue(transport.paused)
        # Paused just past the high-water mark, with one job (write, then
        # hash) in flight and the rest queued (not more).
        self.assertEqual(sent, sink.HIGH_WATER + chunk)
        self.assertLessEqual(writer.backlog, sink.HIGH_WATER + chunk)
        self.assertEqual(len(workers.jobs), 1)
        # The disk catches up: resumed once the backlog is at the low mark.
        while transport.paused:
            workers.step()
        self.assertLessEqual(writer.backlog, sink.LOW_WATER)
        while sent < len(data):
            receiver.dataReceived(data[sent:sent + chunk])
            sent += chunk
            self.assertLessEqual(writer.backlog, sink.HIGH_WATER + chunk)
            if transport.paused:
                while transport.paused:
                    workers.step()
        receiver.connectionLost(Failure(ResponseDone()))
        self.assertTrue(self.successResultOf(receiver.done))
        d = writer.drain()
        workers.finish()
        self.successResultOf(d)
        os.close(fd)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(writer.hash.hexdigest(), sha(data))
        self.assertGreater(transport.pauses, 1)
        self.assertFalse(transport.stopped)

    def test_one_thread_job_per_batch(self):
        """Writing and hashing a MiB is one trip to a thread, not two."""
        path = os.path.abspath(self.mktemp())
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(lambda: os.path.exists(path) and os.unlink(path))
        jobs = []

        def run(f, *args):
            jobs.append(f)
            return _fired(f(*args))

        writer = sink.FileWriter(fd, run)
        data = payload(8 * sink.BATCH)
        for i in range(0, len(data), 64 * 1024):
            writer.write(data[i:i + 64 * 1024])
        self.successResultOf(writer.drain())
        self.assertEqual(jobs, [sink.write_and_hash] * 8)
        self.assertEqual(writer.written, len(data))
        self.assertEqual(writer.hash.hexdigest(), sha(data))
        os.close(fd)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)

    def test_write_error_aborts(self):
        path = os.path.abspath(self.mktemp())
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        workers = FakeWorkers()
        writer = sink.FileWriter(fd, workers.run, hashing=False)
        receiver = sink.BodyReceiver(writer, None, exchange.Watchdog(Clock(), None), 10.0)
        transport = FakeTransport()
        receiver.makeConnection(transport)
        receiver.dataReceived(b"x" * sink.BATCH)
        f, args, d = workers.jobs.pop(0)
        d.errback(Failure(OSError(errno.ENOSPC, "No space left on device")))
        failure = self.failureResultOf(receiver.done, errors.Failed)
        self.assertIn("disk full", failure.value.message)
        self.assertTrue(transport.stopped)
        done = writer.dispose(unlink=path)
        # The close and the removal are a worker's job, not the reactor's.
        self.assertNoResult(done)
        self.assertEqual([job[0] for job in workers.jobs], [sink.close_file])
        self.assertTrue(os.path.exists(path))
        workers.finish()
        self.successResultOf(done)
        self.assertFalse(os.path.exists(path))
