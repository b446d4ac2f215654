"""
The pilot: the worker that runs inside one batch job and runs many tasks.

It connects back to the agent (L{everest_agent.pilot.link}), proves who it
is with the secret the agent made for it, offers its cores, and runs the
tasks it is sent the way the local handler runs them: it I{is} a
L{LocalTaskHandler} (process group, C{stdout}/C{stderr} files, TERM then
KILL on cancel or time limit, the exit-code file written by the task's
wrapper).

What it promises:

 - a task id is run at most once in a pilot's life: a C{run} for a task it
   runs or has run is answered with what it knows (C{started}, C{ended});
 - outcomes are kept until the agent acknowledges them, and offered again
   in the C{hello} of every reconnection (an agent restarted after a kill
   gets them all);
 - it takes no task whose C{timeLimit} would outlast its remaining
   walltime, and none at all in its last C{drain_margin} seconds;
 - with the agent away it keeps running its tasks and reconnects with
   backoff for C{reconnect_for} seconds; after that, and once its tasks
   have ended, it exits (so does it when the agent says C{stop}).
"""

import os
import signal

from twisted.internet import protocol
from twisted.logger import Logger

from everest_agent.handlers.local import LocalTaskHandler
from everest_agent.interfaces import JobRequest
from everest_agent.pilot import link as L


def drain_margin(walltime):
    """Seconds before its walltime's end when a pilot stops taking tasks."""
    return min(60.0, walltime / 10.0)


