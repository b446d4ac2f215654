"""
The task channel (PROTOCOL section 7): tasks talk to the platform through
the agent over a local TCP port.
"""

import os
import resource
import stat
import struct
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from everest_agent.channel import (
    MAX_CONNECTIONS,
    MAX_WAITING_BYTES,
    OPEN_TIMEOUT,
    TaskChannel,
    default_max_connections,
    load_key,
)
from everest_agent.protocol import ProtocolError
from tests.support import eventually, start_agent, start_platform


def frame(payload):
    return struct.pack(">I", len(payload)) + payload


class ChannelUnitTests(SynchronousTestCase):
    def setUp(self):
        self.relayed = []
        self.running = {"t1", "t2"}
        self.clock = Clock()
        self.channel = TaskChannel(lambda t: t in self.running, lambda t, text: self.relayed.append((t, text)),
                                   self.clock, key=b"k" * 32)
        self.cred = self.channel.credential("t1").encode()

    def connect(self, opening=None):
        proto = self.channel.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        transport.protocol = proto
        if opening is not None:
            proto.dataReceived(frame(opening))
        return proto, transport

    def closed(self, transport):
        return transport.disconnecting or getattr(transport, "aborted", False)

    def lose(self, proto, transport):
        proto.connectionLost(None)

    def test_relay_both_ways(self):
        self.channel.to_task("t1", "early")  # waits for the task
        proto, transport = self.connect(b"\0" + self.cred)
        self.assertEqual(transport.value(), frame(b"early"))
        proto.dataReceived(frame("héllo".encode()) + frame(b"second"))
        self.assertEqual(self.relayed, [("t1", "héllo"), ("t1", "second")])
        transport.clear()
        self.channel.to_task("t1", "later")
        self.assertEqual(transport.value(), frame(b"later"))
        self.channel.task_finished("t1")
        self.assertTrue(transport.disconnecting)

    def test_environment_holds_the_credential(self):
        self.channel.address, self.channel.port = "127.0.0.1", 5000
        env = self.channel.environment("t1")
        self.assertEqual(env["EVEREST_AGENT_TASK_ID"], self.cred.decode())
        self.assertTrue(env["EVEREST_AGENT_TASK_ID"].startswith("t1:"))
        other = TaskChannel(lambda t: True, None, self.clock, key=b"j" * 32)
        self.assertNotEqual(other.credential("t1"), self.channel.credential("t1"))

    def test_unknown_task_bad_opening_or_bare_task_id_closed(self):
        forged = self.cred[:-1] + (b"0" if self.cred[-1:] != b"0" else b"1")
        other_task = self.channel.credential("t2").encode()
        for opening in (b"\0nope", b"\1" + self.cred, b"", b"\0t1", b"\0t1:", forged,
                        b"\0t2:" + other_task.split(b":")[1][:-2] + b"zz",
                        b"\0t1:" + other_task.split(b":")[1], b"\0\xff:\xfe"):
            proto, transport = self.connect(opening)
            self.assertTrue(self.closed(transport), opening)
            proto.dataReceived(frame(b"forged message"))
            self.lose(proto, transport)
        self.channel.to_task("t1", "for the task only")
        self.assertEqual(self.relayed, [])
        self.assertEqual(self.channel._all, set())

    def test_finished_task_refused(self):
        self.running.discard("t1")
        proto, transport = self.connect(b"\0" + self.cred)
        self.assertTrue(self.closed(transport))

    def test_oversized_frame_closes(self):
        proto, transport = self.connect(b"\0" + self.cred)
        proto.dataReceived(struct.pack(">I", 2 * 1024 * 1024))
        self.assertTrue(self.closed(transport))

    def test_oversized_opening_frame_closes_at_once(self):
        proto, transport = self.connect()
        proto.dataReceived(struct.pack(">I", 100 * 1024) + b"x" * 1000)
        self.assertTrue(self.closed(transport))

    def test_opening_frame_deadline(self):
        proto, transport = self.connect()
        proto.dataReceived(struct.pack(">I", 50) + b"partial")
        self.clock.advance(OPEN_TIMEOUT - 0.1)
        self.assertFalse(self.closed(transport))
        self.clock.advance(0.2)
        self.assertTrue(self.closed(transport))
        # An identified connection has no deadline.
        proto, transport = self.connect(b"\0" + self.cred)
        self.clock.advance(OPEN_TIMEOUT * 10)
        self.assertFalse(self.closed(transport))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_limits(self):
        channel = TaskChannel(lambda t: True, lambda t, text: None, self.clock, key=b"k" * 32,
                              max_connections=6, max_opening=3, max_per_task=2)
        self.channel = channel
        pending = [self.connect() for _ in range(3)]
        self.assertFalse(any(self.closed(t) for _, t in pending))
        proto, transport = self.connect()
        self.assertTrue(self.closed(transport), "a 4th unidentified connection")
        self.lose(proto, transport)
        # Identified connections do not count against the opening limit...
        self.lose(*pending.pop())
        a = self.connect(b"\0" + self.cred)
        b = self.connect(b"\0" + self.cred)
        c = self.connect(b"\0" + self.cred)
        self.assertFalse(self.closed(a[1]) or self.closed(b[1]))
        self.assertTrue(self.closed(c[1]), "a 3rd connection for one task")
        self.lose(*c)
        d = self.connect(b"\0" + channel.credential("t2").encode())
        e = self.connect(b"\0" + channel.credential("t3").encode())
        self.assertFalse(self.closed(d[1]) or self.closed(e[1]))
        # ... but they do against the total: 2 pending + 4 identified.
        f = self.connect()
        self.assertTrue(self.closed(f[1]), "a 7th connection")
        self.lose(*f)
        self.lose(*e)
        g = self.connect()
        self.assertFalse(self.closed(g[1]))

    def test_waiting_messages_capped_in_bytes(self):
        """400 x 900 KiB for a task that never connects: a few MiB kept, not 360."""
        big = "x" * (900 * 1024)
        for _ in range(400):
            self.channel.to_task("t1", big)
        self.assertLessEqual(self.channel.waiting_total, MAX_WAITING_BYTES)
        kept = sum(len(t) for t in self.channel._waiting["t1"])
        self.assertEqual(kept, self.channel.waiting_total)
        self.assertGreater(kept, 0)
        proto, transport = self.connect(b"\0" + self.cred)
        self.assertEqual(transport.value(), frame(big.encode()) * (kept // len(big)))
        self.assertEqual(self.channel.waiting_total, 0)

    def test_waiting_total_over_all_tasks(self):
        channel = TaskChannel(lambda t: True, None, self.clock, key=b"k" * 32,
                              max_waiting_bytes=100, max_waiting_total=250)
        for task_id in ("a", "b"):
            channel.to_task(task_id, "y" * 100)
        channel.to_task("c", "z" * 50)
        with self.assertRaises(ProtocolError) as caught:
            channel.to_task("d", "w" * 60)
        self.assertEqual(caught.exception.code, "task-channel-full")
        with self.assertRaises(ProtocolError):
            channel.to_task("e", "v" * 101)
        self.assertEqual(channel.waiting_total, 250)
        channel.task_finished("a")
        self.assertEqual(channel.waiting_total, 150)
        channel.to_task("d", "w" * 60)
        self.assertEqual(channel.waiting_total, 210)


class OpenFileLimitTests(SynchronousTestCase):
    def test_quarter_of_a_low_limit(self):
        self.patch(resource, "getrlimit", lambda which: (256, 4096))
        self.assertEqual(default_max_connections(), 64)
        self.assertEqual(TaskChannel(None, None, Clock()).max_connections, 64)
        self.patch(resource, "getrlimit", lambda which: (1 << 20, 1 << 20))
        self.assertEqual(default_max_connections(), MAX_CONNECTIONS)


class ChannelKeyTests(SynchronousTestCase):
    def test_created_private_and_stable(self):
        state = self.mktemp()
        os.makedirs(state)
        key = load_key(state)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(state, "channel-key")).st_mode), 0o600)
        self.assertEqual(load_key(state), key)

    def test_symlink_or_readable_refused(self):
        state = self.mktemp()
        os.makedirs(state)
        elsewhere = os.path.abspath(self.mktemp())
        with open(elsewhere, "w") as f:
            f.write("a" * 64)
        os.chmod(elsewhere, 0o600)
        os.symlink(elsewhere, os.path.join(state, "channel-key"))
        self.assertRaises(OSError, load_key, state)
        os.unlink(os.path.join(state, "channel-key"))
        load_key(state)
        os.chmod(os.path.join(state, "channel-key"), 0o644)
        self.assertRaises(OSError, load_key, state)


