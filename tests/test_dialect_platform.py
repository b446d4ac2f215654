"""
The reference platform's side of the Everest dialect (section 8), with a
fake connection and a Clock: a context sent after the spec and kept,
STAGED_OUT and its outputData kept (and checked), both in the state file.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from everest_agent import protocol as P
from everest_agent.platform import Platform
from tests.test_platform import TOKEN, TOKEN2, PlatformUnitMixin, state

DIALECT = {"command": "true", "outputData": [{"paths": ["r"]}]}
ENTRY = {"path": "r", "size": 1, "sha256": "0" * 64}


class DialectPlatformTests(PlatformUnitMixin, SynchronousTestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.make_platform(state_file=self.path)
        self.conn = self.connect()

    def test_the_context_follows_the_spec(self):
        task_id = self.platform.submit(DIALECT, context={"a": 1})
        self.assertEqual(self.conn.of_type(P.TASK_SUBMIT)[-1], [P.TASK_SUBMIT, task_id, DIALECT, {"a": 1}])
        plain = self.platform.submit(DIALECT)
        self.assertEqual(len(self.conn.of_type(P.TASK_SUBMIT)[-1]), 3)
        self.assertEqual(self.platform.task(task_id).as_dict()["context"], {"a": 1})
        self.assertIsNone(self.platform.task(plain).as_dict()["context"])
        with self.assertRaises(ValueError):
            self.platform.submit(DIALECT, context=[1])

    def test_staged_out_is_kept_and_saved(self):
        task_id = self.platform.submit(DIALECT, context={"a": 1})
        self.receive(self.conn, state(task_id, P.STAGED_OUT, 1, outputData=[ENTRY]))
        self.receive(self.conn, state(task_id, P.DONE, 2, exitCode=0))
        task = self.platform.task(task_id)
        self.assertEqual(task.as_dict()["outputData"], [ENTRY])
        self.assertEqual(task.states, [P.STAGED_OUT, P.DONE])
        self.assertEqual(self.platform.violations, [])
        self.clock.advance(2)
        again = Platform({TOKEN: "a1", TOKEN2: "a2"}, Clock(), state_file=self.path).task(task_id)
        self.assertEqual((again.context, again.output_data), ({"a": 1}, [ENTRY]))

    def test_a_native_task_may_not_report_staged_out(self):
        task_id = self.platform.submit({"command": "true"})
        self.receive(self.conn, state(task_id, P.STAGED_OUT, 1, outputData=[]))
        [violation] = self.platform.violations
        self.assertIn("native", violation["reason"])
        self.assertIsNone(self.platform.task(task_id).state)

    def test_a_malformed_output_data_is_a_violation(self):
        for n, info in enumerate([{}, {"outputData": {}}, {"outputData": [{"path": "r"}]},
                                  {"outputData": [dict(ENTRY, sha256="x")]},
                                  {"outputData": [dict(ENTRY, uri=3)]}]):
            task_id = self.platform.submit(DIALECT)
            self.receive(self.conn, state(task_id, P.STAGED_OUT, n + 1, **info))
            self.assertEqual(len(self.platform.violations), n + 1)
            self.assertIn("STAGED_OUT", self.platform.violations[-1]["reason"])
