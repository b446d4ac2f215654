"""
Helpers for integration tests: a reference platform and a real agent on
loopback, configured through a real agent.ini.
"""

import os

from twisted.internet import defer, reactor, task

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


async def eventually(predicate, timeout=10.0, what="condition"):
    """Poll C{predicate} until true (for what has no event to wait on)."""
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.02)
        waited += 0.02


def as_deferred(coroutine_function):
    """Decorator: run an async test method as a Deferred-returning one."""

    def wrapper(self, *args, **kwargs):
        return defer.Deferred.fromCoroutine(coroutine_function(self, *args, **kwargs))

    wrapper.__name__ = coroutine_function.__name__
    wrapper.__doc__ = coroutine_function.__doc__
    return wrapper