#: The start of a task program: connect, then open with EVEREST_AGENT_TASK_ID verbatim.
TASK_OPENING = r"""
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
"""

TASK = TASK_OPENING + r"""
send(s, b"hello from the task")
send(s, b"VAR_GET answer")
print(recv(s).decode())
print(recv(s).decode())
"""


async def run_channel_task(test, program):
    """A platform, an agent with the channel on, and a task running C{program}."""
    platform = await start_platform(test)
    agent = start_agent(test, platform, sections={"task_channel": {"enabled": "yes"}})
    await platform.wait_connected()
    script = os.path.abspath(test.mktemp())
    with open(script, "w") as f:
        f.write(program)
    task_id = platform.submit({
        "command": f"{sys.executable} {script}",
        "outputs": [{"path": "stdout", "uri": platform.file_url("ch/stdout")}],
    })
    return platform, agent, task_id


class ChannelIntegrationTests(TestCase):
    timeout = 30

    async def test_task_talks_to_platform(self):
        platform, _, task_id = await run_channel_task(self, TASK)
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


GATED_TASK = TASK_OPENING + r"""
send(s, b"legit")
print(recv(s).decode())
"""


class _Intruder(Protocol):
    def __init__(self):
        self.received = b""
        self.lost = Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost.callback(None)


