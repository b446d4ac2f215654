"""
Helpers for integration tests: a reference platform and a real agent on
loopback, configured through a real agent.ini.
"""

import os
import time

from twisted.internet import reactor, task

from everest_agent import config as agent_config
from everest_agent.agent import EverestAgent
from everest_agent.platform import Platform, listen

TOKEN = "test-token-0123456789"


def write_private(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


async def start_platform(test, tokens=None, **kwargs):
    root = os.path.abspath(test.mktemp())
    os.makedirs(root)
    kwargs.setdefault("files_dir", os.path.join(root, "files"))
    platform = Platform(tokens or {TOKEN: "agent"}, reactor, **kwargs)
    await listen(platform, reactor, 0)
    test.addCleanup(platform.close)
    return platform


def agent_ini(test, url, token=TOKEN, sections=None):
    """Write an agent.ini (and its token file) for C{url}; return its path."""
    root = os.path.abspath(test.mktemp())
    os.makedirs(root)
    token_file = write_private(os.path.join(root, "token"), token + "\n")
    values = {
        "platform": {
            "url": url, "token_file": token_file,
            "reconnect_initial_delay": "0.1", "reconnect_max_delay": "2",
        },
        "agent": {
            "work_dir": os.path.join(root, "tasks"), "state_dir": os.path.join(root, "state"),
            "max_tasks": "2", "kill_grace": "1",
        },
        "handler": {"type": "local"},
    }
    for section, keys in (sections or {}).items():
        values.setdefault(section, {}).update(keys)
    text = "".join(
        f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
        for section, keys in values.items()
    )
    return write_private(os.path.join(root, "agent.ini"), text)


def start_agent(test, platform_or_url=None, ini=None, **kwargs):
    """
    Start an agent in this process.  Pass C{ini} (an earlier agent's
    C{config.path}) to start it again on the same state directory.
    """
    if ini is None:
        url = platform_or_url if isinstance(platform_or_url, str) else platform_or_url.ws_url
        ini = agent_ini(test, url, **kwargs)
    config = agent_config.load(ini)
    agent = EverestAgent(config, reactor, fsync=False)
    agent.startService()

    def stop():
        if agent.running:
            return agent.stopService()

    test.addCleanup(stop)
    return agent


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


def watch_reactor_lag(test, interval=0.01):
    """
    Tick every C{interval} seconds until the test ends.  @return: the list
    the lateness of each tick goes into (seconds past its due time): what
    the reactor spent not running.
    """
    lag = []
    last = [reactor.seconds()]

    def tick():
        now = reactor.seconds()
        lag.append(now - last[0] - interval)
        last[0] = now

    ticker = task.LoopingCall(tick)
    ticker.start(interval, now=False)
    test.addCleanup(lambda: ticker.running and ticker.stop())
    return lag


async def eventually(predicate, timeout=10.0, what="condition"):
    """Poll C{predicate} until true (for what has no event to wait on)."""
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.02)
        waited += 0.02


def sleep_marker(seconds=300):
    """
    A unique number of seconds, about C{seconds}, for C{sleep} (GNU sleep
    takes fractions): on the command line of the C{sleep} and of the task's
    wrapper, it finds every process of the task (L{marked_processes}).
    """
    import random

    return f"{seconds}.{random.randrange(10 ** 8, 10 ** 9)}"


def marked_processes(marker):
    """
    C{{pid: command line}} of the live processes (zombies have no command
    line) whose command line holds C{marker}, this process aside: what is
    left of a task whose command holds a unique marker.
    """
    needle = marker.encode() if isinstance(marker, str) else marker
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle in cmdline:
            found[int(name)] = cmdline.replace(b"\0", b" ").decode("utf-8", "replace")
    return found


async def none_left(marker, timeout=20.0, what="the task"):
    """Wait until no process whose command line holds C{marker} is alive; fail naming those left."""
    deadline = time.monotonic() + timeout
    while True:
        left = marked_processes(marker)
        if not left:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"processes of {what} still alive after {timeout:g} s: {left}")
        await sleep(0.1)


def make_certificates(directory, hostname="localhost", with_ip=True, intermediate=False):
    """
    A private CA and a server certificate it signed for C{hostname} (and
    127.0.0.1), as PEM files in C{directory}.  With C{intermediate}, the CA
    signs an intermediate CA that signs the server's certificate, and the
    server's PEM file holds the chain (its certificate, then the
    intermediate's).

    @return: C{(ca_path, cert_path, key_path)}.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "everest-agent test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    chain = []
    if intermediate:
        sub_key = ec.generate_private_key(ec.SECP256R1())
        sub_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "everest-agent test intermediate")])
        sub = (
            x509.CertificateBuilder().subject_name(sub_name).issuer_name(ca_name)
            .public_key(sub_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        chain.append(sub)
        ca_key, ca_name = sub_key, sub_name  # the server's issuer
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(hostname)] + ([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if with_ip else [])
        ), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, name) for name in ("ca.pem", "server.pem", "server.key")]
    blobs = [
        ca.public_bytes(serialization.Encoding.PEM),
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [cert] + chain),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
    ]
    for path, blob in zip(paths, blobs):
        with open(path, "wb") as f:
            f.write(blob)
    return tuple(paths)


async def start_tls_platform(test, certificate_for="localhost", **kwargs):
    """
    A platform serving wss:// and https:// on localhost, with a certificate
    for C{certificate_for}; returns (platform, ca_path).
    """
    from everest_agent.platform.tap import load_tls

    root = os.path.abspath(test.mktemp())
    ca, cert, key = make_certificates(os.path.join(root, "tls"), certificate_for, with_ip=False)
    kwargs.setdefault("files_dir", os.path.join(root, "files"))
    platform = Platform({TOKEN: "agent"}, reactor, **kwargs)
    port = await listen(platform, reactor, 0, tls=load_tls(cert, key))
    test.addCleanup(platform.close)
    number = port.getHost().port
    platform.set_urls(f"wss://localhost:{number}{platform.ws_path}", f"https://localhost:{number}")
    return platform, ca
