#!/bin/bash
# .ci/setup-sge.sh - bring up a one-node Grid Engine (Son of Grid Engine 8.1.9,
# Debian 12) on this machine for the integration tests (tests/test_sge.py),
# beside the SLURM that .ci/setup-slurm.sh starts.
#
# Run as root; no systemd needed.  Safe to run again: each step is skipped
# when already done and daemons are started only when not running.
#
# Debian's gridengine-client and SLURM's TORQUE-style wrappers
# (slurm-wlm-torque) both ship /usr/bin/qsub, qstat and qdel, so letting dpkg
# install gridengine would remove the wrappers the PBS tests use.  Instead the
# gridengine .debs are downloaded and unpacked with dpkg-deb -x; everything
# except their /usr/bin is copied into place (none of it clashes with SLURM),
# and the client commands get their own directory, $SGE_BIN (default
# /opt/gridengine/bin), which the agent's [handler] command_dir names.
#
# Environment (all optional):
#   SGE_BIN            directory for qsub, qstat, qdel, qacct, qconf, ... (/opt/gridengine/bin)
#   SGE_SLOTS          job slots on this host (8; more than the cores on purpose)
#   SGE_PE             name of the parallel environment for multi-core jobs (smp)
#   SGE_READY_TIMEOUT  seconds to wait for the execution host (60)
#
# Prints one line "sge ready: ..." on success; on failure a line starting with
# "setup-sge: " on stderr and a non-zero exit status.
# Stop with .ci/stop-sge.sh.
set -euo pipefail

sge_bin=${SGE_BIN:-/opt/gridengine/bin}
slots=${SGE_SLOTS:-8}
pe=${SGE_PE:-smp}
ready_timeout=${SGE_READY_TIMEOUT:-60}
export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
common=$SGE_ROOT/$SGE_CELL/common
spool=/var/spool/gridengine
host=$(hostname)
export PATH="$sge_bin:$PATH"

