"""
The Everest dialect (contract, section 8) in the TaskManager and the
TaskWorker, with a fake handler, stager and session and a Clock: specs
validated and translated at submit, the owner and the context kept, inputs
with their own C{auth}, C{STAGED_OUT} before the terminal state, durable and
reported once across restarts, and native tasks as before.
"""

import json
import os

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from everest_agent import dialect, protocol
from everest_agent.protocol import ProtocolError
from everest_agent.registry import small_record
from everest_agent.testing import FakeTaskHandler
from tests.test_manager import Harness

AUTH = "EverestAgentClientToken run-1:s3cret"
SHA = "ab" * 32


def everest(**fields):
    spec = {
        "name": "point 3",
        "command": "python3 run.py",
        "inputData": [
            {"path": "run.py", "uri": "http://store/j1/run.py"},
            {"path": "in/data.dat", "uri": "http://agent-b:8891/files/t7/data.dat", "auth": AUTH},
        ],
        "outputData": [
            {"paths": ["result.txt", "plots/*.png"], "uri": "http://store/j1-3/"},
            {"paths": ["big.h5", "logs/*"]},
        ],
    }
    spec.update(fields)
    return spec


def uploaded():
    return [
        {"path": "result.txt", "size": 6, "sha256": SHA, "uri": "http://store/j1-3/result.txt"},
        {"path": "plots/a b.png", "size": 2, "sha256": SHA, "uri": "http://store/j1-3/plots/a%20b.png"},
    ]


def kept():
    return [{"path": "big.h5", "size": 10, "sha256": SHA}, {"path": "logs/run 1.log", "size": 3, "sha256": SHA}]


class DialectHarness(Harness):
    def __init__(self, test, environ=None, **kwargs):
        super().__init__(test, **kwargs)
        self.manager.environ = environ if environ is not None else {"HOME": "/home/agent"}
        self.stager.uploaded = uploaded()
        self.stager.kept = kept()

    def submit(self, task_id, s, context=None, owner=None):
        self.manager.submit(task_id, s, context, owner)
        self.pump()

    def message(self, task_id, state):
        [m] = [m for m in self.session.sent if m[0] == "TASK_STATE" and m[1] == task_id and m[2] == state]
        return m


