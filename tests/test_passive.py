"""
Passive mode's listener (contract, section 9): client credentials, the
WebSocket at /agent/ws and task files at /files/, over real loopback sockets.
"""

import os
import socket

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool
from twisted.web.client import HTTPConnectionPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from everest_agent import protocol
from everest_agent.passive.credentials import ClientTokens, CredentialError, read_tokens
from everest_agent.passive.files import parse_range
from everest_agent.passive.server import SUBPROTOCOL, IPassiveTasks, passive_site, parse_client_message

TOKEN = "client-token-0123456789"


def credential(label="run-1", token=TOKEN):
    return f"EverestAgentClientToken {label}:{token}"


def private_file(test, text, mode=0o600):
    path = os.path.abspath(test.mktemp())
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


class TokensFileTests(SynchronousTestCase):
    def test_one_token_a_line(self):
        path = private_file(self, "# clients\n\nalpha\n  beta  \n")
        self.assertEqual(read_tokens(path), ["alpha", "beta"])

    def test_readable_by_others_is_refused_before_reading(self):
        path = private_file(self, "alpha\n", mode=0o644)
        with self.assertRaises(CredentialError) as caught:
            read_tokens(path)
        self.assertIn("chmod 600", str(caught.exception))

    def test_fifo_is_refused_without_hanging(self):
        path = os.path.abspath(self.mktemp())
        os.mkfifo(path, 0o600)
        with self.assertRaises(CredentialError) as caught:
            read_tokens(path)
        self.assertIn("not a regular file", str(caught.exception))

    def test_device_is_refused(self):
        with self.assertRaises(CredentialError):
            read_tokens("/dev/zero")

    def test_symlink_is_not_followed(self):
        target = private_file(self, "alpha\n")
        link = os.path.abspath(self.mktemp())
        os.symlink(target, link)
        with self.assertRaises(CredentialError):
            read_tokens(link)

    def test_empty_file(self):
        with self.assertRaises(CredentialError) as caught:
            read_tokens(private_file(self, "\n# nothing\n"))
        self.assertIn("no token", str(caught.exception))

    def test_non_ascii_token_does_not_echo_it(self):
        with self.assertRaises(CredentialError) as caught:
            read_tokens(private_file(self, "sécret\n"))
        self.assertNotIn("cret", str(caught.exception))


class AuthenticateTests(SynchronousTestCase):
    def setUp(self):
        self.tokens = ClientTokens([TOKEN, "other-token"])

    def test_valid(self):
        client = self.tokens.authenticate(credential())
        self.assertEqual(client.label, "run-1")
        self.assertNotIn(TOKEN, client.owner)

    def test_bytes_header(self):
        self.assertIsNotNone(self.tokens.authenticate(credential().encode()))

    def test_the_whole_credential_is_the_identity(self):
        a = self.tokens.authenticate(credential("run-1"))
        b = self.tokens.authenticate(credential("run-2"))
        c = self.tokens.authenticate(credential("run-1", "other-token"))
        self.assertEqual(len({a.owner, b.owner, c.owner}), 3)
        self.assertEqual(a, self.tokens.authenticate(credential("run-1")))

    def test_refused(self):
        for header in (None, "", "Bearer " + TOKEN, f"EverestAgentClientToken {TOKEN}",
                       "EverestAgentClientToken run-1:wrong", "EverestAgentClientToken :" + TOKEN,
                       "EverestAgentClientToken run-1:", b"EverestAgentClientToken r:\xff",
                       "EverestAgentClientToken r\u00e9:" + TOKEN):
            self.assertIsNone(self.tokens.authenticate(header), header)


