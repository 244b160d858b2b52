#!/usr/bin/env bash
# Start a real single-node SLURM cluster on localhost, for kdbench's tests and CI.
#
# Facts this script relies on are in /work/shared/notes/slurm.md ("the notes").
# In short: Debian's slurm-wlm runs as plain root background processes without
# systemd or cgroups; submitit needs accounting (slurmdbd + MariaDB), because
# without `sacct` a job killed before writing its result makes job.result() hang.
#
# Idempotent: a daemon whose recorded PID is still alive is not started again, and
# when everything is up the script returns after a few quick checks.
#
# Environment:
#   KDBENCH_SLURM_DIR   private state directory (config, logs, PIDs, spool, DB)
#                       default /tmp/kdbench-slurm
#   KDBENCH_SLURM_CPUS  CPUs the node advertises (default 4; over-subscribed on
#                       purpose so that ~4 small test tasks run at once)
#
# Client tools (sbatch, sacct, squeue, submitit) find the configuration through
# /etc/slurm/slurm.conf, which this script writes as a copy of the private one.
set -euo pipefail

STATE=${KDBENCH_SLURM_DIR:-/tmp/kdbench-slurm}
NCPUS=${KDBENCH_SLURM_CPUS:-4}
CLUSTER=kdbench
HOST=$(hostname -s)          # slurmd finds its NodeName from `hostname -s`
ETC=$STATE/etc LOG=$STATE/log RUN=$STATE/run SPOOL=$STATE/spool DBDIR=$STATE/mysql
DB_PORT=3306                 # the ports are SLURM's/MariaDB's defaults: one cluster per machine
DB_SOCKET=$RUN/mysqld.sock
# PIDs this script launched (what stop-cluster.sh signals); the daemons' own
# pid files are $RUN/*.daemon.pid.
PIDS=$STATE/pids
# Daemons read the private config; client tools get the copy in /etc/slurm.
export SLURM_CONF=$ETC/slurm.conf

T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "[start-cluster] $*" >&2; }

# ---------------------------------------------------------------- helpers

# Print the last lines of a daemon's logs, then exit non-zero.
die() {
    local msg=$1; shift
    log "ERROR: $msg"
    local f
    for f in "$@"; do
        [[ -s $f ]] || continue
        echo "----- tail of $f -----" >&2
        tail -n 25 "$f" >&2
    done
    exit 1
}

# Resolved path of the binary NAME (slurmd/slurmctld are symlinks to *-wlm, notes).
binpath() { readlink -f "$(command -v "$1")"; }

# True when the PID recorded in $PIDS/NAME.pid is alive and runs BINARY.
is_running() {
    local name=$1 bin=$2 pid
    [[ -r $PIDS/$name.pid ]] || return 1
    pid=$(<"$PIDS/$name.pid")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ $(readlink -f "/proc/$pid/exe" 2>/dev/null) == "$bin" ]]
}

# Start "$@" as a plain background process in its own session and record its PID.
# The subshell first closes every inherited fd above 2 (else a CI pipe can stay
# open, notes) and redirects 0/1/2, then execs setsid. setsid does not fork here
# (the subshell is not a process-group leader), so $! is the daemon's own PID.
launch() {
    local name=$1; shift
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            if (( fd > 2 )); then eval "exec ${fd}>&-"; fi
        done
        exec setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1
    ) &
    echo $! >"$PIDS/$name.pid"
}

# True while PID exists and is not a zombie (PID 1 here may not reap orphans
# promptly, and kill -0 succeeds on a zombie).
alive() {
    local st
    st=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z && $st != X ]]
}

# wait_until NAME TIMEOUT CMD...: poll CMD every 0.2 s until it succeeds; fail
# early if the recorded process died, or after TIMEOUT seconds.
wait_until() {
    local name=$1 timeout=$2; shift 2
    local deadline=$(( $(date +%s) + timeout )) pid
    pid=$(<"$PIDS/$name.pid")
    until "$@" >/dev/null 2>&1; do
        if ! alive "$pid"; then
            die "$name (pid $pid) exited during start-up" "$LOG/$name.out" "$LOG/$name.log"
        fi
        if (( $(date +%s) >= deadline )); then
            die "$name not ready after ${timeout}s" "$LOG/$name.out" "$LOG/$name.log"
        fi
        sleep 0.2
    done
}

# ---------------------------------------------------------------- readiness checks

