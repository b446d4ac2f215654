"""
The WebSocket client: dispatch, errors that keep the connection, backoff.
"""

import json

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from everest_agent import client, protocol
from everest_agent.client import AgentClientFactory, AgentProtocolClient
from everest_agent.protocol import ProtocolError


class StubSender:
    def __init__(self):
        self.errors = []
        self.acks = []

    def error(self, e):
        self.errors.append(e.as_message())

    def ack(self, seq):
        self.acks.append(seq)


class StubAgent:
    user_agent = "everest-agent/test"

    def __init__(self):
        self.sender = StubSender()
        self.submitted = []
        self.welcomes = []
        self.lost = []

    def hello(self):
        return {"token": "t", "protocol": 1, "tasks": []}

    def cancel(self, task_id):
        raise ProtocolError(protocol.E_UNKNOWN_TASK, "unknown", task_id)

    def dispatch_table(self):
        return {
            protocol.ACK: self.sender.ack,
            protocol.TASK_SUBMIT: lambda *a: self.submitted.append(a),
            protocol.TASK_CANCEL: self.cancel,
            protocol.TASK_MESSAGE: lambda *a: None,
        }

    def welcomed(self, connection, info):
        self.welcomes.append(info)

    def connection_lost(self, connection):
        self.lost.append(connection)

    def connection_closed(self, code, reason):
        pass

    def connection_failed(self, reason):
        pass


def make_factory(clock=None, **kwargs):
    clock = clock or Clock()
    agent = StubAgent()
    factory = AgentClientFactory(agent, "ws://127.0.0.1:9/compute/agent/v1", clock, **kwargs)
    return factory, agent, clock


