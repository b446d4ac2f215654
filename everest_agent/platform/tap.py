"""
twistd plugin support for the reference platform: C{twistd -n everest-platform}.
"""

import os
import re
import tempfile

from twisted.application import service
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage

from everest_agent import tlsfiles
from everest_agent.config import ConfigError, SecretFileError, check_token_text, read_secret_file
from everest_agent.platform.core import Platform
from everest_agent.platform.server import listen

log = Logger(namespace="everest_agent.platform")

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}\Z")


def _split(value, what):
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
        raise usage.UsageError(f"{what} needs NAME=VALUE, got {value.split('=', 1)[0]!r}=...")
    if not _NAME.match(name):
        raise usage.UsageError(f"invalid agent name {name!r}")
    return name, rest


def _read_token_file(path, option):
    try:
        token = read_secret_file(path)
        check_token_text(token, f"{option} {path}")
    except SecretFileError as e:
        raise usage.UsageError(f"{option} {path}: {e}") from None
    except ConfigError as e:
        raise usage.UsageError(str(e)) from None
    return token


def load_tls(cert_path, key_path):
    """
    A server TLS context from PEM files (L{everest_agent.tlsfiles}): the
    certificate file may hold the chain after the server certificate.

    @raise usage.UsageError: if they cannot be read or do not match.
    """
    try:
        return tlsfiles.server_options(cert_path, key_path)
    except tlsfiles.TLSFilesError as e:
        raise usage.UsageError(str(e)) from None


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the Everest reference platform: agents connect to "
        "/compute/agent/v1 with a WebSocket; /files/ is the file store and "
        "/api/ a JSON API to submit and watch tasks (bearer token: "
        "--api-token-file, or a new one in the file api-token), all on one port.  "
        "At least one --token or --token-file is required."
    )
    optParameters = [
        ["listen", "l", "tcp:8080:interface=127.0.0.1", "Endpoint description to listen on."],
        ["files-dir", "f", None, "File store directory (default: a new temporary directory)."],
        ["state-file", "s", None, "JSON file keeping agents' sequence numbers and tasks across restarts."],
        ["heartbeat", None, 30, "Seconds between the agents' RESOURCE_STATE reports, sent in WELCOME.", int],
        ["hello-timeout", None, 10.0, "Seconds a new connection has to send HELLO.", float],
        ["ping-interval", None, 30.0, "Seconds between WebSocket pings to each agent.", float],
        ["ping-timeout", None, 60.0, "Seconds to wait for a pong before dropping an agent.", float],
        ["tls-cert", None, None, "PEM certificate (optionally followed by its chain): serve wss/https."],
        ["tls-key", None, None, "PEM private key of --tls-cert."],
        ["public-url", None, None, "Base http(s) URL to publish (default: from the listening address)."],
        ["log-level", None, "info", "Least important messages logged: debug, info, warn, error or critical."],
    ]
    optFlags = [
        ["no-files-auth", None, "Serve the file store without requiring an agent token."],
    ]

    def __init__(self):
        super().__init__()
        self["tokens"] = {}
        self["tls"] = None
        self["api-token"] = None
        self["api-token-file"] = None

    def _add_token(self, name, token):
        if token in self["tokens"]:
            raise usage.UsageError(f"the token for agent {name} is given twice")
        if name in self["tokens"].values():
            raise usage.UsageError(f"agent {name} is given twice")
        self["tokens"][token] = name

    def opt_token(self, value):
        """
        NAME=TOKEN: an agent and its token (repeatable).  Prefer
        --token-file: command lines are visible to other users.
        """
        name, token = _split(value, "--token")
        self._add_token(name, token)

    def opt_token_file(self, value):
        """
        NAME=PATH: an agent and a file holding its token (repeatable).
        """
        name, path = _split(value, "--token-file")
        self._add_token(name, _read_token_file(path, "--token-file"))

    def opt_api_token_file(self, value):
        """
        PATH: a file (mode 0600) holding the bearer token of the JSON API
        (/api/).  Default: a new token, written to api-token in the
        platform's directory (the --state-file's, else a new temporary
        one), whose path is logged.
        """
        self["api-token"] = _read_token_file(value, "--api-token-file")
        self["api-token-file"] = value

    def postOptions(self):
        if not self["tokens"]:
            raise usage.UsageError("give at least one --token NAME=TOKEN or --token-file NAME=PATH")
        if self["heartbeat"] <= 0:
            raise usage.UsageError("--heartbeat must be positive")
        for key in ("hello-timeout", "ping-interval", "ping-timeout"):
            if self[key] <= 0:
                raise usage.UsageError(f"--{key} must be positive")
        if self["log-level"] not in LOG_LEVELS:
            raise usage.UsageError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if self["tls-cert"]:
            self["tls"] = load_tls(self["tls-cert"], self["tls-key"])
        if self["public-url"] and not re.match(r"https?://[^/]+\Z", self["public-url"].rstrip("/")):
            raise usage.UsageError("--public-url must look like http(s)://host:port")
        try:
            from twisted.internet import reactor

            endpoints.serverFromString(reactor, self["listen"])
        except (ValueError, KeyError, TypeError) as e:
            raise usage.UsageError(f"invalid --listen {self['listen']!r}: {e}") from None
        if self["state-file"]:
            directory = os.path.dirname(os.path.abspath(self["state-file"]))
            if not os.path.isdir(directory):
                raise usage.UsageError(f"the directory of --state-file does not exist: {directory}")


