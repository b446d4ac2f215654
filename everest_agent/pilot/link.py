"""
The link between the agent and one pilot: length-prefixed frames over TCP.

Each frame is a 4-byte big-endian length and a JSON array of messages; a
message is a JSON array C{[kind, fields]}.  Messages sent during one reactor
turn leave together in one frame (L{Link.send} only queues; a timed call
at the end of the turn writes them), so a burst of a thousand task starts
costs one write and one JSON document, not a thousand.

Both ends send C{ping} when they have sent nothing for C{heartbeat}
seconds, and drop the connection when they have heard nothing for
C{heartbeat * misses} seconds: a half-open link (a cut cable, a suspended
firewall state) is found out and healed by reconnecting.

The first message from a pilot must be C{hello} with its id and secret;
the agent's side (L{everest_agent.pilot.handler}) drops a connection whose
first message is anything else, or whose secret is wrong.
"""

import json

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver

#: Largest frame accepted (a reconnecting pilot's hello lists its tasks).
MAX_FRAME = 256 * 1024 * 1024

HELLO = "hello"
WELCOME = "welcome"
RUN = "run"
CANCEL = "cancel"
STARTED = "started"
#: C{{"task", "result": [exit code, reason, canceled]}}, with a fourth
#: item C{true} when processes of the task outlived it.
ENDED = "ended"
REFUSED = "refused"
ACK = "ack"
STOP = "stop"
DRAINING = "draining"
PING = "ping"


class LinkError(Exception):
    """A frame that is not what the link's grammar allows."""


def decode(frame):
    """The messages in one frame: a list of C{(kind, fields)}."""
    try:
        messages = json.loads(frame)
    except (ValueError, UnicodeDecodeError) as e:
        raise LinkError(f"a frame that is not JSON ({e})") from None
    if not isinstance(messages, list):
        raise LinkError("a frame that is not a list of messages")
    decoded = []
    for message in messages:
        if (not isinstance(message, list) or len(message) != 2 or not isinstance(message[0], str)
                or not isinstance(message[1], dict)):
            raise LinkError("a message that is not [kind, {fields}]")
        decoded.append((message[0], message[1]))
    return decoded


class Link(Int32StringReceiver):
    """
    One end of a link.  C{handler} gets C{link_made(link)},
    C{link_messages(link, messages)} and C{link_lost(link, reason)}.
    """

    MAX_LENGTH = MAX_FRAME
    log = Logger()

    def __init__(self, handler, clock, heartbeat=10.0, misses=3):
        self.handler = handler
        self.clock = clock
        self.heartbeat = heartbeat
        self.misses = misses
        self._queue = []
        self._flush_call = None
        self._beat_call = None
        self._last_heard = None
        self._last_sent = None
        self.closed = False
        self.frames_sent = 0
        self.frames_received = 0

    def connectionMade(self):
        # Small frames both ways, each waited for: Nagle's algorithm would
        # hold them for the peer's delayed ACK (tens of milliseconds).
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        now = self.clock.seconds()
        self._last_heard = self._last_sent = now
        self._beat_call = self.clock.callLater(self.heartbeat, self._beat)
        self.handler.link_made(self)

    def set_heartbeat(self, seconds):
        self.heartbeat = seconds
        if self._beat_call is not None and self._beat_call.active():
            self._beat_call.reset(seconds)

    def send(self, kind, fields=None):
        if self.closed:
            return
        self._queue.append([kind, fields or {}])
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self.flush)

    def flush(self):
        self._flush_call = None
        if not self._queue or self.closed:
            return
        queue, self._queue = self._queue, []
        self.sendString(json.dumps(queue, separators=(",", ":")).encode())
        self.frames_sent += 1
        self._last_sent = self.clock.seconds()

    def _beat(self):
        self._beat_call = None
        if self.closed:
            return
        now = self.clock.seconds()
        if now - self._last_heard >= self.heartbeat * self.misses:
            self.log.warn("Pilot link to {peer}: nothing heard for {seconds:.0f} s; dropping it",
                          peer=self.peer(), seconds=now - self._last_heard)
            self.drop()
            return
        if now - self._last_sent >= self.heartbeat * 0.9:
            self.send(PING)
        self._beat_call = self.clock.callLater(self.heartbeat, self._beat)

    def peer(self):
        try:
            address = self.transport.getPeer()
            return f"{address.host}:{address.port}"
        except Exception:
            return "?"

    def stringReceived(self, frame):
        self._last_heard = self.clock.seconds()
        self.frames_received += 1
        try:
            messages = decode(frame)
        except LinkError as e:
            self.log.warn("Pilot link to {peer}: {error}; dropping it", peer=self.peer(), error=str(e))
            self.drop()
            return
        messages = [m for m in messages if m[0] != PING]
        if messages:
            self.handler.link_messages(self, messages)

    def lengthLimitExceeded(self, length):
        self.log.warn("Pilot link to {peer}: a frame of {length} bytes; dropping it",
                      peer=self.peer(), length=length)
        self.drop()

    def drop(self):
        """Close the connection at once, without sending what is queued."""
        self.closed = True
        self._queue = []
        if self.transport is not None:
            self.transport.abortConnection()

    def close(self):
        """Send what is queued, then close."""
        self.flush()
        self.closed = True
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.closed = True
        for call in (self._flush_call, self._beat_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._beat_call = None
        self.handler.link_lost(self, reason)


class LinkFactory(protocol.Factory):
    """Builds L{Link}s for C{handler} (the agent's listening side)."""

    def __init__(self, handler, clock, heartbeat=10.0, misses=3):
        self.handler = handler
        self.clock = clock
        self.heartbeat = heartbeat
        self.misses = misses

    def buildProtocol(self, addr):
        link = Link(self.handler, self.clock, self.heartbeat, self.misses)
        link.factory = self
        return link
