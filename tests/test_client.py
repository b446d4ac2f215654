"""
The WebSocket client: dispatch, errors that keep the connection, backoff.
"""

import json

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from everest_agent import protocol
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


class FakeConnector:
    def __init__(self):
        self.connects = 0

    def connect(self):
        self.connects += 1


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
        self.proto.sendMessage = lambda payload, isBinary=False: self.frames.append(json.loads(payload))
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


class BackoffTests(SynchronousTestCase):
    def setUp(self):
        # Jitter is random; make it exact here so the test cannot flake.
        from twisted.internet import protocol as twisted_protocol

        self.patch(twisted_protocol.random, "normalvariate", lambda mu, sigma: mu)

    def delays(self, factory, clock, connector, count, reason=None):
        """Lose the connection C{count} times; return the delays chosen."""
        seen = []
        for _ in range(count):
            factory.clientConnectionLost(connector, Failure(Exception("lost")))
            call = clock.getDelayedCalls()[-1]
            seen.append(call.getTime() - clock.seconds())
            clock.advance(seen[-1])
        return seen

    def test_exponential_with_cap(self):
        factory, agent, clock = make_factory(initial_delay=1, max_delay=60, factor=2)
        seen = self.delays(factory, clock, FakeConnector(), 10)
        self.assertEqual(seen, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60])

    def test_reset_only_after_welcome(self):
        factory, agent, clock = make_factory()
        connector = FakeConnector()
        self.delays(factory, clock, connector, 5)
        proto = AgentProtocolClient()
        proto.state = AgentProtocolClient.STATE_OPEN
        proto.factory = factory
        proto.sendMessage = lambda *a, **k: None
        proto.onOpen()  # TCP and WebSocket up: not enough to reset
        self.assertGreater(factory.delay, 10)
        proto.onMessage(b'["WELCOME", {"ack": 0}]', False)
        self.assertEqual(factory.delay, factory.initialDelay)

    def test_rejected_token_backs_off_at_cap(self):
        factory, agent, clock = make_factory(max_delay=60)
        connector = FakeConnector()
        for _ in range(3):
            proto = AgentProtocolClient()
            proto.state = AgentProtocolClient.STATE_OPEN
            proto.factory = factory
            proto.sendMessage = lambda *a, **k: None
            proto.onOpen()
            proto.onClose(False, protocol.CLOSE_INVALID_TOKEN, "invalid token")
            factory.clientConnectionLost(connector, Failure(Exception("closed")))
            call = [c for c in clock.getDelayedCalls() if c.active()][-1]
            self.assertEqual(call.getTime() - clock.seconds(), 60)
            clock.advance(call.getTime() - clock.seconds())
        self.assertEqual(connector.connects, 3)
