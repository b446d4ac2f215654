"""Tests for everest_agent.statedir: reading a state directory from outside."""

import json
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from everest_agent import statedir
from everest_agent.outbox import Outbox
from everest_agent.registry import TaskRegistry


class StateDirTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def write(self, name, lines):
        with open(os.path.join(self.dir, name), "w") as f:
            f.write("".join(line + "\n" for line in lines))

    def test_outbox_as_the_outbox_loads_it(self):
        self.write(statedir.OUTBOX_FILE, [
            json.dumps({"next": 3}), json.dumps({"ack": 2}), json.dumps({"seq": 3, "msg": ["A"]}),
            json.dumps({"seq": 4, "msg": ["B"]}), '{"seq": "x"}', "[1]", '{"seq": 5, "ms',
        ])
        pending, last, acked = statedir.read_outbox(self.dir)
        self.assertEqual((pending, last, acked), ([(3, ["A"]), (4, ["B"])], 4, 2))
        box = Outbox(self.dir, Clock(), fsync=False)
        box.load()
        self.assertEqual((box.durable_pending(), box.last_seq, box.acked), ([["A"], ["B"]], 4, 2))

    def test_next_counts_when_everything_is_acked(self):
        self.write(statedir.OUTBOX_FILE, [json.dumps({"next": 10}), json.dumps({"ack": 9})])
        self.assertEqual(statedir.read_outbox(self.dir), ([], 9, 9))

    def test_missing_files(self):
        self.assertEqual(statedir.read_outbox(self.dir), ([], 0, 0))
        self.assertEqual(statedir.read_registry(self.dir), {})

    def test_registry_as_the_registry_loads_it(self):
        self.write(statedir.TASKS_FILE, [
            json.dumps({"id": "a", "spec": {"command": "true"}, "state": None}),
            json.dumps({"id": "a", "state": "RUNNING"}),
            json.dumps({"id": "b", "state": "DONE"}),  # its first record was lost
            json.dumps({"id": "c", "spec": {}}), json.dumps({"id": "c", "forget": True}),
        ])
        records = statedir.read_registry(self.dir)
        self.assertEqual(records, {"a": {"id": "a", "spec": {"command": "true"}, "state": "RUNNING"}})
        registry = TaskRegistry(self.dir, Clock(), fsync=False)
        self.assertEqual(registry.load(), records)
