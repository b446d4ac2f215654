"""
The Everest dialect of the task spec (contract, section 8): translation to
the native spec, and the STAGED_OUT report.
"""

from twisted.trial.unittest import SynchronousTestCase

from everest_agent import dialect, protocol
from everest_agent.protocol import SpecError

ENVIRON = {"HOME": "/home/alice", "SCRATCH": "/scratch/alice"}


def everest_spec(**fields):
    spec = {
        "name": "sweep point 3",
        "command": "python3 run.py",
        "inputData": [
            {"path": "run.py", "uri": "https://store.example.org/j1/run.py"},
            {"path": "data/in.dat", "uri": "http://agent-b:8891/files/t7/out.dat",
             "auth": "EverestAgentClientToken run-1:s3cret"},
        ],
        "outputData": [
            {"paths": ["result.txt", "plots/*.png"], "uri": "https://store.example.org/j1-3/"},
            {"paths": ["big.h5"]},
        ],
        "environment": {"PYTHONPATH": "$HOME/lib@PATH_SEP${SCRATCH}/lib", "MODE": "fast"},
        "resourceRequirements": {"coresPerNode": 2, "timeLimit": 600},
    }
    spec.update(fields)
    return spec


class DetectionTests(SynchronousTestCase):
    def test_input_or_output_data_marks_the_dialect(self):
        self.assertTrue(dialect.is_everest({"command": "x", "inputData": []}))
        self.assertTrue(dialect.is_everest({"command": "x", "outputData": []}))
        self.assertFalse(dialect.is_everest({"command": "x", "inputs": []}))

    def test_every_spec_of_a_passive_session_is_in_the_dialect(self):
        self.assertTrue(dialect.is_everest({"command": "x"}, passive=True))


class TranslationTests(SynchronousTestCase):
    def native(self, spec=None, context=None):
        translated = dialect.to_native(spec or everest_spec(), ENVIRON, context)
        return protocol.validate_spec(translated)

    def test_inputs_become_native_downloads(self):
        spec = self.native()
        self.assertEqual(
            [(i["path"], i["uri"]) for i in spec["inputs"]],
            [("run.py", "https://store.example.org/j1/run.py"),
             ("data/in.dat", "http://agent-b:8891/files/t7/out.dat")],
        )

    def test_auth_is_kept_per_input_and_only_there(self):
        spec = self.native()
        self.assertEqual(dialect.input_authorization(spec, "data/in.dat"),
                         "EverestAgentClientToken run-1:s3cret")
        self.assertIsNone(dialect.input_authorization(spec, "run.py"))
        self.assertNotIn("auth", spec["inputs"][1])

    def test_outputs_with_a_uri_are_uploaded_by_pattern(self):
        spec = self.native()
        self.assertEqual(spec["outputs"], [
            {"pattern": "result.txt", "uri": "https://store.example.org/j1-3/"},
            {"pattern": "plots/*.png", "uri": "https://store.example.org/j1-3/"},
        ])

    def test_outputs_without_a_uri_stay_in_the_task_directory(self):
        spec = self.native()
        self.assertEqual(dialect.extras(spec)["keep"], ["big.h5"])

    def test_environment_is_expanded(self):
        spec = self.native()
        self.assertEqual(spec["environment"]["PYTHONPATH"], "/home/alice/lib:/scratch/alice/lib")
        self.assertEqual(spec["environment"]["MODE"], "fast")

    def test_unset_variable_expands_to_nothing(self):
        self.assertEqual(dialect.expand("$NOPE/x${NOPE}y", {}), "/xy")

    def test_name_and_context_are_kept_uninterpreted(self):
        spec = self.native(context={"job": "j1", "anything": [1, 2]})
        extras = dialect.extras(spec)
        self.assertEqual(extras["name"], "sweep point 3")
        self.assertEqual(extras["context"], {"job": "j1", "anything": [1, 2]})

    def test_requirements_pass_through(self):
        self.assertEqual(self.native()["resourceRequirements"], {"coresPerNode": 2, "timeLimit": 600})

    def test_native_spec_has_no_extras(self):
        spec = protocol.validate_spec({"command": "true", "environment": {"A": "$HOME"}})
        self.assertIsNone(dialect.extras(spec))
        self.assertEqual(spec["environment"]["A"], "$HOME")