munge_ok()   { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
mariadb_ok() { mariadb --no-defaults --socket="$DB_SOCKET" -uroot -e 'select 1'; }
dbd_ok()     { timeout 5 sacctmgr -n show cluster; }
ctld_ok()    { timeout 5 scontrol ping | grep -q 'is UP'; }
node_field() { timeout 5 scontrol show node "$HOST" 2>/dev/null | grep -o "$1=[^ ]*" | head -n1 | cut -d= -f2-; }
# The node counts as ready when sinfo shows it usable (idle, or running jobs).
# (`sinfo -o %T` prints e.g. idle, mixed, allocated, completing, drained, down.)
node_usable() {
    local st
    st=$(timeout 5 sinfo -h -n "$HOST" -o %T 2>/dev/null) || return 1
    [[ $st =~ ^(idle|mixed|allocated|completing)$ ]]
}
# On a restart slurmctld reports the node idle before slurmd re-registers (notes):
# also require a SlurmdStartTime no older than our launch. A node that slurmctld
# drains or marks invalid (e.g. a config mismatch) also ends the wait, so that the
# check after it fails at once with the reason instead of after the timeout.
slurmd_registered() {
    [[ $(node_field State) =~ DRAIN|INVAL|FAIL ]] && return 0
    node_usable || return 1
    local t
    t=$(node_field SlurmdStartTime)
    [[ -n $t && $t != None && ! $t < $SLURMD_LAUNCHED ]]
}

# ---------------------------------------------------------------- fast path

MUNGED=/usr/sbin/munged
if command -v slurmd >/dev/null && command -v mariadbd >/dev/null && [[ -x $MUNGED ]] \
    && is_running slurmd "$(binpath slurmd)" && is_running slurmctld "$(binpath slurmctld)" \
    && is_running slurmdbd "$(binpath slurmdbd)" && is_running mariadbd "$(binpath mariadbd)" \
    && munge_ok && ctld_ok && node_usable; then
    echo "SLURM cluster up ($(elapsed) s, was already running); state and logs in $STATE"
    exit 0
fi

# ---------------------------------------------------------------- packages

mkdir -p "$ETC" "$LOG" "$RUN" "$PIDS" "$SPOOL/ctld" "$SPOOL/d"
chmod 700 "$STATE"

PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server-core mariadb-client-core)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    # A policy-rc.d that exits 101 keeps the maintainer scripts from starting
    # services (notes); keep any existing one and put it back afterwards.
    POLICY=/usr/sbin/policy-rc.d
    POLICY_ORIG=$(mktemp)
    if [[ -e $POLICY ]]; then cp -p "$POLICY" "$POLICY_ORIG"; else rm -f "$POLICY_ORIG"; fi
    restore_policy() {
        if [[ -e $POLICY_ORIG ]]; then mv -f "$POLICY_ORIG" "$POLICY"; else rm -f "$POLICY"; fi
    }
    trap restore_policy EXIT
    printf '#!/bin/sh\n# written by kdbench slurm/start-cluster.sh during apt-get install\nexit 101\n' >"$POLICY"
    chmod 755 "$POLICY"
    # Other apt users may hold the lock (notes): wait for it rather than fail.
    APT=(apt-get -o DPkg::Lock::Timeout=600 -y -q)
    export DEBIAN_FRONTEND=noninteractive
    if ! "${APT[@]}" install --no-install-recommends "${missing[@]}" >"$LOG/apt.log" 2>&1; then
        log "install failed; running apt-get update and retrying"
        "${APT[@]}" update >>"$LOG/apt.log" 2>&1 \
            || die "apt-get update failed" "$LOG/apt.log"
        "${APT[@]}" install --no-install-recommends "${missing[@]}" >>"$LOG/apt.log" 2>&1 \
            || die "apt-get install failed" "$LOG/apt.log"
    fi
    restore_policy
    trap - EXIT
fi

# ---------------------------------------------------------------- configuration

mkdir -p /etc/slurm

