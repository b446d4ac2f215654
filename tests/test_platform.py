"""
Tests for the reference platform (L{everest_agent.platform}).

Unit tests drive L{Platform} through a fake connection and a L{Clock};
integration tests run it on a loopback port and talk to it with a minimal
Autobahn client, treq and twisted.web's client.
"""

import json
import os

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, endpoints, reactor
from twisted.internet.defer import Deferred, DeferredQueue, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher, formatEvent
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from treq.client import HTTPClient

from everest_agent import protocol as P
from everest_agent.platform import LOST_REASON, NotConnected, Platform, StateNotReached, listen
from everest_agent.platform import tap
from everest_agent.platform.core import parse_agent_message
from everest_agent.platform.files import PlatformRequest
from everest_agent.platform.server import ConnectionTracker

TOKEN = "s3cr3t-token-agent-one"
TOKEN2 = "an0ther-token-agent-two"
SPEC = {"command": "true"}


def hello(token=TOKEN, protocol=1, tasks=(), **extra):
    body = {"token": token, "protocol": protocol, "agent": "everest-agent/test",
            "hostname": "host", "handler": "local", "slots": 2, "tasks": list(tasks)}
    body.update(extra)
    return [P.HELLO, body]


def state(task_id, name, seq, **info):
    info.update(seq=seq, time=1.0)
    return [P.TASK_STATE, task_id, name, info]


# ---------------------------------------------------------------------------
# Unit tests: fake connection, Clock


class FakeConnection:
    """
    The connection interface L{everest_agent.platform.core.Session} uses.
    """

    def __init__(self):
        self.sent = []
        self.frames = []
        self.close_code = None
        self.close_reason = None
        self.aborted = False

    def platform_send(self, payload, binary):
        self.frames.append((payload, binary))
        if not binary:
            try:
                self.sent.append(json.loads(payload))
            except ValueError:
                self.sent.append(payload)

    def platform_close(self, code, reason):
        self.close_code = code
        self.close_reason = reason

    def platform_abort(self):
        self.aborted = True

    def of_type(self, kind):
        return [m for m in self.sent if isinstance(m, list) and m[0] == kind]


class PlatformUnitMixin:
    def make_platform(self, **kwargs):
        self.clock = Clock()
        kwargs.setdefault("heartbeat", 7)
        self.platform = Platform({TOKEN: "a1", TOKEN2: "a2"}, self.clock, **kwargs)
        return self.platform

    def connect(self, message=None, tasks=()):
        """
        Open a session and send HELLO (or C{message}).
        """
        conn = FakeConnection()
        session = self.platform.connection_made(conn, peer="test")
        conn.session = session
        if message is None:
            message = hello(tasks=tasks)
        self.receive(conn, message)
        return conn

    def receive(self, conn, message):
        payload = message if isinstance(message, bytes) else json.dumps(message).encode()
        conn.session.receive(payload)

    def lose(self, conn):
        conn.session.lost()