class MalformedTests(SynchronousTestCase):
    """A malformed field fails the task with a reason that names it."""

    def reason(self, **fields):
        with self.assertRaises(SpecError) as caught:
            protocol.validate_spec(dialect.to_native(everest_spec(**fields), ENVIRON))
        return str(caught.exception)

    def test_input_data_not_a_list(self):
        self.assertIn("'inputData'", self.reason(inputData={"path": "a"}))

    def test_input_not_an_object(self):
        self.assertIn("inputData[0]", self.reason(inputData=["run.py"]))

    def test_input_without_uri(self):
        self.assertIn("inputData[0]: 'uri'", self.reason(inputData=[{"path": "a"}]))

    def test_input_escaping_the_task_directory(self):
        reason = self.reason(inputData=[{"path": "../../etc/x", "uri": "http://h/x"}])
        self.assertIn("inputData[0]", reason)
        self.assertIn("leaves the task directory", reason)

    def test_input_with_absolute_path(self):
        self.assertIn("absolute", self.reason(inputData=[{"path": "/etc/passwd", "uri": "http://h/x"}]))

    def test_auth_with_a_line_break_cannot_inject_headers(self):
        reason = self.reason(inputData=[{"path": "a", "uri": "http://h/a", "auth": "x\r\nHost: evil"}])
        self.assertIn("inputData[0]: 'auth'", reason)

    def test_auth_not_a_string(self):
        self.assertIn("'auth'", self.reason(inputData=[{"path": "a", "uri": "http://h/a", "auth": 7}]))

    def test_unknown_input_field(self):
        self.assertIn("unknown field 'sha'", self.reason(inputData=[{"path": "a", "uri": "http://h/a", "sha": 1}]))

    def test_output_without_paths(self):
        self.assertIn("outputData[0]: 'paths'", self.reason(outputData=[{"uri": "http://h/"}]))

    def test_output_paths_empty(self):
        self.assertIn("outputData[0]: 'paths'", self.reason(outputData=[{"paths": []}]))

    def test_output_path_escaping(self):
        self.assertIn("outputData[0].paths[1]", self.reason(outputData=[{"paths": ["ok", "../x"]}]))

    def test_output_uri_not_http(self):
        self.assertIn("outputData[0]: 'uri'", self.reason(outputData=[{"paths": ["a"], "uri": "file:///etc/"}]))

    def test_mixed_dialects(self):
        self.assertIn("'inputs'", self.reason(inputs=[]))

    def test_name_not_a_string(self):
        self.assertIn("'name'", self.reason(name=["x"]))

    def test_environment_value_not_a_string(self):
        self.assertIn("'N'", self.reason(environment={"N": 3}))

    def test_bad_environment_name_still_caught_by_the_native_checks(self):
        self.assertIn("valid name", self.reason(environment={"1X": "a"}))

    def test_context_not_an_object(self):
        with self.assertRaises(SpecError) as caught:
            dialect.to_native(everest_spec(), ENVIRON, context=[1])
        self.assertIn("context", str(caught.exception))


class StagedOutTests(SynchronousTestCase):
    def test_one_entry_per_file_with_uri_where_known(self):
        info = dialect.staged_out([
            {"path": "result.txt", "size": 3, "sha256": "a" * 64, "uri": "https://s/j1-3/result.txt"},
            {"path": "big.h5", "size": 10, "sha256": "b" * 64, "uri": "/files/t1/big.h5"},
            {"path": "listed.txt", "size": 0, "sha256": "c" * 64},
        ])
        self.assertEqual(info["outputData"][0]["uri"], "https://s/j1-3/result.txt")
        self.assertEqual(info["outputData"][1]["uri"], "/files/t1/big.h5")
        self.assertNotIn("uri", info["outputData"][2])

    def test_staged_out_ranks_between_staging_out_and_terminal(self):
        self.assertTrue(protocol.may_follow(protocol.STAGING_OUT, protocol.STAGED_OUT))
        self.assertTrue(protocol.may_follow(protocol.STAGED_OUT, protocol.DONE))
        self.assertFalse(protocol.may_follow(protocol.STAGED_OUT, protocol.RUNNING))
        self.assertFalse(protocol.may_follow(protocol.FAILED, protocol.STAGED_OUT))


class ValidateTests(SynchronousTestCase):
    """L{dialect.validate}: the one entry for a spec of either dialect."""

    def test_everest_spec_is_translated(self):
        spec = dialect.validate(everest_spec(), ENVIRON)
        self.assertEqual(dialect.extras(spec)["keep"], ["big.h5"])

    def test_native_spec_is_unchanged(self):
        spec = dialect.validate({"command": "true"}, ENVIRON)
        self.assertEqual(spec, protocol.validate_spec({"command": "true"}))

    def test_native_spec_cannot_forge_the_dialect_record(self):
        forged = {"command": "true", "everest": {"auth": {"a": "Bearer x"}, "keep": [], "name": None, "context": None}}
        with self.assertRaises(SpecError) as caught:
            dialect.validate(forged, ENVIRON)
        self.assertIn("reserved", str(caught.exception))

    def test_passive_session_spec_without_data_fields_is_in_the_dialect(self):
        spec = dialect.validate({"command": "true", "environment": {"P": "$HOME"}}, ENVIRON, passive=True)
        self.assertEqual(spec["environment"]["P"], "/home/alice")
        self.assertIsNotNone(dialect.extras(spec))

    def test_translated_spec_survives_validation_again(self):
        # The registry validates specs again when it loads them after a restart.
        spec = dialect.validate(everest_spec(), ENVIRON, context={"k": 1})
        self.assertEqual(protocol.validate_spec(spec), spec)