# One password for the private DB, made once and kept with the state.
if [[ ! -s $ETC/dbpass ]]; then
    (umask 077; od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$ETC/dbpass")
fi
DB_PASS=$(<"$ETC/dbpass")

# The node advertises NCPUS CPUs (more than this machine has, so that several small
# test tasks run at once; cgroups are unavailable anyway, so nothing is pinned).
# Sockets*Cores*Threads must equal CPUs. SlurmdParameters=config_overrides makes
# slurmd report these configured values instead of the hardware's, otherwise
# slurmctld would drain the node ("Low socket*core*thread count").
# DefMemPerCPU=1024: without it a job with no memory request takes the whole node
# and jobs run one at a time (notes); RealMemory leaves 1 GB per CPU.
REALMEM=$(( NCPUS * 1024 ))
write_if_changed() {  # write stdin to FILE only when the content differs
    local f=$1 tmp
    tmp=$(mktemp "$f.XXXX")
    cat >"$tmp"
    if cmp -s "$tmp" "$f"; then rm -f "$tmp"; else mv -f "$tmp" "$f"; fi
}
write_if_changed "$ETC/slurm.conf" <<EOF
# Generated by kdbench slurm/start-cluster.sh; state in $STATE
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# The default cred_expire (120 s) delays the restart of a requeued job (notes).
AuthInfo=cred_expire=10
# No systemd/cgroups here: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
# Accounting through slurmdbd: submitit reads job states with sacct (notes).
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
# A cancelled step gets SIGTERM, which submitit's task ignores (it checkpoints on USR2), then
# SIGKILL after KillWait: 5 s instead of 30, so a scancel in the tests ends the task promptly
# rather than letting a short run finish during the wait.
KillWait=5
# Short scheduler intervals so tests do not wait for the default cycles.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$NCPUS ThreadsPerCore=1 RealMemory=$REALMEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
# Client tools and submitit read /etc/slurm/slurm.conf unless SLURM_CONF is set (notes).
# (mktemp made the file 0600; slurm.conf must be readable by every client user.)
chmod 644 "$ETC/slurm.conf"
install -m 644 "$ETC/slurm.conf" /etc/slurm/slurm.conf.kdbench.tmp
mv -f /etc/slurm/slurm.conf.kdbench.tmp /etc/slurm/slurm.conf

# slurmdbd finds slurmdbd.conf next to $SLURM_CONF; it must be mode 600 (notes).
(umask 077; write_if_changed "$ETC/slurmdbd.conf" <<EOF
# Generated by kdbench slurm/start-cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.daemon.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
)
chmod 600 "$ETC/slurmdbd.conf" "$ETC/dbpass"

# Run on every MariaDB start: create the accounting DB and its user (idempotent).
(umask 077; cat >"$ETC/mariadb-init.sql" <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
)

# ---------------------------------------------------------------- munge

# munged is machine-wide (its socket is in /run/munge); if some munged already
# answers, use it. Otherwise run ours as user munge with setpriv, which execs
# (runuser forks and hides the PID, notes).
if ! munge_ok; then
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    launch munged setpriv --reuid=munge --regid=munge --init-groups "$MUNGED" --foreground
    wait_until munged 20 munge_ok
fi

# ---------------------------------------------------------------- MariaDB

if ! is_running mariadbd "$(binpath mariadbd)"; then
    if [[ ! -d $DBDIR/mysql ]]; then
        # One-time system tables in the private datadir (needs mariadb-client-core).
        mariadb-install-db --no-defaults --datadir="$DBDIR" --user=root \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$LOG/mariadb-install.log" 2>&1 \
            || { rm -rf "$DBDIR"; die "mariadb-install-db failed" "$LOG/mariadb-install.log"; }
    fi
    launch mariadbd mariadbd --no-defaults --user=root --datadir="$DBDIR" \
        --bind-address=127.0.0.1 --port="$DB_PORT" --socket="$DB_SOCKET" \
        --pid-file="$RUN/mariadbd.daemon.pid" --skip-name-resolve \
        --innodb-lock-wait-timeout=900 --init-file="$ETC/mariadb-init.sql"
    wait_until mariadbd 60 mariadb_ok
fi

# ---------------------------------------------------------------- slurmdbd

if ! is_running slurmdbd "$(binpath slurmdbd)"; then
    launch slurmdbd slurmdbd -D
fi
wait_until slurmdbd 60 dbd_ok
# slurmctld's accounting needs the cluster registered in the DB (notes).
if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi

# ---------------------------------------------------------------- slurmctld

if ! is_running slurmctld "$(binpath slurmctld)"; then
    # Forget the saved node state (not the job state: job IDs must keep growing,
    # or sacct would mix new jobs with old records of the same ID). The node's
    # description is all in slurm.conf, and a drain saved by an earlier run (say,
    # from a bad config) would otherwise survive every restart.
    rm -f "$SPOOL/ctld/node_state" "$SPOOL/ctld/node_state.old"
    launch slurmctld slurmctld -D
fi
wait_until slurmctld 60 ctld_ok

# ---------------------------------------------------------------- slurmd

SLURMD_LAUNCHED=0000   # compared as a string with SlurmdStartTime (ISO format)
if ! is_running slurmd "$(binpath slurmd)"; then
    SLURMD_LAUNCHED=$(date +%Y-%m-%dT%H:%M:%S)
    launch slurmd slurmd -D
fi
wait_until slurmd 60 slurmd_registered

# The node must be usable: not drained, invalid or down (config mismatch shows here).
state=$(node_field State)
if [[ $state =~ DRAIN|INVAL|DOWN|FAIL ]]; then
    die "node $HOST is $state: $(timeout 5 scontrol show node "$HOST" | grep -o 'Reason=.*')" \
        "$LOG/slurmd.log" "$LOG/slurmctld.log"
fi

echo "SLURM cluster up ($(elapsed) s): node $HOST, $NCPUS CPUs, ${REALMEM} MB; state and logs in $STATE"