class SessionStartTests(PlatformUnitMixin, SynchronousTestCase):
    def setUp(self):
        self.make_platform()

    def test_welcome(self):
        conn = self.connect()
        self.assertEqual(conn.sent, [[P.WELCOME, {"ack": 0, "heartbeat": 7}]])
        self.assertIsNone(conn.close_code)
        self.assertTrue(self.platform.connected("a1"))
        self.assertFalse(self.platform.connected("a2"))
        self.assertEqual(list(self.platform.sessions), ["a1"])
        self.assertEqual(self.platform.agents["a1"].hello["hostname"], "host")
        self.assertNotIn("token", self.platform.agents["a1"].hello)

    def test_welcome_reports_last_seq(self):
        self.platform.agents["a1"].last_seq = 41
        conn = self.connect()
        self.assertEqual(conn.sent[0], [P.WELCOME, {"ack": 41, "heartbeat": 7}])

    def test_hello_timeout(self):
        conn = FakeConnection()
        self.platform.connection_made(conn, peer="test")
        self.clock.advance(9.9)
        self.assertIsNone(conn.close_code)
        self.clock.advance(0.2)
        self.assertEqual(conn.close_code, P.CLOSE_POLICY)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_hello_timeout_configurable(self):
        self.make_platform(hello_timeout=2)
        conn = FakeConnection()
        self.platform.connection_made(conn, peer="test")
        self.clock.advance(2)
        self.assertEqual(conn.close_code, P.CLOSE_POLICY)

    def test_hello_cancels_timer(self):
        self.connect()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lost_before_hello_cancels_timer(self):
        conn = FakeConnection()
        session = self.platform.connection_made(conn, peer="test")
        session.lost()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.platform.connections, set())

    def assertClosed(self, message, code):
        conn = self.connect(message)
        self.assertEqual(conn.close_code, code)
        self.assertFalse(conn.of_type(P.WELCOME))
        self.assertFalse(self.platform.connected("a1"))
        # Anything after the close is ignored.
        self.receive(conn, hello())
        self.assertEqual(conn.sent, [])
        return conn

    def test_first_message_not_hello(self):
        self.assertClosed(state("t1", P.ACCEPTED, 1), P.CLOSE_POLICY)

    def test_first_message_not_json(self):
        self.assertClosed(b"{nope", P.CLOSE_POLICY)

    def test_hello_without_token(self):
        self.assertClosed([P.HELLO, {"protocol": 1}], P.CLOSE_POLICY)

    def test_hello_without_protocol(self):
        self.assertClosed([P.HELLO, {"token": TOKEN}], P.CLOSE_POLICY)

    def test_hello_bad_tasks(self):
        self.assertClosed(hello(tasks=[1, 2]), P.CLOSE_POLICY)

    def test_bad_token(self):
        self.assertClosed(hello(token="wrong"), P.CLOSE_INVALID_TOKEN)

    def test_bad_protocol(self):
        self.assertClosed(hello(protocol=2), P.CLOSE_UNSUPPORTED_PROTOCOL)

    def test_protocol_true_is_not_1(self):
        self.assertClosed(hello(protocol=True), P.CLOSE_UNSUPPORTED_PROTOCOL)

    def test_second_session(self):
        first = self.connect()
        second = self.connect()
        self.assertEqual(second.close_code, P.CLOSE_SESSION_ACTIVE)
        self.assertIs(self.platform.sessions["a1"], first.session)
        # The rejected session going away leaves the live one alone.
        self.lose(second)
        self.assertIs(self.platform.sessions["a1"], first.session)

    def test_other_agent_may_connect(self):
        self.connect()
        other = self.connect(hello(token=TOKEN2))
        self.assertEqual(other.sent[0][0], P.WELCOME)
        self.assertEqual(sorted(self.platform.sessions), ["a1", "a2"])

    def test_reconnect_after_loss(self):
        first = self.connect()
        self.lose(first)
        self.assertFalse(self.platform.connected("a1"))
        second = self.connect()
        self.assertEqual(second.sent[0][0], P.WELCOME)

    def test_binary_frame_closes(self):
        conn = self.connect()
        conn.session.receive(b"[]", True)
        self.assertEqual(conn.close_code, 1003)

    def test_token_never_logged(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.connect(hello(token="wrong-" + TOKEN))
        self.connect()
        self.connect()
        self.assertTrue(events)
        for event in events:
            self.assertNotIn(TOKEN, formatEvent(event))
            self.assertNotIn(TOKEN, repr(event))

    def test_wait_connected(self):
        d = self.platform.wait_connected("a1")
        self.assertNoResult(d)
        conn = self.connect()
        self.assertIs(self.successResultOf(d), conn.session)
        self.assertIs(self.successResultOf(self.platform.wait_connected()), conn.session)

    def test_wait_disconnected(self):
        self.successResultOf(self.platform.wait_disconnected("a1"))
        conn = self.connect()
        d = self.platform.wait_disconnected("a1")
        self.assertNoResult(d)
        self.lose(conn)
        self.successResultOf(d)

    def test_disconnect(self):
        conn = self.connect()
        d = self.platform.disconnect("a1")
        self.assertTrue(conn.aborted)
        self.assertNoResult(d)
        self.lose(conn)
        self.successResultOf(d)
        self.successResultOf(self.platform.disconnect("a1"))


class ReliableMessageTests(PlatformUnitMixin, SynchronousTestCase):
    def setUp(self):
        self.make_platform()
        self.task_id = self.platform.submit(SPEC, task_id="t1")
        self.conn = self.connect()
        del self.conn.sent[:]

    def test_state_applied_and_acked(self):
        self.receive(self.conn, state("t1", P.ACCEPTED, 1))
        task = self.platform.tasks["t1"]
        self.assertEqual(task.state, P.ACCEPTED)
        self.assertEqual(task.info["seq"], 1)
        self.assertEqual(task.states, [P.ACCEPTED])
        self.assertEqual(self.platform.agents["a1"].last_seq, 1)
        self.assertEqual(self.conn.of_type(P.ACK), [])
        self.clock.advance(0)
        self.assertEqual(self.conn.of_type(P.ACK), [[P.ACK, 1]])

    def test_acks_coalesced(self):
        self.receive(self.conn, state("t1", P.ACCEPTED, 1))
        self.receive(self.conn, state("t1", P.RUNNING, 2))
        self.receive(self.conn, [P.TASK_MESSAGE, "t1", "hi", {"seq": 5}])
        self.clock.advance(0)
        self.assertEqual(self.conn.of_type(P.ACK), [[P.ACK, 5]])
        self.clock.advance(10)
        self.assertEqual(self.conn.of_type(P.ACK), [[P.ACK, 5]])

    def test_duplicate_dropped_and_acked(self):
        self.receive(self.conn, state("t1", P.ACCEPTED, 1))
        self.receive(self.conn, state("t1", P.RUNNING, 2))
        self.clock.advance(0)
        self.receive(self.conn, state("t1", P.RUNNING, 2))
        self.receive(self.conn, state("t1", P.ACCEPTED, 1))
        self.clock.advance(0)
        self.assertEqual(self.platform.duplicates, 2)
        self.assertEqual(self.platform.tasks["t1"].states, [P.ACCEPTED, P.RUNNING])
        self.assertEqual(self.platform.violations, [])
        self.assertEqual(self.conn.of_type(P.ACK), [[P.ACK, 2], [P.ACK, 2]])

    def test_seq_gaps_allowed(self):
        self.receive(self.conn, state("t1", P.ACCEPTED, 10))
        self.receive(self.conn, state("t1", P.DONE, 20, exitCode=0))
        self.clock.advance(0)
        self.assertEqual(self.platform.tasks["t1"].state, P.DONE)
        self.assertEqual(self.conn.of_type(P.ACK), [[P.ACK, 20]])

    def test_order_violation(self):
        self.receive(self.conn, state("t1", P.RUNNING, 1))
        self.receive(self.conn, state("t1", P.QUEUED, 2))
        self.assertEqual(len(self.platform.violations), 1)
        v = self.platform.violations[0]
        self.assertEqual((v["taskId"], v["old"], v["new"], v["seq"]), ("t1", P.RUNNING, P.QUEUED, 2))
        self.assertEqual(self.platform.tasks["t1"].state, P.RUNNING)
        # Still acknowledged: re-sending it would not make it right.
        self.clock.advance(0)
        self.assertEqual(self.conn.of_type(P.ACK), [[P.ACK, 2]])

    def test_state_after_terminal_is_violation(self):
        self.receive(self.conn, state("t1", P.DONE, 1, exitCode=0))
        self.receive(self.conn, state("t1", P.FAILED, 2, reason="x"))
        self.assertEqual(len(self.platform.violations), 1)
        self.assertEqual(self.platform.tasks["t1"].state, P.DONE)

    def test_repeated_state_is_violation(self):
        self.receive(self.conn, state("t1", P.RUNNING, 1))
        self.receive(self.conn, state("t1", P.RUNNING, 2))
        self.assertEqual(len(self.platform.violations), 1)

    def test_state_of_other_agents_task(self):
        self.platform.submit(SPEC, task_id="t2", agent="a2")
        self.receive(self.conn, state("t2", P.ACCEPTED, 1))
        self.assertEqual(len(self.platform.violations), 1)
        self.assertIsNone(self.platform.tasks["t2"].state)

    def test_unknown_task_recorded(self):
        self.receive(self.conn, state("zz", P.ACCEPTED, 1))
        task = self.platform.tasks["zz"]
        self.assertTrue(task.unknown)
        self.assertEqual(task.state, P.ACCEPTED)
        self.assertEqual(self.platform.violations, [])

    def test_task_message(self):
        self.receive(self.conn, [P.TASK_MESSAGE, "t1", "hello there", {"seq": 3}])
        self.receive(self.conn, [P.TASK_MESSAGE, "t1", "hello there", {"seq": 3}])
        self.assertEqual(self.platform.tasks["t1"].messages, ["hello there"])
        self.assertEqual(self.platform.duplicates, 1)

    def test_wait_message(self):
        d = self.platform.wait_message("t1", 2)
        self.receive(self.conn, [P.TASK_MESSAGE, "t1", "a", {"seq": 1}])
        self.assertNoResult(d)
        self.receive(self.conn, [P.TASK_MESSAGE, "t1", "b", {"seq": 2}])
        self.assertEqual(self.successResultOf(d), ["a", "b"])

    def test_malformed_counted_not_closed(self):
        for message in (b"not json", b"{}", [P.TASK_STATE, "t1", P.RUNNING],
                        [P.TASK_STATE, "t1", P.RUNNING, {"time": 1}],
                        [P.TASK_STATE, "t1", P.RUNNING, {"seq": 0}],
                        [P.TASK_STATE, "t1", P.RUNNING, {"seq": "1"}],
                        ["NOPE", 1], [P.RESOURCE_STATE, 3], hello()):
            self.receive(self.conn, message)
        self.assertEqual(self.platform.malformed, 9)
        self.assertIsNone(self.conn.close_code)
        self.assertEqual(self.platform.agents["a1"].last_seq, 0)

    def test_malformed_reliable_with_seq_is_acked(self):
        self.receive(self.conn, [P.TASK_STATE, "..bad", P.RUNNING, {"seq": 4}])
        self.receive(self.conn, [P.TASK_STATE, "t1", "SLEEPING", {"seq": 5}])
        self.clock.advance(0)
        self.assertEqual(self.platform.malformed, 2)
        self.assertEqual(self.conn.of_type(P.ACK), [[P.ACK, 5]])

    def test_resource_state_and_error(self):
        self.receive(self.conn, [P.RESOURCE_STATE, {"slots": 2, "busy": 1}])
        self.receive(self.conn, [P.ERROR, {"code": "unknown-type", "message": "what"}])
        agent = self.platform.agents["a1"]
        self.assertEqual(agent.resource, {"slots": 2, "busy": 1})
        self.assertEqual(agent.errors, [{"code": "unknown-type", "message": "what"}])
        self.assertEqual(self.conn.of_type(P.ACK), [])

    def test_pause_and_resume_acks(self):
        self.platform.pause_acks()
        self.assertTrue(self.platform.ack_paused)
        self.receive(self.conn, state("t1", P.ACCEPTED, 1))
        self.receive(self.conn, state("t1", P.RUNNING, 2))
        self.clock.advance(5)
        self.assertEqual(self.conn.of_type(P.ACK), [])
        self.platform.resume_acks()
        self.clock.advance(0)
        self.assertEqual(self.conn.of_type(P.ACK), [[P.ACK, 2]])

    def test_ack_paused_attribute(self):
        self.platform.ack_paused = True
        self.receive(self.conn, state("t1", P.ACCEPTED, 1))
        self.clock.advance(0)
        self.assertEqual(self.conn.of_type(P.ACK), [])
        self.platform.ack_paused = False
        self.clock.advance(0)
        self.assertEqual(self.conn.of_type(P.ACK), [[P.ACK, 1]])

    def test_resume_without_news_sends_nothing(self):
        self.platform.pause_acks()
        self.platform.resume_acks()
        self.clock.advance(0)
        self.assertEqual(self.conn.of_type(P.ACK), [])

    def test_pause_acks_welcome(self):
        self.receive(self.conn, state("t1", P.ACCEPTED, 1))
        self.clock.advance(0)
        self.platform.pause_acks(welcome=True)
        self.receive(self.conn, state("t1", P.RUNNING, 2))
        self.lose(self.conn)
        conn = self.connect(tasks=["t1"])
        self.assertEqual(conn.sent[0], [P.WELCOME, {"ack": 1, "heartbeat": 7}])
        self.receive(conn, state("t1", P.RUNNING, 2))
        self.assertEqual(self.platform.duplicates, 1)
        self.platform.resume_acks()
        self.clock.advance(0)
        self.assertEqual(conn.of_type(P.ACK), [[P.ACK, 2]])

    def test_welcome_is_truthful_while_acks_paused(self):
        self.platform.pause_acks()
        self.receive(self.conn, state("t1", P.ACCEPTED, 1))
        self.lose(self.conn)
        conn = self.connect(tasks=["t1"])
        self.assertEqual(conn.sent[0][1]["ack"], 1)

    def test_no_ack_after_session_lost(self):
        self.receive(self.conn, state("t1", P.ACCEPTED, 1))
        self.lose(self.conn)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.conn.of_type(P.ACK), [])


