"""
C{everest-agent check}: is this machine ready to run the agent?

One line per check, C{ok} or C{FAIL} with the cause and the fix; the exit
status is 1 if anything failed.  The checks, in order:

 - C{config}: the file parses and every value is valid (the same code the
   agent runs at start, so a token file others can read fails here too);
 - C{token}: where the token comes from, and that only its owner can read it;
 - C{state_dir}, C{work_dir}: writable (a temporary file is created and
   removed) with enough free space; whether an agent is using the state
   directory now;
 - C{handler}: the scheduler's commands are on the C{PATH} and answer
   (C{sinfo}/C{squeue} for SLURM, C{qstat} for TORQUE and PBS);
 - C{monitor}: when C{[monitor] listen} is set, that C{prometheus_client}
   is installed and the address can be used;
 - C{platform}: a real connection: TCP, TLS (certificate and host name
   verified exactly as the agent does), the WebSocket handshake, then
   C{HELLO} and C{WELCOME}.

The platform check sends one message, C{HELLO}, and closes the connection
as soon as C{WELCOME} arrives.  Its C{tasks} list is the one the agent
itself would send, read from the state directory: a platform fails the
tasks an agent does not list (it takes them as lost), so an empty list
would be harmful.  Whatever the platform sends after C{WELCOME} is ignored;
the platform sends its pending submits and cancels again at the agent's
next session.  While the agent is connected, the platform refuses the
check's session with 4003 ("another session with this token is active"),
which shows that the token is valid: that counts as a success.
"""

import getpass
import json
import os
import stat
import sys
import tempfile
import time
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer

from everest_agent import __version__, protocol
from everest_agent import config as agent_config
from everest_agent.client import ConnectionService, describe_tls_error
from everest_agent.statedir import read_outbox, read_registry
from everest_agent.status import hello_tasks, lock_holder

MiB = 1024 * 1024

#: Handler type -> commands that must be on the PATH (optional ones apart).
OPTIONAL_COMMANDS = {"accounting", "select"}


class Result:
    """One check's outcome: C{ok} is True, False (FAIL) or None (skipped)."""

    def __init__(self, name, ok, message, fix=None):
        self.name = name
        self.ok = ok
        self.message = message
        self.fix = fix

    def line(self):
        if self.ok is None:
            return f"skip  {self.name}: {self.message}"
        if self.ok:
            return f"ok    {self.name}: {self.message}"
        fix = f" -- fix: {self.fix}" if self.fix else ""
        return f"FAIL  {self.name}: {self.message}{fix}"

    def as_dict(self):
        return {"check": self.name, "ok": self.ok, "message": self.message, "fix": self.fix}

    def __repr__(self):
        return f"<Result {self.line()!r}>"


# -- local checks ---------------------------------------------------------------------


def check_token(config):
    platform = config.platform
    if platform.token_file:
        st = os.stat(platform.token_file)
        try:
            import pwd

            owner = pwd.getpwuid(st.st_uid).pw_name
        except (ImportError, KeyError):
            owner = str(st.st_uid)
        return Result(
            "token", True,
            f"read from {platform.token_file} (mode {stat.S_IMODE(st.st_mode):04o}, owner {owner})",
        )
    return Result("token", True, f"inline in {config.path}, which only its owner can read")


def check_passive(config):
    """Passive mode is on: where it listens and with how many client tokens (never the tokens)."""
    passive = config.passive
    host, port = passive.listen
    scheme = "wss" if passive.tls_cert else "ws"
    return Result(
        "passive", True,
        f"passive mode on: listening on {scheme}://{host}:{port}/agent/ws and "
        f"{'https' if passive.tls_cert else 'http'}://{host}:{port}/files/, "
        f"{len(passive.tokens)} client tokens read from {passive.client_tokens_file}",
    )


