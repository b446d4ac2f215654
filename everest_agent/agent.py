"""
The agent as one Twisted service tree.

L{EverestAgent} builds the parts from the configuration and wires them:
the connection (L{client}) feeds platform messages to the L{Sender} (acks)
and the L{TaskManager} (tasks); the manager's workers run tasks through the
handler and move files with the L{Stager}; everything said to the platform
goes through the sender and its durable outbox.
"""

import fcntl
import os
import time

from twisted.application.service import IService, MultiService
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from everest_agent import __version__, protocol
from everest_agent.channel import TaskChannel, load_key as load_channel_key
from everest_agent.client import AgentClientFactory, ConnectionService
from everest_agent.config import check_directories
from everest_agent.fsio import ThreadedFileIO
from everest_agent.handlers import make_handler
from everest_agent.journal import CommitGroup, make_private_dir
from everest_agent.manager import TaskManager
from everest_agent.outbox import Outbox
from everest_agent.passive.credentials import ClientTokens
from everest_agent.passive.tasks import NoPassiveClients, PassiveListener, PassiveTasks, SeqCounter
from everest_agent.registry import TaskRegistry
from everest_agent.resource import ResourceMonitor
from everest_agent.sender import Sender
from everest_agent.status import StatusFile
from everest_agent.taskdirs import ProcessTaskDirs, ThreadTaskDirs
from everest_agent.transfer.stager import Stager


def _retention_text(policy):
    if policy is None:
        return "all"
    kind, n = policy
    return str(n) if kind == "count" else f"{n}s"


class StateDirLocked(Exception):
    pass


class UnsafeDirectory(Exception):
    """work_dir or state_dir is someone else's, or others can write in it."""