class TaskCommandTests(PlatformUnitMixin, SynchronousTestCase):
    def setUp(self):
        self.make_platform()

    def test_submit_queued_until_welcome(self):
        task_id = self.platform.submit(SPEC)
        self.assertFalse(self.platform.tasks[task_id].submitted)
        conn = self.connect()
        self.assertEqual(conn.sent, [[P.WELCOME, {"ack": 0, "heartbeat": 7}],
                                     [P.TASK_SUBMIT, task_id, SPEC]])
        self.assertTrue(self.platform.tasks[task_id].submitted)

    def test_submit_while_connected(self):
        conn = self.connect()
        task_id = self.platform.submit(SPEC, task_id="x-1-0")
        self.assertEqual(task_id, "x-1-0")
        self.assertEqual(conn.sent[-1], [P.TASK_SUBMIT, "x-1-0", SPEC])

    def test_submit_to_other_agent(self):
        conn = self.connect()
        self.platform.submit(SPEC, agent="a2")
        self.assertEqual(conn.of_type(P.TASK_SUBMIT), [])

    def test_generated_ids(self):
        a = self.platform.submit(SPEC)
        b = self.platform.submit(SPEC)
        c = self.platform.submit(SPEC, job=7)
        d = self.platform.submit(SPEC, job=7)
        self.assertEqual((a, b, c, d), ("j1-1-0", "j2-1-0", "j7-1-0", "j7-2-0"))
        for task_id in (a, b, c, d):
            self.assertTrue(P.valid_task_id(task_id))

    def test_submit_rejects(self):
        self.platform.submit(SPEC, task_id="t1")
        self.assertRaises(ValueError, self.platform.submit, SPEC, task_id="t1")
        self.assertRaises(ValueError, self.platform.submit, SPEC, task_id=".bad")
        self.assertRaises(ValueError, self.platform.submit, "command", task_id="t2")
        self.assertRaises(KeyError, self.platform.submit, SPEC, agent="nobody")

    def test_send_raw(self):
        self.assertRaises(NotConnected, self.platform.send_raw, "a1", [P.TASK_SUBMIT, "..", {}])
        conn = self.connect()
        self.platform.send_raw("a1", [P.TASK_SUBMIT, "..", {}])
        self.platform.send_raw("a1", b"\xff\xfe not utf-8")
        self.platform.send_raw("a1", b"\x00\x01", binary=True)
        self.assertEqual(conn.frames[1:], [(b'["TASK_SUBMIT","..",{}]', False),
                                           (b"\xff\xfe not utf-8", False), (b"\x00\x01", True)])

    def test_cancel_unsent(self):
        task_id = self.platform.submit(SPEC)
        self.assertTrue(self.platform.cancel(task_id))
        task = self.platform.tasks[task_id]
        self.assertEqual(task.state, P.CANCELED)
        self.assertTrue(task.info["platform"])
        conn = self.connect()
        self.assertEqual(conn.sent[1:], [])
        self.assertFalse(self.platform.cancel(task_id))

    def test_cancel_connected(self):
        conn = self.connect()
        task_id = self.platform.submit(SPEC)
        self.assertTrue(self.platform.cancel(task_id))
        self.assertEqual(conn.sent[-1], [P.TASK_CANCEL, task_id])
        self.receive(conn, state(task_id, P.ACCEPTED, 1))
        self.receive(conn, state(task_id, P.CANCELED, 2, reason="canceled"))
        self.assertFalse(self.platform.cancel(task_id))
        self.assertEqual(len(conn.of_type(P.TASK_CANCEL)), 1)

    def test_cancel_while_disconnected_sent_after_welcome(self):
        conn = self.connect()
        task_id = self.platform.submit(SPEC)
        self.receive(conn, state(task_id, P.RUNNING, 1))
        self.lose(conn)
        self.platform.cancel(task_id)
        conn = self.connect(tasks=[task_id])
        self.assertEqual(conn.sent[1:], [[P.TASK_CANCEL, task_id]])

    def test_cancel_unaccepted_unknown_to_agent(self):
        conn = self.connect()
        task_id = self.platform.submit(SPEC)
        self.lose(conn)
        self.platform.cancel(task_id)
        conn = self.connect(tasks=[])
        self.assertEqual(conn.sent[1:], [])
        task = self.platform.tasks[task_id]
        self.assertEqual(task.state, P.CANCELED)
        self.assertTrue(task.info["platform"])

    def test_cancel_answered_unknown_task(self):
        conn = self.connect()
        task_id = self.platform.submit(SPEC)
        self.platform.cancel(task_id)
        self.receive(conn, [P.ERROR, {"code": P.E_UNKNOWN_TASK, "message": "?", "taskId": task_id}])
        self.assertEqual(self.platform.tasks[task_id].state, P.CANCELED)

    def test_unknown_task_error_without_cancel_leaves_task(self):
        conn = self.connect()
        task_id = self.platform.submit(SPEC)
        self.receive(conn, [P.ERROR, {"code": P.E_UNKNOWN_TASK, "message": "?", "taskId": task_id}])
        self.assertIsNone(self.platform.tasks[task_id].state)

    def test_send_message(self):
        task_id = self.platform.submit(SPEC)
        self.platform.send_message(task_id, "queued")
        conn = self.connect()
        self.assertEqual(conn.sent[1:], [[P.TASK_SUBMIT, task_id, SPEC],
                                         [P.TASK_MESSAGE, task_id, "queued"]])
        self.platform.send_message(task_id, "now")
        self.assertEqual(conn.sent[-1], [P.TASK_MESSAGE, task_id, "now"])
        self.assertRaises(KeyError, self.platform.send_message, "nope", "x")

    def test_wait_for(self):
        conn = self.connect()
        task_id = self.platform.submit(SPEC)
        running = self.platform.wait_for(task_id, P.RUNNING)
        staging = self.platform.wait_for(task_id, P.STAGING_IN)
        done = self.platform.wait_for(task_id)
        self.receive(conn, state(task_id, P.ACCEPTED, 1))
        self.assertNoResult(running)
        self.receive(conn, state(task_id, P.RUNNING, 2))
        task = self.successResultOf(running)
        self.assertEqual(task.state, P.RUNNING)
        # STAGING_IN was skipped: the task is past it.
        self.successResultOf(staging)
        self.assertNoResult(done)
        self.receive(conn, state(task_id, P.DONE, 3, exitCode=0))
        self.assertEqual(self.successResultOf(done).info["exitCode"], 0)
        # Already there.
        self.successResultOf(self.platform.wait_for(task_id, P.RUNNING))
        self.successResultOf(self.platform.wait_for(task_id, P.DONE))

    def test_wait_for_state_not_reached(self):
        conn = self.connect()
        task_id = self.platform.submit(SPEC)
        done = self.platform.wait_for(task_id, P.DONE)
        running = self.platform.wait_for(task_id, P.RUNNING)
        self.receive(conn, state(task_id, P.FAILED, 1, reason="refused"))
        f = self.failureResultOf(done, StateNotReached)
        self.assertEqual(f.value.task.info["reason"], "refused")
        self.failureResultOf(running, StateNotReached)
        self.failureResultOf(self.platform.wait_for(task_id, P.DONE), StateNotReached)

    def test_wait_for_cancel(self):
        task_id = self.platform.submit(SPEC)
        d = self.platform.wait_for(task_id)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.platform.tasks[task_id]._waiters, [])

    def test_variable_store(self):
        conn = self.connect()
        a = self.platform.submit(SPEC, job=3)
        b = self.platform.submit(SPEC, job=3)
        c = self.platform.submit(SPEC, job=4)
        for i, task_id in enumerate((a, b, c)):
            self.receive(conn, state(task_id, P.RUNNING, i + 1))
        del conn.sent[:]
        self.receive(conn, [P.TASK_MESSAGE, a, "VAR_GET x", {"seq": 10}])
        self.assertEqual(conn.sent, [[P.TASK_MESSAGE, a, "VAR_VALUE x NULL"]])
        self.receive(conn, [P.TASK_MESSAGE, a, "VAR_SET_MD x 4 2", {"seq": 11}])
        self.assertEqual(conn.sent[1:], [[P.TASK_MESSAGE, a, "VAR_VALUE x 4 2"],
                                         [P.TASK_MESSAGE, b, "VAR_VALUE x 4 2"]])
        self.receive(conn, [P.TASK_MESSAGE, b, "VAR_GET x", {"seq": 12}])
        self.assertEqual(conn.sent[-1], [P.TASK_MESSAGE, b, "VAR_VALUE x 4 2"])
        self.receive(conn, [P.TASK_MESSAGE, c, "VAR_GET x", {"seq": 13}])
        self.assertEqual(conn.sent[-1], [P.TASK_MESSAGE, c, "VAR_VALUE x NULL"])