def _nearest_existing(path):
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_directory(name, path, min_free, user, note=""):
    fix_owner = f"mkdir -p {path} && chown {user} {path}"
    if os.path.exists(path):
        if not os.path.isdir(path):
            return Result(name, False, f"{path} exists and is not a directory", f"remove it or set [agent] {name}")
        try:
            fd, tmp = tempfile.mkstemp(prefix=".everest-check-", dir=path)
            try:
                os.write(fd, b"check\n")
            finally:
                os.close(fd)
                os.unlink(tmp)
        except OSError as e:
            return Result(name, False, f"cannot write in {path}: {e.strerror or e}",
                          f"run the agent as the directory's owner, or: chown -R {user} {path}")
        where = path
        created = ""
    else:
        where = _nearest_existing(path)
        if not os.access(where, os.W_OK | os.X_OK):
            return Result(name, False, f"{path} does not exist and {where} is not writable by {user}", fix_owner)
        created = " (does not exist yet; the agent creates it)"
    try:
        st = os.statvfs(where)
        free = st.f_bavail * st.f_frsize
    except OSError as e:
        return Result(name, False, f"cannot read the free space of {where}: {e.strerror}", None)
    if free < min_free:
        return Result(
            name, False,
            f"{path}: only {free // MiB} MiB free (at least {min_free // MiB} MiB needed)",
            f"free space on that file system or point [agent] {name} elsewhere",
        )
    return Result(name, True, f"{path} writable, {free // MiB} MiB free{created}{note}")


def check_ownership(config):
    problem = agent_config.check_directories(config)
    if problem:
        message, _, fix = problem.partition("; fix: ")
        return Result("ownership", False, message, fix or None)
    return Result("ownership", True, f"state_dir and work_dir are {getpass.getuser()}'s alone")


def _find(program, env):
    from everest_agent.handlers.command import find_executable

    return find_executable(program, env)


async def check_handler(config, reactor, env, timeout):
    from twisted.python.reflect import namedAny

    from everest_agent.handlers import HANDLERS
    from everest_agent.handlers.command import run_command

    kind = config.handler.type
    path = env.get("PATH", "")
    if kind == "local":
        from everest_agent.handlers import local

        if not os.access(local.SHELL, os.X_OK):
            return Result("handler", False, f"local: {local.SHELL} missing", "install a POSIX shell")
        if not hasattr(os, "posix_spawn"):
            return Result("handler", False, "local: this Python has no os.posix_spawn",
                          "run the agent with CPython 3.10 or later on Linux")
        return Result("handler", True, f"local: {local.SHELL} present, {config.agent.max_tasks} slots")
    cls = namedAny(HANDLERS[kind])
    h = config.handler
    command_dir = getattr(h, "command_dir", "")
    where = command_dir or f"PATH={path}"
    commands = {role: os.path.join(command_dir, program) if command_dir else program
                for role, program in cls.default_commands.items()}
    missing = sorted({os.path.basename(program) for role, program in commands.items()
                      if role not in OPTIONAL_COMMANDS and _find(program, env) is None})
    optional_missing = sorted({os.path.basename(program) for role, program in commands.items()
                               if role in OPTIONAL_COMMANDS and _find(program, env) is None})
    if missing:
        family = {"slurm": "SLURM", "sge": "Grid Engine"}.get(kind, "TORQUE/PBS")
        return Result(
            "handler", False,
            f"{kind}: {', '.join(missing)} not found ({where})",
            f"install the {family} client commands on this host, or name their directory in "
            "[handler] command_dir (or add it to the agent's PATH)",
        )
    user = getpass.getuser()
    if kind == "slurm":
        info = [commands["info"], "-h", "-o", "%P|%a"] + (["-p", h.partition] if h.partition else [])
        probes = [info, [commands["status"], "-h", "-u", user, "-o", "%i"]]
    elif kind == "sge":
        probes = [[commands["status"], "-g", "c"] + (["-q", h.queue] if h.queue else [])]
    else:
        probes = [[commands["status"], "-Q"] + ([h.queue] if h.queue else [])]
    limit = min(timeout, getattr(h, "command_timeout", timeout))
    answers = []
    for argv in probes:
        started = time.monotonic()
        try:
            out, err, code = await run_command(reactor, argv, timeout=limit, env=env)
        except Exception as e:  # CommandError, CommandTimeout
            return Result("handler", False, f"{kind}: {' '.join(argv)}: {e}",
                          "check that the scheduler's controller answers from this host")
        if code != 0:
            detail = " ".join((err or out).split())[:300]
            return Result(
                "handler", False, f"{kind}: {' '.join(argv)} exited with status {code}: {detail}",
                "check that the scheduler's controller answers from this host"
                + {"slurm": " (scontrol ping)", "sge": " (qping, qconf -sql)"}.get(kind, " (qstat -B)")
                + ", and the partition/queue name in [handler]",
            )
        answers.append(f"{os.path.basename(argv[0])} answered in {time.monotonic() - started:.2f} s")
    note = f"; optional {', '.join(optional_missing)} missing" if optional_missing else ""
    return Result("handler", True, f"{kind}: {', '.join(answers)}{note}")


