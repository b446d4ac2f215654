"""
The job script that runs one task, and the file it leaves behind.

A batch handler submits L{job_script}'s text (written by L{write_job_script}
to C{.everest/job.sh} in the task directory); the script

 1. C{cd}s to the task directory,
 2. notes that it started (C{.everest/started}) and removes an exit-code
    file a previous attempt of the same job may have left (a requeued job
    runs the script again),
 3. runs the command with C{/bin/sh -c} in a subshell that holds the task's
    environment, standard input from C{/dev/null}, standard output and
    error to the files C{stdout} and C{stderr},
 4. and as its last act writes the command's exit status to
    C{.everest/exitcode} with L{exit_code_writer}, the one writer of a
    status in that file (the local handler's wrapper uses it too).

The local handler's wrapper (also inside pilots) has no C{started} file:
it writes L{STARTED_MARK} into C{.everest/exitcode} before its command
begins (L{started_writer}), and L{read_exit_status} tells a command that
began from one that never did.

So the exit status comes from the job itself, not from the scheduler's
accounting, and L{read_exit_code} finds it even when the scheduler has long
forgotten the job.  A job killed before its command ended (time limit,
cancel, node failure) leaves no exit-code file.

Every value is quoted with L{shlex.quote}: a command or environment value
holding quotes, C{$}, backticks, backslashes or newlines reaches the task
unchanged.
"""

import os
import re
import shlex

from everest_agent import paths

#: Directory (inside the task directory) for the agent's own files.
STATE_DIR = ".everest"
#: The job script, relative to the task directory.
SCRIPT_FILE = os.path.join(STATE_DIR, "job.sh")
#: Where the scheduler is told to put the script's own output (its errors,
#: e.g. when the task directory is missing on the compute node).
JOB_OUTPUT_FILE = os.path.join(STATE_DIR, "job.out")
#: Written by the script when it starts.
STARTED_FILE = os.path.join(STATE_DIR, "started")
#: Holds the command's exit status, written by the script as its last act.
EXIT_CODE_FILE = os.path.join(STATE_DIR, "exitcode")
#: What the local wrapper writes into L{EXIT_CODE_FILE} just before its
#: command begins (L{started_writer}).
STARTED_MARK = "started"



#: The size of a written exit-code file: the status right-aligned in 11
#: columns, then a newline (L{exit_code_writer}).
EXIT_CODE_SIZE = 12


def exit_code_writer(variable):
    """
    The shell command that records an exit status: the one writer of
    L{EXIT_CODE_FILE}, used by the job script and by the local handler's
    wrapper (and so inside pilots).

    It is a shell built-in (C{printf}: nothing can fail to start between a
    command's end and its status reaching the file) that writes the number
    and a newline in one C{write}.  The file is complete once the newline is
    in it: L{read_exit_code} takes a file without one (just created, not yet
    written) for no file at all, so no reader ever acts on half of it, with
    no temporary file and no C{mv} process per task.

    Every status is written at the same width (L{EXIT_CODE_SIZE} bytes) into
    the file opened without truncation (C{1<>}), so the file of a task
    directory used again, whose newline was taken back
    (L{everest_agent.spares.empty_exit_code}), is written over in place:
    no truncation, no new file, and nothing of the earlier status left.

    @param variable: the name of the shell variable holding the status.
    """
    return f"printf '%11d\\n' \"${variable}\" 1<>{EXIT_CODE_FILE}"


def started_writer():
    """
    The shell command with which the local wrapper notes, in the task
    directory, that its command is about to begin: L{STARTED_MARK} written
    over the start of L{EXIT_CODE_FILE} in place, with no newline, so it is
    never read as a status (L{read_exit_code}) and the status is later
    written over it (L{exit_code_writer}).  A shell built-in and one
    C{write}, like the status.

    It tells a restarted agent that found no wrapper and no status whether
    the command ever began (L{read_exit_status}): the agent can be killed
    after it readied the directory and before its spawn, and the task is
    then started, not taken for lost.
    """
    return f"printf '%{EXIT_CODE_SIZE - 1}s' {STARTED_MARK} 1<>{EXIT_CODE_FILE}"


