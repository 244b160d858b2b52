#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by slurm/start-cluster.sh.
#
# Facts from /work/shared/notes/slurm.md ("the notes"): stopping slurmd leaves
# running jobs alive, so cancel every job first; then SIGTERM exactly the PIDs
# that start-cluster.sh recorded, checking that each still runs the expected
# binary (slurmd/slurmctld are symlinks to *-wlm binaries: compare resolved paths),
# so that a recycled PID is never signalled. Idempotent: with nothing running it
# just returns. Packages, configuration, DB and logs are kept, so the next start
# is quick (~2 s).
#
# Environment: KDBENCH_SLURM_DIR (default /tmp/kdbench-slurm), as for start-cluster.sh.
set -euo pipefail

STATE=${KDBENCH_SLURM_DIR:-/tmp/kdbench-slurm}
PIDS=$STATE/pids   # written by start-cluster.sh, one file per daemon
export SLURM_CONF=$STATE/etc/slurm.conf
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "[stop-cluster] $*" >&2; }

# PID recorded for NAME if that process is alive and runs the expected binary.
live_pid() {
    local name=$1 bin pid
    [[ -r $PIDS/$name.pid ]] || return 1
    pid=$(<"$PIDS/$name.pid")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    case $name in
        munged) bin=/usr/sbin/munged ;;
        *) command -v "$name" >/dev/null || return 1; bin=$(readlink -f "$(command -v "$name")") ;;
    esac
    [[ $(readlink -f "/proc/$pid/exe" 2>/dev/null) == "$bin" ]] || return 1
    echo "$pid"
}

# True while PID exists and is not a zombie (PID 1 in a container may not reap
# the orphaned daemons promptly, and kill -0 succeeds on a zombie).
alive() {
    local st
    st=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z && $st != X ]]
}

# 1. Cancel all jobs while slurmctld and slurmd still run, and wait (bounded) for
#    them to leave the queue, so no job processes outlive the cluster.
if live_pid slurmctld >/dev/null && timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u || true)
    if [[ -n $jobs ]]; then
        log "cancelling jobs: $(echo $jobs)"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        # Steps get SIGTERM now and SIGKILL after KillWait (30 s default).
        for _ in $(seq 1 200); do
            [[ -z $(timeout 5 squeue -h -o %A 2>/dev/null || true) ]] && break
            sleep 0.2
        done
        left=$(timeout 5 squeue -h -o '%A %T' 2>/dev/null || true)
        [[ -z $left ]] || log "WARNING: jobs still listed after 40 s: $(echo $left)"
    fi
fi

# 2. Stop the daemons in reverse start order, each by its recorded PID.
stopped=()
for name in slurmd slurmctld slurmdbd mariadbd munged; do
    if pid=$(live_pid "$name"); then
        kill -TERM "$pid" 2>/dev/null || true
        # Wait up to 30 s (MariaDB flushes InnoDB on shutdown), then SIGKILL that PID.
        for _ in $(seq 1 150); do
            alive "$pid" || break
            sleep 0.2
        done
        if alive "$pid"; then
            log "WARNING: $name (pid $pid) ignored SIGTERM for 30 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
        stopped+=("$name")
    fi
    rm -f "$PIDS/$name.pid"
done

if ((${#stopped[@]})); then
    echo "SLURM cluster stopped ($(elapsed) s): ${stopped[*]}"
else
    echo "SLURM cluster not running"
fi