class Pilot:
    log = Logger()

    def __init__(self, reactor, host, port, pilot_id, secret, cores, walltime, *,
                 kill_grace=10.0, reconnect_for=600.0, heartbeat=10.0, handler=None,
                 initial_delay=0.5, max_delay=10.0, exit=None):
        self.reactor = reactor
        self.host, self.port = host, port
        self.pilot_id = pilot_id
        self.secret = secret
        self.cores = cores
        self.walltime = float(walltime)
        self.margin = drain_margin(self.walltime)
        self.reconnect_for = reconnect_for
        self.heartbeat = heartbeat
        self.handler = handler if handler is not None else LocalTaskHandler(reactor, cores, kill_grace)
        self.initial_delay, self.max_delay = initial_delay, max_delay
        self._exit = exit if exit is not None else self._stop_reactor
        self.started_at = reactor.seconds()
        self.jobs = {}  # task id -> (job, cores) of running tasks
        self.results = {}  # task id -> [exit_code, reason, canceled] of every task ended here
        self.unacked = set()  # ended tasks whose outcome the agent has not acknowledged
        self.free = cores
        self.link = None
        self.welcomed = False
        self.draining = False
        self.stopping = False
        self.ended = False
        self._away_since = self.started_at
        self._delay = initial_delay
        self._retry_call = None
        self._drain_call = reactor.callLater(max(0.0, self.walltime - self.margin), self._drain)

    # -- life -------------------------------------------------------------------

    def remaining(self):
        return self.walltime - (self.reactor.seconds() - self.started_at)

    def start(self):
        self.log.info("Pilot {pilot} starting: {cores} cores, {walltime:g} s, agent {host}:{port}",
                      pilot=self.pilot_id, cores=self.cores, walltime=self.walltime,
                      host=self.host, port=self.port)
        self.reactor.addSystemEventTrigger("before", "shutdown", self._terminating)
        self._connect()

    def _terminating(self):
        """SIGTERM (the scheduler ends the job): say so while the link is up."""
        if self.ended:
            return
        self.draining = True
        if self.link is not None and self.welcomed:
            self.link.send(L.DRAINING, {"remaining": self.remaining(), "terminating": True})
            self.link.flush()

    def _connect(self):
        self._retry_call = None
        if self.ended:
            return
        creator = protocol.ClientCreator(self.reactor, L.Link, self, self.reactor, self.heartbeat)
        d = creator.connectTCP(self.host, self.port, timeout=30)
        d.addErrback(self._connect_failed)

    def _connect_failed(self, failure):
        self.log.info("Pilot {pilot}: cannot reach the agent at {host}:{port}: {error}",
                      pilot=self.pilot_id, host=self.host, port=self.port,
                      error=failure.getErrorMessage())
        self._retry()

    def _retry(self):
        if self.ended or self._retry_call is not None:
            return
        away = self.reactor.seconds() - self._away_since
        if away >= self.reconnect_for:
            if not self.stopping:
                self.log.warn("Pilot {pilot}: no agent for {away:.0f} s; ending once its {count} tasks end",
                              pilot=self.pilot_id, away=away, count=len(self.jobs))
            self.stopping = True
            self._maybe_exit()
            if not self.ended:
                # Its tasks still run: keep trying, the agent may be back.
                self._retry_call = self.reactor.callLater(self.max_delay, self._connect)
            return
        self._retry_call = self.reactor.callLater(self._delay, self._connect)
        self._delay = min(self.max_delay, self._delay * 2)

    def _drain(self):
        self._drain_call = None
        if not self.draining:
            self.draining = True
            self.log.info("Pilot {pilot}: near the end of its walltime; taking no more tasks", pilot=self.pilot_id)
            if self.link is not None and self.welcomed:
                self.link.send(L.DRAINING, {"remaining": self.remaining()})

    def _maybe_exit(self):
        if self.stopping and not self.jobs and not self.ended:
            self.ended = True
            self.log.info("Pilot {pilot} ending: {count} tasks run", pilot=self.pilot_id, count=len(self.results))
            for call in (self._retry_call, self._drain_call):
                if call is not None and call.active():
                    call.cancel()
            if self.link is not None:
                self.link.close()
            self._exit()

    def _stop_reactor(self):
        if self.reactor.running:
            self.reactor.callLater(0.1, self.reactor.stop)

    # -- the link ---------------------------------------------------------------

    def link_made(self, link):
        self.link = link
        self.welcomed = False
        running = [[task_id, job.job_id] for task_id, (job, _) in self.jobs.items()]
        finished = {task_id: self.results[task_id] for task_id in self.unacked}
        link.send(L.HELLO, {
            "pilot": self.pilot_id, "secret": self.secret, "cores": self.cores,
            "remaining": self.remaining(), "draining": self.draining or self.stopping,
            "running": running, "finished": finished, "pid": os.getpid(),
        })

    def link_lost(self, link, reason):
        if link is not self.link:
            return
        self.link = None
        if self.welcomed:
            self._away_since = self.reactor.seconds()
            self._delay = self.initial_delay
            self.log.info("Pilot {pilot}: lost the agent ({why}); reconnecting",
                          pilot=self.pilot_id, why=reason.getErrorMessage())
        self.welcomed = False
        if self.ended:
            return
        self._retry()

    def link_messages(self, link, messages):
        for kind, fields in messages:
            if not self.welcomed:
                if kind != L.WELCOME:
                    link.drop()
                    return
                self.welcomed = True
                self._delay = self.initial_delay
                heartbeat = fields.get("heartbeat")
                if isinstance(heartbeat, (int, float)) and heartbeat > 0:
                    link.set_heartbeat(float(heartbeat))
                self.log.info("Pilot {pilot}: connected to the agent", pilot=self.pilot_id)
                if self.draining:
                    link.send(L.DRAINING, {"remaining": self.remaining()})
                continue
            method = getattr(self, "msg_" + kind, None)
            if method is None:
                self.log.warn("Pilot {pilot}: unknown message {kind!r} from the agent", pilot=self.pilot_id, kind=kind)
                continue
            try:
                method(fields)
            except (KeyError, TypeError, ValueError) as e:
                self.log.warn("Pilot {pilot}: bad {kind} message: {error}", pilot=self.pilot_id, kind=kind, error=e)

    # -- what the agent asks ----------------------------------------------------

    def _send(self, kind, fields):
        if self.link is not None and self.welcomed:
            self.link.send(kind, fields)

    def msg_run(self, fields):
        task_id = fields["task"]
        if task_id in self.jobs:
            self._send(L.STARTED, {"task": task_id, "pid": self.jobs[task_id][0].job_id})
            return
        if task_id in self.results:
            self.unacked.add(task_id)
            self._send(L.ENDED, {"task": task_id, "result": self.results[task_id]})
            return
        requirements = fields.get("requirements") or {}
        cores = int(requirements.get("coresPerNode", 1))
        limit = requirements.get("timeLimit")
        remaining = self.remaining()
        why = None
        if self.draining or self.stopping:
            why = "the pilot is ending"
        elif cores > self.free:
            why = f"the pilot has {self.free} free cores, the task needs {cores}"
        elif limit and limit > remaining - self.margin:
            why = f"the task's timeLimit ({limit:g} s) outlasts the pilot's remaining walltime"
        if why is not None:
            self._send(L.REFUSED, {"task": task_id, "reason": why, "remaining": remaining})
            return
        request = JobRequest(task_id=task_id, directory=fields["directory"], command=fields["command"],
                             environment=fields.get("environment") or {}, requirements=requirements)
        d = self.handler.submit(request)
        failure = []
        d.addErrback(failure.append)
        if failure:
            self._ended(task_id, [None, str(failure[0].value), False])
            return
        job = d.result
        self.free -= cores
        self.jobs[task_id] = (job, cores)
        self._send(L.STARTED, {"task": task_id, "pid": job.job_id})
        job.result.addCallback(self._job_ended, task_id)

    def _job_ended(self, result, task_id):
        job, cores = self.jobs.pop(task_id)
        self.free += cores
        ended = [result.exit_code, result.reason, result.canceled]
        if getattr(job, "leftover", False):
            ended.append(True)  # processes of the task outlived it: see everest_agent.spares
        self._ended(task_id, ended)
        self._maybe_exit()

    def _ended(self, task_id, result):
        self.results[task_id] = result
        self.unacked.add(task_id)
        self._send(L.ENDED, {"task": task_id, "result": result})

    def msg_cancel(self, fields):
        entry = self.jobs.get(fields["task"])
        if entry is not None:
            entry[0].cancel()

    def msg_ack(self, fields):
        self.unacked.difference_update(fields["tasks"])

    def msg_stop(self, fields):
        self.stopping = True
        self._maybe_exit()


class TermOnce:
    """
    The worker's SIGTERM handler: the reactor's, once.  SIGTERM often
    reaches the worker twice at once, from the scheduler, which signals
    every process of the job, and from the pilot's guard, which forwards
    its own (L{everest_agent.pilot.guard}); the second must not stop a
    reactor that is stopping already (Twisted logs that as critical).
    """

    def __init__(self, reactor):
        self.reactor = reactor
        self.received = 0

    def __call__(self, number, frame=None):
        self.received += 1
        if self.received == 1:
            self.reactor.sigTerm(number, frame)

    def install(self):
        signal.signal(signal.SIGTERM, self)


def run(reactor, host, port, pilot_id, secret, cores, walltime, **kwargs):
    """Run a pilot until it ends (for C{python -m everest_agent.pilot})."""
    pilot = Pilot(reactor, host, port, pilot_id, secret, cores, walltime, **kwargs)
    reactor.callWhenRunning(TermOnce(reactor).install)  # after the reactor's own handlers
    reactor.callWhenRunning(pilot.start)
    reactor.run()
    return pilot

