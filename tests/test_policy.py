"""
[security] allowed_commands and allowed_environment (issue 11, item 7):
the documented examples against the walk-arounds that were found, and a
spec environment that would change what the shell runs.
"""

import os
import re

from twisted.trial.unittest import SynchronousTestCase

from everest_agent import config as agent_config
from everest_agent import policy
from tests.test_manager import Harness, spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: What was found to pass the old documented examples.
WALK_AROUNDS = [
    "python3 -m mypackage.worker --a=x;id>f",
    "python3 -m mypackage.worker --a=$(id>f)",
    "python3 -m mypackage.worker --a=`id>f`",
    "python3 -m mypackage.worker --a=x|id",
    "python3 -m mypackage.worker --a=x&&id",
    "python3 -m mypackage.worker --a='x'",
    "python3 -m mypackage.worker --a=x\nid",
    "bash run-task.sh 1; id",
    "bash run-task.sh 1\nid",
]
GOOD = ["bash run-task.sh 12", "python3 -m mypackage.worker --input=a.dat --steps=10"]


def _documented_patterns(path, marker):
    """The allowed_commands lines of the example in C{path} after C{marker}."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    block = text[text.index(marker):].splitlines()[1:]
    lines = []
    for line in block:
        stripped = line.strip().lstrip(";").strip()
        if not stripped or stripped.startswith(("allowed_commands", "::")):
            if lines:
                break
            continue
        if not (line.startswith("        ") or line.startswith(";    ")):
            break
        lines.append(stripped)
    return agent_config._regex_lines("\n".join(lines))


class DocumentedExamplesTests(SynchronousTestCase):
    def check(self, patterns):
        self.assertEqual(len(patterns), 2)
        for command in WALK_AROUNDS:
            self.assertFalse(any(p.fullmatch(command) for p in patterns), command)
        for command in GOOD:
            self.assertTrue(any(p.fullmatch(command) for p in patterns), command)

    def test_configuration_reference(self):
        self.check(_documented_patterns(os.path.join(ROOT, "docs", "configuration.rst"),
                                        "        allowed_commands ="))

    def test_example_file(self):
        self.check(_documented_patterns(os.path.join(ROOT, "examples", "agent.ini"),
                                        ";allowed_commands ="))


class EnvironmentTests(SynchronousTestCase):
    def setUp(self):
        self.allowed = [re.compile(r"bash run-task\.sh [0-9]+")]

    def refused(self, environment, allowed_environment=()):
        h = Harness(self, allowed=self.allowed)
        h.manager.allowed_environment = frozenset(allowed_environment)
        h.submit("t", spec("bash run-task.sh 1", environment=environment))
        return h

    def test_walk_arounds_fail_without_running(self):
        for environment in [{"BASH_ENV": "./evil.sh"}, {"PATH": "."}, {"ENV": "./evil.sh"},
                            {"LD_PRELOAD": "./evil.so"}, {"PYTHONSTARTUP": "x.py"},
                            {"IFS": "/"}, {"SHELLOPTS": "xtrace"}, {"PS4": "$(id>f)"},
                            {"GCONV_PATH": "."}, {"GLIBC_TUNABLES": "x"}]:
            h = self.refused(environment)
            self.assertEqual(h.handler.jobs, {}, environment)
            self.assertEqual(h.states("t"), ["ACCEPTED", "FAILED"])
            reason = h.last("t")[3]["reason"]
            self.assertIn("environment refused", reason)
            self.assertIn(next(iter(environment)), reason)
            h.stop()

    def test_allowed_environment_lets_named_ones_through(self):
        h = self.refused({"PATH": "/opt/bin:/usr/bin", "LD_LIBRARY_PATH": "/opt/lib"},
                         allowed_environment=["PATH", "LD_*"])
        self.assertIn("t", h.handler.jobs)
        h.stop()

    def test_harmless_variables_pass(self):
        h = self.refused({"OMP_NUM_THREADS": "4", "TMPDIR": "/scratch"})
        self.assertIn("t", h.handler.jobs)
        h.stop()

    def test_no_restriction_without_allowed_commands(self):
        self.assertIsNone(policy.check({"command": "x", "environment": {"PATH": "."}}, []))

    def test_config_names(self):
        self.assertEqual(agent_config._env_names(" PATH  LD_* "), ["PATH", "LD_*"])
        self.assertRaises(ValueError, agent_config._env_names, "A=B")
