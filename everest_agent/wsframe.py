"""
One WebSocket text frame (RFC 6455, section 5) per message, built in one go.

Autobahn's C{sendMessage} does much more per call than either side of this
project needs (per-message compression, fragmentation, statistics, debug
log events formatted whether or not they are logged, a native masker set up
per frame); in a burst of 100,000 task reports it was a tenth of the
agent's CPU.  The agent and the reference platform therefore build each
frame of a message here, a single final text frame with no extension bits
(they negotiate no extension), and write it to the connection's transport
themselves.  Receiving (and control frames: ping, pong, close) stays
Autobahn's.

A client's frames are masked (section 5.3) with a fresh 4-byte key each,
taken from the operating system's random source (C{os.urandom}, drawn a few
kilobytes at a time); a server's are not.
"""

import os
import struct

_FIN_TEXT = 0x81  # FIN, no RSV bits, opcode 1 (text)
_MASKED = 0x80

_KEYS_AT_ONCE = 1024  # masking keys drawn from the OS per call


class _Keys:
    """Masking keys: 4 bytes each from C{os.urandom}, a batch at a time."""

    def __init__(self, random_bytes=os.urandom):
        self._random = random_bytes
        self._pool = b""
        self._next = 0

    def __call__(self):
        at = self._next
        if at >= len(self._pool):
            self._pool = self._random(4 * _KEYS_AT_ONCE)
            at = 0
        self._next = at + 4
        return self._pool[at:at + 4]


masking_key = _Keys()


def header(length, masked):
    """The header of a final text frame whose payload is C{length} bytes long."""
    bit = _MASKED if masked else 0
    if length < 126:
        return bytes((_FIN_TEXT, bit | length))
    if length < 0x10000:
        return struct.pack("!BBH", _FIN_TEXT, bit | 126, length)
    return struct.pack("!BBQ", _FIN_TEXT, bit | 127, length)


def mask(payload, key):
    """C{payload} XORed with the repeated 4-byte C{key} (section 5.3)."""
    n = len(payload)
    if not n:
        return b""
    stream = key * ((n >> 2) + 1)
    value = int.from_bytes(payload, "little") ^ int.from_bytes(stream[:n], "little")
    return value.to_bytes(n, "little")


def text_frame(payload, masked, key=None):
    """
    The bytes of one final text frame carrying C{payload} (UTF-8 bytes).

    @param masked: True for a client's frame (masked with C{key}, default a
        fresh random one), False for a server's.
    """
    if not masked:
        return header(len(payload), False) + payload
    if key is None:
        key = masking_key()
    return b"".join((header(len(payload), True), key, mask(payload, key)))
