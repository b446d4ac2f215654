"""
The twistd plugin: `twistd everest-agent --config agent.ini`, for real.
"""

import os
import signal
import sys

from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.plugin import getPlugins
from twisted.application.service import IServiceMaker
from twisted.trial.unittest import SynchronousTestCase, TestCase

from everest_agent import tap
from tests.support import agent_ini, eventually, start_platform, write_private

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class Collect(ProcessProtocol):
    def __init__(self):
        self.out = b""
        self.err = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.out += data

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.signal = reason.value.signal
        self.ended.callback(reason.value.exitCode)


def twistd(args, cwd):
    proto = Collect()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    reactor.spawnProcess(proto, TWISTD, [TWISTD] + args, env=env, path=cwd)
    return proto


class OptionsTests(SynchronousTestCase):
    def test_plugin_is_found(self):
        names = [p.tapname for p in getPlugins(IServiceMaker)]
        self.assertIn("everest-agent", names)
        self.assertIn("everest-platform", names)

    def test_bad_config_is_one_line_and_exits(self):
        e = self.assertRaises(SystemExit, tap.Options().parseOptions, ["--config", "/nonexistent/agent.ini"])
        self.assertEqual(e.code, "everest-agent: /nonexistent/agent.ini: no such configuration file")

    def test_help_documents_config(self):
        self.assertIn("--config", str(tap.Options()))


class TwistdTests(TestCase):
    timeout = 60

    def setUp(self):
        if not os.access(TWISTD, os.X_OK):
            raise self.skipTest(f"no twistd next to {sys.executable}")

    async def test_bad_config_exits_before_connecting(self):
        ini = write_private(os.path.abspath(self.mktemp()), "[platform]\nurl = wss://x.example.org\ntoken = t\n[agent]\nmax_tasks = none\n")
        proto = twistd(["-n", "everest-agent", "--config", ini], os.path.dirname(ini))
        code = await proto.ended
        self.assertEqual(code, 1)
        self.assertEqual(
            proto.err.decode().strip().splitlines(),
            [f"everest-agent: {ini}: [agent] max_tasks: bad value 'none': invalid literal for int() with base 10: 'none'"],
        )

    async def test_foreground_agent_runs_tasks(self):
        platform = await start_platform(self)
        ini = agent_ini(self, platform.ws_url)
        proto = twistd(["-n", "--pidfile=", "everest-agent", "--config", ini], os.path.dirname(ini))
        self.addCleanup(lambda: proto.ended.called or os.kill(proto.transport.pid, signal.SIGKILL))
        await platform.wait_connected()
        record = await platform.wait_for(platform.submit({"command": "echo hi"}))
        self.assertEqual(record.state, "DONE")
        os.kill(proto.transport.pid, signal.SIGTERM)
        await proto.ended
        # twistd stops cleanly, then ends itself with the signal it got.
        self.assertEqual(proto.signal, signal.SIGTERM)
        self.assertIn(b"everest-agent stopped", proto.out)
        self.assertNotIn(b"test-token", proto.out)

    async def test_daemon_with_pidfile(self):
        platform = await start_platform(self)
        ini = agent_ini(self, platform.ws_url)
        root = os.path.dirname(ini)
        pidfile = os.path.join(root, "agent.pid")
        proto = twistd(["--pidfile", pidfile, "--logfile", os.path.join(root, "agent.log"),
                        "everest-agent", "--config", ini], root)
        self.assertEqual(await proto.ended, 0)  # the parent returns once daemonized
        await eventually(lambda: os.path.exists(pidfile), what="the pid file")
        with open(pidfile) as f:
            pid = int(f.read())
        self.addCleanup(lambda: os.path.exists(pidfile) and os.kill(pid, signal.SIGKILL))
        await platform.wait_connected()
        record = await platform.wait_for(platform.submit({"command": "true"}))
        self.assertEqual(record.state, "DONE")
        os.kill(pid, signal.SIGTERM)
        await eventually(lambda: not os.path.exists(pidfile), what="the daemon to stop")