def check_pilot(config):
    """Pilot mode: the interpreter pilots run, the address they connect to, pilots that never did."""
    import socket
    import sys

    from everest_agent.status import read_status_file

    pilot = config.pilot
    python = pilot.python or sys.executable
    if not os.access(python, os.X_OK):
        return Result("pilot", False, f"[pilot] python {python} is not an executable",
                      "point [pilot] python at the interpreter that has everest_agent installed")
    address = pilot.advertise_address or config.agent.hostname
    try:
        socket.getaddrinfo(address, None)
    except (OSError, UnicodeError) as e:
        return Result("pilot", False, f"pilots would connect to {address!r}, which does not resolve: {e}",
                      "set [pilot] advertise_address to a name or address the compute nodes can reach")
    status = read_status_file(config.agent.state_dir) or {}
    pilots = status.get("pilots") if isinstance(status, dict) else None
    unreachable = pilots.get("unreachable") if isinstance(pilots, dict) else 0
    if unreachable:
        return Result("pilot", False,
                      f"{unreachable} pilot job(s) ran but never connected back to {pilots.get('address')}",
                      "check [pilot] advertise_address and the firewalls between the compute nodes and this host")
    return Result("pilot", True, f"{pilot.max_pilots} pilots of {pilot.cores} cores, connecting to "
                                 f"{address}, run by {python}")


async def check_monitor(config, reactor, running):
    address = config.monitor.listen
    host, port = address
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return Result("monitor", False, "prometheus_client is not installed: /metrics would answer 501",
                      "pip install 'everest-agent[metrics]' in the agent's environment")
    if running:
        return Result("monitor", True, f"{host}:{port} (in use by the running agent)")
    from twisted.internet.protocol import Factory

    try:
        listening = reactor.listenTCP(port, Factory(), interface=host)
    except Exception as e:
        return Result("monitor", False, f"cannot listen on {host}:{port}: {e}",
                      "choose a free port in [monitor] listen")
    await listening.stopListening()
    return Result("monitor", True, f"{host}:{port} free, prometheus_client installed")


# -- the platform -------------------------------------------------------------------------


class _HelloProtocol(WebSocketClientProtocol):
    """Says HELLO, waits for WELCOME, closes. Nothing else."""

    def connectionMade(self):
        self.factory.outcome["connected"] = True
        super().connectionMade()

    def onConnect(self, response):
        self.factory.outcome["upgraded"] = True

    def onOpen(self):
        self.factory.outcome["opened"] = True
        self.sendMessage(protocol.encode([protocol.HELLO, self.factory.hello]), isBinary=False)

    def onMessage(self, payload, isBinary):
        outcome = self.factory.outcome
        if "welcome" in outcome or isBinary:
            return  # TASK_SUBMIT and friends: not for us, re-sent at the agent's next session
        try:
            message = protocol.decode(payload)
        except protocol.ProtocolError:
            return
        if message and message[0] == protocol.WELCOME:
            info = message[1] if len(message) > 1 and isinstance(message[1], dict) else {}
            outcome["welcome"] = info
            outcome["welcome_time"] = time.monotonic()
            self.sendClose(1000, "everest-agent check done")

    def onClose(self, wasClean, code, reason):
        outcome = self.factory.outcome
        outcome.setdefault("close_code", code)
        outcome.setdefault("close_reason", reason)

    def connectionLost(self, reason):
        self.factory.outcome.setdefault("lost", reason.value)
        try:
            super().connectionLost(reason)
        finally:
            self.factory.finish()


class _HelloFactory(WebSocketClientFactory):
    protocol = _HelloProtocol
    noisy = False

    def __init__(self, url, hello, reactor, timeout):
        WebSocketClientFactory.__init__(self, url, useragent=f"everest-agent/{__version__} check", reactor=reactor)
        self.hello = hello
        self.outcome = {}
        self.done = defer.Deferred()
        self.current = None
        self.setProtocolOptions(
            maxFramePayloadSize=protocol.MAX_FRAME_SIZE,
            maxMessagePayloadSize=protocol.MAX_FRAME_SIZE,
            # The check's own timer (round_trip) says "no answer"; this one
            # only backs it up.
            openHandshakeTimeout=timeout + 1,
            closeHandshakeTimeout=2,
        )

    def buildProtocol(self, addr):
        self.current = WebSocketClientFactory.buildProtocol(self, addr)
        return self.current

    def failed(self, error):
        """A connection attempt failed (L{ConnectionService} and the protocol say so)."""
        if isinstance(error, str):  # a TLS failure the protocol named: its lost reason is kept
            return
        self.outcome["connect_failed"] = error
        self.finish()

    def finish(self):
        if not self.done.called:
            self.done.callback(self.outcome)