class ProtocolTests(SynchronousTestCase):
    def setUp(self):
        self.factory, self.agent, self.clock = make_factory()
        self.proto = AgentProtocolClient()
        self.proto.state = AgentProtocolClient.STATE_OPEN
        self.proto.factory = self.factory
        self.frames = []
        self.closed = []
        self.proto.send_text = lambda payload: self.frames.append(json.loads(payload))
        self.proto.sendClose = lambda code=None, reason=None: self.closed.append(code)
        self.proto._fail_connection = lambda code=None, reason=None: self.closed.append(code)
        self.proto.dropConnection = lambda abort=False: self.closed.append("dropped")
        self.proto.onOpen()

    def receive(self, message):
        payload = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.proto.onMessage(payload, False)

    def test_hello_first(self):
        self.assertEqual(self.frames, [["HELLO", {"token": "t", "protocol": 1, "tasks": []}]])

    def test_welcome_then_dispatch(self):
        self.receive(["WELCOME", {"ack": 3, "heartbeat": 10}])
        self.assertEqual(self.agent.welcomes, [{"ack": 3, "heartbeat": 10}])
        self.receive(["TASK_SUBMIT", "j1-1-0", {"command": "true"}])
        self.receive(["ACK", 7])
        self.assertEqual(self.agent.submitted, [("j1-1-0", {"command": "true"})])
        self.assertEqual(self.agent.sender.acks, [7])
        self.assertEqual(self.closed, [])

    def test_commands_before_welcome_are_ignored(self):
        self.receive(["TASK_SUBMIT", "j1-1-0", {"command": "true"}])
        self.assertEqual(self.agent.submitted, [])

    def test_no_welcome_drops_connection(self):
        self.clock.advance(self.factory.welcome_timeout)
        self.assertEqual(self.closed, ["dropped"])

    def test_welcome_cancels_timer(self):
        self.receive(["WELCOME", {"ack": 0}])
        self.clock.advance(self.factory.welcome_timeout * 2)
        self.assertEqual(self.closed, [])

    def test_bad_messages_answered_with_error(self):
        self.receive(["WELCOME", {"ack": 0}])
        cases = [
            (b"{not json", "malformed"),
            (b'{"a": 1}', "malformed"),
            (b"[]", "malformed"),
            (b"[1, 2]", "malformed"),
            (["NOPE"], "unknown-type"),
            (["TASK_SUBMIT", "../etc", {}], "invalid-task-id"),
            (["TASK_SUBMIT", ".hidden", {}], "invalid-task-id"),
            (["TASK_SUBMIT", "x" * 129, {}], "invalid-task-id"),
            (["TASK_SUBMIT", 5, {}], "invalid-task-id"),
            (["TASK_SUBMIT", "ok"], "invalid-message"),
            (["TASK_SUBMIT", "ok", []], "invalid-message"),
            (["TASK_CANCEL", "nope"], "unknown-task"),
            (["ACK", "x"], "invalid-message"),
            (["WELCOME", {"ack": 0}], "invalid-message"),
            (b"\xff\xfe", "malformed"),
            (b"[" * 200000, "malformed"),
            (b'["TASK_SUBMIT", "deep", {"command": "true", "x": ' + b"[" * 500 + b"]" * 500 + b"}]", "malformed"),
            (b'["ACK", ' + b"{\"a\": " * 100 + b"1" + b"}" * 100 + b"]", "malformed"),
        ]
        for message, code in cases:
            self.receive(message)
        self.assertEqual([e[1]["code"] for e in self.agent.sender.errors], [c for _, c in cases])
        self.assertEqual(self.agent.sender.errors[11][1]["taskId"], "nope")
        self.assertEqual(self.closed, [])
        self.assertEqual(self.agent.submitted, [])

    def test_nesting_bound(self):
        ok = "[" * protocol.MAX_DEPTH + '"X"' + "]" * protocol.MAX_DEPTH
        self.assertEqual(protocol.decode(('["X", ' + ok[1:]).encode())[0], "X")
        for payload in (b"[" * 200000, b'["X", ' + b"[" * protocol.MAX_DEPTH + b"]" * protocol.MAX_DEPTH + b"]",
                        b'["X", ' + b'{"a": ' * protocol.MAX_DEPTH + b"1" + b"}" * protocol.MAX_DEPTH + b"]"):
            e = self.assertRaises(protocol.ProtocolError, protocol.decode, payload)
            self.assertEqual(e.code, "malformed")
            self.assertIn("nested deeper than", e.message)

    def test_binary_frame_closes(self):
        self.proto.onMessage(b"\x00", True)
        self.assertEqual(self.closed, [1003])

    def test_handler_bug_keeps_connection(self):
        self.receive(["WELCOME", {"ack": 0}])

        def boom(*args):
            raise ZeroDivisionError()

        self.proto._dispatch[protocol.TASK_SUBMIT] = boom
        self.receive(["TASK_SUBMIT", "a", {}])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.closed, [])


class Backoff(SynchronousTestCase):
    """The retry policy alone: exponential, capped, reset only by WELCOME."""

    def setUp(self):
        # Jitter is random; make it exact here so the test cannot flake.
        self.patch(client.random, "normalvariate", lambda mu, sigma: mu)

    def test_exponential_with_cap(self):
        policy = client.Backoff(initial=1, maximum=60, factor=2)
        # ClientService passes its own count (reset at each TCP connect): ignored.
        self.assertEqual([policy(1) for _ in range(10)], [1, 2, 4, 8, 16, 32, 60, 60, 60, 60])
        self.assertEqual(policy.retries, 10)

    def test_configured_factor_and_initial_delay(self):
        policy = client.Backoff(initial=0.5, maximum=5, factor=3)
        self.assertEqual([policy(1) for _ in range(4)], [0.5, 1.5, 4.5, 5])

    def test_jitter_is_ten_percent(self):
        seen = []
        self.patch(client.random, "normalvariate", lambda mu, sigma: seen.append((mu, sigma)) or mu - 3 * sigma)
        policy = client.Backoff(initial=10, maximum=60, factor=2)
        self.assertAlmostEqual(policy(1), 7.0)
        self.assertEqual(seen, [(10, 1.0)])

    def test_refused_waits_the_cap_until_welcome(self):
        policy = client.Backoff(initial=1, maximum=60, factor=2)
        policy(1)
        policy.refused()
        self.assertEqual([policy(1) for _ in range(3)], [60, 60, 60])
        policy.reset()
        self.assertEqual(policy(1), 1)

    def test_huge_factor_does_not_overflow(self):
        policy = client.Backoff(initial=1, maximum=60, factor=1e300)
        self.assertEqual([policy(1) for _ in range(4)], [1, 60, 60, 60])

    def test_reset_only_after_welcome(self):
        factory, agent, clock = make_factory()
        for _ in range(5):
            factory.backoff()
        proto = AgentProtocolClient()
        proto.state = AgentProtocolClient.STATE_OPEN
        proto.factory = factory
        proto.send_text = lambda payload: None
        proto.onOpen()  # TCP and WebSocket up: not enough to reset
        self.assertEqual(factory.backoff.delay(), 32)
        proto.onMessage(b'["WELCOME", {"ack": 0}]', False)
        self.assertEqual(factory.backoff.delay(), 1)
        self.assertEqual(factory.backoff.retries, 0)


