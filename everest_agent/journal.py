"""
An append-only journal of JSON records with group commit.

Both durable parts of the agent (the outbox of reliable messages and the
task registry) are journals in C{state_dir}.

Group commit: L{Journal.append} only queues a record and returns a Deferred.
The first append of a reactor turn schedules one flush for the end of that
turn (C{callLater(0)}); the flush writes every queued record with a single
C{write} and a single C{fsync}, then fires all their Deferreds at once.  So
a thousand tasks reporting in the same turn cost one fsync, not a thousand,
and each caller still learns exactly when its own record is on disk.

With C{sync_in_thread} (the agent's setting), a L{CommitGroup} writes in
the reactor thread but leaves the fsync to another thread, one at a time:
while it runs the reactor goes on, the records of the next turns are
written behind it, and the next fsync covers all of them at once.  Their
Deferreds fire, in order, in the reactor thread when it is done.  If an
fsync fails, what it covered and everything written after it is cut off
the file and queued again, in order.

L{Journal.write_ahead} (or L{CommitGroup.write_ahead}) writes what is
queued at once, without fsync, for a record that must be in the file (so a
killed agent leaves it behind) before the caller acts, but need not
survive a machine crash; its fsync and its Deferreds come with the next
regular flush.

A crash can leave a torn last line; L{Journal.load} skips any line that is
not a complete JSON object (and logs it), so a damaged journal never stops
the agent.  L{Journal.rewrite} replaces the file atomically (write a
temporary file, fsync, rename, fsync the directory) to compact it, in the
calling thread (at load, before the agent serves anything).  While the agent
runs, L{Journal.compact_soon} does the same off the reactor thread, through
the agent's L{everest_agent.fsio.IFileIO}: it waits until no group fsync is
in flight, writes what the members before it have queued, takes a snapshot
of the records (everything queued for this journal is in it), and hands the
temporary file, its fsync, the fsync of the members before it, the rename
and the directory's fsync to a thread.  Meanwhile this journal and the
members after it keep their new records queued (so none is ever ahead of a
member before it); once the new file is in place, the records the snapshot
covered are reported durable and the group writes what waited.
"""

import json
import os

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.logger import Logger

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _encode_all(records):
    """
    The lines of C{records}: dicts are encoded, C{bytes} are lines encoded
    already (L{Journal.append_line}).
    """
    return b"".join(r if r.__class__ is bytes else _dumps(r).encode("utf-8") + b"\n" for r in records)


