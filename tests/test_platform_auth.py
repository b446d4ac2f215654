"""
The reference platform's credentials (issue 11, items 1 and 9): the JSON API
needs its bearer token, checked on real second local connections; a request
body without a valid token is refused before it is read.
"""

import json
import os
import stat

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from everest_agent.platform import Platform, listen, tap
from everest_agent.platform.core import API_TOKEN_FILE

TOKEN = "agent-token-0123456789"


class RawHTTP(Protocol):
    """A second local connection speaking HTTP by hand, as an intruder would."""

    def __init__(self):
        self.data = b""
        self.lost = Deferred()
        self._head = Deferred()

    def dataReceived(self, data):
        self.data += data
        if b"\r\n\r\n" in self.data and self._head is not None:
            d, self._head = self._head, None
            d.callback(self.data)

    def connectionLost(self, reason):
        if self._head is not None:
            d, self._head = self._head, None
            d.callback(self.data)
        self.lost.callback(None)

    def head(self):
        return self._head if self._head is not None else succeed(self.data)

    @property
    def code(self):
        return int(self.data.split(b" ", 2)[1])

    @property
    def body(self):
        return self.data.partition(b"\r\n\r\n")[2]


class ApiAuthTests(TestCase):
    timeout = 20

    async def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.platform = Platform({TOKEN: "a1"}, reactor, files_dir=os.path.join(self.root, "files"),
                                 api_token_dir=self.root)
        self.port = await listen(self.platform, reactor, 0)
        self.addCleanup(self.platform.close)

    async def request(self, head, body=b"", wait_close=True):
        proto = RawHTTP()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), proto)
        proto.transport.write(head + b"\r\n\r\n" + body)
        if wait_close:
            await proto.head()
            proto.transport.loseConnection()
            await proto.lost
        return proto

    def post_tasks(self, spec, headers=b""):
        body = json.dumps({"spec": spec}).encode()
        return self.request(
            b"POST /api/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + headers + b"Content-Length: " + str(len(body)).encode(), body)

    async def test_unauthenticated_submit_refused(self):
        """Another local user POSTs a command of their choice: 401, nothing submitted."""
        for headers in (b"", b"Authorization: Bearer wrong\r\n", b"Authorization: Basic " + TOKEN.encode() + b"\r\n",
                        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n",  # an agent's token is not the API's
                        b"Authorization: Bearer " + self.platform.api_token[:-1].encode() + b"\r\n"):
            proto = await self.post_tasks({"command": "id > /tmp/owned"}, headers)
            self.assertEqual(proto.code, 401, proto.data)
            self.assertIn(b'WWW-Authenticate: Bearer realm="everest"', proto.data)
        self.assertEqual(self.platform.tasks, {})

    async def test_unauthenticated_reads_refused(self):
        self.platform.submit({"command": "secret-command"}, task_id="t1")
        for path in (b"/api/tasks", b"/api/tasks/t1", b"/api/agents", b"/api", b"/api/", b"/api/nothing"):
            proto = await self.request(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close")
            self.assertEqual(proto.code, 401, path)
            self.assertNotIn(b"secret-command", proto.data)

    async def test_with_the_token(self):
        auth = b"Authorization: Bearer " + self.platform.api_token.encode() + b"\r\n"
        proto = await self.post_tasks({"command": "true"}, auth)
        self.assertEqual(proto.code, 201, proto.data)
        task_id = json.loads(proto.body)["taskId"]
        self.assertIn(task_id, self.platform.tasks)
        proto = await self.request(b"GET /api/tasks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + auth[:-2])
        self.assertEqual(proto.code, 200)
        self.assertEqual([t["taskId"] for t in json.loads(proto.body)], [task_id])

    async def test_index_outside_the_auth(self):
        proto = await self.request(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close")
        self.assertEqual(proto.code, 200)

    async def test_body_refused_before_it_is_read(self):
        """
        An unauthenticated PUT announcing 50 MiB gets its 401 after the
        first 64 KiB, and nothing of it is written to the store.
        """
        incoming = os.path.join(self.platform.files_dir, ".incoming")
        for auth in (b"", b"Authorization: Bearer wrong\r\n", b"Expect: 100-continue\r\n"):
            proto = await self.request(
                b"PUT /files/big.bin HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 52428800",
                b"x" * 65536, wait_close=False)
            await proto.head()
            self.assertEqual(proto.code, 401, proto.data)
            await proto.lost
            self.assertNotIn(b"100 Continue", proto.data)
            self.assertEqual(os.listdir(incoming), [])  # and the platform closed the connection
        self.assertFalse(os.path.exists(os.path.join(self.platform.files_dir, "big.bin")))
        # The same for a chunked body and for the API.
        proto = await self.request(
            b"PUT /files/c.bin HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked", b"10000\r\n" + b"y" * 65536,
            wait_close=False)
        await proto.head()
        self.assertEqual(proto.code, 401)
        self.assertEqual(os.listdir(incoming), [])
        await proto.lost
        for path in (b"/api/tasks", b"/%61pi/tasks", b"//api/tasks", b"/api"):
            proto = await self.request(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 52428800",
                                       b"{" * 65536, wait_close=False)
            await proto.head()
            self.assertEqual(proto.code, 401, path)
            await proto.lost
        for path in (b"/%66iles/e.bin", b"//files/e.bin"):
            proto = await self.request(b"PUT " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 52428800",
                                       b"e" * 65536, wait_close=False)
            await proto.head()
            self.assertEqual(proto.code, 401, path)
            await proto.lost
        # An agent's token still stores files.
        proto = await self.request(
            b"PUT /files/ok.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
            + TOKEN.encode() + b"\r\nContent-Length: 2", b"ok")
        self.assertEqual(proto.code, 201, proto.data)
        self.assertEqual(self.platform.get_file("ok.txt"), b"ok")

    def test_token_file_written_private(self):
        path = os.path.join(self.root, API_TOKEN_FILE)
        self.assertEqual(self.platform.api_token_file, path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            self.assertEqual(f.read().strip(), self.platform.api_token)
        self.assertGreaterEqual(len(self.platform.api_token), 32)


class ApiTokenOptionTests(SynchronousTestCase):
    def parse(self, *args):
        options = tap.Options()
        options.parseOptions(["--token", "a1=" + TOKEN] + list(args))
        return options

    def capture(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def test_api_token_file(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("operator-token-abcdef\n")
        os.chmod(path, 0o600)
        options = self.parse("--api-token-file", path, "--files-dir", self.mktemp())
        service = tap.makeService(options, Clock())
        self.assertEqual(service.platform.api_token, "operator-token-abcdef")
        self.assertIsNone(service.platform.api_token_file)

    def test_api_token_file_checked(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("operator-token-abcdef\n")
        os.chmod(path, 0o644)
        e = self.assertRaises(usage.UsageError, self.parse, "--api-token-file", path)
        self.assertIn("others can read it", str(e))
        self.assertNotIn("operator-token", str(e))
        fifo = self.mktemp()
        os.mkfifo(fifo, 0o600)
        e = self.assertRaises(usage.UsageError, self.parse, "--api-token-file", fifo)
        self.assertIn("not a regular file", str(e))

    def test_generated_into_the_state_directory_and_logged_by_path(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory, mode=0o700)
        events = self.capture()
        options = self.parse("--files-dir", self.mktemp(), "--state-file", os.path.join(directory, "state.json"))
        platform = tap.makeService(options, Clock()).platform
        path = os.path.join(directory, API_TOKEN_FILE)
        self.assertEqual(platform.api_token_file, path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        text = "\n".join(formatEvent(e) for e in events) + repr(events)
        self.assertIn(path, text)
        self.assertNotIn(platform.api_token, text)

    def test_generated_into_a_new_directory(self):
        options = self.parse()
        platform = tap.makeService(options, Clock()).platform
        directory = os.path.dirname(platform.api_token_file)
        self.addCleanup(lambda: __import__("shutil").rmtree(directory, ignore_errors=True))
        self.assertEqual(os.path.dirname(platform.files_dir), directory)
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