class SubmitTests(SynchronousTestCase):
    def test_the_spec_is_translated_and_run(self):
        h = DialectHarness(self)
        h.submit("t1", everest(environment={"P": "$HOME/lib@PATH_SEP${UNSET}x"}))
        job = h.handler.jobs["t1"]
        self.assertEqual(job.request.command, "python3 run.py")
        self.assertEqual(job.request.environment["P"], "/home/agent/lib:x")
        record = h.registry.get("t1")
        self.assertEqual(dialect.extras(record["spec"])["name"], "point 3")
        self.assertNotIn("owner", record)

    def test_the_context_is_kept_with_the_task(self):
        h = DialectHarness(self)
        h.submit("t1", everest(), {"dag": "d1", "node": 3})
        self.assertEqual(dialect.extras(h.registry.get("t1")["spec"])["context"], {"dag": "d1", "node": 3})

    def test_the_owner_is_kept_in_the_record_and_survives_its_end(self):
        h = DialectHarness(self)
        h.submit("t1", everest(), None, "c0ffee")
        self.assertEqual(h.registry.get("t1")["owner"], "c0ffee")
        h.handler.jobs["t1"].finish(0)
        h.pump()
        self.assertEqual(small_record(dict(h.registry.get("t1")))["owner"], "c0ffee")

    def test_a_passive_task_is_always_in_the_dialect(self):
        h = DialectHarness(self)
        h.submit("t1", {"command": "true", "environment": {"X": "$HOME"}}, None, "c0ffee")
        self.assertEqual(h.handler.jobs["t1"].request.environment["X"], "/home/agent")
        h.handler.jobs["t1"].finish(0)
        h.pump()
        self.assertIn("STAGED_OUT", h.states("t1"))

    def test_malformed_input_data_fails_naming_the_field(self):
        h = DialectHarness(self)
        for n, (field, spec) in enumerate([
            ("inputData[0]", everest(inputData=[{"path": "a"}])),
            ("inputData[1]", everest(inputData=[{"path": "a", "uri": "http://x/a"}, "nope"])),
            ("inputData[0]", everest(inputData=[{"path": "../x", "uri": "http://x/a"}])),
            ("inputData[0]", everest(inputData=[{"path": "a", "uri": "http://x/a", "auth": "a\r\nX: y"}])),
            ("inputData[0]", everest(inputData=[{"path": "a", "uri": "http://x/a", "sha": 1}])),
            ("'inputData'", everest(inputData={"path": "a"})),
            ("outputData[0]", everest(outputData=[{"paths": []}])),
            ("outputData[0].paths[1]", everest(outputData=[{"paths": ["ok", "/etc/passwd"]}])),
            ("outputData[0]", everest(outputData=[{"paths": ["x"], "uri": "ftp://x/"}])),
            ("'outputData'", everest(outputData="x")),
        ]):
            task_id = f"bad{n}"
            h.submit(task_id, spec)
            self.assertEqual(h.states(task_id), ["ACCEPTED", "FAILED"], spec)
            self.assertIn(field, h.last(task_id)[3]["reason"])
        self.assertEqual(h.handler.jobs, {})
        # The agent goes on: a good task runs.
        h.submit("good", everest())
        self.assertIn("good", h.handler.jobs)

    def test_a_native_spec_may_not_carry_the_dialect_record(self):
        h = DialectHarness(self)
        h.submit("t1", {"command": "true", "everest": {"auth": {}, "keep": []}})
        self.assertEqual(h.states("t1"), ["ACCEPTED", "FAILED"])
        self.assertIn("'everest'", h.last("t1")[3]["reason"])

    def test_inputs_reach_the_stager_with_their_own_auth(self):
        h = DialectHarness(self)
        h.submit("t1", everest())
        [inputs] = h.stager.inputs_given
        self.assertEqual(
            [(i["path"], i.get("authorization")) for i in inputs],
            [("run.py", None), ("in/data.dat", AUTH)],
        )
        # Not in the recorded spec's inputs (only in its dialect record).
        self.assertNotIn("authorization", json.dumps(h.registry.get("t1")["spec"]["inputs"]))