class ReconcileTests(PlatformUnitMixin, SynchronousTestCase):
    def setUp(self):
        self.make_platform()

    def test_lost_task_failed(self):
        conn = self.connect()
        task_id = self.platform.submit(SPEC)
        kept = self.platform.submit(SPEC)
        done = self.platform.submit(SPEC)
        self.receive(conn, state(task_id, P.RUNNING, 1))
        self.receive(conn, state(kept, P.RUNNING, 2))
        self.receive(conn, state(done, P.DONE, 3, exitCode=0))
        waiting = self.platform.wait_for(task_id)
        self.lose(conn)
        conn = self.connect(tasks=[kept])
        task = self.successResultOf(waiting)
        self.assertEqual(task.state, P.FAILED)
        self.assertEqual(task.info["reason"], LOST_REASON)
        self.assertTrue(task.info["platform"])
        self.assertNotIn("seq", task.info)
        self.assertEqual(task.history[-1], (P.FAILED, task.info))
        self.assertEqual(self.platform.tasks[kept].state, P.RUNNING)
        self.assertEqual(self.platform.tasks[done].state, P.DONE)
        self.assertEqual(conn.sent[1:], [])

    def test_unaccepted_resubmitted(self):
        conn = self.connect()
        task_id = self.platform.submit(SPEC)
        self.lose(conn)
        conn = self.connect()
        self.assertEqual(conn.sent[1:], [[P.TASK_SUBMIT, task_id, SPEC]])
        self.assertEqual(self.platform.tasks[task_id].submit_count, 2)
        self.assertIsNone(self.platform.tasks[task_id].state)

    def test_unaccepted_listed_resubmitted(self):
        conn = self.connect()
        task_id = self.platform.submit(SPEC)
        self.lose(conn)
        conn = self.connect(tasks=[task_id])
        self.assertEqual(conn.sent[1:], [[P.TASK_SUBMIT, task_id, SPEC]])

    def test_unaccepted_listed_canceled(self):
        conn = self.connect()
        task_id = self.platform.submit(SPEC)
        self.lose(conn)
        self.platform.cancel(task_id)
        conn = self.connect(tasks=[task_id])
        self.assertEqual(conn.sent[1:], [[P.TASK_SUBMIT, task_id, SPEC], [P.TASK_CANCEL, task_id]])
        self.assertIsNone(self.platform.tasks[task_id].state)

    def test_order_welcome_submits_cancels_messages(self):
        conn = self.connect()
        running = self.platform.submit(SPEC)
        self.receive(conn, state(running, P.RUNNING, 1))
        self.lose(conn)
        self.platform.send_message(running, "m")
        self.platform.cancel(running)
        new = self.platform.submit(SPEC)
        conn = self.connect(tasks=[running])
        self.assertEqual([m[0] for m in conn.sent],
                         [P.WELCOME, P.TASK_SUBMIT, P.TASK_CANCEL, P.TASK_MESSAGE])
        self.assertEqual(conn.sent[1][1], new)

    def test_repeat_after_resubmit_is_not_violation(self):
        conn = self.connect()
        task_id = self.platform.submit(SPEC)
        self.lose(conn)
        conn = self.connect(tasks=[task_id])
        # The agent had accepted it just before the connection broke: it
        # re-sends its outbox (ACCEPTED, RUNNING), then answers the resubmit
        # with its current state.
        self.receive(conn, state(task_id, P.ACCEPTED, 1))
        self.receive(conn, state(task_id, P.RUNNING, 2))
        self.receive(conn, state(task_id, P.RUNNING, 3))
        self.assertEqual(self.platform.violations, [])
        self.assertEqual(self.platform.tasks[task_id].states, [P.ACCEPTED, P.RUNNING])
        self.assertEqual(self.platform.tasks[task_id].repeats, 1)
        # Only one repeat per extra submit.
        self.receive(conn, state(task_id, P.RUNNING, 4))
        self.assertEqual(len(self.platform.violations), 1)

    def test_other_agents_tasks_untouched(self):
        other = self.connect(hello(token=TOKEN2))
        task_id = self.platform.submit(SPEC, agent="a2")
        self.receive(other, state(task_id, P.RUNNING, 1))
        self.connect(tasks=[])
        self.assertEqual(self.platform.tasks[task_id].state, P.RUNNING)