def fsync_directory(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(path):
    """Create C{path} (and parents) as a directory only its owner can use."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


class Journal:
    log = Logger()

    #: Seconds to wait before trying again after a failed write (disk full).
    retry_delay = 1.0

    def __init__(self, path, reactor, fsync=True, files=None):
        """
        @param files: an L{everest_agent.fsio.IFileIO} for compaction off
            the reactor thread (L{compact_soon}); without it compaction runs
            in the calling thread.
        """
        self.path = path
        self._reactor = reactor
        self._fsync = fsync
        self._files = files
        self._compaction = None  # the Deferred of the compaction under way
        self._queue = []  # encoded lines waiting for the next flush
        self._waiting = []  # their Deferreds
        self._flush_call = None
        self._group = None  # the CommitGroup this journal commits with, if any
        self._written = []  # Deferreds of records on disk but not yet announced
        # Written ahead, not yet fsynced: their Deferreds, their lines (put
        # back in the queue if the fsync fails) and where they start.
        self._unsynced = []
        self._unsynced_lines = []
        self._unsynced_offset = None
        self._file = None
        self._end = 0  # the size of the open file: where the next write starts
        self.failing = False  # the last write failed; records wait queued
        self.lines = 0  # records in the file, for deciding when to compact
        self.flushes = 0

    def load(self):
        """
        Read every record in the file (none if there is no file).

        @return: a list of dicts, in the order they were appended.
        """
        records = []
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return records
        with f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError("not an object")
                except ValueError:
                    if line.strip():
                        self.log.warn(
                            "Skipping damaged line {number} of {path}",
                            number=number, path=self.path,
                        )
                    continue
                records.append(record)
        self.lines = len(records)
        return records

    def _open(self):
        if self._file is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._file = os.fdopen(fd, "ab", buffering=0)
            # Only this object writes the file while it is open (the agent
            # holds the state directory's lock), so its size is known from
            # here on without an fstat per write.
            self._end = os.fstat(fd).st_size
        return self._file

    def append(self, record):
        """
        Queue one record.

        @return: a Deferred that fires (with None) once the record is on disk.
        """
        return self.append_line(_dumps(record).encode("utf-8") + b"\n")

    def append_nowait(self, record):
        """Queue a record whose durability nobody waits for (it rides the next flush)."""
        self.append_line(_dumps(record).encode("utf-8") + b"\n", wait=False)

    def append_line(self, line, wait=True):
        """
        Queue one record already encoded: a JSON object on one line, as
        UTF-8 bytes ending with a newline (the outbox encodes each message
        once, for this file and for the wire).

        @return: with C{wait}, a Deferred that fires once the record is on
            disk; else None (it rides the next flush).
        """
        self._queue.append(line)
        if self._group is not None:
            self._group.schedule()
        elif self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self.flush)
        if wait:
            d = Deferred()
            self._waiting.append(d)
            return d
        return None

    def _schedule(self, delay=0):
        if self._group is not None:
            self._group.schedule(delay)
        elif self._flush_call is None:
            self._flush_call = self._reactor.callLater(delay, self.flush)

    def _write_queued(self, sync=True):
        """
        Write what is queued, and (if C{sync}) fsync everything written.

        @return: False if that failed; everything then stays queued, in
            order, for the next try, and nothing is reported durable (or
            sent) before it is.
        """
        if self._compaction is not None:
            return False  # records wait for the new file (see compact_soon)
        if self._queue:
            lines, self._queue = self._queue, []
            try:
                offset = self._append(b"".join(lines))
            except OSError as e:
                self._queue[:0] = lines
                return self._failed(e)
            if self._unsynced_offset is None:
                self._unsynced_offset = offset
            self._unsynced_lines += lines
            self._unsynced += self._waiting
            self._waiting = []
        if sync and self._unsynced_lines:
            taken = self._take_unsynced()
            try:
                if self._fsync:
                    os.fsync(self._file.fileno())
            except OSError as e:
                self._sync_failed(taken, e)
                return False
            self._synced(taken)
        self.failing = False
        return True

    def _failed(self, error):
        self.log.error(
            "Cannot write {path}: {error}; retrying in {delay} s",
            path=self.path, error=error.strerror or str(error), delay=self.retry_delay,
        )
        self.failing = True
        return False

    def _take_unsynced(self):
        """Hand what is written but not fsynced to an fsync about to run."""
        taken = (self._unsynced_offset, self._unsynced_lines, self._unsynced)
        self._unsynced, self._unsynced_lines, self._unsynced_offset = [], [], None
        return taken

    def _restore_unsynced(self, taken):
        """Take back what an fsync that will not be waited for was to cover."""
        offset, lines, waiting = taken
        self._unsynced_offset = offset
        self._unsynced_lines[:0] = lines
        self._unsynced[:0] = waiting

    def _synced(self, taken):
        _, lines, waiting = taken
        self.lines += len(lines)
        self.flushes += 1
        self._written += waiting
        self.failing = False

    def _sync_failed(self, taken, error):
        """
        Cut off what the failed fsync covered and all written since, and
        queue it again, in order, so the retry does not duplicate it.
        """
        offset, lines, waiting = taken
        if self._file is not None:
            self._truncate(offset)
        self._queue[:0] = lines + self._unsynced_lines
        self._waiting[:0] = waiting + self._unsynced
        self._unsynced, self._unsynced_lines, self._unsynced_offset = [], [], None
        self._failed(error)

    def write_ahead(self):
        """
        Write what is queued now, without waiting for fsync (see the module
        docstring).  Its fsync and Deferreds come with the next flush.
        """
        if self._group is not None:
            self._group.write_ahead()
        elif self._compaction is None and not self._write_queued(sync=False):
            self._schedule(self.retry_delay)

    def _fire(self):
        """Tell everyone waiting that their records are on disk."""
        written, self._written = self._written, []
        for d in written:
            d.callback(None)

    def _append(self, data):
        """Write C{data} at the end of the file; @return: where it starts."""
        f = self._open()
        offset = self._end
        try:
            written = f.write(data)
            if written != len(data):
                view = memoryview(data)[written:]
                while view:
                    written = f.write(view)
                    view = view[written:]
        except OSError:
            self._truncate(offset)  # a partial write is taken back
            raise
        self._end = offset + len(data)
        return offset

    def _truncate(self, offset):
        try:
            os.ftruncate(self._file.fileno(), offset)
        except OSError:
            pass
        else:
            self._end = offset
            return
        try:  # how much is there now, then
            self._end = os.fstat(self._file.fileno()).st_size
        except OSError:
            self.close()  # reopened (and measured) at the next write

    def flush(self):
        """Write what is queued now (with the rest of its group, in order)."""
        if self._group is not None:
            self._group.flush()
            return
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self._compaction is not None:
            return  # it flushes when it is over
        if self._write_queued():
            self._fire()
        else:
            self._schedule(self.retry_delay)

    def rewrite(self, records):
        """
        Atomically replace the journal with C{records} (compaction).

        C{records} are encoded first, then anything queued is written (with
        the rest of its commit group, in order), so no append is lost and a
        compacted registry is never ahead of the outbox.  Records appended
        while that flush tells its waiters they are durable (a callback
        reporting the next state) are not part of the snapshot; they stay
        queued and go into the new file at the next flush.

        @raise OSError: if the disk refuses the writes; the old file is
            left as it was.
        """
        data = _encode_all(records)
        if self._group is not None:
            self._group.sync_now()
        else:
            self.flush()
        if self.failing:
            raise OSError("cannot compact while writes are failing")
        tmp = self.path + ".tmp"
        self._write_temporary(data)
        self.close()
        os.replace(tmp, self.path)
        if self._fsync:
            fsync_directory(os.path.dirname(self.path) or ".")
        self.lines = len(records)

    def compact(self, records):
        """
        L{rewrite}, for compaction that can wait: if the disk refuses, log
        it and go on with the old file (the next compaction tries again).

        @return: True if the journal was rewritten.
        """
        try:
            self.rewrite(records)
        except OSError as e:
            self.log.warn(
                "Cannot compact {path} now: {error}",
                path=self.path, error=e.strerror or str(e),
            )
            return False
        return True

    def compact_soon(self, snapshot):
        """
        Compact the journal to C{snapshot()} off the reactor thread (see the
        module docstring), or at once without an L{IFileIO}.  Does nothing
        while a compaction is under way or writes fail.  If the disk refuses,
        it is logged and the old file stays (the next compaction tries again).

        @param snapshot: a callable returning the records, called when the
            compaction starts.
        """
        if self._files is None:
            self.compact(snapshot())
            return
        if self._compaction is not None or self.failing:
            return
        self._compaction = Deferred()
        if self._group is not None:
            self._group.when_quiet(lambda: self._start_compaction(snapshot))
        else:
            self._start_compaction(snapshot)

    def _start_compaction(self, snapshot):
        before = []
        if self._group is not None:
            before = self._group.journals[: self._group.journals.index(self)]
            # What the snapshot reflects must be in the files before it.
            self._group.write_ahead()
        if any(j.failing for j in before):
            self._compaction_over(None, OSError("writes are failing"), None, None, ())
            return
        records = snapshot()
        data = _encode_all(records)
        # Everything queued or written for this journal is in the snapshot.
        queued = (self._queue, self._waiting)
        self._queue, self._waiting = [], []
        unsynced = self._take_unsynced()
        fds = [(j._file.fileno(), j._fsync) for j in before if j._file is not None]
        self._files.run(self._replace_file, data, fds).addBoth(
            lambda result: self._compaction_over(
                len(records), result.value if isinstance(result, Failure) else None, queued, unsynced, fds
            )
        )

    def _replace_file(self, data, earlier_fds):
        """In a file-system thread: put C{data} in the journal's place, durably."""
        self._write_temporary(data)
        for fd, really in earlier_fds:
            if really:
                os.fsync(fd)
        os.replace(self.path + ".tmp", self.path)
        if self._fsync:
            fsync_directory(os.path.dirname(self.path) or ".")

    def _compaction_over(self, count, error, queued, unsynced, fds):
        done, self._compaction = self._compaction, None
        if error is None:
            self.close()  # the old file; the next append opens the new one
            self.lines = count
            self.flushes += 1
            self._written += unsynced[2] + queued[1]
            self.failing = False
        else:
            self.log.warn(
                "Cannot compact {path} now: {error}",
                path=self.path, error=getattr(error, "strerror", None) or str(error),
            )
            if queued is not None:
                self._restore_unsynced(unsynced)
                self._queue[:0] = queued[0]
                self._waiting[:0] = queued[1]
        if self._group is not None:
            self._group._fire()
            self._group.schedule()
        else:
            self._fire()
            if self._queue:
                self._schedule()
        done.callback(error is None)

    def _write_temporary(self, data):
        tmp = self.path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if self._fsync:
                    os.fsync(f.fileno())
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def stop(self):
        """
        Flush what is queued (fsync included, at once) and close the file,
        after the compaction under way if there is one.

        @return: a Deferred that fires when that is done.
        """
        if self._compaction is not None:
            waiting = Deferred()
            self._compaction.addBoth(lambda _: self.stop().chainDeferred(waiting))
            return waiting
        self._stop_now()
        return succeed(None)

    def _stop_now(self):
        try:
            if self._group is not None:
                self._group.sync_now()
            else:
                self.flush()
        finally:
            if self._flush_call is not None and self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
            self.close()


class CommitGroup:
    """
    Journals that commit together: one flush per reactor turn writes each
    member's queued records in the order the members were added, and only
    then tells anyone their records are durable.

    The agent puts its outbox first and its task registry second.  A state
    change appends to both in the same turn, and the outbox is written
    first, so after the agent process dies (the page cache keeps every
    write) the task registry is never ahead of the outbox: a state it
    records is always among the outbox's messages (sent, or to be sent),
    and a state in the outbox that the registry missed is carried forward
    at the next start.  After the machine itself goes down, the writes not
    yet fsynced may survive in any combination; nothing was reported
    durable (nor sent) for them, and a terminal state the registry kept
    without its message is sent at the next start (see
    L{everest_agent.manager.TaskManager}).  If a member's write fails (disk
    full), the members after it wait too, and the whole group tries again
    later, in the same order.
    """

    def __init__(self, reactor, retry_delay=Journal.retry_delay, sync_in_thread=None):
        """
        @param sync_in_thread: None to fsync in the reactor thread, or a
            callable taking a function and returning a Deferred of its
            result run in another thread (the agent passes
            C{deferToThreadPool} with a pool of one thread).
        """
        self._reactor = reactor
        self.retry_delay = retry_delay
        self.journals = []
        self._call = None
        self._sync_in_thread = sync_in_thread
        self._in_flight = None  # [(journal, taken)] of the fsync running in the other thread
        self._quiet = []  # what waits for no fsync to be in flight (compactions)
        self._generation = 0  # bumped when sync_now overtakes an fsync in flight

    def add(self, journal):
        journal._group = self
        self.journals.append(journal)
        return journal

    def schedule(self, delay=0):
        if self._call is None:
            self._call = self._reactor.callLater(delay, self.flush)

    def write_ahead(self):
        """Write every member's queue now, in order, without fsync."""
        self._write_all(sync=False)

    def flush(self):
        self._cancel_call()
        threaded = self._sync_in_thread is not None
        if not self._write_all(sync=not threaded):
            return
        if threaded and self._in_flight is None:
            self._start_sync()
        self._fire()

    def _write_all(self, sync):
        """
        Write each member's queue in order (and fsync, if C{sync}); on a
        failure the members after it wait too, and all try again later.
        """
        for journal in self.journals:
            if journal._compaction is not None:
                return False  # the rest waits for the compaction, which flushes again
            if not journal._write_queued(sync=sync):
                self.schedule(self.retry_delay)
                return False
        return True

    def when_quiet(self, f):
        """Call C{f} once no fsync is in flight (now, if none is)."""
        if self._in_flight is None:
            f()
        else:
            self._quiet.append(f)

    def _run_quiet(self):
        quiet, self._quiet = self._quiet, []
        for f in quiet:
            f()

    def _cancel_call(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fire(self):
        for journal in self.journals:
            journal._fire()

    def _start_sync(self):
        batch = [(j, j._take_unsynced()) for j in self.journals if j._unsynced_lines]
        if not batch:
            return
        self._in_flight = batch
        generation = self._generation
        fds = [(j._file.fileno(), j._fsync) for j, _ in batch]

        def fsync_all():
            for fd, really in fds:
                if really:
                    os.fsync(fd)

        self._sync_in_thread(fsync_all).addBoth(self._sync_done, batch, generation)

    def _sync_done(self, result, batch, generation):
        if generation != self._generation:
            return  # sync_now did it (and this thread's fsync may have hit a closed file)
        self._in_flight = None
        if isinstance(result, Failure):
            error = result.value if isinstance(result.value, OSError) else OSError(str(result.value))
            for journal, taken in batch:
                journal._sync_failed(taken, error)
            self.schedule(self.retry_delay)
            self._run_quiet()
            return
        for journal, taken in batch:
            journal._synced(taken)
        self._fire()
        self._run_quiet()
        if any(j._unsynced_lines or j._queue for j in self.journals):
            self.schedule()

    def sync_now(self):
        """
        Write and fsync everything, in this thread, now (before a compaction
        and when the agent stops), overtaking an fsync in flight.

        @return: False if a write or an fsync failed (all stays queued).
        """
        self._cancel_call()
        batch, self._in_flight = self._in_flight or [], None
        self._generation += 1
        for journal, taken in batch:
            journal._restore_unsynced(taken)
        self._run_quiet()
        if not self._write_all(sync=True):
            return False
        self._fire()
        return True