class ParseTests(SynchronousTestCase):
    def test_submit_with_and_without_context(self):
        self.assertEqual(parse_client_message(["TASK_SUBMIT", "t1", {"command": "x"}]),
                         ("TASK_SUBMIT", ("t1", {"command": "x"}, None)))
        self.assertEqual(parse_client_message(["TASK_SUBMIT", "t1", {}, {"k": 1}])[1][2], {"k": 1})

    def test_context_must_be_an_object(self):
        with self.assertRaises(protocol.ProtocolError) as caught:
            parse_client_message(["TASK_SUBMIT", "t1", {}, [1]])
        self.assertEqual(caught.exception.task_id, "t1")

    def test_no_welcome_or_hello_from_a_client(self):
        for kind in ("WELCOME", "HELLO", "TASK_STATE"):
            with self.assertRaises(protocol.ProtocolError) as caught:
                parse_client_message([kind, {}])
            self.assertEqual(caught.exception.code, protocol.E_UNKNOWN_TYPE)

    def test_bad_task_id(self):
        with self.assertRaises(protocol.ProtocolError) as caught:
            parse_client_message(["TASK_CANCEL", "../x"])
        self.assertEqual(caught.exception.code, protocol.E_INVALID_TASK_ID)


class RangeTests(SynchronousTestCase):
    def test_forms(self):
        self.assertIsNone(parse_range(None, 100))
        self.assertEqual(parse_range("bytes=0-9", 100), (0, 9))
        self.assertEqual(parse_range("bytes=90-", 100), (90, 99))
        self.assertEqual(parse_range("bytes=-10", 100), (90, 99))
        self.assertEqual(parse_range("bytes=95-200", 100), (95, 99))
        self.assertEqual(parse_range("bytes=-500", 100), (0, 99))

    def test_unsatisfiable(self):
        self.assertIs(parse_range("bytes=100-", 100), False)
        self.assertIs(parse_range("bytes=5-2", 100), False)
        self.assertIs(parse_range("bytes=-0", 100), False)
        self.assertIs(parse_range("bytes=0-", 0), False)

    def test_several_ranges_or_other_units_get_the_whole_file(self):
        self.assertIsNone(parse_range("bytes=0-1,5-6", 100))
        self.assertIsNone(parse_range("lines=1-2", 100))


@implementer(IPassiveTasks)
class FakeTasks:
    """The agent side of passive sessions, recording what clients asked."""

    def __init__(self):
        self.calls = []
        self.sessions = []
        self.owners = {}  # task_id -> (owner, task_dir)

    def session_opened(self, client, session):
        self.sessions.append(session)
        self.calls.append(("opened", client.label))
        session.send(["TASK_STATE", "t0", "RUNNING", {"seq": 1, "time": 0}])

    def session_closed(self, client, session):
        self.sessions.remove(session)
        self.calls.append(("closed", client.label))

    def submit(self, client, task_id, spec, context):
        self.calls.append(("submit", client.label, task_id, spec, context))

    def cancel(self, client, task_id):
        if task_id not in self.owners:
            raise protocol.ProtocolError(protocol.E_UNKNOWN_TASK, "unknown task", task_id)
        self.calls.append(("cancel", client.label, task_id))

    def deliver(self, client, task_id, text):
        self.calls.append(("deliver", client.label, task_id, text))

    def ack(self, client, seq):
        self.calls.append(("ack", client.label, seq))

    def lookup(self, task_id):
        return self.owners.get(task_id)


class _Client(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.factory.received.append(protocol.decode(payload))
        waiting, self.factory.waiting = self.factory.waiting, None
        if waiting is not None:
            waiting.callback(None)

    def onClose(self, wasClean, code, reason):
        self.factory.closed_with = code
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(reason))
        self.factory.closed.callback(code)