class StagedOutTests(SynchronousTestCase):
    def run_task(self, h, task_id="t1", code=0, **submit):
        h.submit(task_id, everest(), **submit)
        h.handler.jobs[task_id].finish(code)
        h.pump()

    def test_staged_out_comes_before_done_with_every_file(self):
        h = DialectHarness(self)
        self.run_task(h)
        self.assertEqual(h.states("t1"), ["ACCEPTED", "STAGING_IN", "RUNNING", "STAGING_OUT", "STAGED_OUT", "DONE"])
        info = h.message("t1", "STAGED_OUT")[3]
        self.assertEqual(info["outputData"], [
            {"path": "result.txt", "size": 6, "sha256": SHA, "uri": "http://store/j1-3/result.txt"},
            {"path": "plots/a b.png", "size": 2, "sha256": SHA, "uri": "http://store/j1-3/plots/a%20b.png"},
            # Kept over the active connection: listed, no uri.
            {"path": "big.h5", "size": 10, "sha256": SHA},
            {"path": "logs/run 1.log", "size": 3, "sha256": SHA},
        ])
        self.assertEqual(h.stager.listed, [(os.path.join(h.work_dir, "t1"), ["big.h5", "logs/*"])])
        # The terminal report's outputs are as for a native task.
        done = h.last("t1")[3]
        self.assertEqual(done["outputs"], [{k: f[k] for k in ("path", "size", "sha256")} for f in uploaded()])
        self.assertLess(h.message("t1", "STAGED_OUT")[3]["seq"], done["seq"])

    def test_an_owned_task_gets_uris_for_its_kept_files(self):
        h = DialectHarness(self)
        self.run_task(h, owner="c0ffee")
        entries = h.message("t1", "STAGED_OUT")[3]["outputData"]
        self.assertEqual([e.get("uri") for e in entries[2:]],
                         ["/files/t1/big.h5", "/files/t1/logs/run%201.log"])

    def test_a_failed_job_still_reports_what_it_left(self):
        h = DialectHarness(self)
        self.run_task(h, code=2)
        self.assertEqual(h.states("t1")[-2:], ["STAGED_OUT", "FAILED"])
        self.assertEqual(len(h.message("t1", "STAGED_OUT")[3]["outputData"]), 4)

    def test_no_output_data_still_reports_staged_out_empty(self):
        h = DialectHarness(self)
        h.submit("t1", {"command": "true", "inputData": []})
        h.handler.jobs["t1"].finish(0)
        h.pump()
        self.assertEqual(h.states("t1"), ["ACCEPTED", "RUNNING", "STAGED_OUT", "DONE"])
        self.assertEqual(h.message("t1", "STAGED_OUT")[3]["outputData"], [])
        self.assertEqual(h.stager.staged_out, [])

    def test_a_stage_out_error_fails_after_staged_out(self):
        h = DialectHarness(self)
        h.stager.out_errors = ["output 'result.txt': PUT http://store/j1-3/result.txt answered HTTP 507"]
        self.run_task(h)
        self.assertEqual(h.states("t1")[-2:], ["STAGED_OUT", "FAILED"])
        self.assertIn("HTTP 507", h.last("t1")[3]["reason"])

    def test_failed_before_running_reports_no_staged_out(self):
        h = DialectHarness(self)
        h.stager.fail_in = "input 'run.py': GET http://store/j1/run.py answered HTTP 404"
        h.submit("t1", everest())
        self.assertEqual(h.states("t1"), ["ACCEPTED", "STAGING_IN", "FAILED"])

    def test_a_huge_listing_still_fits_in_a_frame(self):
        h = DialectHarness(self)
        h.stager.uploaded = []
        h.stager.kept = [{"path": f"out/{'x' * 100}-{i:06d}.dat", "size": i, "sha256": SHA} for i in range(20000)]
        self.run_task(h, owner="c0ffee")
        message = h.message("t1", "STAGED_OUT")
        self.assertLess(len(protocol.encode(message)), protocol.MAX_FRAME_SIZE)
        info = message[3]
        self.assertGreater(info["outputDataOmitted"], 0)
        self.assertEqual(len(info["outputData"]) + info["outputDataOmitted"], 20000)

    def test_a_resubmit_after_staged_out_resends_it_with_its_files(self):
        h = DialectHarness(self)
        h.stager.hold_out = defer.Deferred()
        h.submit("t1", everest())
        h.handler.jobs["t1"].finish(0)
        h.pump()
        # Stage-out held: STAGING_OUT is the current state.
        h.stager.hold_out, held = None, h.stager.hold_out
        held.callback(None)
        h.pump()
        h.submit("t1", everest())
        self.assertEqual(h.states("t1")[-1], "DONE")  # current state re-sent
        self.assertEqual(h.states("t1").count("STAGED_OUT"), 1)


class NativeTests(SynchronousTestCase):
    def test_a_native_task_never_reports_staged_out(self):
        h = DialectHarness(self)
        h.submit("t1", {"command": "true", "environment": {"V": "$HOME@PATH_SEP"},
                        "outputs": [{"path": "r", "uri": "http://x/r"}]})
        job = h.handler.jobs["t1"]
        self.assertEqual(job.request.environment["V"], "$HOME@PATH_SEP")  # verbatim
        job.finish(0)
        h.pump()
        self.assertEqual(h.states("t1"), ["ACCEPTED", "RUNNING", "STAGING_OUT", "DONE"])
        self.assertEqual(h.stager.listed, [])
        self.assertEqual(h.last("t1")[3]["outputs"],
                         [{k: f[k] for k in ("path", "size", "sha256")} for f in uploaded()])


