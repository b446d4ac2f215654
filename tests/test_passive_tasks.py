"""
Passive mode's bookkeeping with a Clock and fakes: owned tasks in the
manager (routing, HELLO, forgetting, restarts) and the durable seq counter.
"""

import os

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from everest_agent.passive.credentials import Client
from everest_agent.passive.server import IPassiveTasks
from everest_agent.passive.tasks import PassiveTasks, SeqCounter
from everest_agent.protocol import ProtocolError
from tests.test_manager import Harness

ALICE = Client(label="alice", owner="a" * 64)
BOB = Client(label="bob", owner="b" * 64)


class Session:
    def __init__(self, client):
        self.client = client
        self.sent = []

    def send(self, message):
        self.sent.append(message)

    def states(self, task_id):
        return [m[2] for m in self.sent if m[0] == "TASK_STATE" and m[1] == task_id]


def dialect_spec(command="true"):
    return {"command": command, "inputData": [], "outputData": []}


class OwnedTaskTests(SynchronousTestCase):
    def setUp(self):
        self.state_dir = self.mktemp()
        self.h = Harness(self, self.state_dir)
        self.passive = PassiveTasks(self.h.manager, SeqCounter(os.path.join(self.state_dir, "passive-seq")),
                                    lambda: 5.0, max_client_tasks=2, max_tasks=3)
        self.passive.load()
        verifyObject(IPassiveTasks, self.passive)
        self.alice, self.bob = Session(ALICE), Session(BOB)
        self.passive.session_opened(ALICE, self.alice)
        self.passive.session_opened(BOB, self.bob)

    def run_to_end(self, task_id, code=0):
        self.h.pump()
        self.h.handler.jobs[task_id].finish(code)
        self.h.pump()

    def test_owned_reports_go_to_their_owner_only(self):
        self.passive.submit(ALICE, "p1", dialect_spec(), None)
        self.h.submit("a1", {"command": "true"})
        self.run_to_end("p1")
        self.run_to_end("a1")
        self.assertEqual(self.alice.states("p1")[-1], "DONE")
        self.assertEqual(self.bob.sent, [])
        self.assertEqual(self.h.states("p1"), [])  # never to the platform
        self.assertEqual(self.alice.states("a1"), [])
        self.assertEqual(self.h.manager.hello_tasks(), ["a1"])  # the platform's, not acknowledged
        self.assertEqual(self.h.registry.get("p1")["owner"], ALICE.owner)
        seqs = [m[3]["seq"] for m in self.alice.sent]
        self.assertEqual(seqs, sorted(set(seqs)))

    def test_waiting_task_reports_reach_its_owner(self):
        # Two slots: the third task waits in the pool's line without a
        # worker; its ACCEPTED and QUEUED still go to its owner alone.
        self.passive.max_client_tasks = self.passive.max_tasks = 10
        for task_id in ("p1", "p2", "p3"):
            self.passive.submit(ALICE, task_id, dialect_spec(), None)
        self.h.pump()
        self.assertEqual(self.alice.states("p3"), ["ACCEPTED", "QUEUED"])
        self.assertEqual(self.h.states("p3"), [])
        self.assertEqual(self.h.manager.hello_tasks(), [])
        self.h.handler.jobs["p1"].finish(0)
        self.h.pump()
        self.h.handler.jobs["p3"].finish(0)
        self.h.pump()
        self.assertEqual(self.alice.states("p3")[-2:], ["STAGED_OUT", "DONE"])
        self.assertEqual(self.bob.sent, [])
        self.assertEqual(len(self.h.outbox), 0)

    def test_state_sent_only_once_its_record_is_durable(self):
        self.passive.submit(ALICE, "p1", dialect_spec(), None)
        self.h.pump()
        before = len(self.alice.sent)
        self.h.handler.jobs["p1"].finish(0)
        self.assertEqual(len(self.alice.sent), before)  # not before the journal's flush
        self.h.pump()
        self.assertEqual(self.alice.states("p1")[-1], "DONE")

    def test_other_credential_cannot_cancel_or_message_or_reuse_the_id(self):
        self.passive.submit(ALICE, "p1", dialect_spec(), None)
        self.h.pump()
        for call in (lambda: self.passive.cancel(BOB, "p1"), lambda: self.passive.deliver(BOB, "p1", "x"),
                     lambda: self.passive.submit(BOB, "p1", dialect_spec(), None),
                     lambda: self.h.manager.cancel("p1"), lambda: self.h.manager.submit("p1", {"command": "x"})):
            self.assertRaises(ProtocolError, call)
        self.assertIsNone(self.passive.lookup("nope"))
        self.assertEqual(self.passive.lookup("p1")[0], ALICE.owner)
        self.h.submit("a1", {"command": "true"})
        self.assertIsNone(self.passive.lookup("a1"))  # the platform's task has no files here
        self.assertRaises(ProtocolError, self.passive.cancel, ALICE, "a1")

    def test_finished_owned_tasks_are_forgotten_without_platform_ack(self):
        self.h.manager.keep_finished = 1
        for task_id in ("p1", "p2"):
            self.passive.submit(ALICE, task_id, dialect_spec(), None)
            self.run_to_end(task_id)
        self.assertNotIn("p1", self.h.registry)
        self.assertIn("p2", self.h.registry)
        self.assertEqual(len(self.h.outbox), 0)

    def test_limits(self):
        self.passive.submit(ALICE, "p1", dialect_spec(), None)
        self.passive.submit(ALICE, "p2", dialect_spec(), None)
        e = self.assertRaises(ProtocolError, self.passive.submit, ALICE, "p3", dialect_spec(), None)
        self.assertEqual(e.code, "too-many-tasks")
        self.passive.submit(BOB, "q1", dialect_spec(), None)
        e = self.assertRaises(ProtocolError, self.passive.submit, BOB, "q2", dialect_spec(), None)
        self.assertIn("max_tasks", e.message)
        self.assertNotIn("p3", self.h.registry)
        self.run_to_end("p1")
        self.passive.submit(ALICE, "p3", dialect_spec(), None)  # room again
        self.assertIn("p3", self.h.registry)

    def test_reconnect_gets_current_states_not_what_an_ack_covers(self):
        for task_id in ("p1", "p2"):
            self.passive.submit(ALICE, task_id, dialect_spec(), None)
        self.run_to_end("p1")
        self.passive.session_closed(ALICE, self.alice)
        self.h.pump()
        again = Session(ALICE)
        self.passive.session_opened(ALICE, again)
        # A finished task's STAGED_OUT comes again before its end: the
        # client needs its outputData to fetch the outputs.
        self.assertEqual(again.states("p1"), ["STAGED_OUT", "DONE"])
        live = [m for m in self.alice.sent if m[1] == "p1" and m[2] == "STAGED_OUT"]
        replayed = [m for m in again.sent if m[1] == "p1" and m[2] == "STAGED_OUT"]
        self.assertEqual([m[3]["seq"] for m in replayed], [m[3]["seq"] for m in live])
        self.assertEqual([m[3]["outputData"] for m in replayed], [m[3]["outputData"] for m in live])
        self.assertEqual(len(again.states("p2")), 1)
        done_seq = [m for m in again.sent if m[1] == "p1"][-1][3]["seq"]
        self.passive.ack(ALICE, done_seq)
        third = Session(ALICE)
        self.passive.session_opened(ALICE, third)
        covered = [m for m in third.sent if m[3]["seq"] <= done_seq]
        self.assertEqual(covered, [])


class SeqCounterTests(SynchronousTestCase):
    def test_never_reused_across_a_crash(self):
        path = os.path.join(self.mktemp())
        seen = set()
        for life in range(3):
            counter = SeqCounter(path, block=10)
            counter.load()
            numbers = [counter.next() for _ in range(25)]  # crosses blocks with no write-ahead runner
            self.assertFalse(seen & set(numbers), life)
            seen.update(numbers)
            # no clean stop: the next life starts from the file alone

    def test_reserves_ahead_through_the_runner(self):
        path = self.mktemp()
        calls = []

        def run(f, *args):
            calls.append(args)
            f(*args)
            return defer.succeed(None)

        counter = SeqCounter(path, run=run, block=10)
        counter.load()
        for _ in range(6):
            counter.next()
        self.assertEqual(calls, [(20,)])
        with open(path) as f:
            self.assertEqual(f.read(), "20")

    def test_damaged_file_is_a_clear_error(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a number")
        e = self.assertRaises(RuntimeError, SeqCounter(path).load)
        self.assertIn(path, str(e))