class StateFileTests(PlatformUnitMixin, SynchronousTestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.make_platform(state_file=self.path)

    def load(self):
        with open(self.path) as f:
            return json.load(f)

    def test_round_trip(self):
        conn = self.connect()
        task_id = self.platform.submit(SPEC, job=5)
        self.receive(conn, state(task_id, P.RUNNING, 3))
        self.receive(conn, [P.TASK_MESSAGE, task_id, "hi", {"seq": 4}])
        self.clock.advance(0)
        self.assertEqual(self.load()["agents"]["a1"]["lastSeq"], 4)

        restarted = Platform({TOKEN: "a1", TOKEN2: "a2"}, Clock(), state_file=self.path)
        task = restarted.tasks[task_id]
        self.assertEqual(task.state, P.RUNNING)
        self.assertEqual(task.spec, SPEC)
        self.assertEqual(task.messages, ["hi"])
        self.assertTrue(task.submitted)
        self.assertEqual(task.history, [(P.RUNNING, {"seq": 3, "time": 1.0})])
        self.assertEqual(restarted.agents["a1"].last_seq, 4)
        self.assertEqual(restarted.submit(SPEC, job=5), "j5-2-0")
        self.assertEqual(restarted.submit(SPEC), "j6-1-0")

    def test_saved_before_ack(self):
        conn = self.connect()
        self.clock.advance(5)
        self.receive(conn, state("zz", P.RUNNING, 9))
        # The ACK goes out in the next turn, after a save, even though the
        # throttle would wait longer.
        self.clock.advance(0)
        self.assertEqual(conn.of_type(P.ACK), [[P.ACK, 9]])
        self.assertEqual(self.load()["agents"]["a1"]["lastSeq"], 9)

    def test_throttled(self):
        self.platform.submit(SPEC, task_id="t1")
        self.clock.advance(0)
        self.assertEqual(len(self.load()["tasks"]), 1)
        self.platform.submit(SPEC, task_id="t2")
        self.clock.advance(0.5)
        self.assertEqual(len(self.load()["tasks"]), 1)
        self.clock.advance(0.5)
        self.assertEqual(len(self.load()["tasks"]), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_saved_on_close(self):
        self.platform.submit(SPEC, task_id="t1")
        self.successResultOf(self.platform.close())
        self.assertEqual(len(self.load()["tasks"]), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual([n for n in os.listdir(os.path.dirname(os.path.abspath(self.path)))
                          if n.startswith(".platform-state-")], [])

    def test_lost_task_after_restart(self):
        conn = self.connect()
        task_id = self.platform.submit(SPEC)
        self.receive(conn, state(task_id, P.RUNNING, 1))
        closed = self.platform.close()
        self.assertTrue(conn.aborted)
        self.lose(conn)
        self.successResultOf(closed)
        self.make_platform(state_file=self.path)
        conn = self.connect(tasks=[])
        self.assertEqual(conn.sent[0][1]["ack"], 1)
        self.assertEqual(self.platform.tasks[task_id].info["reason"], LOST_REASON)


class FileStoreUnitTests(PlatformUnitMixin, SynchronousTestCase):
    def setUp(self):
        self.make_platform(files_dir=self.mktemp())

    def test_put_get(self):
        self.platform.put_file("j1/in.txt", b"data")
        self.assertEqual(self.platform.get_file("j1/in.txt"), b"data")
        self.platform.put_file("j1/in.txt", b"new")
        self.assertEqual(self.platform.get_file("j1/in.txt"), b"new")

    def test_confined(self):
        for path in ("", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/", ".incoming/x",
                     "a\\b", "a\0b"):
            self.assertRaises(ValueError, self.platform.resolve_file, path)

    def test_symlink_escape(self):
        os.symlink("/", os.path.join(self.platform.files_dir, "root"))
        self.assertRaises(ValueError, self.platform.resolve_file, "root/etc/passwd")

    def test_file_url(self):
        self.assertRaises(RuntimeError, self.platform.file_url, "a")
        self.platform.set_urls("ws://127.0.0.1:9/compute/agent/v1", "http://127.0.0.1:9")
        self.assertEqual(self.platform.file_url("j 1/a.txt"), "http://127.0.0.1:9/files/j%201/a.txt")


class ParseTests(SynchronousTestCase):
    def test_parse(self):
        self.assertEqual(parse_agent_message(state("t", P.DONE, 3)),
                         (P.TASK_STATE, ("t", P.DONE, {"seq": 3, "time": 1.0})))
        self.assertEqual(parse_agent_message([P.TASK_MESSAGE, "t", "x", {"seq": 2}]),
                         (P.TASK_MESSAGE, ("t", "x", 2)))
        self.assertEqual(parse_agent_message([P.ERROR, {}]), (P.ERROR, ({},)))
        for bad in ([P.TASK_STATE, "t", "X", {"seq": 1}], [P.TASK_MESSAGE, "t", 3, {"seq": 1}],
                    [P.ERROR], [P.WELCOME, {}], [P.TASK_STATE, "/", P.DONE, {"seq": 1}]):
            self.assertRaises(P.ProtocolError, parse_agent_message, bad)


class TapTests(SynchronousTestCase):
    def parse(self, *args):
        options = tap.Options()
        options.parseOptions(list(args))
        return options

    def test_tokens(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(TOKEN2 + "\n")
        os.chmod(path, 0o600)
        options = self.parse("--token", "a1=" + TOKEN, "--token-file", "a2=" + path)
        self.assertEqual(options["tokens"], {TOKEN: "a1", TOKEN2: "a2"})
        self.assertEqual(options["listen"], "tcp:8080:interface=127.0.0.1")
        self.assertEqual(options["heartbeat"], 30)
        self.assertFalse(options["no-files-auth"])

    def test_errors(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("\n")
        for args in ([], ["--token", "a1"], ["--token", "=x"], ["--token", "a 1=x"],
                     ["--token", "a1=x", "--token", "a2=x"],
                     ["--token", "a1=x", "--token", "a1=y"],
                     ["--token-file", "a1=/nonexistent/file"],
                     ["--token-file", "a1=" + path],
                     ["--token", "a1=x", "--heartbeat", "0"],
                     ["--token", "a1=x", "--heartbeat", "soon"],
                     ["--token", "a1=x", "--tls-cert", "c.pem"],
                     ["--token", "a1=x", "--tls-cert", "/nonexistent", "--tls-key", "/nonexistent"],
                     ["--token", "a1=x", "--listen", "bogus:1"],
                     ["--token", "a1=x", "--public-url", "ftp://x"],
                     ["--token", "a1=x", "--state-file", "/nonexistent/dir/state.json"]):
            self.assertRaises(usage.UsageError, self.parse, *args)

    def test_make_service(self):
        files = self.mktemp()
        options = self.parse("--token", "a1=x", "--files-dir", files, "--no-files-auth",
                             "--heartbeat", "5")
        service = tap.makeService(options, Clock())
        self.assertEqual(service.platform.heartbeat, 5)
        self.assertFalse(service.platform.files_auth)
        self.assertEqual(service.platform.files_dir, os.path.abspath(files))
        self.assertEqual(service.platform.tokens, {"x": "a1"})

    def test_plugin(self):
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "everest-platform"]
        self.assertEqual(len(makers), 1)
        self.assertIsInstance(makers[0].options(), tap.Options)


# ---------------------------------------------------------------------------
# Integration tests: real loopback connections


class Client(WebSocketClientProtocol):
    """
    A minimal agent: records what it receives, reports how it was closed.
    """

    def __init__(self):
        super().__init__()
        self.queue = DeferredQueue()
        self.received = []
        self.opened = Deferred()
        self.closed = Deferred()

    def onOpen(self):
        self.opened.callback(self)

    def onMessage(self, payload, isBinary):
        message = json.loads(payload) if not isBinary else payload
        self.received.append(message)
        self.queue.put(message)

    def connectionLost(self, reason):
        try:
            super().connectionLost(reason)
        finally:
            for name in ("closeHandshakeTimeoutCall", "serverConnectionDropTimeoutCall"):
                call = getattr(self, name, None)
                if call is not None:
                    try:
                        call.cancel()
                    except Exception:
                        pass
                    setattr(self, name, None)
            if not self.opened.called:
                self.opened.errback(Exception("connection lost before open"))
            self.closed.callback(self.remoteCloseCode)

    def send(self, message):
        self.sendMessage(json.dumps(message).encode("utf-8"))

    @inlineCallbacks
    def next(self, kind=None):
        """
        The next message (of type C{kind}, skipping others).
        """
        while True:
            message = yield self.queue.get()
            if kind is None or message[0] == kind:
                return message


class ClientFactory(WebSocketClientFactory):
    protocol = Client

    def __init__(self, url, tracker):
        super().__init__(url)
        self.tracker = tracker
        self.setProtocolOptions(maxFramePayloadSize=4 * P.MAX_FRAME_SIZE,
                                maxMessagePayloadSize=4 * P.MAX_FRAME_SIZE)

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        self.tracker.append(p)
        return p


class IntegrationMixin:
    files_auth = True
    timeout = 20

    @inlineCallbacks
    def setUp(self):
        self.platform = Platform({TOKEN: "a1", TOKEN2: "a2"}, reactor, heartbeat=5,
                                 files_dir=self.mktemp(), files_auth=self.files_auth)
        self.port = yield listen(self.platform, reactor, 0)
        self.clients = []
        self.http_tracker = None
        self.addCleanup(self.cleanup)

    @inlineCallbacks
    def cleanup(self):
        yield self.platform.close()
        for client in self.clients:
            yield client.closed
        if self.http_tracker is not None:
            yield self.http_tracker.drop_all()
            yield self.pool.closeCachedConnections()

    @inlineCallbacks
    def open(self, url=None, tls=None):
        url = url or self.platform.ws_url
        factory = ClientFactory(url, self.clients)
        before = len(self.clients)
        if tls is None:
            reactor.connectTCP("127.0.0.1", self.port.getHost().port, factory)
        else:
            reactor.connectSSL("127.0.0.1", self.port.getHost().port, factory, tls)
        while len(self.clients) == before:
            yield deferLater(0)
        client = self.clients[-1]
        yield client.opened
        return client

    @inlineCallbacks
    def agent(self, token=TOKEN, tasks=()):
        client = yield self.open()
        client.send(hello(token=token, tasks=tasks))
        welcome = yield client.next()
        self.assertEqual(welcome[0], P.WELCOME)
        return client

    def http(self):
        if self.http_tracker is None:
            self.pool = HTTPConnectionPool(reactor, persistent=False)
            self.http_tracker = ConnectionTracker(None)
            tracker = self.http_tracker

            class Endpoints:
                def endpointForURI(self, uri):
                    inner = endpoints.TCP4ClientEndpoint(reactor, uri.host, uri.port)
                    return _TrackedEndpoint(inner, tracker)

            self._http = HTTPClient(Agent.usingEndpointFactory(reactor, Endpoints(), pool=self.pool))
        return self._http


class _TrackedEndpoint:
    def __init__(self, inner, tracker):
        self.inner = inner
        self.tracker = tracker

    def connect(self, factory):
        wrapper = ConnectionTracker(factory)
        outer = self.tracker

        def register(p):
            outer.protocols[p] = 1
            original = p.connectionLost

            def lost(reason):
                original(reason)
                outer.unregisterProtocol(p)

            p.connectionLost = lost
            return p.wrappedProtocol

        return self.inner.connect(wrapper).addCallback(lambda p: register(p))


def deferLater(delay):
    from twisted.internet.task import deferLater as _deferLater

    return _deferLater(reactor, delay, lambda: None)


class WebSocketTests(IntegrationMixin, TestCase):
    @inlineCallbacks
    def test_hello_welcome(self):
        client = yield self.open()
        client.send(hello())
        welcome = yield client.next()
        self.assertEqual(welcome, [P.WELCOME, {"ack": 0, "heartbeat": 5}])
        session = yield self.platform.wait_connected("a1")
        self.assertIn("127.0.0.1", session.peer)
        self.assertTrue(self.platform.connected("a1"))

    @inlineCallbacks
    def assertClosedWith(self, code, *messages):
        client = yield self.open()
        for message in messages:
            if isinstance(message, tuple):
                client.sendMessage(*message)
            else:
                client.send(message)
        got = yield client.closed
        self.assertEqual(got, code)
        self.assertFalse(any(m[0] == P.WELCOME for m in client.received))

    def test_bad_token(self):
        return self.assertClosedWith(P.CLOSE_INVALID_TOKEN, hello(token="nope"))

    def test_bad_protocol(self):
        return self.assertClosedWith(P.CLOSE_UNSUPPORTED_PROTOCOL, hello(protocol=2))

    def test_not_hello(self):
        return self.assertClosedWith(P.CLOSE_POLICY, [P.RESOURCE_STATE, {}])

    def test_binary(self):
        return self.assertClosedWith(1003, (b'["HELLO", {}]', True))

    def test_oversize(self):
        return self.assertClosedWith(P.CLOSE_TOO_BIG, (b" " * (P.MAX_FRAME_SIZE + 1), False))

    @inlineCallbacks
    def test_max_size_accepted(self):
        client = yield self.agent()
        body = json.dumps([P.RESOURCE_STATE, {"pad": ""}])
        pad = P.MAX_FRAME_SIZE - len(body)
        client.send([P.RESOURCE_STATE, {"pad": "x" * pad}])
        client.send([P.TASK_MESSAGE, "t1", "after", {"seq": 1}])
        self.assertEqual((yield client.next(P.ACK)), [P.ACK, 1])
        self.assertEqual(len(self.platform.agents["a1"].resource["pad"]), pad)

    @inlineCallbacks
    def test_second_session(self):
        first = yield self.agent()
        yield self.assertClosedWith(P.CLOSE_SESSION_ACTIVE, hello())
        self.assertIs(self.platform.sessions["a1"].connection.session, self.platform.sessions["a1"])
        first.send([P.TASK_MESSAGE, "t1", "still here", {"seq": 1}])
        self.assertEqual((yield first.next(P.ACK)), [P.ACK, 1])

    @inlineCallbacks
    def test_duplicate_dropped_ack_sent(self):
        task_id = self.platform.submit(SPEC)
        client = yield self.agent()
        submit = yield client.next()
        self.assertEqual(submit, [P.TASK_SUBMIT, task_id, SPEC])
        client.send(state(task_id, P.ACCEPTED, 1))
        self.assertEqual((yield client.next()), [P.ACK, 1])
        client.send(state(task_id, P.ACCEPTED, 1))
        self.assertEqual((yield client.next()), [P.ACK, 1])
        self.assertEqual(self.platform.duplicates, 1)
        self.assertEqual(self.platform.tasks[task_id].states, [P.ACCEPTED])

    @inlineCallbacks
    def test_order_violation_recorded(self):
        task_id = self.platform.submit(SPEC)
        client = yield self.agent()
        client.send(state(task_id, P.RUNNING, 1))
        client.send(state(task_id, P.ACCEPTED, 2))
        self.assertEqual((yield client.next(P.ACK)), [P.ACK, 2])
        self.assertEqual([(v["old"], v["new"]) for v in self.platform.violations],
                         [(P.RUNNING, P.ACCEPTED)])

    @inlineCallbacks
    def test_submit_before_connect(self):
        task_id = self.platform.submit(SPEC, task_id="early-1-0")
        client = yield self.agent()
        self.assertEqual((yield client.next()), [P.TASK_SUBMIT, task_id, SPEC])
        done = self.platform.wait_for(task_id)
        client.send(state(task_id, P.ACCEPTED, 1))
        client.send(state(task_id, P.DONE, 2, exitCode=0))
        task = yield done
        self.assertEqual(task.states, [P.ACCEPTED, P.DONE])

    @inlineCallbacks
    def test_disconnect_and_reconnect(self):
        task_id = self.platform.submit(SPEC)
        client = yield self.agent()
        yield client.next(P.TASK_SUBMIT)
        client.send(state(task_id, P.RUNNING, 1))
        yield client.next(P.ACK)
        yield self.platform.disconnect("a1")
        code = yield client.closed
        self.assertIsNone(code)
        self.assertFalse(self.platform.connected("a1"))
        client = yield self.open()
        client.send(hello(tasks=[task_id]))
        self.assertEqual((yield client.next()), [P.WELCOME, {"ack": 1, "heartbeat": 5}])
        self.assertEqual(self.platform.tasks[task_id].state, P.RUNNING)

    @inlineCallbacks
    def test_client_goes_away(self):
        client = yield self.agent()
        gone = self.platform.wait_disconnected("a1")
        client.transport.abortConnection()
        yield gone
        self.assertEqual(self.platform.connections, set())

    @inlineCallbacks
    def test_send_raw_invalid_id(self):
        client = yield self.agent()
        self.platform.send_raw("a1", [P.TASK_SUBMIT, "../etc", SPEC])
        self.assertEqual((yield client.next()), [P.TASK_SUBMIT, "../etc", SPEC])

    @inlineCallbacks
    def test_tls(self):
        from twisted.internet import ssl

        cert_pem, key_pem = _self_signed()
        server_tls = tap.load_tls(*self._write_pems(cert_pem, key_pem))
        platform = Platform({TOKEN: "a1"}, reactor)
        port = yield listen(platform, reactor, 0, tls=server_tls)
        self.addCleanup(platform.close)
        self.assertTrue(platform.ws_url.startswith("wss://127.0.0.1:"))
        self.assertTrue(platform.http_url.startswith("https://127.0.0.1:"))
        client_tls = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(cert_pem))
        self.port = port
        client = yield self.open(url=platform.ws_url, tls=client_tls)
        client.send(hello())
        self.assertEqual((yield client.next())[0], P.WELCOME)

    def _write_pems(self, cert_pem, key_pem):
        cert, key = self.mktemp(), self.mktemp()
        with open(cert, "wb") as f:
            f.write(cert_pem)
        with open(key, "wb") as f:
            f.write(key_pem)
        return cert, key


def _self_signed():
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
    )


class FileStoreTests(IntegrationMixin, TestCase):
    def url(self, path):
        return f"{self.platform.http_url}/files/{path}"

    @inlineCallbacks
    def test_put_get_round_trip(self):
        data = os.urandom(300 * 1024)
        auth = {"Authorization": "Bearer " + TOKEN}
        response = yield self.http().put(self.url("j1-1-0/out/result.bin"), data=data, headers=auth)
        self.assertEqual(response.code, 201)
        yield response.content()
        self.assertEqual(self.platform.get_file("j1-1-0/out/result.bin"), data)
        response = yield self.http().get(self.platform.file_url("j1-1-0/out/result.bin"),
                                         headers={"Authorization": "Bearer " + TOKEN2})
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.content()), data)
        self.assertEqual(self.platform.file_requests, [
            ("PUT", "j1-1-0/out/result.bin", True, True),
            ("GET", "j1-1-0/out/result.bin", True, True),
        ])
        self.assertEqual(os.listdir(os.path.join(self.platform.files_dir, ".incoming")), [])

    @inlineCallbacks
    def test_put_streams_into_store(self):
        """
        The body of a PUT is written straight into a temporary file inside
        the store (not buffered elsewhere and copied).
        """
        taken = []
        original = PlatformRequest.take_incoming

        def take_incoming(request):
            name = original(request)
            taken.append(name)
            return name

        self.patch(PlatformRequest, "take_incoming", take_incoming)
        response = yield self.http().put(self.url("big.bin"), data=b"y" * 500000,
                                         headers={"Authorization": "Bearer " + TOKEN})
        self.assertEqual(response.code, 201)
        yield response.content()
        self.assertEqual(len(taken), 1)
        self.assertEqual(os.path.dirname(taken[0]),
                         os.path.join(self.platform.files_dir, ".incoming"))
        self.assertEqual(self.platform.get_file("big.bin"), b"y" * 500000)

    @inlineCallbacks
    def test_aborted_upload_leaves_nothing(self):
        incoming = os.path.join(self.platform.files_dir, ".incoming")
        connected = Deferred()

        class Uploader(Protocol):
            def connectionMade(self):
                self.transport.write(
                    b"PUT /files/partial.bin HTTP/1.1\r\nHost: x\r\n"
                    b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                    b"Content-Length: 100000\r\n\r\n" + b"z" * 1000)
                connected.callback(self)

        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        client = yield endpoints.connectProtocol(endpoint, Uploader())
        yield connected
        while not os.listdir(incoming):
            yield deferLater(0.01)
        lost = Deferred()
        client.connectionLost = lambda reason: lost.callback(None)
        client.transport.abortConnection()
        yield lost
        while os.listdir(incoming):
            yield deferLater(0.01)
        self.assertFalse(os.path.exists(os.path.join(self.platform.files_dir, "partial.bin")))

    @inlineCallbacks
    def test_unauthorized(self):
        self.platform.put_file("a.txt", b"secret")
        response = yield self.http().get(self.url("a.txt"))
        self.assertEqual(response.code, 401)
        yield response.content()
        response = yield self.http().get(self.url("a.txt"), headers={"Authorization": "Bearer nope"})
        self.assertEqual(response.code, 401)
        yield response.content()
        response = yield self.http().put(self.url("b.txt"), data=b"x" * 200000,
                                         headers={"Authorization": "Basic " + TOKEN})
        self.assertEqual(response.code, 401)
        yield response.content()
        self.assertFalse(os.path.exists(os.path.join(self.platform.files_dir, "b.txt")))
        self.assertEqual(os.listdir(os.path.join(self.platform.files_dir, ".incoming")), [])
        # The PUT was refused before its body was read: it never reached the store.
        self.assertEqual(self.platform.file_requests, [
            ("GET", "a.txt", False, False), ("GET", "a.txt", False, True),
        ])

    @inlineCallbacks
    def test_not_found(self):
        response = yield self.http().get(self.url("nothing.txt"),
                                         headers={"Authorization": "Bearer " + TOKEN})
        self.assertEqual(response.code, 404)
        yield response.content()
        os.mkdir(os.path.join(self.platform.files_dir, "dir"))
        response = yield self.http().get(self.url("dir"), headers={"Authorization": "Bearer " + TOKEN})
        self.assertEqual(response.code, 404)
        yield response.content()

    @inlineCallbacks
    def test_path_escape_rejected(self):
        secret = os.path.join(os.path.dirname(self.platform.files_dir), "outside.txt")
        with open(secret, "wb") as f:
            f.write(b"outside")
        auth = {"Authorization": "Bearer " + TOKEN}
        for path in ("%2e%2e/outside.txt", "a/%2e%2e/%2e%2e/outside.txt", "..%2Foutside.txt",
                     "%2E%2E%2Foutside.txt", ".incoming/x", "a//b"):
            for method in ("GET", "PUT"):
                response = yield self.http().request(method, self.url(path), headers=auth,
                                                     data=b"evil" if method == "PUT" else None)
                body = yield response.content()
                self.assertIn(response.code, (400, 404), (method, path, body))
                self.assertNotEqual(body, b"outside")
        with open(secret, "rb") as f:
            self.assertEqual(f.read(), b"outside")

    @inlineCallbacks
    def test_put_over_directory(self):
        os.mkdir(os.path.join(self.platform.files_dir, "d"))
        self.platform.put_file("f", b"file")
        auth = {"Authorization": "Bearer " + TOKEN}
        for path in ("d", "f/x"):
            response = yield self.http().put(self.url(path), data=b"x", headers=auth)
            self.assertEqual(response.code, 409)
            yield response.content()

    @inlineCallbacks
    def test_method_not_allowed(self):
        response = yield self.http().delete(self.url("a"), headers={"Authorization": "Bearer " + TOKEN})
        self.assertEqual(response.code, 405)
        yield response.content()


