"""
The task channel: a TCP port through which running tasks talk to the platform.

Framing, both ways: a 4-byte big-endian length, then that many bytes.  A
task opens with one frame holding a 0 byte (message mode) and its task id;
every later frame it sends is relayed to the platform as a reliable
C{TASK_MESSAGE}, and every C{TASK_MESSAGE} the platform sends for that task
is written to its connection(s).  Messages that arrive before the task has
connected wait for it (up to L{MAX_WAITING} per task).  A connection that
names an unknown or finished task, or opens with a bad frame, is closed.

Tasks find the channel through C{EVEREST_AGENT_ADDRESS}, C{EVEREST_AGENT_PORT}
and C{EVEREST_AGENT_TASK_ID} in their environment.
"""

import collections

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver

MAX_WAITING = 1000


class TaskChannelProtocol(Int32StringReceiver):
    log = Logger()
    # A task's message travels on as a TASK_MESSAGE, which must fit in a
    # 1 MiB WebSocket frame with its JSON quoting (up to 6 bytes a byte for
    # control characters): larger frames from a task are refused.
    MAX_LENGTH = 128 * 1024
    task_id = None

    def stringReceived(self, payload):
        if self.task_id is None:
            self._open(payload)
            return
        self.factory.from_task(self.task_id, payload.decode("utf-8", errors="replace"))

    def _open(self, payload):
        task_id = payload[1:].decode("ascii", errors="replace")
        if payload[:1] != b"\0" or not self.factory.is_running(task_id):
            self.log.warn(
                "Task channel: refusing a connection that opened with {what!r}",
                what=payload[:140],
            )
            self.transport.loseConnection()
            return
        self.task_id = task_id
        self.factory.attach(self)

    def lengthLimitExceeded(self, length):
        self.log.warn("Task channel: frame of {length} bytes from task {task_id} refused", length=length, task_id=self.task_id)
        self.transport.loseConnection()

    def connectionLost(self, reason):
        if self.task_id is not None:
            self.factory.detach(self)


class TaskChannel(Factory):
    """
    @param is_running: C{is_running(task_id)} tells whether a task may
        connect (known and not finished).
    @param relay: C{relay(task_id, text)} sends a message to the platform.
    """

    protocol = TaskChannelProtocol

    def __init__(self, is_running, relay):
        self.is_running = is_running
        self._relay = relay
        self._connections = collections.defaultdict(list)
        self._waiting = collections.defaultdict(collections.deque)
        self.address = None
        self.port = None

    def environment(self, task_id):
        """The variables that tell task C{task_id} where the channel is."""
        return {
            "EVEREST_AGENT_ADDRESS": self.address,
            "EVEREST_AGENT_PORT": str(self.port),
            "EVEREST_AGENT_TASK_ID": task_id,
        }

    def attach(self, connection):
        self._connections[connection.task_id].append(connection)
        for text in self._waiting.pop(connection.task_id, ()):
            connection.sendString(text.encode("utf-8"))

    def detach(self, connection):
        connections = self._connections.get(connection.task_id, [])
        if connection in connections:
            connections.remove(connection)
        if not connections:
            self._connections.pop(connection.task_id, None)

    def from_task(self, task_id, text):
        self._relay(task_id, text)

    def to_task(self, task_id, text):
        """Deliver a platform message to a task (or keep it until it connects)."""
        connections = self._connections.get(task_id)
        if connections:
            for connection in connections:
                connection.sendString(text.encode("utf-8"))
            return
        waiting = self._waiting[task_id]
        if len(waiting) >= MAX_WAITING:
            waiting.popleft()
        waiting.append(text)

    def task_finished(self, task_id):
        """Close a finished task's connections and drop what waits for it."""
        self._waiting.pop(task_id, None)
        for connection in self._connections.pop(task_id, []):
            connection.transport.loseConnection()
