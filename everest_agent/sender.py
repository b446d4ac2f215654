"""
Everything the agent says to the platform goes through the L{Sender}.

Reliable messages (C{TASK_STATE}, C{TASK_MESSAGE}) go through the durable
L{Outbox}: a message is on disk before it is sent, is sent again after every
reconnect until an C{ACK} covers it, and keeps its C{seq}.  Unreliable ones
(C{RESOURCE_STATE}, C{ERROR}) are sent only while a session is up.
"""

import time

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from everest_agent import protocol
from everest_agent.interfaces import ISender


@implementer(ISender)
class Sender(Service):
    log = Logger()

    def __init__(self, outbox, clock=None, wallclock=time.time):
        self.outbox = outbox
        self.clock = clock
        self._time = wallclock
        self._session = None  # a connection that has been WELCOMEd
        self._ack_listeners = []
        self.sent = 0

    # -- session -------------------------------------------------------------

    @property
    def connected(self):
        return self._session is not None

    def welcomed(self, session, ack):
        """
        The platform said WELCOME: drop what it already has, re-send the rest
        in order on C{session}.
        """
        self._session = session
        self.ack(ack)
        pending = self.outbox.durable_payloads()
        if pending:
            self.log.info("Re-sending {count} unacknowledged messages", count=len(pending))
        send = session.send_payload
        for payload in pending:
            self.sent += 1
            send(payload)

    def lost(self, session):
        if self._session is session:
            self._session = None

    def ack(self, seq):
        if self.outbox.ack(seq):
            for listener in self._ack_listeners:
                listener(self.outbox.acked)

    def drained(self, timeout):
        """
        A Deferred that fires once every message is acknowledged, or after
        C{timeout} seconds, whichever comes first.
        """
        d = defer.Deferred()
        if not len(self.outbox):
            d.callback(None)
            return d

        def on_ack(_):
            if not d.called and not len(self.outbox):
                d.callback(None)

        self._ack_listeners.append(on_ack)
        timer = self.clock.callLater(timeout, lambda: d.called or d.callback(None))

        def done(result):
            self._ack_listeners.remove(on_ack)
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(done)

    def add_ack_listener(self, listener):
        """Call C{listener(acked_seq)} whenever the platform acknowledges more."""
        self._ack_listeners.append(listener)

    # -- reliable ------------------------------------------------------------

    def task_state(self, task_id, state, info=None):
        fields = dict(info or ())
        now = self._time()

        def build(seq):
            fields["seq"] = seq
            fields["time"] = now
            return [protocol.TASK_STATE, task_id, state, fields]

        return self._reliable(build)

    def task_message(self, task_id, text):
        return self._reliable(lambda seq: [protocol.TASK_MESSAGE, task_id, text, {"seq": seq}])

    def _reliable(self, build):
        seq, payload, durable = self.outbox.put(build)
        return durable.addCallback(self._durable, seq, payload)

    def _durable(self, _, seq, payload):
        # Sent only when on disk.  A message acknowledged meanwhile (it
        # cannot be, but an impatient platform may ack ahead) is skipped.
        if self._session is not None and seq > self.outbox.acked:
            self.sent += 1
            self._session.send_payload(payload)
        return seq

    # -- unreliable ----------------------------------------------------------

    def send_unreliable(self, message):
        if self._session is None:
            return False
        self._send(message)
        return True

    def error(self, error):
        """Answer a platform message we cannot act on (a L{protocol.ProtocolError})."""
        self.log.warn(
            "Platform message refused: {code}: {message}",
            code=error.code, message=error.message, task_id=error.task_id,
        )
        self.send_unreliable(error.as_message())

    def _send(self, message):
        self.sent += 1
        self._session.send(message)

    def stopService(self):
        super().stopService()
        return self.outbox.stop()
