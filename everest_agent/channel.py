"""
The task channel: a TCP port through which running tasks talk to the platform.

Framing, both ways: a 4-byte big-endian length, then that many bytes.  A
task opens with one frame holding a 0 byte (message mode) and its channel
credential, the value of C{EVEREST_AGENT_TASK_ID} in its environment; every
later frame it sends is relayed to the platform as a reliable
C{TASK_MESSAGE}, and every C{TASK_MESSAGE} the platform sends for that task
is written to its connection(s).

The credential is C{<taskId>:<code>}, where the code is an HMAC of the task
id under a key only the agent knows (kept in the state directory, mode
0600), so a task that passes the variable back verbatim is recognised, and a
local user who only knows a task's id (it shows in C{ps}) cannot connect as
that task.  A connection that does not present a valid credential of a
running task, opens with a bad frame, or sends nothing within
L{OPEN_TIMEOUT} seconds is closed.  At most L{MAX_CONNECTIONS} connections
(or a quarter of the open-file limit, when lower) are open at a time (L{MAX_OPENING} of them not yet identified, L{MAX_PER_TASK}
per task); more are closed at once.

Messages that arrive before the task has connected wait for it, up to
L{MAX_WAITING} and L{MAX_WAITING_BYTES} per task and L{MAX_WAITING_TOTAL} bytes
in all: over that, the oldest ones for the task are dropped (and, if the
total is still over, the new one is refused with an error to the platform).
"""

import collections
import errno
import hashlib
import hmac
import os
import resource
import secrets
import stat

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver

from everest_agent.protocol import ProtocolError

MAX_WAITING = 1000
MAX_WAITING_BYTES = 4 * 1024 * 1024
MAX_WAITING_TOTAL = 64 * 1024 * 1024
MAX_CONNECTIONS = 512
MAX_OPENING = 64
MAX_PER_TASK = 8
OPEN_TIMEOUT = 10.0

#: Longest opening frame: the mode byte, a task id (128) and the code.
MAX_OPENING_FRAME = 1 + 128 + 1 + 64

KEY_FILE = "channel-key"
E_CHANNEL_FULL = "task-channel-full"


