"""
The task channel (PROTOCOL section 7): tasks talk to the platform through
the agent over a local TCP port.
"""

import os
import struct
import sys

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from everest_agent.channel import TaskChannel
from tests.support import start_agent, start_platform


def frame(payload):
    return struct.pack(">I", len(payload)) + payload


class ChannelUnitTests(SynchronousTestCase):
    def setUp(self):
        self.relayed = []
        self.running = {"t1"}
        self.channel = TaskChannel(lambda t: t in self.running, lambda t, text: self.relayed.append((t, text)))

    def connect(self, opening):
        proto = self.channel.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(frame(opening))
        return proto, transport

    def test_relay_both_ways(self):
        self.channel.to_task("t1", "early")  # waits for the task
        proto, transport = self.connect(b"\0t1")
        self.assertEqual(transport.value(), frame(b"early"))
        proto.dataReceived(frame("héllo".encode()) + frame(b"second"))
        self.assertEqual(self.relayed, [("t1", "héllo"), ("t1", "second")])
        transport.clear()
        self.channel.to_task("t1", "later")
        self.assertEqual(transport.value(), frame(b"later"))
        self.channel.task_finished("t1")
        self.assertTrue(transport.disconnecting)

    def test_unknown_task_or_bad_opening_closed(self):
        for opening in (b"\0nope", b"\1t1", b""):
            proto, transport = self.connect(opening)
            self.assertTrue(transport.disconnecting, opening)
        self.assertEqual(self.relayed, [])

    def test_oversized_frame_closes(self):
        proto, transport = self.connect(b"\0t1")
        proto.dataReceived(struct.pack(">I", 2 * 1024 * 1024))
        self.assertTrue(transport.disconnecting)


TASK = r"""
import os, socket, struct, sys
def send(s, payload):
    s.sendall(struct.pack(">I", len(payload)) + payload)
def recv(s):
    def exactly(n):
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk:
                raise SystemExit("channel closed")
            data += chunk
        return data
    return exactly(struct.unpack(">I", exactly(4))[0])
s = socket.create_connection((os.environ["EVEREST_AGENT_ADDRESS"], int(os.environ["EVEREST_AGENT_PORT"])))
send(s, b"\0" + os.environ["EVEREST_AGENT_TASK_ID"].encode())
send(s, b"hello from the task")
send(s, b"VAR_GET answer")
print(recv(s).decode())
print(recv(s).decode())
"""


class ChannelIntegrationTests(TestCase):
    timeout = 30

    async def test_task_talks_to_platform(self):
        platform = await start_platform(self)
        start_agent(self, platform, sections={"task_channel": {"enabled": "yes"}})
        await platform.wait_connected()
        script = os.path.abspath(self.mktemp())
        with open(script, "w") as f:
            f.write(TASK)
        task_id = platform.submit({
            "command": f"{sys.executable} {script}",
            "outputs": [{"path": "stdout", "uri": platform.file_url("ch/stdout")}],
        })
        messages = await platform.wait_message(task_id, 2)
        self.assertEqual(messages[:2], ["hello from the task", "VAR_GET answer"])
        platform.send_message(task_id, "hi task")
        record = await platform.wait_for(task_id)
        self.assertEqual(record.state, "DONE", record.info)
        self.assertEqual(platform.get_file("ch/stdout"), b"VAR_VALUE answer NULL\nhi task\n")
        self.assertEqual(platform.violations, [])

    async def test_disabled_channel_answers_error(self):
        platform = await start_platform(self)
        start_agent(self, platform)
        await platform.wait_connected()
        task_id = platform.submit({"command": "sleep 0.3"})
        await platform.wait_for(task_id, "RUNNING")
        platform.send_message(task_id, "anyone?")
        record = await platform.wait_for(task_id)
        self.assertEqual(record.state, "DONE")
        self.assertEqual([e["code"] for e in platform.agent().errors], ["no-task-channel"])