class ListenerTestCase(TestCase):
    def setUp(self):
        self.tasks = FakeTasks()
        verifyObject(IPassiveTasks, self.tasks)
        self.pool = ThreadPool(1, 2, "passive-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        site = passive_site(self.tasks, ClientTokens([TOKEN, "other-token"]), reactor, self.pool,
                            ping_interval=30, ping_timeout=60)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    def connect(self, header=credential(), protocols=(SUBPROTOCOL,)):
        headers = {"Authorization": header} if header else {}
        url = self.base.replace("http", "ws") + "/agent/ws"
        factory = WebSocketClientFactory(url, headers=headers, protocols=list(protocols) or None)
        factory.protocol = _Client
        factory.opened, factory.closed = defer.Deferred(), defer.Deferred()
        factory.received, factory.waiting, factory.closed_with = [], None, None
        factory.setProtocolOptions(openHandshakeTimeout=5, closeHandshakeTimeout=1)
        connector = connectWS(factory)
        self.addCleanup(connector.disconnect)
        return factory

    def next_message(self, factory):
        factory.waiting = defer.Deferred()
        return factory.waiting


class WebSocketTests(ListenerTestCase):
    @defer.inlineCallbacks
    def test_session_submit_with_context_and_current_states(self):
        f = self.connect()
        client = yield f.opened
        self.assertEqual(client.websocket_protocol_in_use, SUBPROTOCOL)
        if not f.received:
            yield self.next_message(f)
        self.assertEqual(f.received[0][:3], ["TASK_STATE", "t0", "RUNNING"])
        client.sendMessage(protocol.encode(["TASK_SUBMIT", "t1", {"command": "true"}, {"run": "r1"}]))
        client.sendMessage(protocol.encode(["ACK", 1]))
        client.sendMessage(protocol.encode(["TASK_CANCEL", "nope"]))
        yield self.next_message(f)
        self.assertEqual(f.received[-1][1]["code"], protocol.E_UNKNOWN_TASK)
        self.assertIn(("submit", "run-1", "t1", {"command": "true"}, {"run": "r1"}), self.tasks.calls)
        self.assertIn(("ack", "run-1", 1), self.tasks.calls)

    @defer.inlineCallbacks
    def test_malformed_messages_keep_the_connection(self):
        f = self.connect()
        client = yield f.opened
        if not f.received:
            yield self.next_message(f)
        for bad in (b"{not json", b'["HELLO", {}]', b'["TASK_SUBMIT", "t1"]', b"[" * 5000, b'"x"'):
            client.sendMessage(bad)
            yield self.next_message(f)
            self.assertEqual(f.received[-1][0], "ERROR")
        client.sendMessage(protocol.encode(["TASK_MESSAGE", "t1", "hi"]))
        client.sendMessage(protocol.encode(["TASK_CANCEL", "bad id"]))
        yield self.next_message(f)
        self.assertIn(("deliver", "run-1", "t1", "hi"), self.tasks.calls)
        self.assertIsNone(f.closed_with)

    @defer.inlineCallbacks
    def test_binary_frame_closes(self):
        f = self.connect()
        client = yield f.opened
        client.sendMessage(b"\x00\x01", isBinary=True)
        code = yield f.closed
        self.assertEqual(code, 1003)
        self.assertEqual(self.tasks.calls[-1], ("closed", "run-1"))

    @defer.inlineCallbacks
    def test_wrong_token_gets_no_websocket(self):
        f = self.connect(credential(token="guess"))
        yield self.assertFailure(f.opened, ConnectionError)
        self.assertEqual(self.tasks.calls, [])

    def raw_upgrade(self, authorization):
        """An upgrade written by hand on a plain socket: the status line the server answers."""
        sock = socket.create_connection(("127.0.0.1", self.port.getHost().port), timeout=5)
        lines = [
            "GET /agent/ws HTTP/1.1", f"Host: 127.0.0.1:{self.port.getHost().port}",
            "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", f"Sec-WebSocket-Protocol: {SUBPROTOCOL}",
        ]
        if authorization:
            lines.append(f"Authorization: {authorization}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return sock

    def status_of(self, sock):
        def read():
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            sock.close()
            return data.split(b"\r\n", 1)[0]
        from twisted.internet.threads import deferToThread
        return deferToThread(read)

    @defer.inlineCallbacks
    def test_upgrade_refused_with_401_by_another_stack(self):
        for header in (None, credential(token="guess"), "Bearer " + TOKEN):
            status = yield self.status_of(self.raw_upgrade(header))
            self.assertIn(b" 401 ", status + b" ", header)
        status = yield self.status_of(self.raw_upgrade(credential()))
        self.assertIn(b" 101 ", status + b" ")

    @defer.inlineCallbacks
    def test_wrong_subprotocol_is_refused(self):
        f = self.connect(protocols=("v2.something",))
        yield self.assertFailure(f.opened, ConnectionError)


class FilesTests(ListenerTestCase):
    def setUp(self):
        super().setUp()
        owner = ClientTokens([TOKEN]).authenticate(credential()).owner
        self.task_dir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.task_dir, "out"))
        self.data = os.urandom(3 * 1024 * 1024 + 17)
        with open(os.path.join(self.task_dir, "out", "big.bin"), "wb") as f:
            f.write(self.data)
        self.outside = os.path.abspath(self.mktemp())
        with open(self.outside, "w") as f:
            f.write("secret outside\n")
        os.symlink(self.outside, os.path.join(self.task_dir, "link"))
        os.mkfifo(os.path.join(self.task_dir, "fifo"))
        self.tasks.owners["t1"] = (owner, self.task_dir)
        self.http_pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.http_pool.closeCachedConnections)

    def get(self, path, header=credential(), method="GET", **headers):
        if header:
            headers["Authorization"] = header
        return treq.request(method, self.base + path, headers=headers, pool=self.http_pool)

    @defer.inlineCallbacks
    def test_whole_file(self):
        response = yield self.get("/files/t1/out/big.bin")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.length, len(self.data))
        body = yield response.content()
        self.assertEqual(body, self.data)

    @defer.inlineCallbacks
    def test_range(self):
        response = yield self.get("/files/t1/out/big.bin", Range="bytes=1000-1999")
        self.assertEqual(response.code, 206)
        self.assertEqual(response.headers.getRawHeaders("content-range"), [f"bytes 1000-1999/{len(self.data)}"])
        self.assertEqual((yield response.content()), self.data[1000:2000])
        response = yield self.get("/files/t1/out/big.bin", Range="bytes=-5")
        self.assertEqual((yield response.content()), self.data[-5:])

    @defer.inlineCallbacks
    def test_range_not_satisfiable(self):
        response = yield self.get("/files/t1/out/big.bin", Range=f"bytes={len(self.data)}-")
        self.assertEqual(response.code, 416)
        self.assertEqual(response.headers.getRawHeaders("content-range"), [f"bytes */{len(self.data)}"])
        yield response.content()

    @defer.inlineCallbacks
    def test_head(self):
        response = yield self.get("/files/t1/out/big.bin", method="HEAD")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-length"), [str(len(self.data))])

    @defer.inlineCallbacks
    def test_wrong_or_missing_token(self):
        for header in (None, credential(token="guess")):
            response = yield self.get("/files/t1/out/big.bin", header)
            self.assertEqual(response.code, 401)
            self.assertNotIn(b"\x00", (yield response.content()))

    @defer.inlineCallbacks
    def test_another_client_cannot_read(self):
        for header in (credential("run-2"), credential("run-1", "other-token")):
            response = yield self.get("/files/t1/out/big.bin", header)
            self.assertEqual(response.code, 403)
            yield response.content()

    @defer.inlineCallbacks
    def test_paths_never_leave_the_task_directory(self):
        for path in ("/files/t1/link", "/files/t1/..%2F..%2Fetc%2Fpasswd", "/files/t1/out/..%2F..%2Fx",
                     "/files/t1/%2E%2E/x", "/files/t1/fifo", "/files/t1/out"):
            response = yield self.get(path)
            body = yield response.content()
            self.assertIn(response.code, (403, 404), path)
            self.assertNotIn(b"secret outside", body)

    @defer.inlineCallbacks
    def test_unknown_task_and_file(self):
        for path in ("/files/t2/x", "/files/t1/missing", "/files/t1", "/elsewhere"):
            response = yield self.get(path)
            self.assertEqual(response.code, 404, path)
            yield response.content()