def load_key(state_dir):
    """
    The channel's key from C{state_dir/channel-key}, created (0600) on
    first use, so that tasks that outlive an agent restart keep a valid
    credential.  The file must be a regular file of ours that nobody else
    can read; it is never followed through a symbolic link.
    """
    path = os.path.join(state_dir, KEY_FILE)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    else:
        try:
            os.write(fd, secrets.token_hex(32).encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(e.errno, f"{path} is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise OSError(errno.EPERM, f"{path} must be a regular file of this user, mode 0600")
        key = os.read(fd, 256).strip()
    finally:
        os.close(fd)
    if len(key) < 32:
        raise OSError(errno.EINVAL, f"{path} is too short; remove it to have a new one made")
    return key


def default_max_connections():
    """
    L{MAX_CONNECTIONS}, or a quarter of the open-file limit when that is
    lower: the channel must leave descriptors for tasks and transfers.
    """
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return MAX_CONNECTIONS
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, soft // 4))


class TaskChannelProtocol(Int32StringReceiver):
    log = Logger()
    # A task's message travels on as a TASK_MESSAGE, which must fit in a
    # 1 MiB WebSocket frame with its JSON quoting (up to 6 bytes a byte for
    # control characters): larger frames from a task are refused.
    MAX_LENGTH = MAX_OPENING_FRAME
    OPENED_MAX_LENGTH = 128 * 1024
    task_id = None
    _timer = None
    _closed = False

    def connectionMade(self):
        if not self.factory.admit(self):
            self._close()
            return
        self._timer = self.factory.reactor.callLater(self.factory.open_timeout, self._too_slow)

    def _too_slow(self):
        self._timer = None
        self.log.warn("Task channel: closing a connection that sent no opening frame in time")
        self._close()

    def _close(self):
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.transport.abortConnection()

    def stringReceived(self, payload):
        if self._closed:
            return
        if self.task_id is None:
            self._open(payload)
            return
        self.factory.from_task(self.task_id, payload.decode("utf-8", errors="replace"))

    def _open(self, payload):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        task_id = None
        if payload[:1] == b"\0":
            task_id = self.factory.task_of(payload[1:])
        if task_id is None or not self.factory.attach(self, task_id):
            # Never log the credential: only what the task id part claims.
            claimed = payload[1:].split(b":", 1)[0][:128]
            self.log.warn(
                "Task channel: refusing a connection that opened as {claimed!r} without a valid credential",
                claimed=claimed,
            )
            self._close()
            return
        self.MAX_LENGTH = self.OPENED_MAX_LENGTH

    def lengthLimitExceeded(self, length):
        self.log.warn("Task channel: frame of {length} bytes from task {task_id} refused", length=length, task_id=self.task_id)
        self._close()

    def connectionLost(self, reason):
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.factory.detach(self)


class TaskChannel(Factory):
    """
    @param is_running: C{is_running(task_id)} tells whether a task may
        connect (known and not finished).
    @param relay: C{relay(task_id, text)} sends a message to the platform.
    @param reactor: for the opening timeout.
    @param key: the secret (bytes) credentials are made with; see
        L{load_key}.  A random one if C{None} (then credentials do not
        survive a restart).
    """

    protocol = TaskChannelProtocol
    log = Logger()

    def __init__(self, is_running, relay, reactor=None, key=None, *, open_timeout=OPEN_TIMEOUT,
                 max_connections=None, max_opening=MAX_OPENING, max_per_task=MAX_PER_TASK,
                 max_waiting_bytes=MAX_WAITING_BYTES, max_waiting_total=MAX_WAITING_TOTAL):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.is_running = is_running
        self._relay = relay
        self.key = key if key is not None else secrets.token_bytes(32)
        self.open_timeout = open_timeout
        self.max_connections = max_connections if max_connections is not None else default_max_connections()
        self.max_opening = max_opening
        self.max_per_task = max_per_task
        self.max_waiting_bytes = max_waiting_bytes
        self.max_waiting_total = max_waiting_total
        self._all = set()
        self._connections = collections.defaultdict(list)
        self._waiting = collections.defaultdict(collections.deque)
        self._waiting_bytes = collections.Counter()
        self.waiting_total = 0
        self.address = None
        self.port = None

    # -- credentials ---------------------------------------------------------

    def credential(self, task_id):
        """The value of C{EVEREST_AGENT_TASK_ID} for task C{task_id}."""
        code = hmac.new(self.key, task_id.encode("ascii"), hashlib.sha256).hexdigest()[:48]
        return f"{task_id}:{code}"

    def task_of(self, credential):
        """The task id a credential (bytes) is valid for, or C{None}."""
        task_id, sep, _ = credential.partition(b":")
        try:
            task_id = task_id.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not sep or not task_id:
            return None
        if not hmac.compare_digest(self.credential(task_id).encode("ascii"), credential):
            return None
        return task_id

    def environment(self, task_id):
        """The variables that tell task C{task_id} where the channel is."""
        return {
            "EVEREST_AGENT_ADDRESS": self.address,
            "EVEREST_AGENT_PORT": str(self.port),
            "EVEREST_AGENT_TASK_ID": self.credential(task_id),
        }

    # -- connections ---------------------------------------------------------

    def admit(self, connection):
        """Count a new connection in, or refuse it when over the limits."""
        opening = sum(1 for c in self._all if c.task_id is None)
        if len(self._all) >= self.max_connections or opening >= self.max_opening:
            self.log.warn(
                "Task channel: {count} connections open ({opening} not identified yet); refusing one more",
                count=len(self._all), opening=opening,
            )
            return False
        self._all.add(connection)
        return True

    def attach(self, connection, task_id):
        if not self.is_running(task_id):
            return False
        connections = self._connections[task_id]
        if len(connections) >= self.max_per_task:
            self.log.warn("Task channel: task {task_id} already has {count} connections; refusing one more",
                          task_id=task_id, count=len(connections))
            return False
        connection.task_id = task_id
        connections.append(connection)
        for text in self._take_waiting(task_id):
            connection.sendString(text.encode("utf-8"))
        return True

    def detach(self, connection):
        self._all.discard(connection)
        if connection.task_id is None:
            return
        connections = self._connections.get(connection.task_id, [])
        if connection in connections:
            connections.remove(connection)
        if not connections:
            self._connections.pop(connection.task_id, None)

    def from_task(self, task_id, text):
        self._relay(task_id, text)

    # -- messages to tasks ---------------------------------------------------

    def _take_waiting(self, task_id):
        self.waiting_total -= self._waiting_bytes.pop(task_id, 0)
        return self._waiting.pop(task_id, ())

    def to_task(self, task_id, text):
        """
        Deliver a platform message to a task (or keep it until it connects).

        @raise ProtocolError: C{task-channel-full} if it cannot be kept.
        """
        connections = self._connections.get(task_id)
        data = text.encode("utf-8")
        if connections:
            for connection in connections:
                connection.sendString(data)
            return
        size = len(data)
        waiting = self._waiting[task_id]
        dropped = 0
        while waiting and (
            len(waiting) >= MAX_WAITING
            or self._waiting_bytes[task_id] + size > self.max_waiting_bytes
            or self.waiting_total + size > self.max_waiting_total
        ):
            old = len(waiting.popleft().encode("utf-8"))
            self._waiting_bytes[task_id] -= old
            self.waiting_total -= old
            dropped += 1
        if dropped:
            self.log.warn("Task channel: dropped {count} old messages waiting for task {task_id}",
                          count=dropped, task_id=task_id)
        if size > self.max_waiting_bytes or self.waiting_total + size > self.max_waiting_total:
            if not waiting:
                self._waiting.pop(task_id, None)
                self._waiting_bytes.pop(task_id, None)
            raise ProtocolError(
                E_CHANNEL_FULL,
                f"task {task_id} has not connected to the task channel and too many bytes wait for tasks",
                task_id,
            )
        waiting.append(text)
        self._waiting_bytes[task_id] += size
        self.waiting_total += size

    def task_finished(self, task_id):
        """Close a finished task's connections and drop what waits for it."""
        self._take_waiting(task_id)
        for connection in self._connections.pop(task_id, []):
            connection.transport.loseConnection()
