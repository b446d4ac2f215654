"""
Client credentials of passive mode.

A client authenticates with the header
C{Authorization: EverestAgentClientToken <client>:<token>}.  C{<token>} must
be one of the agent's client tokens (a file, one a line, mode 0600);
C{<client>} is a label the client chooses.  The whole credential is the
client's identity: tasks and files belong to it.

Neither the token nor the credential is ever logged or stored: the agent
keeps an L{owner} digest, and logs only the client's label.
"""

import hashlib
import hmac
import os
import stat
from dataclasses import dataclass

SCHEME = "EverestAgentClientToken"

#: A tokens file larger than this is refused (it is a short list of secrets).
MAX_TOKENS_FILE = 1 << 20
#: Longest client label and token accepted in a header.
MAX_LABEL = 256
MAX_TOKEN = 1024


class CredentialError(Exception):
    """A tokens file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Client:
    """
    An authenticated client.

    @ivar label: the label the client chose (safe to log: printable ASCII).
    @ivar owner: a digest of the whole credential, the key its tasks are
        recorded under; it reveals nothing of the token.
    """

    label: str
    owner: str


def read_tokens(path):
    """
    The client tokens in C{path}: one per line, blank lines and lines
    starting with C{#} ignored.

    The file is opened without following a symbolic link and without
    blocking, and must be a regular file of its owner's only (mode 0600 or
    stricter) and of reasonable size, so a FIFO, a device or a file others
    can read is refused before anything is read.

    @raise CredentialError: with one line naming the file and the fix.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CredentialError(f"{path}: no such file") from None
    except OSError as e:
        raise CredentialError(f"{path}: cannot open it: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CredentialError(f"{path}: not a regular file")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CredentialError(
                f"{path}: others can read it (mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        if st.st_size > MAX_TOKENS_FILE:
            raise CredentialError(f"{path}: larger than {MAX_TOKENS_FILE} bytes; it should hold a few tokens")
        data = os.read(fd, MAX_TOKENS_FILE + 1)
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise CredentialError(f"{path}: tokens must be printable ASCII") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not _printable(line) or " " in line or len(line) > MAX_TOKEN:
            raise CredentialError(
                f"{path}: line {number}: a token is one word of printable ASCII, at most {MAX_TOKEN} characters"
            )
        tokens.append(line)
    if not tokens:
        raise CredentialError(f"{path}: holds no token")
    return tokens


def _printable(text):
    return all(33 <= ord(c) < 127 or c == " " for c in text)


class ClientTokens:
    """
    Checks C{Authorization} headers against the agent's client tokens.

    Tokens are compared in constant time; the header's scheme and shape are
    checked first, and every rejection says only that the credential was
    refused.
    """

    def __init__(self, tokens):
        self._tokens = [t.encode("ascii") for t in tokens]

    @classmethod
    def from_file(cls, path):
        return cls(read_tokens(path))

    def authenticate(self, header):
        """
        @param header: the C{Authorization} header's value (str or bytes), or C{None}.
        @return: the L{Client}, or C{None} when the credential is refused.
        """
        if isinstance(header, bytes):
            try:
                header = header.decode("ascii")
            except UnicodeDecodeError:
                return None
        if not isinstance(header, str):
            return None
        scheme, _, credential = header.strip().partition(" ")
        if scheme != SCHEME:
            return None
        credential = credential.strip()
        label, sep, token = credential.rpartition(":")
        if not sep or not label or not token or len(label) > MAX_LABEL or len(token) > MAX_TOKEN:
            return None
        if not _printable(label) or " " in token:
            return None
        candidate = token.encode("ascii")
        matched = False
        for known in self._tokens:
            matched |= hmac.compare_digest(candidate, known)
        if not matched:
            return None
        owner = hashlib.sha256(b"everest-agent client\0" + credential.encode("ascii")).hexdigest()
        return Client(label=label, owner=owner)