class ChannelIntruderTests(TestCase):
    timeout = 30

    async def intrude(self, port, payload):
        intruder = _Intruder()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        await connectProtocol(endpoint, intruder)
        intruder.transport.write(payload)
        await intruder.lost
        return intruder

    async def test_second_local_connection_with_the_task_id_is_closed(self):
        """
        A local user who saw a task's id in ps connects as that task (a
        real second TCP connection): it is closed, its message never
        reaches the platform and it receives nothing meant for the task.
        """
        platform, agent, task_id = await run_channel_task(self, GATED_TASK)
        await platform.wait_message(task_id, 1)
        port = agent.channel.port
        forged = frame(b"\0" + task_id.encode()) + frame(b"forged by an intruder")
        intruder = await self.intrude(port, forged)
        self.assertEqual(intruder.received, b"")
        # A guessed code of the right shape fares no better.
        guessed = frame(b"\0" + f"{task_id}:{'0' * 48}".encode()) + frame(b"forged again")
        intruder = await self.intrude(port, guessed)
        self.assertEqual(intruder.received, b"")
        platform.send_message(task_id, "for the task")
        record = await platform.wait_for(task_id)
        self.assertEqual(record.state, "DONE", record.info)
        self.assertEqual(platform.get_file("ch/stdout"), b"for the task\n")
        self.assertEqual(platform.tasks[task_id].messages, ["legit"])

    async def test_silent_connections_do_not_pile_up(self):
        """Connections that never send an opening frame hit the limit and are refused."""
        platform = await start_platform(self)
        agent = start_agent(self, platform, sections={"task_channel": {"enabled": "yes"}})
        await platform.wait_connected()
        agent.channel.max_opening = 3
        held = []
        for _ in range(3):
            p = _Intruder()
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", agent.channel.port), p)
            p.transport.write(struct.pack(">I", 20))  # a partial opening frame
            held.append(p)
        await eventually(lambda: len(agent.channel._all) == 3, what="three connections admitted")
        extra = await self.intrude(agent.channel.port, b"")
        self.assertEqual(extra.received, b"")
        self.assertEqual(len(agent.channel._all), 3)
        for p in held:
            p.transport.loseConnection()
            await p.lost