class PlatformService(service.Service):
    """
    Listens when started; L{Platform.close} when stopped.
    """

    name = "everest-platform"

    def __init__(self, platform, endpoint, tls=None, public_url=None, ping_interval=30,
                 ping_timeout=60):
        self.platform = platform
        self.endpoint = endpoint
        self.tls = tls
        self.public_url = public_url
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.port = None

    def startService(self):
        super().startService()
        reactor = self.platform.reactor
        d = listen(self.platform, reactor, self.endpoint, tls=self.tls,
                   public_url=self.public_url, ping_interval=self.ping_interval,
                   ping_timeout=self.ping_timeout)

        def listening(port):
            self.port = port
            log.info("agents connect to {url}", url=self.platform.ws_url)

        def failed(f):
            log.failure("the platform cannot listen on {endpoint}", f, endpoint=str(self.endpoint))
            if reactor.running:
                reactor.stop()

        d.addCallbacks(listening, failed)

    def stopService(self):
        super().stopService()
        return self.platform.close()


def _logging_not_begun():
    from twisted.logger import globalLogBeginner

    return getattr(globalLogBeginner, "_temporaryObserver", None) is not None


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    if options.get("log-level") and _logging_not_begun():
        # Under twistd, which installs its log observer after this: filter
        # it (per-task lines are debug; at thousands a second they cost).
        from everest_agent.tap import filter_log_level

        filter_log_level(options["log-level"])
    if _logging_not_begun():  # twistd's process (not a test calling this)
        from everest_agent import gcpolicy

        gcpolicy.configure()
    files_dir = options["files-dir"]
    directory = None
    if not files_dir:
        directory = tempfile.mkdtemp(prefix="everest-platform-")
        files_dir = os.path.join(directory, "files")
        log.info("file store in {path}", path=files_dir)
    if options["api-token"] is None and directory is None:
        if options["state-file"]:
            directory = os.path.dirname(os.path.abspath(options["state-file"]))
            if os.stat(directory).st_mode & 0o022:
                directory = None  # shared (e.g. /tmp): not a place for a secret
        if directory is None:
            directory = tempfile.mkdtemp(prefix="everest-platform-")
    platform = Platform(
        dict(options["tokens"]),
        reactor,
        heartbeat=options["heartbeat"],
        hello_timeout=options["hello-timeout"],
        files_dir=files_dir,
        files_auth=not options["no-files-auth"],
        state_file=options["state-file"],
        api_token=options["api-token"],
        api_token_dir=directory,
    )
    return PlatformService(platform, options["listen"], tls=options["tls"],
                           public_url=options["public-url"],
                           ping_interval=options["ping-interval"],
                           ping_timeout=options["ping-timeout"])
