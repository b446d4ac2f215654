"""
Unit tests of passive/tasks.py: the seq counter across restarts, and the
routing bookkeeping with fakes (no reactor, no sockets).
"""

import os

from twisted.trial.unittest import SynchronousTestCase
from twisted.internet import defer
from zope.interface.verify import verifyObject

from everest_agent import protocol
from everest_agent.passive import tasks as passive_tasks
from everest_agent.passive.credentials import ClientTokens
from everest_agent.passive.server import IPassiveTasks


class SeqCounterTests(SynchronousTestCase):
    def test_never_repeats_across_restarts(self):
        path = os.path.join(self.mktemp())
        counter = passive_tasks.SeqCounter(path, block=10)
        counter.load()
        seen = [counter.next() for _ in range(25)]
        # A restart (or kill -9) at any point: the next run starts above every seq given out.
        again = passive_tasks.SeqCounter(path, block=10)
        again.load()
        self.assertGreater(again.next(), max(seen))
        self.assertEqual(seen, list(range(1, 26)))

    def test_damaged_file_is_an_error_naming_it(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a number")
        with self.assertRaises(ValueError) as e:
            passive_tasks.SeqCounter(path).load()
        self.assertIn(path, str(e.exception))


class _Registry:
    def __init__(self):
        self.records = {}

    def get(self, task_id):
        return self.records.get(task_id)

    def update(self, task_id, **fields):
        self.records[task_id].update(fields)
        return defer.succeed(None)


class _Manager:
    def __init__(self):
        self.registry = _Registry()
        self.submitted = []

    def submit(self, task_id, spec, context=None, owner=None):
        self.submitted.append(task_id)
        self.registry.records[task_id] = {"id": task_id, "owner": owner, "state": None}

    def task_dir(self, task_id):
        return "/work/" + task_id


class _Session:
    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)


class PassiveTasksTests(SynchronousTestCase):
    def setUp(self):
        self.manager = _Manager()
        self.tasks = passive_tasks.PassiveTasks(self.manager, self._dir(),
                                                max_unfinished=2, wallclock=lambda: 5.0)
        self.tasks.load()
        tokens = ClientTokens(["tok"])
        self.alice = tokens.authenticate("EverestAgentClientToken alice:tok")
        self.bob = tokens.authenticate("EverestAgentClientToken bob:tok")

    def _dir(self):
        path = self.mktemp()
        os.makedirs(path)
        return path

    def test_provides_the_interface(self):
        verifyObject(IPassiveTasks, self.tasks)

    def test_reports_go_to_the_owner_sessions_only(self):
        mine, theirs = _Session(), _Session()
        self.tasks.session_opened(self.alice, mine)
        self.tasks.session_opened(self.bob, theirs)
        self.tasks.submit(self.alice, "t", {}, None)
        seq, d = self.tasks.report("t", protocol.ACCEPTED, {})
        self.assertEqual(self.successResultOf(d), seq)
        self.assertEqual(mine.sent, [["TASK_STATE", "t", "ACCEPTED", {"seq": seq, "time": 5.0}]])
        self.assertEqual(theirs.sent, [])

    def test_cap_then_room_after_a_terminal_state(self):
        self.tasks.submit(self.alice, "a", {}, None)
        self.tasks.submit(self.alice, "b", {}, None)
        with self.assertRaises(protocol.ProtocolError) as e:
            self.tasks.submit(self.alice, "c", {}, None)
        self.assertEqual(e.exception.code, "too-many-tasks")
        self.tasks.submit(self.bob, "x", {}, None)  # another credential is not held back
        self.tasks.report("a", protocol.DONE, {"exitCode": 0})
        self.tasks.submit(self.alice, "c", {}, None)
        self.assertEqual(self.manager.submitted, ["a", "b", "x", "c"])

    def test_reconnect_sends_staged_out_and_state_after_the_ack(self):
        self.tasks.submit(self.alice, "t", {}, None)
        record = self.manager.registry.records["t"]
        first, _ = self.tasks.report("t", protocol.ACCEPTED, {})
        record.update(state="ACCEPTED", state_seq=first)
        staged, _ = self.tasks.report("t", protocol.STAGED_OUT, {"outputData": []})
        done, _ = self.tasks.report("t", protocol.DONE, {"exitCode": 0})
        record.update(state="DONE", state_seq=done, info={"exitCode": 0})
        session = _Session()
        self.tasks.session_opened(self.alice, session)
        self.assertEqual([(m[2], m[3]["seq"]) for m in session.sent], [("STAGED_OUT", staged), ("DONE", done)])
        self.tasks.ack(self.alice, staged)
        later = _Session()
        self.tasks.session_opened(self.alice, later)
        self.assertEqual([m[2] for m in later.sent], ["DONE"])
        self.tasks.ack(self.alice, 10 ** 9)  # an ACK ahead of what was sent covers no more than that
        self.assertEqual(self.tasks.acked[self.alice.owner], self.tasks.seq.last)

    def test_acks_of_many_labels_are_bounded(self):
        self.patch(passive_tasks, "MAX_ACKED_OWNERS", 3)
        tokens = ClientTokens(["tok"])
        self.tasks.seq.next()
        for i in range(10):
            self.tasks.ack(tokens.authenticate(f"EverestAgentClientToken c{i}:tok"), 1)
        self.assertEqual(len(self.tasks.acked), 3)

    def test_other_owner_and_unknown_task_look_the_same(self):
        self.tasks.submit(self.alice, "alices-task", {}, None)
        answers = []
        for task_id in ("alices-task", "nope"):
            with self.assertRaises(protocol.ProtocolError) as e:
                self.tasks.cancel(self.bob, task_id)
            answers.append((e.exception.code, e.exception.message.replace(task_id, "ID")))
        self.assertEqual(answers[0], answers[1])
        self.assertIsNone(self.tasks.lookup("nope"))
        self.assertEqual(self.tasks.lookup("alices-task"), (self.alice.owner, "/work/alices-task"))
