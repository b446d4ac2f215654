"""
The codec of the wire contract (everest_agent/protocol.py): the nesting
bound, whether or not the walk behind it runs.
"""

from twisted.trial.unittest import SynchronousTestCase

from everest_agent import protocol
from everest_agent.protocol import ProtocolError


class DepthTests(SynchronousTestCase):
    def test_brackets_in_strings_are_not_nesting(self):
        """Many brackets, none of them nesting: counted, walked, accepted."""
        text = "[{" * 500
        payload = protocol.encode(["TASK_MESSAGE", "t1", text])
        self.assertGreater(protocol._openings(payload), protocol.MAX_DEPTH)
        self.assertEqual(protocol.decode(payload), ["TASK_MESSAGE", "t1", text])
        self.assertEqual(protocol.decode(payload.decode("utf-8")), ["TASK_MESSAGE", "t1", text])

    def test_limit_exactly(self):
        ok = '["X", ' + "[" * (protocol.MAX_DEPTH - 1) + "]" * (protocol.MAX_DEPTH - 1) + "]"
        self.assertEqual(protocol._openings(ok), protocol.MAX_DEPTH)
        self.assertEqual(protocol.decode(ok.encode())[0], "X")
        one_more = '["X", ' + "[" * protocol.MAX_DEPTH + "]" * protocol.MAX_DEPTH + "]"
        self.assertRaises(ProtocolError, protocol.decode, one_more)
        too_deep = '["X", ' + '{"a": ' * protocol.MAX_DEPTH + "1" + "}" * protocol.MAX_DEPTH + "]"
        for payload in (too_deep, too_deep.encode()):
            e = self.assertRaises(ProtocolError, protocol.decode, payload)
            self.assertIn("nested deeper than", e.message)

    def test_shallow_messages_skip_the_walk(self):
        walked = []
        real = protocol._depth_within
        self.patch(protocol, "_depth_within", lambda *a: walked.append(a) or real(*a))
        protocol.decode(protocol.encode(["TASK_SUBMIT", "t1", {"command": "true", "inputs": [], "outputs": []}]))
        self.assertEqual(walked, [])
        protocol.decode(protocol.encode(["TASK_MESSAGE", "t1", "[" * 100]))
        self.assertEqual(len(walked), 1)
