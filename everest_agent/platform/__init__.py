"""
The reference platform: an honest implementation of the platform side of
the agent-platform contract (``docs/protocol.rst``), for integration tests
and demos.  Not a production server.

In-process use::

    platform = Platform({"secret-token": "agent1"}, reactor, files_dir=tmp)
    port = yield listen(platform, reactor, 0)      # loopback, any free port
    task_id = platform.submit({"command": "true"})
    task = yield platform.wait_for(task_id)
    yield platform.close()

As a program: ``twistd -n everest-platform --token agent1=secret`` or
``everest-platform --token agent1=secret``.
"""

from everest_agent.platform.core import (
    LOST_REASON,
    Agent,
    NotConnected,
    Platform,
    Session,
    StateNotReached,
    Task,
)
from everest_agent.platform.server import listen, make_site, page_url

__all__ = [
    "Platform", "Session", "Task", "Agent", "StateNotReached", "NotConnected",
    "LOST_REASON", "listen", "make_site", "page_url",
]
