"""The upload producer (L{everest_agent.transfer.producer}) feeding Twisted's transport buffering."""

import os
from types import SimpleNamespace

from twisted.internet.abstract import FileDescriptor
from twisted.trial.unittest import SynchronousTestCase

from everest_agent.transfer import fastpath, producer as producing
from tests.test_transfer_sink import FakeWorkers
from tests.test_transfer_stager import payload, sha


class FakeReactor:
    def __init__(self):
        self.writers = set()

    def addWriter(self, descriptor):
        self.writers.add(descriptor)

    def removeWriter(self, descriptor):
        self.writers.discard(descriptor)

    def addReader(self, descriptor):
        pass

    def removeReader(self, descriptor):
        pass


class FakeSocket(FileDescriptor):
    """
    Twisted's own buffering, pausing and resuming (L{FileDescriptor}) over a
    "kernel" that takes at most C{room} bytes per send (None: all it is
    offered, up to C{SEND_LIMIT} as Twisted's TCP transport does).
    """

    def __init__(self):
        super().__init__(FakeReactor())
        self.connected = 1
        self.room = None
        self.offered = []  # what each send was given (the objects themselves)
        self.received = []

    def writeSomeData(self, data):
        self.offered.append(data)
        limited = memoryview(data)[: self.SEND_LIMIT]
        n = len(limited) if self.room is None else min(self.room, len(limited))
        self.received.append(bytes(limited[:n]))
        return n

    def writable(self):
        return self in self.reactor.writers


class LengthConsumer:
    """Stands for twisted.web's consumer of a request body."""

    def __init__(self, transport):
        self._consumer = transport

    def write(self, data):
        self._consumer.write(data)


class UploadProducerTests(SynchronousTestCase):
    """L{producing.FileProducer} feeding Twisted's transport buffering."""

    def start(self, data):
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(data)
        fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        self.reads = []
        workers = FakeWorkers()
        original = workers.run

        def run(f, *args):
            d = original(f, *args)
            d.addCallback(lambda block: self.reads.append(block) or block)
            return d

        workers.run = run
        producer = producing.FileProducer(fd, len(data), workers.run)
        socket_ = FakeSocket()
        socket_.registerProducer(producer, True)
        done = producer.startProducing(LengthConsumer(socket_))
        return producer, workers, socket_, done

    def run_until(self, workers, socket_, done):
        for _ in range(100000):
            if done.called and not socket_.writable():
                return
            if socket_.writable():
                socket_.doWrite()
            elif workers.jobs:
                workers.step()
            else:
                self.fail("the upload is stuck")
        self.fail("the upload does not end")

    def test_whole_blocks_sent_as_read(self):
        block = producing.READ_SIZE
        data = payload(5 * block + 777)
        producer, workers, socket_, done = self.start(data)
        self.assertEqual((socket_.bufferSize, socket_.SEND_LIMIT), (block - 1, block))
        self.run_until(workers, socket_, done)
        self.successResultOf(done)
        self.assertEqual(b"".join(socket_.received), data)
        self.assertEqual(producer.hash.hexdigest(), sha(data))
        self.assertEqual(producer.sent, len(data))
        # One send per block, each given the very bytes object that was
        # read and hashed: Twisted joined nothing, nothing was copied.
        self.assertEqual([len(r) for r in self.reads], [block] * 5 + [777])
        self.assertEqual(len(socket_.offered), len(self.reads))
        for offered, read in zip(socket_.offered, self.reads):
            self.assertIs(offered, read)

    def test_a_full_socket_stops_the_reading(self):
        block = producing.READ_SIZE
        data = payload((producing.PREFETCH + 6) * block + 5)
        producer, workers, socket_, done = self.start(data)
        socket_.room = 0  # the peer reads nothing
        for _ in range(100):
            if socket_.writable():
                socket_.doWrite()
            if workers.jobs:
                workers.step()
        # One block in the transport, PREFETCH read ahead, and no more.
        self.assertTrue(socket_.producerPaused)
        self.assertEqual(workers.jobs, [])
        self.assertEqual(len(self.reads), producing.PREFETCH + 1)
        self.assertEqual(producer.sent, block)
        self.assertNoResult(done)
        # The peer reads slowly, a part of a block at a time: all of it
        # arrives, in order, and the hash is that of what was sent.
        socket_.room = 300 * 1024
        self.run_until(workers, socket_, done)
        self.successResultOf(done)
        self.assertEqual(b"".join(socket_.received), data)
        self.assertEqual(producer.hash.hexdigest(), sha(data))
        self.assertLessEqual(len(self.reads), producing.PREFETCH + 1 + 6)

    def test_stop_producing_stops_reading(self):
        data = payload(4 * producing.READ_SIZE)
        producer, workers, socket_, done = self.start(data)
        workers.step()
        producer.stopProducing()
        while workers.jobs:
            workers.step()
        self.assertLessEqual(len(self.reads), 2)
        self.assertNoResult(done)

    def test_empty_file(self):
        producer, workers, socket_, done = self.start(b"")
        self.successResultOf(done)
        self.assertEqual(workers.jobs, [])
        self.assertEqual(producer.hash.hexdigest(), sha(b""))

    def test_only_a_socket_transport_is_tuned(self):
        tls_like = SimpleNamespace(bufferSize=65536)
        fastpath.tune_upload(SimpleNamespace(_consumer=tls_like), producing.READ_SIZE)
        fastpath.tune_upload(None, producing.READ_SIZE)
        self.assertEqual(vars(tls_like), {"bufferSize": 65536})
