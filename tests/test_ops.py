"""
Operators' tools: C{everest-agent check}, C{everest-agent status}, the
C{/healthz} and C{/metrics} endpoint, the log level under twistd.

Most tests run the real thing: a reference platform on loopback (plain or
TLS with certificates made here), real agents in this process, real
scheduler-command stand-ins on a private C{PATH}, real C{twistd}
processes.
"""

import datetime
import hashlib
import io
import ipaddress
import json
import os
import signal
import socket
import sys
import types

from twisted.internet import defer, protocol, reactor, ssl
from twisted.logger import LogBeginner, Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody

import everest_agent
from everest_agent import __version__, check, monitor, status, tap
from everest_agent import config as agent_config
from everest_agent.agent import EverestAgent
from everest_agent.platform import listen
from everest_agent.testing import FakeTaskHandler
from tests.support import TOKEN, agent_ini, eventually, start_agent, start_platform, write_private

MiB = 1024 * 1024
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(everest_agent.__file__)))


def free_port():
    """A loopback port nobody listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def run_checks(ini, **kwargs):
    out = io.StringIO()
    kwargs.setdefault("min_free_work", MiB)
    kwargs.setdefault("min_free_state", MiB)
    kwargs.setdefault("timeout", 10.0)
    results = await check.run_checks(ini, reactor, out=out, **kwargs)
    return {r.name: r for r in results}, out.getvalue()


def start_fake_agent(test, ini):
    """An agent on C{ini} whose tasks run in memory (L{FakeTaskHandler})."""
    handler = FakeTaskHandler()
    agent = EverestAgent(agent_config.load(ini), reactor, handler=handler, fsync=False)
    agent.startService()
    test.addCleanup(lambda: agent.running and agent.stopService())
    return agent, handler


async def connected_agent(test, *args, **kwargs):
    """
    L{start_agent}, once the agent has processed WELCOME (the platform's
    C{wait_connected} fires when it sends it).
    """
    agent = start_agent(test, *args, **kwargs)
    await test.platform.wait_connected()
    await eventually(lambda: agent.sender.connected, what="the agent to process WELCOME")
    return agent


async def http_get(url, headers=None):
    from twisted.web.http_headers import Headers

    pool = HTTPConnectionPool(reactor, persistent=False)
    response = await Agent(reactor, pool=pool).request(b"GET", url.encode(), Headers(headers or {}))
    body = await readBody(response)
    return response.code, response.headers, body


# -- certificates for the TLS tests ----------------------------------------------------------


def make_ca(name):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(ca_key, ca_cert):
    """A certificate for localhost and 127.0.0.1 signed by the CA: (key PEM, cert PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def pem(cert):
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


# -- check ---------------------------------------------------------------------------------


class CheckTests(TestCase):
    timeout = 60

    async def setUp(self):
        self.platform = await start_platform(self, heartbeat=1)

    async def test_healthy(self):
        ini = agent_ini(self, self.platform.ws_url)
        results, text = await run_checks(ini)
        self.assertEqual([r.name for r in results.values()],
                         ["config", "token", "state_dir", "work_dir", "ownership", "handler", "platform"])
        for result in results.values():
            self.assertIs(result.ok, True, result.line())
        lines = text.splitlines()
        self.assertEqual(len(lines), 7)
        self.assertTrue(all(line.startswith("ok    ") for line in lines), text)
        self.assertIn("HELLO/WELCOME in", results["platform"].message)
        self.assertIn("0 tasks listed", results["platform"].message)
        # One session, HELLO only: no resource report, nothing malformed,
        # and it is over.
        agent = self.platform.agent()
        self.assertEqual(agent.welcomes, 1)
        self.assertEqual(agent.hello["tasks"], [])
        self.assertEqual(agent.hello["agent"], f"everest-agent/{__version__}")
        self.assertEqual(agent.resource_count, 0)
        self.assertEqual(agent.last_seq, 0)
        self.assertEqual(self.platform.malformed, 0)
        await eventually(lambda: agent.session is None, what="the check's session to end")

    async def test_hello_lists_the_agents_tasks(self):
        """
        The check's HELLO names the tasks in the state directory, so a
        platform does not take them as lost: a task running when the agent
        stopped is still RUNNING on the platform after a check.
        """
        ini = agent_ini(self, self.platform.ws_url)
        agent, handler = start_fake_agent(self, ini)
        await self.platform.wait_connected()
        running = self.platform.submit({"command": "true"}, task_id="run-1-0")
        done = self.platform.submit({"command": "true"}, task_id="done-1-0")
        await self.platform.wait_for(running, "RUNNING")
        await self.platform.wait_for(done, "RUNNING")
        handler.jobs[done].finish(0)
        await self.platform.wait_for(done)
        await eventually(lambda: agent.outbox.acked == agent.outbox.last_seq, what="the acks")
        await agent.stopService()
        await self.platform.wait_disconnected()

        results, text = await run_checks(ini)
        self.assertIs(results["platform"].ok, True, text)
        self.assertIn("1 tasks listed", results["platform"].message)
        self.assertEqual(self.platform.agent().hello["tasks"], ["run-1-0"])
        self.assertEqual(self.platform.task(running).state, "RUNNING")
        self.assertEqual(self.platform.violations, [])

    async def test_wrong_token(self):
        ini = agent_ini(self, self.platform.ws_url, token="not-the-token")
        results, text = await run_checks(ini)
        result = results["platform"]
        self.assertIs(result.ok, False)
        self.assertIn("4001", result.message)
        self.assertIn("refused the token", result.message)
        token_file = agent_config.load(ini).platform.token_file
        self.assertIn(token_file, result.fix)
        self.assertIn("FAIL  platform:", text)
        self.assertIn("-- fix: ", text)
        self.assertNotIn("not-the-token", text)
        # The other checks still ran and passed.
        self.assertTrue(all(r.ok for name, r in results.items() if name != "platform"))

    async def test_unreachable(self):
        port = free_port()
        ini = agent_ini(self, f"ws://127.0.0.1:{port}/compute/agent/v1")
        results, text = await run_checks(ini)
        result = results["platform"]
        self.assertIs(result.ok, False)
        self.assertIn(f"cannot connect to 127.0.0.1:{port}", result.message)
        self.assertIn("refused", result.message.lower())
        self.assertIn("firewall", result.fix)

    async def test_no_answer_is_bounded(self):
        """A server that accepts TCP and never answers: FAIL after the timeout."""
        from twisted.internet.protocol import Factory, Protocol

        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        ini = agent_ini(self, f"ws://127.0.0.1:{port.getHost().port}/compute/agent/v1")
        results, text = await run_checks(ini, timeout=0.5)
        result = results["platform"]
        self.assertIs(result.ok, False)
        self.assertIn("no answer within 0.5 s", result.message)

    async def tls_platform(self):
        ca_key, ca_cert = make_ca("everest test CA")
        key_pem, cert_pem = make_server_cert(ca_key, ca_cert)
        platform = await start_platform(self)
        options = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options()
        port = await listen(platform, reactor, 0, tls=options)
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        ca_file = os.path.join(root, "ca.pem")
        with open(ca_file, "wb") as f:
            f.write(pem(ca_cert))
        return platform, f"wss://localhost:{port.getHost().port}/compute/agent/v1", ca_file

    async def test_tls_with_the_right_ca(self):
        platform, url, ca_file = await self.tls_platform()
        ini = agent_ini(self, url, sections={"platform": {"ca_file": ca_file}})
        results, text = await run_checks(ini)
        self.assertIs(results["platform"].ok, True, text)
        self.assertIn(f"TLS verified against ca_file {ca_file}", results["platform"].message)
        self.assertEqual(platform.agent().welcomes, 1)

    async def test_bad_ca(self):
        platform, url, _ = await self.tls_platform()
        _, other_ca = make_ca("some other CA")
        other = os.path.join(os.path.abspath(self.mktemp()))
        with open(other, "wb") as f:
            f.write(pem(other_ca))
        ini = agent_ini(self, url, sections={"platform": {"ca_file": other}})
        results, text = await run_checks(ini)
        result = results["platform"]
        self.assertIs(result.ok, False, text)
        self.assertIn("TLS: cannot verify the platform's certificate", result.message)
        self.assertIn(f"ca_file {other}", result.message)
        self.assertIn("ca_file", result.fix)
        self.assertEqual(platform.agent().welcomes, 0)

    async def test_running_agent_holds_the_session(self):
        """With the agent connected, 4003 proves the token: ok, and the agent is undisturbed."""
        ini = agent_ini(self, self.platform.ws_url)
        agent = await connected_agent(self, ini=ini)
        session = self.platform.agent().session
        results, text = await run_checks(ini)
        self.assertIs(results["platform"].ok, True, text)
        self.assertIn(f"the running agent (pid {os.getpid()})", results["platform"].message)
        self.assertIn(f"an agent is running on it (pid {os.getpid()})", results["state_dir"].message)
        self.assertIs(self.platform.agent().session, session)
        self.assertTrue(agent.sender.connected)

    async def test_config_error_stops_there(self):
        ini = agent_ini(self, self.platform.ws_url, sections={"agent": {"max_tasks": "zero"}})
        results, text = await run_checks(ini)
        self.assertEqual(list(results), ["config"])
        self.assertIn("[agent] max_tasks: bad value 'zero'", results["config"].message)
        self.assertTrue(text.startswith("FAIL  config: "))

    async def test_token_file_others_can_read(self):
        ini = agent_ini(self, self.platform.ws_url)
        os.chmod(agent_config.load(ini).platform.token_file, 0o644)
        results, text = await run_checks(ini)
        self.assertIs(results["config"].ok, False)
        self.assertIn("others can read it (mode 0644)", results["config"].message)
        self.assertIn("chmod 600", results["config"].message)

    async def test_directories(self):
        ini = agent_ini(self, self.platform.ws_url)
        config = agent_config.load(ini)
        os.makedirs(os.path.dirname(config.agent.work_dir), exist_ok=True)
        with open(config.agent.work_dir, "w") as f:
            f.write("not a directory")
        results, text = await run_checks(ini, min_free_state=1 << 60)
        self.assertIs(results["work_dir"].ok, False)
        self.assertIn("is not a directory", results["work_dir"].message)
        self.assertIs(results["state_dir"].ok, False)
        self.assertIn("MiB free (at least", results["state_dir"].message)
        # Nothing was left behind by the write test.
        os.makedirs(config.agent.state_dir)
        await run_checks(ini)
        self.assertEqual(os.listdir(config.agent.state_dir), [])

    def fake_commands(self, scripts):
        """A directory holding executable stand-ins: {name: shell script body}."""
        bin_dir = os.path.abspath(self.mktemp())
        os.makedirs(bin_dir)
        for name, body in scripts.items():
            path = os.path.join(bin_dir, name)
            with open(path, "w") as f:
                f.write("#!/bin/sh\n" + body + "\n")
            os.chmod(path, 0o755)
        return bin_dir

    async def test_slurm_commands_missing(self):
        ini = agent_ini(self, self.platform.ws_url, sections={"handler": {"type": "slurm"}})
        empty = self.fake_commands({"sbatch": "exit 0"})
        results, text = await run_checks(ini, env={"PATH": empty})
        result = results["handler"]
        self.assertIs(result.ok, False)
        self.assertIn("scancel, sinfo, squeue not found", result.message)
        self.assertIn(f"PATH={empty}", result.message)
        self.assertIn("PATH", result.fix)
        self.assertIn("SLURM", result.fix)

    async def test_slurm_commands_answer(self):
        ini = agent_ini(self, self.platform.ws_url,
                        sections={"handler": {"type": "slurm", "partition": "debug"}})
        marker = os.path.abspath(self.mktemp())
        bin_dir = self.fake_commands({
            "sbatch": "exit 0",
            "scancel": "exit 0",
            "sinfo": f'echo "$@" >> {marker}; echo "debug|up"',
            "squeue": f'echo "$@" >> {marker}',
        })
        results, text = await run_checks(ini, env={"PATH": bin_dir})
        result = results["handler"]
        self.assertIs(result.ok, True, text)
        self.assertIn("sinfo answered", result.message)
        self.assertIn("squeue answered", result.message)
        self.assertIn("optional sacct missing", result.message)
        with open(marker) as f:
            calls = f.read().splitlines()
        self.assertEqual(calls[0], "-h -o %P|%a -p debug")
        self.assertTrue(calls[1].startswith("-h -u "))

    async def test_slurm_controller_down(self):
        ini = agent_ini(self, self.platform.ws_url, sections={"handler": {"type": "slurm"}})
        bin_dir = self.fake_commands({
            "sbatch": "exit 0", "scancel": "exit 0", "sinfo": "echo 'debug|up'",
            "squeue": "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1",
        })
        results, text = await run_checks(ini, env={"PATH": bin_dir})
        result = results["handler"]
        self.assertIs(result.ok, False)
        self.assertIn("exited with status 1: slurm_load_jobs error: Unable to contact slurm controller",
                      result.message)
        self.assertIn("scontrol ping", result.fix)

    async def test_pbs_qstat(self):
        ini = agent_ini(self, self.platform.ws_url, sections={"handler": {"type": "pbs", "queue": "workq"}})
        marker = os.path.abspath(self.mktemp())
        bin_dir = self.fake_commands({
            "qsub": "exit 0", "qdel": "exit 0", "qstat": f'echo "$@" > {marker}; echo "Queue: workq"',
        })
        results, text = await run_checks(ini, env={"PATH": bin_dir})
        self.assertIs(results["handler"].ok, True, text)
        self.assertIn("qstat answered", results["handler"].message)
        with open(marker) as f:
            self.assertEqual(f.read().split(), ["-Q", "workq"])
        results, text = await run_checks(ini, env={"PATH": self.fake_commands({})})
        self.assertIn("qdel, qstat, qsub not found", results["handler"].message)

    async def test_monitor_without_prometheus_client(self):
        ini = agent_ini(self, self.platform.ws_url, sections={"monitor": {"listen": "127.0.0.1:0"}})
        results, _ = await run_checks(ini)
        self.assertIs(results["monitor"].ok, True)
        self.addCleanup(sys.modules.__setitem__, "prometheus_client", sys.modules["prometheus_client"])
        sys.modules["prometheus_client"] = None  # import fails
        results, _ = await run_checks(ini)
        self.assertIs(results["monitor"].ok, False)
        self.assertIn("everest-agent[metrics]", results["monitor"].fix)


class CheckCommandTests(TestCase):
    """C{python -m everest_agent check}: the printed lines and the exit status."""

    timeout = 60

    async def setUp(self):
        self.platform = await start_platform(self)

    async def run_command(self, *args):
        proc = ChildProcess()
        env = dict(os.environ, PYTHONPATH=PROJECT_ROOT)
        reactor.spawnProcess(proc, sys.executable, [sys.executable, "-m", "everest_agent", *args],
                             env=env, path=PROJECT_ROOT)
        code = await proc.ended
        return code, proc.output.decode()

    async def test_exit_status(self):
        ini = agent_ini(self, self.platform.ws_url)
        code, out = await self.run_command("check", "--config", ini)
        self.assertEqual(code, 0, out)
        self.assertIn("ok    platform: ", out)
        ini = agent_ini(self, self.platform.ws_url, token="wrong-token")
        code, out = await self.run_command("check", "--config", ini, "--json")
        self.assertEqual(code, 1, out)
        results = {r["check"]: r for r in json.loads(out)}
        self.assertIs(results["platform"]["ok"], False)
        self.assertIn("4001", results["platform"]["message"])


# -- status --------------------------------------------------------------------------------


class StatusTests(TestCase):
    timeout = 60

    async def setUp(self):
        self.platform = await start_platform(self, heartbeat=1)

    async def run_two_tasks(self, agent):
        ok = self.platform.submit({"command": "echo fine"}, task_id="ok-1-0")
        bad = self.platform.submit({"command": "exit 3"}, task_id="bad-1-0")
        await self.platform.wait_for(ok)
        await self.platform.wait_for(bad)
        await eventually(lambda: len(agent.outbox) == 0, what="the acks")

    async def test_live_agent(self):
        ini = agent_ini(self, self.platform.ws_url)
        agent = await connected_agent(self, ini=ini)
        await self.run_two_tasks(agent)
        state_dir = agent.config.agent.state_dir

        state = status.read_state(state_dir)
        self.assertIs(state["running"], True)
        self.assertEqual(state["pid"], os.getpid())
        self.assertEqual(state["connection"]["state"], "connected")
        self.assertEqual(state["connection"]["reconnects"], 0)
        self.assertEqual(state["agent"]["platform"], self.platform.ws_url)
        self.assertEqual(state["tasks"]["by_state"], {"DONE": 1, "FAILED": 1})
        self.assertEqual(state["tasks"]["unfinished"], 0)
        self.assertEqual(state["outbox"]["pending"], 0)
        self.assertEqual(state["outbox"]["last_seq"], agent.outbox.last_seq)
        self.assertEqual([f["task_id"] for f in state["failures"]], ["bad-1-0"])
        self.assertEqual(state["failures"][0]["reason"], "exit code 3")
        self.assertEqual(state["failures"][0]["exit_code"], 3)

        out = io.StringIO()
        self.assertEqual(status.main(["--config", ini], out=out), status.EXIT_CONNECTED)
        text = out.getvalue()
        self.assertIn(f"agent: running, pid {os.getpid()}", text)
        self.assertIn("connection: connected since ", text)
        self.assertIn("tasks: 0 unfinished of 2 known (1 DONE, 1 FAILED)", text)
        self.assertIn("outbox: every message acknowledged", text)
        self.assertIn("recent failures:\n  bad-1-0  ", text)
        self.assertIn("  bad-1-0  ", text)
        self.assertTrue(text.rstrip().endswith("  exit code 3"), text)
        self.assertNotIn(TOKEN, text)

        out = io.StringIO()
        self.assertEqual(status.main(["--config", ini, "--json"], out=out), status.EXIT_CONNECTED)
        parsed = json.loads(out.getvalue())
        self.assertEqual(parsed["tasks"]["by_state"], {"DONE": 1, "FAILED": 1})
        self.assertIs(parsed["running"], True)

        # Reconnects are counted, and the time of the change recorded.
        since = state["connection"]["since"]
        self.platform.disconnect()
        await self.platform.wait_disconnected()
        await self.platform.wait_connected()
        await eventually(lambda: agent.sender.connected, what="the agent to process WELCOME")
        state = status.read_state(state_dir)
        self.assertEqual(state["connection"]["state"], "connected")
        self.assertEqual(state["connection"]["reconnects"], 1)
        self.assertGreaterEqual(state["connection"]["since"], since)

    async def test_unacknowledged_messages(self):
        ini = agent_ini(self, self.platform.ws_url)
        agent = await connected_agent(self, ini=ini)
        self.platform.pause_acks()
        task_id = self.platform.submit({"command": "true"}, task_id="slow-1-0")
        await self.platform.wait_for(task_id)
        state = status.read_state(agent.config.agent.state_dir)
        self.assertEqual(state["outbox"]["pending"], len(agent.outbox))
        self.assertGreater(len(agent.outbox), 0)
        oldest = state["outbox"]["oldest"]
        self.assertEqual(oldest["seq"], agent.outbox.oldest()[0])
        self.assertEqual((oldest["type"], oldest["task_id"], oldest["state"]), ("TASK_STATE", task_id, "ACCEPTED"))
        text = "\n".join(status.format_state(state))
        self.assertIn(f"outbox: {len(agent.outbox)} messages not acknowledged; oldest seq {oldest['seq']} "
                      f"(TASK_STATE {task_id} ACCEPTED, ", text)
        self.assertIn("tasks: 0 unfinished of 1 known (1 DONE)", text)
        self.platform.resume_acks()

    async def test_status_does_not_change_the_state_dir(self):
        ini = agent_ini(self, self.platform.ws_url)
        agent = await connected_agent(self, ini=ini)
        await self.run_two_tasks(agent)
        state_dir = agent.config.agent.state_dir
        # Lots of records the agent would compact at its next start.
        for name in ("tasks.jsonl", "outbox.jsonl"):
            self.assertGreater(len(open(os.path.join(state_dir, name)).read().splitlines()), 1)

        def snapshot():
            found = {}
            for name in sorted(os.listdir(state_dir)):
                path = os.path.join(state_dir, name)
                with open(path, "rb") as f:
                    found[name] = (f.read(), os.stat(path).st_mtime_ns, os.stat(path).st_ino)
            return found

        before = snapshot()
        status.read_state(state_dir)
        status.main(["--state-dir", state_dir], out=io.StringIO())
        self.assertEqual(snapshot(), before)

    async def test_stopped_agent(self):
        ini = agent_ini(self, self.platform.ws_url)
        agent = await connected_agent(self, ini=ini)
        await self.run_two_tasks(agent)
        await agent.stopService()
        state_dir = agent.config.agent.state_dir

        state = status.read_state(state_dir)
        self.assertIs(state["running"], False)
        self.assertEqual(state["pid"], os.getpid())
        self.assertEqual(state["connection"]["state"], "stopped")
        self.assertNotIn("stale", state["connection"])
        self.assertEqual(state["tasks"]["by_state"], {"DONE": 1, "FAILED": 1})

        out = io.StringIO()
        self.assertEqual(status.main(["--config", ini], out=out), status.EXIT_NOT_RUNNING)
        text = out.getvalue()
        self.assertIn(f"agent: not running (last pid {os.getpid()})", text)
        self.assertIn("connection: stopped since", text)
        self.assertIn("bad-1-0", text)

        out = io.StringIO()
        self.assertEqual(status.main(["--config", ini, "--json"], out=out), status.EXIT_NOT_RUNNING)
        self.assertIs(json.loads(out.getvalue())["running"], False)

    async def test_platform_refuses_the_token(self):
        """What client.py reports of a refused session reaches status.json."""
        ini = agent_ini(self, self.platform.ws_url, token="wrong-token")
        agent = start_agent(self, ini=ini)
        agent.connection_closed(4001, "invalid token")
        state = status.read_state(agent.config.agent.state_dir)
        self.assertEqual(state["connection"]["state"], "disconnected")
        self.assertEqual(state["connection"]["last_close"]["code"], 4001)
        text = "\n".join(status.format_state(state))
        self.assertIn("last close: code 4001 (invalid token)", text)


class StatusFileTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.now = [1000.0]

    def status_file(self, url="wss://user:secret@everest.example.org:8443/compute/agent/v1?token=abc"):
        return status.StatusFile(self.dir, url, wallclock=lambda: self.now[0])

    def read(self):
        with open(os.path.join(self.dir, "status.json")) as f:
            return f.read()

    def test_written_atomically_private_and_without_secrets(self):
        sf = self.status_file()
        sf.starting(handler="local", slots=2)
        path = os.path.join(self.dir, "status.json")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(os.listdir(self.dir), ["status.json"])  # no temporary file left
        text = self.read()
        self.assertNotIn("secret", text)
        self.assertNotIn("token", text)
        data = json.loads(text)
        self.assertEqual(data["platform"], "wss://everest.example.org:8443/compute/agent/v1")
        self.assertEqual(data["pid"], os.getpid())
        self.assertEqual(data["connection"]["state"], "starting")

    def test_connection_story(self):
        sf = self.status_file()
        sf.starting()
        self.now[0] = 1001.0
        sf.failed("Connection refused")
        self.now[0] = 1002.0
        sf.welcomed(ack=3, heartbeat=30)
        self.now[0] = 1010.0
        sf.lost()
        sf.closed(1006, "connection was closed uncleanly")
        self.now[0] = 1011.0
        sf.welcomed(ack=5, heartbeat=30)
        data = json.loads(self.read())["connection"]
        self.assertEqual(data["state"], "connected")
        self.assertEqual(data["since"], 1011.0)
        self.assertEqual((data["connects"], data["reconnects"], data["disconnects"]), (2, 1, 1))
        self.assertEqual(data["last_close"], {"time": 1010.0, "code": 1006, "reason": "connection was closed uncleanly"})
        self.assertEqual(data["last_failure"]["reason"], "Connection refused")
        self.assertEqual(data["last_welcome"]["ack"], 5)
        sf.stopped()
        self.assertEqual(json.loads(self.read())["connection"]["state"], "stopped")

    def test_write_failure_is_logged_not_raised(self):
        sf = status.StatusFile(os.path.join(self.dir, "missing"), "ws://127.0.0.1:1/x")
        sf.starting()
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_crashed_agent(self):
        """status.json says connected but nobody holds the lock: stale."""
        sf = self.status_file()
        sf.starting()
        sf.welcomed(ack=0, heartbeat=30)
        with open(os.path.join(self.dir, "lock"), "w") as f:
            f.write("999999999")
        state = status.read_state(self.dir, proc_locks=os.path.join(self.dir, "no-locks"))
        self.assertIs(state["running"], False)
        self.assertEqual(state["connection"]["state"], "stopped")
        self.assertTrue(state["connection"]["stale"])
        text = "\n".join(status.format_state(state))
        self.assertIn("agent: not running (last pid 999999999)", text)
        self.assertIn("connection: none (the agent is not running", text)

    def test_no_status_file(self):
        state = status.read_state(self.dir)
        self.assertIs(state["running"], False)
        text = "\n".join(status.format_state(state))
        self.assertIn("connection: unknown", text)
        self.assertIn("tasks: none known", text)

    def test_missing_state_dir(self):
        out = io.StringIO()
        code = status.main(["--state-dir", os.path.join(self.dir, "nope")], out=out)
        self.assertEqual(code, status.EXIT_NOT_RUNNING)
        self.assertIn("the agent never ran with it", out.getvalue())

    def test_lock_holder_from_proc_locks(self):
        lock = os.path.join(self.dir, "lock")
        with open(lock, "w") as f:
            f.write("4242")
        st = os.stat(lock)
        device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
        locks = os.path.join(self.dir, "locks")

        def holder(text):
            with open(locks, "w") as f:
                f.write(text)
            return status.lock_holder(self.dir, proc_locks=locks)

        self.assertEqual(holder(f"1: FLOCK  ADVISORY  WRITE 4242 {device}:{st.st_ino} 0 EOF\n"), (True, 4242))
        # Another device shown (an overlay): the pid the agent wrote decides.
        self.assertEqual(holder(f"1: FLOCK  ADVISORY  WRITE 4242 ff:ff:{st.st_ino} 0 EOF\n"), (True, 4242))
        self.assertEqual(holder(f"1: FLOCK  ADVISORY  WRITE 77 ff:ff:{st.st_ino} 0 EOF\n"), (False, 4242))
        self.assertEqual(holder(f"1: POSIX  ADVISORY  WRITE 4242 {device}:{st.st_ino} 0 EOF\n"), (False, 4242))
        self.assertEqual(holder(f"1: FLOCK  ADVISORY  WRITE 4242 {device}:{st.st_ino + 1} 0 EOF\n"), (False, 4242))
        self.assertEqual(holder(""), (False, 4242))
        # No /proc/locks: the pid in the lock file, if alive.
        with open(lock, "w") as f:
            f.write(str(os.getpid()))
        self.assertEqual(status.lock_holder(self.dir, proc_locks=os.path.join(self.dir, "none")),
                         (True, os.getpid()))

    def test_real_flock_seen_without_taking_it(self):
        import fcntl

        lock = os.path.join(self.dir, "lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        os.write(fd, str(os.getpid()).encode())
        if not os.path.exists("/proc/locks"):
            raise __import__("unittest").SkipTest("no /proc/locks")
        self.assertEqual(status.lock_holder(self.dir), (False, os.getpid()))
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.assertEqual(status.lock_holder(self.dir), (True, os.getpid()))

    def test_hello_tasks(self):
        records = {
            "new": {"id": "new", "spec": {}},
            "acked": {"id": "acked", "finished": True, "terminal_seq": 4},
            "unacked": {"id": "unacked", "finished": True, "terminal_seq": 9},
            "unknown-seq": {"id": "unknown-seq", "finished": True},
        }
        self.assertEqual(status.hello_tasks(records, acked=5), ["new", "unacked", "unknown-seq"])


# -- the monitor endpoint ----------------------------------------------------------------------


def families(text):
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class MonitorTests(TestCase):
    timeout = 60

    async def setUp(self):
        self.platform = await start_platform(self, heartbeat=1)

    async def start(self, **sections):
        sections.setdefault("monitor", {"listen": "127.0.0.1:0"})
        agent = await connected_agent(self, self.platform, sections=sections)
        self.assertIsNotNone(agent.monitor_service.url)
        return agent

    async def test_metrics_match_what_the_agent_did(self):
        agent = await self.start()
        data = b"x" * 100_000
        self.platform.put_file("j1/input.bin", data)
        spec = {
            "command": "head -c 12345 input.bin > out.bin",
            "inputs": [{"path": "input.bin", "uri": self.platform.file_url("j1/input.bin"),
                        "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}],
            "outputs": [{"path": "out.bin", "uri": self.platform.file_url("j1-1-0/out.bin")}],
        }
        ok = self.platform.submit(spec, task_id="j1-1-0")
        bad = self.platform.submit({"command": "exit 7"}, task_id="j1-2-0")
        self.assertEqual((await self.platform.wait_for(ok)).state, "DONE")
        self.assertEqual((await self.platform.wait_for(bad)).state, "FAILED")
        await eventually(lambda: len(agent.outbox) == 0, what="the acks")

        code, headers, body = await http_get(agent.monitor_service.url + "/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        m = families(body.decode())
        self.assertEqual(m[("everest_agent_connected", ())], 1)
        self.assertEqual(m[("everest_agent_info", (("handler", "local"), ("version", __version__)))], 1)
        self.assertEqual(m[("everest_agent_connects_total", ())], 1)
        self.assertEqual(m[("everest_agent_reconnects_total", ())], 0)
        self.assertEqual(m[("everest_agent_tasks", (("state", "DONE"),))], 1)
        self.assertEqual(m[("everest_agent_tasks", (("state", "FAILED"),))], 1)
        self.assertEqual(m[("everest_agent_tasks", (("state", "RUNNING"),))], 0)
        self.assertEqual(m[("everest_agent_slots", ())], 2)
        self.assertEqual(m[("everest_agent_slots_busy", ())], 0)
        self.assertEqual(m[("everest_agent_outbox_pending", ())], 0)
        self.assertEqual(m[("everest_agent_outbox_last_seq", ())], agent.outbox.last_seq)
        self.assertEqual(m[("everest_agent_outbox_acked_seq", ())], agent.outbox.last_seq)
        self.assertEqual(m[("everest_agent_messages_sent_total", ())], agent.sender.sent)
        self.assertGreaterEqual(m[("everest_agent_resource_reports_total", ())], 1)
        self.assertEqual(m[("everest_agent_transfer_bytes_total", (("direction", "in"),))], len(data))
        self.assertEqual(m[("everest_agent_transfer_bytes_total", (("direction", "out"),))], 12345)
        self.assertEqual(self.platform.task(ok).info["outputs"][0]["size"], 12345)
        self.assertIn(("process_resident_memory_bytes", ()), m)
        # The local handler polls no scheduler: no such series.
        self.assertFalse([k for k in m if k[0].startswith("everest_agent_scheduler_")])
        # The agent's own registry, not the process-wide one.
        import prometheus_client

        self.assertIsNone(prometheus_client.REGISTRY.get_sample_value("everest_agent_connected"))

    async def test_outbox_depth_and_age(self):
        agent = await self.start()
        self.platform.pause_acks()
        task_id = self.platform.submit({"command": "true"})
        await self.platform.wait_for(task_id)
        oldest_time = agent.outbox.oldest()[1][3]["time"]
        before = agent.wallclock()
        code, _, body = await http_get(agent.monitor_service.url + "/metrics")
        m = families(body.decode())
        self.assertEqual(m[("everest_agent_outbox_pending", ())], len(agent.outbox))
        self.assertGreater(m[("everest_agent_outbox_pending", ())], 0)
        age = m[("everest_agent_outbox_oldest_pending_age_seconds", ())]
        self.assertGreaterEqual(age, before - oldest_time)
        self.assertLessEqual(age, agent.wallclock() - oldest_time)
        self.platform.resume_acks()

    async def test_openmetrics_on_request(self):
        agent = await self.start()
        code, headers, body = await http_get(agent.monitor_service.url + "/metrics",
                                             {b"accept": [b"application/openmetrics-text; version=1.0.0"]})
        self.assertEqual(code, 200)
        self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(b"application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))

    async def test_healthz(self):
        agent = await self.start()
        code, headers, body = await http_get(agent.monitor_service.url + "/healthz")
        self.assertEqual(code, 200)
        health = json.loads(body)
        self.assertEqual(health["status"], "ok")
        self.assertIs(health["connected"], True)
        self.assertEqual(health["version"], __version__)
        self.platform.disconnect()
        await self.platform.wait_disconnected()
        await eventually(lambda: not agent.sender.connected, what="the agent to notice")
        code, _, body = await http_get(agent.monitor_service.url + "/healthz")
        self.assertEqual(code, 200)
        self.assertIs(json.loads(body)["connected"], False)

    async def test_metrics_without_prometheus_client(self):
        agent = await self.start()
        self.patch(monitor, "prometheus_client", None)
        code, headers, body = await http_get(agent.monitor_service.url + "/metrics")
        self.assertEqual(code, 501)
        self.assertIn(b"prometheus_client", body)
        self.assertIn(b"pip install 'everest-agent[metrics]'", body)
        code, _, _ = await http_get(agent.monitor_service.url + "/healthz")
        self.assertEqual(code, 200)

    async def test_off_by_default(self):
        agent = await connected_agent(self, self.platform)
        self.assertIsNone(agent.monitor_service)
        self.assertIsNone(agent.status.data.get("monitor"))

    async def test_busy_port_does_not_stop_the_agent(self):
        from twisted.internet.protocol import Factory, Protocol

        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        agent = await connected_agent(self, self.platform,
                                      sections={"monitor": {"listen": f"127.0.0.1:{port.getHost().port}"}})
        self.assertIsNone(agent.monitor_service.url)
        self.assertTrue(agent.sender.connected)

    async def test_status_names_the_endpoint(self):
        agent = await self.start()
        text = "\n".join(status.format_state(status.read_state(agent.config.agent.state_dir)))
        self.assertIn(f"monitor: {agent.monitor_service.url}/metrics", text)


class CollectorTests(SynchronousTestCase):
    """The figures a batch handler offers, read by name, and only if present."""

    def fake_agent(self, handler):
        from everest_agent.manager import SlotPool

        outbox = type("O", (), {"last_seq": 0, "acked": 0, "oldest": lambda self: None,
                                "__len__": lambda self: 0})()
        return types.SimpleNamespace(
            handler=handler, outbox=outbox, wallclock=lambda: 0.0,
            manager=types.SimpleNamespace(registry=types.SimpleNamespace(records={}), pool=SlotPool(4)),
            sender=types.SimpleNamespace(connected=False, sent=0),
            monitor=types.SimpleNamespace(sent=0), stager=object(),
        )

    def collect(self, handler):
        found = {}
        for family in monitor.AgentCollector(self.fake_agent(handler)).collect():
            for sample in family.samples:
                found[sample.name] = sample.value
        return found

    def test_scheduler_polls(self):
        handler = types.SimpleNamespace(name="slurm", poll_count=12, poll_failures=2, last_poll_duration=0.25)
        m = self.collect(handler)
        self.assertEqual(m["everest_agent_scheduler_polls_total"], 12)
        self.assertEqual(m["everest_agent_scheduler_poll_failures_total"], 2)
        self.assertEqual(m["everest_agent_scheduler_last_poll_duration_seconds"], 0.25)
        # Without a stager's counters: zeros.
        self.assertEqual(m["everest_agent_transfer_bytes_total"], 0)

    def test_polls_attribute(self):
        m = self.collect(types.SimpleNamespace(name="pbs", polls=3))
        self.assertEqual(m["everest_agent_scheduler_polls_total"], 3)
        self.assertNotIn("everest_agent_scheduler_poll_failures_total", m)


# -- log level -----------------------------------------------------------------------------------


class LogLevelTests(SynchronousTestCase):
    def beginner(self):
        publisher = LogPublisher()
        stdio = types.SimpleNamespace(stdout=io.StringIO(), stderr=io.StringIO())
        warnings = types.SimpleNamespace(showwarning=lambda *a, **k: None)
        return publisher, LogBeginner(publisher, io.StringIO(), stdio, warnings)

    def test_filters_what_twistd_installs(self):
        publisher, beginner = self.beginner()
        log = Logger(namespace="test", observer=publisher)
        tap.filter_log_level("warn", beginner)
        log.info("buffered before logging began")
        log.error("buffered error")
        seen = []
        beginner.beginLoggingTo([seen.append], redirectStandardIO=False)
        log.debug("debug")
        log.info("info")
        log.warn("warn")
        log.critical("critical")
        self.assertEqual([e["log_format"] for e in seen], ["buffered error", "warn", "critical"])
        # One shot: the beginner's own method is back.
        self.assertNotIn("beginLoggingTo", vars(beginner))

    def test_undo(self):
        _, beginner = self.beginner()
        undo = tap.filter_log_level("debug", beginner)
        self.assertIn("beginLoggingTo", vars(beginner))
        undo()
        self.assertNotIn("beginLoggingTo", vars(beginner))

    def test_config_key(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        token = write_private(os.path.join(root, "token"), "t\n")

        def load(level):
            text = f"[platform]\nurl = ws://127.0.0.1:1/x\ntoken_file = {token}\n"
            if level is not None:
                text += f"[agent]\nlog_level = {level}\n"
            return agent_config.load(write_private(os.path.join(root, "agent.ini"), text)).agent.log_level

        self.assertEqual(load(None), "info")
        self.assertEqual(load("DEBUG"), "debug")
        self.assertEqual(load("warning"), "warn")
        with self.assertRaises(agent_config.ConfigError) as e:
            load("loud")
        self.assertIn("[agent] log_level: bad value 'loud': must be one of debug, info, warn, error, critical",
                      str(e.exception))

    def test_monitor_key(self):
        parse = agent_config.SCHEMA["monitor"]["listen"].parse
        self.assertEqual(parse("127.0.0.1:9108"), ("127.0.0.1", 9108))
        self.assertEqual(parse("[::1]:9108"), ("::1", 9108))
        self.assertIsNone(parse("  "))
        for bad in ("9108", "host:", "host:99999", ":80"):
            self.assertRaises(ValueError, parse, bad)


class ChildProcess(protocol.ProcessProtocol):
    """Collects a child's output; L{wait_for} fires when a text shows up."""

    def __init__(self):
        self.output = b""
        self.ended = defer.Deferred()
        self._waiters = []

    def outReceived(self, data):
        self.output += data
        for text, d in list(self._waiters):
            if text in self.output:
                self._waiters.remove((text, d))
                d.callback(None)

    errReceived = outReceived

    def wait_for(self, text):
        d = defer.Deferred()
        if text in self.output:
            d.callback(None)
        else:
            self._waiters.append((text, d))
        return d

    def processEnded(self, reason):
        waiters, self._waiters = self._waiters, []
        for text, d in waiters:
            d.errback(AssertionError(f"exited before writing {text!r}: {self.output.decode(errors='replace')}"))
        self.signal = reason.value.signal
        self.ended.callback(reason.value.exitCode)


class TwistdLogLevelTests(TestCase):
    """The real twistd, in the foreground, to standard output and to a --logfile."""

    timeout = 60

    async def setUp(self):
        self.platform = await start_platform(self)

    def twistd(self, ini, *options):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        proc = ChildProcess()
        argv = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile", os.path.join(root, "twistd.pid"), *options,
                "everest-agent", "--config", ini]
        env = dict(os.environ, PYTHONPATH=PROJECT_ROOT)
        transport = reactor.spawnProcess(proc, sys.executable, argv, env=env, path=root)

        def stop():
            if transport.pid is not None:
                transport.signalProcess("KILL")
                return proc.ended

        self.addCleanup(stop)
        return proc, transport

    async def stop(self, proc, transport):
        transport.signalProcess("TERM")
        code = await proc.ended
        # twistd stops cleanly, then ends by the signal it received.
        self.assertIn((code, proc.signal), [(0, None), (None, signal.SIGTERM)], proc.output.decode())

    async def test_info_to_stdout(self):
        ini = agent_ini(self, self.platform.ws_url)
        proc, transport = self.twistd(ini)
        await proc.wait_for(b"Connected to the platform")
        await self.stop(proc, transport)
        out = proc.output.decode()
        self.assertIn("everest-agent stopped", out)
        self.assertIn("twistd", out)
        self.assertIn("Connecting to ", out)
        # Logged just after "Connected", at debug: filtered.
        self.assertNotIn("WELCOME: ack", out)
        self.assertNotIn("#debug]", out)

    async def test_debug_to_stdout(self):
        ini = agent_ini(self, self.platform.ws_url, sections={"agent": {"log_level": "debug"}})
        proc, transport = self.twistd(ini)
        await proc.wait_for(b"WELCOME: ack 0, heartbeat")
        await self.stop(proc, transport)
        self.assertIn("[everest_agent.agent.EverestAgent#debug] WELCOME: ack 0", proc.output.decode())

    async def test_warn_to_logfile(self):
        ini = agent_ini(self, self.platform.ws_url, token="wrong-token",
                        sections={"agent": {"log_level": "warn"}})
        logfile = os.path.abspath(self.mktemp())
        proc, transport = self.twistd(ini, "--logfile", logfile)

        def logged():
            try:
                with open(logfile) as f:
                    return "The platform refused this agent (4001" in f.read()
            except FileNotFoundError:
                return False

        await eventually(logged, timeout=20, what="the refusal in the log file")
        await self.stop(proc, transport)
        with open(logfile) as f:
            text = f.read()
        self.assertIn("#error] The platform refused this agent", text)
        self.assertNotIn("starting up", text)  # twistd's own info line
        self.assertNotIn("Connecting to", text)
        self.assertNotIn("#info]", text)
        self.assertEqual(proc.output, b"")  # nothing on standard output