async def round_trip(config, reactor, hello, timeout):
    """
    Connect as the agent would (the same L{ConnectionService}), say
    C{hello}, wait for WELCOME, close; no second attempt.

    @return: the outcome dict (see L{_HelloFactory}), with C{elapsed} and
        C{timed_out}.
    """
    url = config.platform.url
    factory = _HelloFactory(url, hello, reactor, timeout)
    # One attempt: the service is stopped as soon as the outcome is known,
    # long before a retry would start.
    service = ConnectionService(factory, url, reactor, config.platform.ca_file or None,
                                retry_policy=lambda attempts: timeout + 60, timeout=timeout)
    started = time.monotonic()

    def expire():
        factory.outcome["timed_out"] = True
        proto = factory.current
        if proto is not None and proto.transport is not None:
            proto.transport.abortConnection()  # connectionLost finishes
        factory.finish()

    service.startService()
    timer = reactor.callLater(timeout, expire)
    try:
        outcome = await factory.done
    finally:
        if timer.active():
            timer.cancel()
        await service.stopService()
    outcome["elapsed"] = (outcome.get("welcome_time") or time.monotonic()) - started
    return outcome


def judge_round_trip(config, outcome, running, pid, listed, timeout):
    platform = config.platform
    parts = urlsplit(platform.url)
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    where = f"{parts.hostname}:{port}"
    secure = parts.scheme == "wss"
    trust = f"ca_file {platform.ca_file}" if platform.ca_file else "the system's trust store"
    token_fix = ("copy the resource's token from the platform's web interface again into "
                 + (platform.token_file if platform.token_file else f"[platform] token of {config.path}"))
    if "welcome" in outcome:
        info = outcome["welcome"]
        tls = f"TLS verified against {trust}, " if secure else "no TLS (ws://), "
        return Result(
            "platform", True,
            f"{platform.url}: {tls}HELLO/WELCOME in {outcome['elapsed']:.2f} s "
            f"(ack {info.get('ack')}, heartbeat {info.get('heartbeat')} s, {len(listed)} tasks listed)",
        )
    code = outcome.get("close_code")
    if code == protocol.CLOSE_SESSION_ACTIVE:
        if running:
            return Result("platform", True, f"{platform.url}: token accepted; the running agent (pid {pid}) "
                                            "holds the session (4003), so the check stopped there")
        return Result(
            "platform", False,
            f"{platform.url}: another agent is connected with this token (4003) and no agent runs on this "
            "state directory",
            "stop the other agent (another machine, or another state_dir); each resource needs its own token",
        )
    if code == protocol.CLOSE_INVALID_TOKEN:
        return Result("platform", False, f"{platform.url}: the platform refused the token (4001 invalid token)", token_fix)
    if code == protocol.CLOSE_UNSUPPORTED_PROTOCOL:
        return Result("platform", False,
                      f"{platform.url}: the platform does not speak protocol {protocol.PROTOCOL_VERSION} (4002)",
                      "upgrade everest-agent (pip install -U everest-agent)")
    if code == protocol.CLOSE_POLICY:
        return Result("platform", False,
                      f"{platform.url}: the platform refused the HELLO (1008: {outcome.get('close_reason')})",
                      "check that the URL is the platform's agent endpoint; report it if it is")
    if outcome.get("timed_out"):
        stage = ("waiting for WELCOME" if outcome.get("opened")
                 else "in the TLS or WebSocket handshake" if outcome.get("connected")
                 else "connecting")
        return Result("platform", False, f"{platform.url}: no answer within {timeout:g} s ({stage})",
                      "check the URL and that nothing between here and the platform holds the connection")
    if "connect_failed" in outcome:
        error = outcome["connect_failed"]
        return Result(
            "platform", False, f"cannot connect to {where}: {error}",
            "check [platform] url, DNS, and that this host may open outbound connections to "
            f"port {port} (firewall, proxy)",
        )
    error = outcome.get("lost")
    tls_problem = describe_tls_error(error) if error is not None else None
    if tls_problem and secure and not outcome.get("upgraded"):
        return Result(
            "platform", False,
            f"{platform.url}: TLS: cannot verify the platform's certificate ({tls_problem}), using {trust}",
            "if the platform uses a private CA, set [platform] ca_file to its PEM bundle; "
            "check the system clock and the host name in url",
        )
    reason = outcome.get("close_reason") or (str(error) if error is not None else "")
    if not outcome.get("opened"):
        return Result("platform", False, f"{platform.url}: the WebSocket handshake failed: {reason}",
                      "check [platform] url: scheme, host, port and path of the agent endpoint")
    return Result("platform", False,
                  f"{platform.url}: the connection closed before WELCOME (code {code}: {reason})",
                  "see the platform's logs; check the URL")