class Session(AgentProtocolClient):
    """
    L{AgentProtocolClient} with Autobahn's WebSocket layer skipped: open as
    soon as the transport is, frames recorded; the test closes it with
    L{FakeEndpoint.close}.
    """

    def connectionMade(self):
        self.state = self.STATE_OPEN
        self.frames = []
        self.close_sent = None
        self.dropped = False
        self.onOpen()

    def send_text(self, payload):
        self.frames.append(json.loads(payload))

    def sendClose(self, code=None, reason=None):
        self.close_sent = code  # the platform's answer: FakeEndpoint.close

    def dropConnection(self, abort=False):
        self.dropped = True

    def connectionLost(self, reason):
        self._report_tls_failure(reason)
        if self.state != self.STATE_CLOSED:
            self.state = self.STATE_CLOSED
            self.onClose(False, getattr(self, "close_code", 1006), "")


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Each connect() waits for the test: L{accept} or L{refuse}."""

    def __init__(self):
        self.attempts = []  # (Deferred, factory)
        self.sessions = []  # the protocols ClientService got (its proxies)

    def connect(self, factory):
        d = defer.Deferred()
        self.attempts.append((d, factory))
        return d

    def accept(self):
        d, factory = self.attempts[-1]
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        self.sessions.append(proto)
        d.callback(proto)
        return proto

    def refuse(self):
        self.attempts[-1][0].errback(ConnectionRefusedError("111: Connection refused"))

    def close(self, code=1006):
        """The platform closes the last session with C{code}."""
        proto = self.sessions[-1]
        proto._protocol.close_code = code
        proto.connectionLost(Failure(ConnectionDone()))


class ConnectionServiceTests(SynchronousTestCase):
    """ClientService over an endpoint: retries, failures reported, clean stop."""

    def setUp(self):
        self.patch(client.random, "normalvariate", lambda mu, sigma: mu)
        self.factory, self.agent, self.clock = make_factory(initial_delay=1, max_delay=60, factor=2)
        self.factory.protocol = Session
        self.failures = []
        self.agent.connection_failed = self.failures.append
        self.endpoint = FakeEndpoint()
        self.service = client.ConnectionService(self.factory, "ws://127.0.0.1:9/compute/agent/v1", self.clock,
                                                endpoint=self.endpoint)
        self.service.startService()

    def next_delay(self):
        calls = [c for c in self.clock.getDelayedCalls() if c.active()]
        self.assertEqual(len(calls), 1, calls)
        return calls[0].getTime() - self.clock.seconds()

    def retry(self):
        delay = self.next_delay()
        self.clock.advance(delay)
        return delay

    def test_failures_back_off_and_are_reported(self):
        delays = []
        for _ in range(4):
            self.endpoint.refuse()
            delays.append(self.retry())
        self.assertEqual(delays, [1, 2, 4, 8])
        self.assertEqual(len(self.endpoint.attempts), 5)
        self.assertEqual(len(self.failures), 4)
        self.assertTrue(all("111: Connection refused" in f for f in self.failures), self.failures)

    def test_connection_without_welcome_does_not_reset(self):
        """ClientService would reset at TCP connect; the agent waits for WELCOME."""
        for _ in range(3):
            self.endpoint.accept()
            self.endpoint.close(1006)
            self.retry()
        self.endpoint.accept()
        self.endpoint.close(1006)
        self.assertEqual(self.next_delay(), 8)

    def test_welcome_resets(self):
        for _ in range(3):
            self.endpoint.refuse()
            self.retry()
        session = self.endpoint.accept()
        session.onMessage(b'["WELCOME", {"ack": 0}]', False)
        self.assertEqual(self.agent.welcomes, [{"ack": 0}])
        self.endpoint.close(1001)
        self.assertEqual(self.next_delay(), 1)
        self.assertEqual(self.agent.lost, [session._protocol])

    def test_rejected_token_backs_off_at_cap(self):
        for _ in range(3):
            session = self.endpoint.accept()
            self.assertEqual(session.frames[0][0], "HELLO")
            self.endpoint.close(protocol.CLOSE_INVALID_TOKEN)
            self.assertEqual(self.retry(), 60)
        self.assertEqual(len(self.endpoint.attempts), 4)

    def test_no_welcome_drops_and_retries(self):
        session = self.endpoint.accept()
        self.clock.advance(self.factory.welcome_timeout)
        self.assertTrue(session.dropped)
        self.endpoint.close(1006)
        self.assertEqual(self.next_delay(), 1)

    def test_stop_closes_with_1000_and_waits(self):
        session = self.endpoint.accept()
        session.onMessage(b'["WELCOME", {"ack": 0}]', False)
        stopped = self.service.stopService()
        self.assertEqual(session.close_sent, 1000)
        self.assertNoResult(stopped)
        self.endpoint.close(1000)
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no retry after a stop

    def test_stop_does_not_wait_forever_for_the_close(self):
        session = self.endpoint.accept()
        stopped = self.service.stopService()
        self.clock.advance(self.service.close_timeout)
        self.assertTrue(session.dropped)
        self.endpoint.close(1006)
        self.successResultOf(stopped)

    def test_stop_while_connecting_cancels_quietly(self):
        stopped = self.service.stopService()
        self.successResultOf(stopped)
        self.assertEqual(self.failures, [])  # a cancelled attempt is not a failure
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_while_waiting(self):
        self.endpoint.refuse()
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.service.startService()  # and it can start again
        self.assertEqual(len(self.endpoint.attempts), 2)

    def test_tls_failure_named(self):
        from OpenSSL import SSL

        session = self.endpoint.accept()
        session._protocol.state = Session.STATE_CONNECTING
        session._protocol.close_code = 1006
        error = SSL.Error([("SSL routines", "", "certificate verify failed")])
        session.connectionLost(Failure(error))
        self.assertEqual(self.failures, ["TLS: certificate verify failed"])


class EndpointTests(SynchronousTestCase):
    def connect(self, url, **kwargs):
        reactor = MemoryReactorClock()
        endpoint = client.platform_endpoint(reactor, url, **kwargs)
        endpoint.connect(Factory.forProtocol(Protocol))
        reactor.advance(0)
        [(host, port, factory, timeout, _)] = reactor.tcpClients
        transport = StringTransport()
        factory.buildProtocol(None).makeConnection(transport)
        return host, port, timeout, transport.value()

    def test_ws(self):
        host, port, timeout, sent = self.connect("ws://127.0.0.1/compute/agent/v1", timeout=7)
        self.assertEqual((host, port, timeout), ("127.0.0.1", 80, 7))
        self.assertEqual(sent, b"")  # no TLS

    def test_wss_is_tls_to_the_url_host(self):
        host, port, timeout, sent = self.connect("wss://localhost/compute/agent/v1")
        self.assertEqual((host, port), ("127.0.0.1", 443))
        self.assertEqual(sent[:1], b"\x16")  # a TLS handshake record: the ClientHello
        self.assertIn(b"localhost", sent)  # with the server name to verify
        self.assertEqual(self.connect("wss://127.0.0.1:8443/x")[1], 8443)

    def test_ca_file_without_certificates(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate\n")
        e = self.assertRaises(ValueError, client.platform_endpoint, MemoryReactorClock(),
                              "wss://example.org/compute/agent/v1", path)
        self.assertIn("holds no PEM certificate", str(e))