class RestartTests(SynchronousTestCase):
    def write_state(self, records):
        state_dir = self.mktemp()
        os.makedirs(state_dir)
        with open(os.path.join(state_dir, "tasks.jsonl"), "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        return state_dir

    def ended(self, task_id, state):
        spec = protocol.validate_spec(dialect.to_native(everest(), {}))
        return {"id": task_id, "spec": spec, "state": state, "phase": "ended",
                "result": {"exit_code": 0, "reason": None, "canceled": False}}

    def test_a_restart_in_ended_redoes_the_outputs_and_reports_staged_out_once(self):
        h = DialectHarness(self, state_dir=self.write_state([self.ended("t1", "RUNNING")]))
        h.pump()
        self.assertEqual(h.states("t1"), ["STAGING_OUT", "STAGED_OUT", "DONE"])
        self.assertEqual(len(h.stager.staged_out), 1)
        self.assertEqual(len(h.stager.listed), 1)

    def test_a_restart_after_staged_out_does_not_report_it_again(self):
        h = DialectHarness(self, state_dir=self.write_state([self.ended("t1", "STAGED_OUT")]))
        h.pump()
        self.assertEqual(h.states("t1"), ["DONE"])
        self.assertEqual(len(h.stager.staged_out), 1)  # the outputs are done again

    def test_a_job_ended_before_its_outputs_is_recorded_as_ended(self):
        h = DialectHarness(self)
        h.stager.hold_out = defer.Deferred()
        h.submit("t1", {"command": "true", "outputData": [{"paths": ["kept"]}]})
        h.handler.jobs["t1"].finish(0)
        h.pump()
        self.assertEqual(h.registry.get("t1")["phase"], "ended")
        # Kept outputs only: a restart lists them again and reports STAGED_OUT.
        self.assertEqual(h.states("t1")[-1], "STAGING_OUT")
        h.sender.ack(h.outbox.durable_seq)
        h.stop()
        h2 = DialectHarness(self, state_dir=h.state_dir)
        h2.pump()
        self.assertEqual(h2.states("t1"), ["STAGED_OUT", "DONE"])

    def test_a_record_with_the_dialect_survives_a_reload(self):
        h = DialectHarness(self, handler=FakeTaskHandler(batch=True))
        h.submit("t1", everest(), {"k": 1}, "c0ffee")
        self.assertIn("t1", h.handler.jobs)
        h.stop()
        h2 = DialectHarness(self, state_dir=h.state_dir, handler=FakeTaskHandler(batch=True))
        h2.pump()
        self.assertEqual(len(h2.handler.reattached), 1)
        record = h2.registry.get("t1")
        self.assertEqual(record["owner"], "c0ffee")
        self.assertEqual(dialect.extras(record["spec"])["context"], {"k": 1})
        h2.handler.jobs["t1"].finish(0)
        h2.pump()
        self.assertEqual(h2.states("t1")[-2:], ["STAGED_OUT", "DONE"])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_a_damaged_dialect_record_fails_alone(self):
        good = self.ended("good", "RUNNING")
        bad = self.ended("bad", "RUNNING")
        bad["spec"]["everest"]["auth"] = ["not", "a", "map"]
        worse = self.ended("worse", "RUNNING")
        worse["spec"]["everest"] = "x"
        h = DialectHarness(self, state_dir=self.write_state([good, bad, worse]))
        h.pump()
        self.assertEqual(h.states("good")[-1], "DONE")
        for task_id in ("bad", "worse"):
            self.assertEqual(h.states(task_id), ["FAILED"])
            self.assertIn("damaged", h.last(task_id)[3]["reason"])
            self.assertIn("everest", h.last(task_id)[3]["reason"])


class WireTests(SynchronousTestCase):
    def test_task_submit_may_carry_a_context(self):
        kind, args = protocol.parse_platform_message(["TASK_SUBMIT", "t1", {"command": "x"}, {"a": [1]}])
        self.assertEqual((kind, args), ("TASK_SUBMIT", ("t1", {"command": "x"}, {"a": [1]})))
        kind, args = protocol.parse_platform_message(["TASK_SUBMIT", "t1", {"command": "x"}])
        self.assertEqual(args, ("t1", {"command": "x"}))

    def test_a_context_that_is_not_an_object_is_refused_by_name(self):
        for context in ([1], "x", 3, None):
            with self.assertRaises(ProtocolError) as caught:
                protocol.parse_platform_message(["TASK_SUBMIT", "t1", {"command": "x"}, context])
            self.assertEqual(caught.exception.code, protocol.E_INVALID)
            self.assertIn("'context'", caught.exception.message)
            self.assertEqual(caught.exception.task_id, "t1")

    def test_five_items_are_too_many(self):
        with self.assertRaises(ProtocolError) as caught:
            protocol.parse_platform_message(["TASK_SUBMIT", "t1", {}, {}, {}])
        self.assertIn("3 or 4", caught.exception.message)