die() { echo "setup-sge: $*" >&2; exit 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
millis() { date +%s%3N; }
started=$(millis)

[ "$(id -u)" = 0 ] || die "must run as root"

# --- 1. files, without dpkg owning them ----------------------------------------
if [ ! -x /usr/lib/gridengine/sge_qmaster ] || [ ! -x "$sge_bin/qsub" ]; then
    libs=(libjemalloc2 libdb5.3 libhwloc15 libmunge2 libtirpc3 libssl3 libpam0g tcsh procps)
    missing=()
    for p in "${libs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    apt-get update -qq || die "apt-get update failed"
    if [ ${#missing[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
    fi
    (cd "$work" && apt-get download -qq gridengine-common gridengine-client \
        gridengine-master gridengine-exec 2>/dev/null) || die "apt-get download gridengine failed"
    mkdir "$work/root"
    for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
    # Never /usr/bin (qsub, qstat, qdel: SLURM's wrappers live there), never
    # /etc/init.d (nothing here is started by init).
    cp -a "$work/root/usr/lib/gridengine" /usr/lib/
    cp -a "$work/root/usr/share/gridengine" /usr/share/
    for f in "$work"/root/usr/sbin/*; do cp -a "$f" /usr/sbin/; done
    mkdir -p "$SGE_ROOT"
    cp -a "$work/root/var/lib/gridengine/." "$SGE_ROOT/"
    # The client commands: the packages' wrapper, which sets SGE_ROOT and
    # SGE_CELL and runs /usr/lib/gridengine/<its own name>.
    mkdir -p "$sge_bin"
    for f in "$work"/root/usr/bin/q*; do
        ln -sfn /usr/share/gridengine/gridengine-wrapper "$sge_bin/$(basename "$f")"
    done
    rm -rf "$work"; trap - EXIT
fi
[ -r /etc/default/gridengine ] || \
    sed "s@^SGE_CELL=.*@SGE_CELL=$SGE_CELL@" /usr/share/gridengine/templates/gridengine.default \
        > /etc/default/gridengine

# --- 2. the admin user and a fresh cell ----------------------------------------
id sgeadmin >/dev/null 2>&1 || adduser --system --no-create-home --quiet --disabled-password \
    --disabled-login --shell /bin/false --group --home "$SGE_ROOT" sgeadmin
for d in "$SGE_ROOT" "$SGE_ROOT/$SGE_CELL" "$common" "$spool" "$spool/qmaster" \
         "$spool/qmaster/job_scripts" "$spool/spooldb" "$spool/execd" /var/run/gridengine; do
    install -d -m 755 -o sgeadmin -g sgeadmin "$d"
done
[ -e "$common/bootstrap" ] || install -m 644 -o sgeadmin -g sgeadmin \
    /usr/share/gridengine/default-bootstrap "$common/bootstrap"
if [ ! -e "$spool/spooldb/sge" ]; then
    su -s /bin/sh -c "/usr/share/gridengine/scripts/init_cluster $SGE_ROOT $SGE_CELL $spool/spooldb sgeadmin" \
        sgeadmin >/dev/null || die "init_cluster failed"
fi
# The daemons insist that the name a client claims equals the reverse lookup
# of its address; 127.0.0.1 resolves back to "localhost", so alias the two.
echo "$host localhost" > "$common/host_aliases"
echo "$host" > "$common/act_qmaster"
chown sgeadmin:sgeadmin "$common/host_aliases" "$common/act_qmaster"

# --- 3. master daemon (forks, then runs as sgeadmin) ---------------------------
alive "$spool/qmaster/qmaster.pid" || /usr/sbin/sge_qmaster || die "sge_qmaster did not start"
for _ in $(seq 1 120); do qstat >/dev/null 2>&1 && break; sleep 0.5; done
qstat >/dev/null 2>&1 || die "qmaster does not answer"

# --- 4. cluster configuration ---------------------------------------------------
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Root may submit (min_uid 1000 by default).  qconf -Mconf wants the file
# named after the configuration it replaces: "global".
qconf -sconf global | sed -e 's/^min_uid .*/min_uid 0/' -e 's/^min_gid .*/min_gid 0/' \
    -e 's/flush_time=[0-9:]*/flush_time=00:00:01/' > "$tmp/global"
qconf -Mconf "$tmp/global" >/dev/null 2>&1 || true
# Schedule every second instead of every 15 s.
qconf -ssconf | sed -e 's/^schedule_interval .*/schedule_interval 0:0:1/' \
    -e 's/^flush_submit_sec .*/flush_submit_sec 1/' \
    -e 's/^flush_finish_sec .*/flush_finish_sec 1/' > "$tmp/sched"
qconf -Msconf "$tmp/sched" >/dev/null 2>&1 || true
qconf -ss 2>/dev/null | grep -qx "$host" || qconf -as "$host" >/dev/null 2>&1
if ! qconf -sel 2>/dev/null | grep -qx "$host"; then
    printf '%s\n' "hostname $host" "load_scaling NONE" "complex_values NONE" "user_lists NONE" \
        "xuser_lists NONE" "projects NONE" "xprojects NONE" "usage_scaling NONE" \
        "report_variables NONE" > "$tmp/exechost"
    qconf -Ae "$tmp/exechost" >/dev/null 2>&1
fi
# A parallel environment whose slots all sit on one host: "-pe smp N" is how
# a job asks for N cores.
if ! qconf -spl 2>/dev/null | grep -qx "$pe"; then
    printf '%s\n' "pe_name $pe" "slots 9999" "user_lists NONE" "xuser_lists NONE" \
        "start_proc_args NONE" "stop_proc_args NONE" 'allocation_rule $pe_slots' \
        "control_slaves FALSE" "job_is_first_task TRUE" "urgency_slots min" \
        "accounting_summary FALSE" "qsort_args NONE" > "$tmp/pe"
    qconf -Ap "$tmp/pe" >/dev/null 2>&1
fi
# The queue: this host, $slots slots, the PE above, no load alarms (a busy
# two-core machine would otherwise put it in alarm state).
if ! qconf -sql 2>/dev/null | grep -qx all.q; then
    qconf -sq 2>/dev/null | sed -e "s/^qname .*/qname all.q/" -e "s/^hostlist .*/hostlist $host/" \
        -e "s/^slots .*/slots $slots/" -e "s/^pe_list .*/pe_list $pe/" \
        -e "s/^load_thresholds .*/load_thresholds NONE/" > "$tmp/queue"
    qconf -Aq "$tmp/queue" >/dev/null 2>&1
fi
rm -rf "$tmp"; trap - EXIT

# --- 5. execution daemon; wait until the queue instance reports load ----------
pidfile=$(ls "$spool"/execd/*/execd.pid 2>/dev/null | head -n1 || true)
if [ -z "$pidfile" ] || ! alive "$pidfile"; then
    /usr/sbin/sge_execd || die "sge_execd did not start"
fi
deadline=$(( $(date +%s) + ready_timeout ))
while [ "$(date +%s)" -lt "$deadline" ]; do
    if qstat -f 2>/dev/null | grep -q "^all.q@$host .* lx-amd64 *\$"; then
        echo "sge ready: host $host, $slots slots, pe $pe, commands in $sge_bin," \
             "$(( $(millis) - started )) ms"
        exit 0
    fi
    sleep 0.5
done
qstat -f >&2 || true
die "execution host $host not ready after ${ready_timeout}s"