#: The script's exit status when it cannot enter the task directory.
CD_FAILED = 90

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def job_script(request, shell="/bin/sh"):
    """
    The text of the script that runs C{request}.

    @param request: a L{everest_agent.interfaces.JobRequest}.
    @param shell: the shell that runs the command (C{shell -c command}).
    @raise ValueError: if an environment variable's name is empty or holds
        C{=}, or a name, a value or the command holds a NUL character.
    """
    q = shlex.quote
    for what, text in [("command", request.command), ("directory", request.directory)]:
        if "\0" in text:
            raise ValueError(f"the task's {what} holds a NUL character")
    lines = [
        "#!/bin/sh",
        f"# everest-agent job for task {_SAFE.sub('?', request.task_id)}; generated, do not edit.",
        f"cd {q(request.directory)} || exit {CD_FAILED}",
        f"rm -f {q(EXIT_CODE_FILE)} {q(EXIT_CODE_FILE + '.tmp')}",
        f": >{q(STARTED_FILE)}",
        "rm -f stdout stderr",
    ]
    # The task's variables are set in a subshell, so that a task setting
    # PATH or IFS cannot change how the rest of the script runs.
    lines.append("(")
    odd = []  # names a shell cannot assign to; env(1) passes them on
    for name, value in sorted(request.environment.items()):
        name, value = str(name), str(value)
        if not name or "=" in name or "\0" in name:
            raise ValueError(f"environment variable name {name!r} is not valid")
        if "\0" in value:
            raise ValueError(f"environment variable {name} holds a NUL character")
        if _NAME.match(name):
            lines.append(f"{name}={q(value)}; export {name}")
        else:
            odd.append(q(f"{name}={value}"))
    run = f"{q(shell)} -c {q(request.command)}"
    if odd:
        run = "env -- " + " ".join(odd) + " " + run
    lines += [
        f"exec {run}",
        # (rm first: a link an earlier run of the task id left is not followed)
        ") </dev/null >stdout 2>stderr",
        "everest_status=$?",
        exit_code_writer("everest_status"),
        'exit "$everest_status"',
        "",
    ]
    return "\n".join(lines)


def write_job_script(request, shell="/bin/sh"):
    """
    Write L{job_script} to C{.everest/job.sh} in the task directory (which
    must exist), executable, and remove what an earlier run left there
    (exit-code file, started marker, job output).

    @return: the script's absolute path.
    """
    text = job_script(request, shell)
    from everest_agent.spares import open_state_dir  # (spares needs this module's names)

    root = paths.open_task_dir_nofollow(request.directory)
    try:
        state = open_state_dir(root)
    finally:
        os.close(root)
    try:
        for stale in (EXIT_CODE_FILE, STARTED_FILE, JOB_OUTPUT_FILE):
            try:
                os.unlink(os.path.basename(stale), dir_fd=state)
            except FileNotFoundError:
                pass
        name = os.path.basename(SCRIPT_FILE)
        fd = paths.open_file(state, name + ".tmp", os.O_WRONLY | os.O_CREAT, 0o755, follow=False)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            os.fchmod(f.fileno(), 0o755)
        paths.replace_file(state, name + ".tmp", name)
    finally:
        os.close(state)
    return os.path.join(request.directory, SCRIPT_FILE)


def read_exit_code(directory):
    """
    The exit status the job script recorded in C{directory}.

    @return: an C{int}, or None if there is no complete exit-code file (the
        command has not ended, was killed before it ended, or its status is
        being written: a file without its final newline, see
        L{exit_code_writer}).
    @raise ValueError: if the file holds something else than a number, or
        is not a regular file (a link there was planted: it is not followed).
    """
    return read_exit_status(directory)[0]


def read_exit_status(directory):
    """
    L{read_exit_code}, and whether the local wrapper's command began there
    (L{started_writer}; always true with a status).

    @return: C{(exit code or None, began)}.
    @raise ValueError: as L{read_exit_code}.
    """
    try:
        root = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        try:
            fd = paths.open_file(root, EXIT_CODE_FILE, follow=False)
        finally:
            os.close(root)
    except (FileNotFoundError, NotADirectoryError):
        return None, False
    except paths.PathEscape as e:
        raise ValueError(str(e)) from None
    with os.fdopen(fd, "rb") as f:
        text = f.read(100).decode("utf-8", "replace")
    if not text.endswith("\n"):
        # Created and not written yet, emptied for a start, or only marked.
        return None, text.strip() == STARTED_MARK
    text = text.strip()
    if not re.fullmatch(r"-?[0-9]{1,10}", text):
        raise ValueError(f"{EXIT_CODE_FILE} holds {text!r}, not an exit status")
    return int(text), True


def exit_code_or_reason(directory):
    """
    L{read_exit_code}, its failure turned into words: C{(exit code or None,
    why the file is unreadable or None)}, for a handler settling an ended
    job (blocking: run in the file-system threads).
    """
    code, _, unreadable = exit_status_or_reason(directory)
    return code, unreadable


def exit_status_or_reason(directory):
    """
    L{read_exit_status}, its failure turned into words: C{(exit code or
    None, began, why the file is unreadable or None)}; an unreadable file
    counts as begun (something wrote there: the task is not run again).
    """
    try:
        code, began = read_exit_status(directory)
    except ValueError as e:
        return None, True, str(e)
    except OSError as e:
        return None, True, f"cannot read {EXIT_CODE_FILE}: {e.strerror or e}"
    return code, began, None


def job_started(directory):
    """True if the job script has started in C{directory} (its marker exists)."""
    return os.path.exists(os.path.join(directory, STARTED_FILE))