class FileStoreNoAuthTests(IntegrationMixin, TestCase):
    files_auth = False

    @inlineCallbacks
    def test_no_auth_needed(self):
        response = yield self.http().put(f"{self.platform.http_url}/files/x.txt", data=b"hello")
        self.assertEqual(response.code, 201)
        yield response.content()
        response = yield self.http().get(f"{self.platform.http_url}/files/x.txt")
        self.assertEqual((yield response.content()), b"hello")
        self.assertEqual(self.platform.file_requests,
                         [("PUT", "x.txt", False, False), ("GET", "x.txt", False, False)])


class ApiTests(IntegrationMixin, TestCase):
    def url(self, path):
        return f"{self.platform.http_url}/api/{path}"

    @inlineCallbacks
    def call(self, method, path, body=None, code=200):
        data = json.dumps(body).encode() if body is not None else None
        response = yield self.http().request(method, self.url(path), data=data,
                                             headers={"Authorization": "Bearer " + self.platform.api_token})
        raw = yield response.content()
        self.assertEqual(response.code, code, raw)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return json.loads(raw)

    @inlineCallbacks
    def test_submit_get_cancel(self):
        created = yield self.call("POST", "tasks", {"spec": SPEC}, code=201)
        task_id = created["taskId"]
        self.assertTrue(P.valid_task_id(task_id))
        created = yield self.call("POST", "tasks", {"spec": SPEC, "taskId": "mine-1-0", "agent": "a2"},
                                  code=201)
        self.assertEqual(created, {"taskId": "mine-1-0"})
        self.assertEqual(self.platform.tasks["mine-1-0"].agent, "a2")

        client = yield self.agent()
        yield client.next(P.TASK_SUBMIT)
        client.send(state(task_id, P.RUNNING, 1))
        client.send([P.TASK_MESSAGE, task_id, "progress 50%", {"seq": 2}])
        yield self.platform.wait_message(task_id)

        listed = yield self.call("GET", "tasks")
        self.assertEqual(listed, [
            {"taskId": task_id, "agent": "a1", "state": P.RUNNING, "info": {"seq": 1, "time": 1.0}},
            {"taskId": "mine-1-0", "agent": "a2", "state": None, "info": None},
        ])
        task = yield self.call("GET", f"tasks/{task_id}")
        self.assertEqual(task["history"], [[P.RUNNING, {"seq": 1, "time": 1.0}]])
        self.assertEqual(task["messages"], ["progress 50%"])
        self.assertEqual(task["spec"], SPEC)

        result = yield self.call("POST", f"tasks/{task_id}/message", {"text": "hello"})
        self.assertEqual(result, {"taskId": task_id})
        self.assertEqual((yield client.next(P.TASK_MESSAGE)), [P.TASK_MESSAGE, task_id, "hello"])

        result = yield self.call("POST", f"tasks/{task_id}/cancel")
        self.assertEqual(result, {"taskId": task_id, "canceled": True})
        self.assertEqual((yield client.next(P.TASK_CANCEL)), [P.TASK_CANCEL, task_id])
        result = yield self.call("POST", "tasks/mine-1-0/cancel")
        self.assertEqual(self.platform.tasks["mine-1-0"].state, P.CANCELED)

    @inlineCallbacks
    def test_agents(self):
        yield self.agent()
        self.platform.agents["a1"].resource = {"slots": 4}
        agents = yield self.call("GET", "agents")
        self.assertEqual(agents, [
            {"name": "a1", "connected": True, "lastSeq": 0, "resource": {"slots": 4}},
            {"name": "a2", "connected": False, "lastSeq": 0, "resource": None},
        ])

    @inlineCallbacks
    def test_errors(self):
        for method, path, body, code in (
            ("GET", "tasks/nope", None, 404),
            ("POST", "tasks/nope/cancel", None, 404),
            ("GET", "nothing", None, 404),
            ("DELETE", "tasks", None, 405),
            ("POST", "tasks", {"spec": "true"}, 400),
            ("POST", "tasks", {"spec": SPEC, "taskId": ".x"}, 400),
            ("POST", "tasks", {"spec": SPEC, "taskId": 5}, 400),
            ("POST", "tasks", {"spec": SPEC, "agent": "zz"}, 400),
            ("POST", "tasks", [1], 400),
        ):
            result = yield self.call(method, path, body, code=code)
            self.assertIn("error", result)
        response = yield self.http().post(self.url("tasks"), data=b"{nope",
                                          headers={"Authorization": "Bearer " + self.platform.api_token})
        self.assertEqual(response.code, 400)
        self.assertIn("error", json.loads((yield response.content())))
        self.platform.submit(SPEC, task_id="t1")
        result = yield self.call("POST", "tasks/t1/message", {"text": 3}, code=400)
        result = yield self.call("POST", "tasks/t1/explode", {}, code=404)
        result = yield self.call("GET", "tasks/t1/cancel", None, code=405)
        result = yield self.call("POST", "tasks", {"spec": SPEC, "taskId": "t1"}, code=400)


class ServiceTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_start_stop(self):
        options = tap.Options()
        state_file = self.mktemp()
        options.parseOptions(["--token", "a1=" + TOKEN, "--listen", "tcp:0:interface=127.0.0.1",
                              "--files-dir", self.mktemp(), "--state-file", state_file])
        service = tap.makeService(options)
        service.startService()
        while service.port is None:
            yield deferLater(0)
        platform = service.platform
        self.assertTrue(platform.ws_url.startswith("ws://127.0.0.1:"))
        self.assertTrue(platform.ws_url.endswith("/compute/agent/v1"))
        platform.submit(SPEC, task_id="t1")
        yield service.stopService()
        with open(state_file) as f:
            self.assertEqual([t["taskId"] for t in json.load(f)["tasks"]], ["t1"])