class EverestAgent(MultiService):
    log = Logger()

    def __init__(self, config, reactor, handler=None, fsync=True, wallclock=time.time):
        super().__init__()
        self.config = config
        self.reactor = reactor
        agent = config.agent
        self.user_agent = f"everest-agent/{__version__}"
        # Blocking file-system work runs in these threads (see fsio.py).
        self.files = ThreadedFileIO(reactor)
        self.handler = handler if handler is not None else make_handler(config, reactor)
        if hasattr(self.handler, "use_files"):
            self.handler.use_files(self.files)
        # One commit group, outbox first.  Its fsyncs run in a thread of
        # their own, so the reactor goes on meanwhile (see journal.py).
        self._fsync_pool = None
        sync_in_thread = None
        if fsync:
            self._fsync_pool = ThreadPool(minthreads=1, maxthreads=1, name="everest-fsync")
            sync_in_thread = lambda f: threads.deferToThreadPool(reactor, self._fsync_pool, f)  # noqa: E731
        commits = CommitGroup(reactor, sync_in_thread=sync_in_thread)
        self.outbox = Outbox(agent.state_dir, reactor, fsync=fsync, group=commits, files=self.files)
        self.registry = TaskRegistry(agent.state_dir, reactor, fsync=fsync, group=commits, files=self.files)
        self.sender = Sender(self.outbox, reactor, wallclock)
        self.stager = Stager.from_config(config, reactor)
        # Task directories are made and retired in a process of their own
        # (taskdirs.py), or in the file-system threads if it is gone.
        self.dirs = ProcessTaskDirs(reactor, agent.work_dir, ThreadTaskDirs(agent.work_dir, self.files))
        self.manager = TaskManager(
            self.registry, self.sender, self.handler, self.stager, agent.work_dir, agent.max_tasks,
            allowed_commands=config.security.allowed_commands,
            allowed_environment=config.security.allowed_environment,
            keep_finished=agent.keep_finished, wallclock=wallclock, files=self.files,
            keep_task_dirs=agent.keep_task_dirs, dirs=self.dirs,
        )
        if hasattr(self.handler, "pool"):  # pilot mode: the slots follow the pilots' cores
            self.handler.pool = self.manager.pool
            self.manager.pool.set_capacity(0)
        self.monitor = ResourceMonitor(
            reactor, self.sender, self.manager, self.handler, agent.hostname, agent.work_dir, wallclock
        )
        platform = config.platform  # None: passive mode only
        # -- passive mode (contract, section 9): passive/tasks.py routes owned tasks' reports
        self.passive = None
        self.passive_listener = None
        passive = getattr(config, "passive", None)
        if passive is not None and passive.enabled:
            self.passive = PassiveTasks(
                self.manager, SeqCounter(os.path.join(agent.state_dir, "passive-seq"), self.files.run),
                wallclock, max_client_tasks=passive.max_client_tasks, max_tasks=passive.max_tasks,
            )
            self.passive_listener = PassiveListener(
                self.passive, ClientTokens(passive.tokens), reactor, passive.listen,
                ThreadPool(minthreads=0, maxthreads=4, name="everest-passive-files"),
                passive.tls_cert, passive.tls_key,
            )
        else:
            # Records of a client from when passive mode was on stay with no one: never the platform's.
            self.manager.passive = NoPassiveClients()
        self.factory = self.connection = None
        if platform is not None:
            self.factory = AgentClientFactory(
                self, platform.url, reactor,
                ping_interval=platform.ping_interval, ping_timeout=platform.ping_timeout,
                initial_delay=platform.reconnect_initial_delay, max_delay=platform.reconnect_max_delay,
                factor=platform.reconnect_factor, welcome_timeout=platform.welcome_timeout,
            )
            self.connection = ConnectionService(self.factory, platform.url, reactor, platform.ca_file or None)
        self.channel = None
        self._channel_port = None
        if config.task_channel.enabled:
            self.channel = TaskChannel(self.manager.is_running, self._task_message, reactor)
            self.manager.channel = self.channel
        self._lock = None
        # Started in this order, stopped in reverse: the connection goes
        # first, the file-system threads last.
        self.files.setServiceParent(self)
        self.dirs.setServiceParent(self)
        self.sender.setServiceParent(self)
        if IService.providedBy(self.handler):
            self.handler.setServiceParent(self)
        self.manager.setServiceParent(self)
        if self.connection is not None:
            self.connection.setServiceParent(self)
        if self.passive_listener is not None:
            self.passive_listener.setServiceParent(self)  # stopped first: no client mid-stop
        # -- operations: status.json and the optional /metrics endpoint (status.py, monitor.py)
        self.wallclock = wallclock
        self.status = StatusFile(agent.state_dir, platform.url if platform is not None else "", wallclock)
        if hasattr(self.handler, "pool"):
            self.handler.status = self.status  # pilot mode: status lists the pilots
        self.monitor_service = None
        listen = getattr(getattr(config, "monitor", None), "listen", None)
        if listen is not None:
            from everest_agent.monitor import MonitorService

            self.monitor_service = MonitorService(self, listen, reactor)
            self.monitor_service.setServiceParent(self)
        # -- end of operations

    def startService(self):
        agent = self.config.agent
        problem = check_directories(self.config)
        if problem:
            raise UnsafeDirectory(problem)
        make_private_dir(agent.state_dir)
        os.makedirs(agent.work_dir, mode=0o700, exist_ok=True)
        self._take_lock(agent.state_dir)
        if self._fsync_pool is not None:
            self._fsync_pool.start()
            # Whatever happens to the graceful stop, the thread must not keep
            # the process alive.
            self.reactor.addSystemEventTrigger("after", "shutdown", self._stop_fsync_pool)
        self.outbox.load()
        self.registry.load()
        if self.passive is not None:
            self.passive.load()  # before the manager resumes owned tasks
        self.status.starting(handler=self.handler.name, slots=agent.max_tasks,  # operations
                             keep_task_dirs=_retention_text(agent.keep_task_dirs),
                             **self._passive_status())
        self.log.info(
            "everest-agent {version} starting: handler {handler}, {slots} slots, "
            "work_dir {work_dir}, {pending} messages to deliver",
            version=__version__, handler=self.handler.name, slots=agent.max_tasks,
            work_dir=agent.work_dir, pending=len(self.outbox),
        )
        if self.channel is not None:
            self._listen_channel()
        if os.geteuid() == 0:
            self.log.warn("Running as root: tasks run as root too; consider a dedicated user")
        super().startService()

    def _passive_status(self):
        """status.json's passive-mode fields: where it listens (the real port is known once listening)."""
        if self.passive_listener is None:
            return {}
        host, port = self.passive_listener.listen
        return {"passive": f"{self.passive_listener.scheme}://{host}:{port}"}

    def _task_message(self, task_id, text):
        """A task's channel message: to its passive client, or to the platform."""
        owner = self.manager.owned(task_id)
        if owner is not None:
            return self.passive.task_message(owner, task_id, text) if self.passive is not None else None
        return self.sender.task_message(task_id, text)

    def _listen_channel(self):
        settings = self.config.task_channel
        host, port = settings.listen
        self.channel.key = load_channel_key(self.config.agent.state_dir)
        self._channel_port = self.reactor.listenTCP(port, self.channel, interface=host)
        self.channel.port = self._channel_port.getHost().port
        wildcard = host in ("0.0.0.0", "::", "")
        self.channel.address = settings.address or (self.config.agent.hostname if wildcard else host)
        self.log.info(
            "Task channel listening on {host}:{port}, given to tasks as {address}",
            host=host, port=self.channel.port, address=self.channel.address,
        )

    def _take_lock(self, state_dir):
        fd = os.open(os.path.join(state_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StateDirLocked(
                f"another agent is using the state directory {state_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock = fd

    async def _stop(self):
        """
        Stop gracefully: take no new work, cancel running tasks if so
        configured, let the platform acknowledge what it can, close the
        WebSocket cleanly, and leave the state directory complete.
        """
        self.running = 0
        agent = self.config.agent
        self.manager.stopping = True
        if agent.on_stop == "cancel":
            await self.manager.cancel_all(timeout=agent.kill_grace + 5)
        if self.sender.connected and len(self.outbox):
            await self.sender.drained(timeout=2.0)
        # Children in reverse order of start: the connection first, the
        # outbox last, so every state change reaches the disk.
        for service in reversed(list(self)):
            await defer.maybeDeferred(service.stopService)
        self.monitor.lost()
        if self._channel_port is not None:
            await self._channel_port.stopListening()
            self._channel_port = None
        await self.stager.close()
        self._stop_fsync_pool()  # the journals have synced everything themselves
        if self._lock is not None:
            self.status.stopped()  # operations: before the lock goes
            os.close(self._lock)
            self._lock = None
        self.log.info("everest-agent stopped")

    def stopService(self):
        return defer.Deferred.fromCoroutine(self._stop())

    def _stop_fsync_pool(self):
        if self._fsync_pool is not None and self._fsync_pool.started:
            self._fsync_pool.stop()

    # -- what the connection asks of the agent ------------------------------------

    def pilot_summary(self):
        """The pilots, for the monitor page; C{None} unless in pilot mode."""
        summary = getattr(self.handler, "pilot_summary", None)
        return summary() if summary is not None else None

    def hello(self):
        return protocol.hello(
            self.config.platform.token, self.user_agent, self.config.agent.hostname,
            self.handler.name, self.config.agent.max_tasks, self.manager.hello_tasks(),
        )

    def dispatch_table(self):
        return {
            protocol.ACK: self.sender.ack,
            protocol.TASK_SUBMIT: self.manager.submit,
            protocol.TASK_CANCEL: self.manager.cancel,
            protocol.TASK_MESSAGE: self.manager.deliver,
        }

    def welcomed(self, connection, info):
        heartbeat = info.get("heartbeat")
        if not isinstance(heartbeat, (int, float)) or isinstance(heartbeat, bool) or heartbeat <= 0:
            heartbeat = 30
        self.log.info("Connected to the platform")
        self.log.debug("WELCOME: ack {ack}, heartbeat {heartbeat} s", ack=info.get("ack", 0), heartbeat=heartbeat)
        self.sender.welcomed(connection, info.get("ack", 0))
        self.monitor.welcomed(heartbeat)
        self.status.welcomed(info.get("ack", 0), heartbeat)  # operations

    def connection_lost(self, connection):
        self.sender.lost(connection)
        self.monitor.lost()
        self.status.lost()  # operations

    # -- operations: what client.py may report for status.json ----------------------

    def connection_closed(self, code, reason):
        """A WebSocket to the platform closed, welcomed or not (e.g. 4001)."""
        self.status.closed(code, reason)

    def connection_failed(self, reason):
        """A connection attempt failed before the WebSocket opened (refused, TLS...)."""
        self.status.failed(reason)
