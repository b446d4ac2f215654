#!/bin/bash
# .ci/setup-slurm.sh - bring up a one-node SLURM on this machine for the
# integration tests (tests/test_slurm.py, tests/test_pbs.py).
#
# For Debian 12 (SLURM 22.05), run as root, no systemd needed.  Safe to run
# again: packages are installed only when missing, daemons are started only
# when not running, and slurm.conf is rewritten (and re-read) only when its
# contents change.  Everything listens on 127.0.0.1 only.
#
# Environment (all optional):
#   SLURM_MIN_JOB_AGE    seconds a finished job stays visible to squeue (300)
#   SLURM_OVERSUBSCRIBE  jobs per core (8)
#   SLURM_WITH_TORQUE    1 = also install slurm-wlm-torque, the PBS-style
#                        qsub/qstat/qdel wrappers over SLURM (default 1)
#   SLURM_READY_TIMEOUT  seconds to wait for the node to come up (60)
#
# Prints one line "slurm ready: ..." on success; on failure a line starting
# with "setup-slurm: " on stderr and a non-zero exit status.
set -euo pipefail

min_job_age=${SLURM_MIN_JOB_AGE:-300}
oversubscribe=${SLURM_OVERSUBSCRIBE:-8}
with_torque=${SLURM_WITH_TORQUE:-1}
ready_timeout=${SLURM_READY_TIMEOUT:-60}
conf_dir=/etc/slurm
conf=$conf_dir/slurm.conf
log_dir=/var/log/slurm

die() { echo "setup-slurm: $*" >&2; exit 1; }
millis() { date +%s%3N; }
started=$(millis)

[ "$(id -u)" = 0 ] || die "must run as root"
[ -r /etc/debian_version ] || echo "setup-slurm: warning: not Debian; package names may differ" >&2

# --- 1. packages -----------------------------------------------------------
wanted=()
command -v slurmctld >/dev/null || wanted+=(slurmctld)
command -v slurmd >/dev/null || wanted+=(slurmd)
command -v sbatch >/dev/null || wanted+=(slurm-client)
command -v munged >/dev/null || wanted+=(munge)
if [ "$with_torque" = 1 ] && ! [ -e /usr/bin/qstat ]; then
    wanted+=(slurm-wlm-torque)
fi
if [ ${#wanted[@]} -gt 0 ]; then
    # Keep the packages' init scripts from starting daemons on their own.
    own_policy=no
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=yes
    fi
    trap '[ "$own_policy" = yes ] && rm -f /usr/sbin/policy-rc.d' EXIT
    echo "setup-slurm: installing ${wanted[*]}" >&2
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${wanted[@]}" >/dev/null || die "apt-get install ${wanted[*]} failed"
    [ "$own_policy" = yes ] && rm -f /usr/sbin/policy-rc.d
    trap - EXIT
fi
for tool in slurmctld slurmd sbatch squeue scontrol munged; do
    command -v $tool >/dev/null || die "$tool is still missing after installing packages"
done

# --- 2. munge (authentication between the SLURM commands and daemons) -----
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key || die "cannot create the munge key"
fi
chown munge:munge /etc/munge/munge.key
chmod 600 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    # --force: start even if a dead munged left its socket behind.
    runuser -u munge -- /usr/sbin/munged --force || die "munged did not start"
    munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munged runs but does not answer"
fi

# --- 3. configuration -------------------------------------------------------
install -d /var/spool/slurmctld /var/spool/slurmd "$log_dir" "$conf_dir"
# "slurmd -C" prints this machine's node line (CPUs, cores, RealMemory).
node_line=$(slurmd -C | head -n 1)
case "$node_line" in NodeName=*) ;; *) die "unexpected 'slurmd -C' output: $node_line" ;; esac
node=${node_line#NodeName=}
node=${node%% *}
new_conf=$(mktemp "$conf_dir/.slurm.conf.XXXXXX")
cat > "$new_conf" <<CONF
# Written by everest-agent's .ci/setup-slurm.sh; changes are overwritten.
ClusterName=everestci
SlurmctldHost=localhost(127.0.0.1)
# Bind to the configured addresses (127.0.0.1), not to every interface.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
# Start batch jobs at once rather than after a few seconds.
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=$min_job_age
# Short grace between SIGTERM and SIGKILL at a time limit or scancel.
KillWait=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$log_dir/slurmctld.log
SlurmdLogFile=$log_dir/slurmd.log
# No slurmdbd, so plain sacct is disabled; "sacct --completion" reads this file.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$log_dir/jobcomp.log
$node_line NodeAddr=127.0.0.1 NodeHostname=$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:$oversubscribe
CONF
chmod 644 "$new_conf"
conf_changed=no
if cmp -s "$new_conf" "$conf"; then
    rm -f "$new_conf"
else
    mv -f "$new_conf" "$conf"
    conf_changed=yes
fi

# --- 4. daemons (both fork and write their pid files) -----------------------
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() {    # stop PIDFILE: SIGTERM (slurmctld saves its state), wait up to 10 s
    local pid
    running "$1" || return 0
    pid=$(cat "$1")
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    die "$(basename "$1" .pid) (pid $pid) did not stop after SIGTERM"
}
if [ "$conf_changed" = yes ] && { running /run/slurmctld.pid || running /run/slurmd.pid; }; then
    # A reconfigure would not rebind the daemons' ports; restart them.
    echo "setup-slurm: slurm.conf changed; restarting the daemons" >&2
    stop /run/slurmd.pid
    stop /run/slurmctld.pid
fi
daemons_at=$(millis)
if ! running /run/slurmctld.pid; then
    slurmctld || die "slurmctld did not start; see $log_dir/slurmctld.log"
fi
if ! running /run/slurmd.pid; then
    slurmd || die "slurmd did not start; see $log_dir/slurmd.log"
fi

# --- 5. wait until the node takes jobs --------------------------------------
state=
deadline=$(( $(millis) + ready_timeout * 1000 ))
while [ "$(millis)" -lt "$deadline" ]; do
    state=$(sinfo -h -N -n "$node" -o '%T' 2>/dev/null || true)
    case "$state" in
        idle|mixed|allocated)
            now=$(millis)
            torque=no
            [ -x /usr/bin/qsub ] && torque=yes
            echo "slurm ready: node $node $state, partition debug, torque wrappers $torque;" \
                 "$((now - daemons_at)) ms after daemon start, $((now - started)) ms in all"
            exit 0 ;;
        down*|drain*|fail*)
            # An unclean stop can leave the node down; bring it back.
            scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.25
done
die "node $node not ready after ${ready_timeout} s (state: '${state:-unknown}'); see $log_dir/*.log"
