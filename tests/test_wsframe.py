"""
The agent's and the reference platform's own framing of text messages
(everest_agent/wsframe.py), checked against Autobahn's.
"""

import json
import os

from autobahn.exception import PayloadExceededError
from autobahn.websocket.protocol import PreparedMessage
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from everest_agent import protocol, wsframe
from everest_agent.client import AgentClientFactory, AgentProtocolClient

LENGTHS = (0, 1, 3, 4, 5, 125, 126, 127, 1000, 65535, 65536, 70001)


def parse(frame):
    """One frame by the book (RFC 6455, 5.2): (fin, rsv, opcode, masked, payload), unmasked."""
    b0, b1 = frame[0], frame[1]
    n = b1 & 0x7F
    at = 2
    if n == 126:
        n = int.from_bytes(frame[2:4], "big")
        at = 4
    elif n == 127:
        n = int.from_bytes(frame[2:10], "big")
        at = 10
    masked = bool(b1 & 0x80)
    key = frame[at:at + 4] if masked else b"\0\0\0\0"
    if masked:
        at += 4
    body = frame[at:]
    assert len(body) == n, (len(body), n)
    payload = bytes(c ^ key[i % 4] for i, c in enumerate(body))
    return bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F, masked, payload


class FrameTests(SynchronousTestCase):
    def test_server_frames_are_autobahns(self):
        """Unmasked, every length form: byte for byte what Autobahn builds."""
        for n in LENGTHS:
            payload = os.urandom(n)
            expected = PreparedMessage(payload, False, False, True).payloadHybi
            self.assertEqual(wsframe.text_frame(payload, masked=False), expected, n)

    def test_mask_is_autobahns(self):
        for n in LENGTHS:
            payload, key = os.urandom(n), os.urandom(4)
            expected = create_xor_masker(key, n).process(payload) if n else b""
            self.assertEqual(wsframe.mask(payload, key), expected, n)

    def test_client_frames(self):
        """Masked with the key that follows the header; the payload comes back whole."""
        for n in LENGTHS:
            payload = os.urandom(n)
            frame = wsframe.text_frame(payload, masked=True, key=b"\x01\x02\x03\x04")
            self.assertEqual(parse(frame), (True, 0, 1, True, payload), n)
            if n >= 4:
                self.assertNotEqual(frame[-n:], payload)

    def test_fresh_key_per_frame(self):
        drawn = []

        def random_bytes(n):
            drawn.append(n)
            return os.urandom(n)

        keys = wsframe._Keys(random_bytes)
        got = [keys() for _ in range(2 * wsframe._KEYS_AT_ONCE + 1)]
        self.assertTrue(all(len(k) == 4 for k in got))
        self.assertEqual(drawn, [4 * wsframe._KEYS_AT_ONCE] * 3)  # a batch at a time
        self.assertGreater(len(set(got)), len(got) - 5)  # (32 random bits: a repeat or two at most)
        frames = {wsframe.text_frame(b"same", masked=True) for _ in range(50)}
        self.assertGreater(len(frames), 45)


class ClientSendTests(SynchronousTestCase):
    def setUp(self):
        class Agent:
            user_agent = "everest-agent/test"

        self.factory = AgentClientFactory(Agent(), "ws://127.0.0.1:9/compute/agent/v1", Clock())
        self.proto = AgentProtocolClient()
        self.proto.factory = self.factory
        self.proto.transport = self.transport = StringTransport()
        self.proto.state = AgentProtocolClient.STATE_OPEN

    def test_one_masked_text_frame_per_message(self):
        self.proto.send(["TASK_STATE", "t1", "ACCEPTED", {"seq": 1, "time": 1.5}])
        self.proto.send_payload(protocol.encode(["TASK_STATE", "t1", "QUEUED", {"seq": 2, "time": 1.5}]))
        data = self.transport.value()
        first_len = data[1] & 0x7F
        first, second = data[:2 + 4 + first_len], data[2 + 4 + first_len:]
        for frame, state in ((first, "ACCEPTED"), (second, "QUEUED")):
            fin, rsv, opcode, masked, payload = parse(frame)
            self.assertEqual((fin, rsv, opcode, masked), (True, 0, 1, True))
            self.assertEqual(json.loads(payload)[2], state)

    def test_nothing_sent_while_not_open(self):
        self.proto.state = AgentProtocolClient.STATE_CLOSING
        self.proto.send(["RESOURCE_STATE", {}])
        self.assertEqual(self.transport.value(), b"")

    def test_oversized_message_refused(self):
        """Over the contract's 1 MiB: refused (as Autobahn's sendMessage did), nothing written."""
        big = protocol.encode(["TASK_MESSAGE", "t1", "x" * protocol.MAX_FRAME_SIZE, {"seq": 1}])
        self.assertRaises(PayloadExceededError, self.proto.send_payload, big)
        self.assertEqual(self.transport.value(), b"")
        just = b'"' + b"x" * (protocol.MAX_FRAME_SIZE - 2) + b'"'
        self.proto.send_payload(just)
        self.assertEqual(parse(self.transport.value())[4], just)
