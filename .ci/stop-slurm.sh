#!/bin/bash
# .ci/stop-slurm.sh - undo .ci/setup-slurm.sh: cancel every job, wait for the
# queue to drain, then stop slurmd, slurmctld and munged by the process ids in
# their pid files (SIGTERM, SIGKILL only if one hangs for 10 s).  slurmctld
# gets time to save its state: a killed controller forgets jobs.
#
#   .ci/stop-slurm.sh          stop; job state and logs are kept
#   .ci/stop-slurm.sh --purge  also delete job state, spool and logs, so the
#                              next start numbers jobs from 1 again
#
# Stopping what is not running is not an error.
set -u

if [ "${1:-}" != "" ] && [ "$1" != "--purge" ]; then
    echo "usage: $0 [--purge]" >&2
    exit 2
fi

stop_daemon() {     # stop_daemon NAME PIDFILE
    local name=$1 pidfile=$2 pid
    if [ ! -s "$pidfile" ]; then
        echo "$name: not running"
        return 0
    fi
    pid=$(cat "$pidfile")
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "$name: not running (removed a stale pid file)"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid"
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid"
        echo "$name: did not stop within 10 s, killed (pid $pid)"
    else
        echo "$name: stopped (pid $pid)"
    fi
    rm -f "$pidfile"
}

if command -v scontrol >/dev/null && scontrol ping >/dev/null 2>&1; then
    ids=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$ids" ]; then
        # shellcheck disable=SC2086
        scancel $ids || true
        for _ in $(seq 1 60); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
        echo "jobs: canceled $(echo $ids | wc -w)"
    fi
fi

stop_daemon slurmd /run/slurmd.pid
stop_daemon slurmctld /run/slurmctld.pid
stop_daemon munged /run/munge/munged.pid

if [ "${1:-}" = "--purge" ]; then
    rm -rf /var/spool/slurmctld/* /var/spool/slurmd/* /var/log/slurm/*
    echo "removed job state, spool and logs"
fi
exit 0