async def check_platform(config, reactor, timeout, running, pid):
    state_dir = config.agent.state_dir
    try:
        if os.path.exists(state_dir):
            records = read_registry(state_dir)
            _, _, acked = read_outbox(state_dir)
        else:
            records, acked = {}, 0
    except OSError as e:
        return Result(
            "platform", False,
            f"not tried: cannot read {state_dir} ({e.strerror}) to list this agent's tasks in HELLO "
            "(the platform fails the tasks an agent does not list)",
            "run check as the agent's user",
        )
    listed = hello_tasks(records, acked)
    hello = protocol.hello(
        config.platform.token, f"everest-agent/{__version__}", config.agent.hostname,
        config.handler.type, config.agent.max_tasks, listed,
    )
    try:
        outcome = await round_trip(config, reactor, hello, timeout)
    except ValueError as e:  # a ca_file without certificates
        return Result("platform", False, f"ca_file: {e}", "point [platform] ca_file at a PEM bundle")
    return judge_round_trip(config, outcome, running, pid, listed, timeout)


# -- all of them -------------------------------------------------------------------------


async def run_checks(config_path, reactor, env=None, timeout=15.0, out=None,
                     min_free_state=64 * MiB, min_free_work=1024 * MiB, platform=True):
    """
    Run every check; write each line to C{out} (if given) as it is known.

    @param env: the environment whose C{PATH} finds scheduler commands
        (default: this process's).
    @return: the list of L{Result}s.
    """
    env = dict(os.environ if env is None else env)
    results = []

    def report(result):
        results.append(result)
        if out is not None:
            out.write(result.line() + "\n")
            out.flush()

    try:
        config = agent_config.load(config_path)
    except agent_config.ConfigError as e:
        message = str(e)
        report(Result("config", False, message, "edit the file (docs/configuration.rst lists every key)"))
        return results
    report(Result("config", True, f"{config_path}: valid (handler {config.handler.type}, "
                                  f"{config.agent.max_tasks} slots)"))
    if config.platform is not None:
        report(check_token(config))
    if config.passive.enabled:
        report(check_passive(config))
    user = getpass.getuser()
    state_dir = config.agent.state_dir
    running, pid = (lock_holder(state_dir) if os.path.isdir(state_dir) else (False, None))
    note = f"; an agent is running on it (pid {pid})" if running else ""
    report(check_directory("state_dir", state_dir, min_free_state, user, note))
    report(check_directory("work_dir", config.agent.work_dir, min_free_work, user))
    report(check_ownership(config))
    report(await check_handler(config, reactor, env, timeout))
    if getattr(getattr(config, "pilot", None), "enabled", False):
        report(check_pilot(config))
    if getattr(getattr(config, "monitor", None), "listen", None) is not None:
        report(await check_monitor(config, reactor, running))
    if platform and config.platform is None:
        report(Result("platform", None, "no [platform] section: passive mode only"))
    elif platform:
        report(await check_platform(config, reactor, timeout, running, pid))
    return results


USAGE = """\
usage: everest-agent check [--config FILE] [--timeout SECONDS] [--json]

Check the configuration, the token file, the directories, the scheduler's
commands and a real HELLO/WELCOME with the platform.  One line per check;
exit status 1 if any failed.
"""


def main(argv, reactor=None):
    import argparse

    parser = argparse.ArgumentParser(prog="everest-agent check", description=USAGE.split("\n\n", 1)[1])
    parser.add_argument("--config", "-c", default="/etc/everest-agent/agent.ini")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds for each network step (default 15)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON array")
    args = parser.parse_args(argv)
    from twisted.internet import task

    codes = []

    async def run(reactor):
        results = await run_checks(args.config, reactor, timeout=args.timeout, out=None if args.json else sys.stdout)
        if args.json:
            sys.stdout.write(json.dumps([r.as_dict() for r in results], indent=1) + "\n")
        codes.append(0 if all(r.ok is not False for r in results) else 1)

    def go(reactor):
        return defer.Deferred.fromCoroutine(run(reactor))

    try:
        task.react(go)
    except SystemExit as e:
        if e.code not in (0, None):
            return e.code
    return codes[0] if codes else 1

