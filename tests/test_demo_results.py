"""
C{everest-agent demo}: its sweep script computes exact results for every
point (awk's doubles are exact only to 2^53), and the demo talks to the
reference platform's JSON API with its token.
"""

import io
import os

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from everest_agent import demo


class SweepScriptTests(TestCase):
    timeout = 60

    async def run_point(self, n):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        script = os.path.join(directory, "sweep.sh")
        with open(script, "wb") as f:
            f.write(demo.SCRIPT)
        with open(os.path.join(directory, "params.txt"), "w") as f:
            f.write(str(n))
        out, err, code = await getProcessOutputAndValue("/bin/sh", [script], env={"PATH": os.environ["PATH"]},
                                                        path=directory)
        with open(os.path.join(directory, "result.txt")) as f:
            return f.read().strip(), code

    async def test_results_exact_past_two_to_the_53(self):
        # n = 151 is the first point whose sum passes 2^53; 300 is the
        # largest of a 300-point demo.
        points = [1, 12, 150, 151, 152, 299, 300]
        results = await defer.gatherResults([defer.Deferred.fromCoroutine(self.run_point(n)) for n in points])
        for n, (result, code) in zip(points, results):
            self.assertEqual(result, demo.expected_result(n), n)
            self.assertEqual(code, 0)
        self.assertGreater(int(demo.expected_result(300).split()[1]), 2 ** 53)


class DemoTests(TestCase):
    timeout = 120

    async def test_short_demo_uses_the_api_token(self):
        out = io.StringIO()
        code = await defer.Deferred.fromCoroutine(demo.run_demo(reactor, tasks=demo.FAILING, out=out))
        text = out.getvalue()
        self.assertEqual(code, 0, text)
        self.assertIn("needs Authorization: Bearer <the token in ", text)
        self.assertIn("api-token>", text)
        self.assertNotIn("PROBLEM", text)
        self.assertIn(f"{demo.FAILING - 1} results verified", text)
