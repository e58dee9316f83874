#!/usr/bin/env bash
# A real two-node SLURM cluster (with accounting and typed GPUs) on this one machine, for development and CI.
#
#   local-cluster.sh install   apt-get install slurm-wlm slurmdbd munge mariadb-server (if missing)
#   local-cluster.sh start     start munge, MariaDB, slurmdbd, slurmctld, one slurmd per node; wait for the nodes
#   local-cluster.sh stop      stop all of them (slurmd, slurmctld, slurmdbd, MariaDB, munge)
#   local-cluster.sh restart   stop, then start
#   local-cluster.sh status    print each daemon's state; exit 1 unless the cluster is usable
#
# Two SLURM nodes on this host, so that heterogeneous jobs (which need their components on different
# nodes under the backfill scheduler) run for real: node "<host>" in the default partition "local"
# with two fake GPUs of type "typea", node "<host>2" in partition "local2" with two of type "typeb".
# Each slurmd has its own port, spool, pid and log file (%n). The fake GPUs are null-device files
# (/dev/llmpq-fakegpuN, `mknod c 1 3`): SLURM 22.05 drops typed GPUs without device files. Both nodes
# declare all of this host's CPUs and 95% of its memory, so jobs on both nodes at once share them.
# Accounting through slurmdbd + MariaDB (the Snakemake SLURM plugin polls `sacct`; GRES types and job
# comments are recorded), cluster "llmpq" and account "llmpq" registered with sacctmgr.
# Daemons are started directly (no systemd needed), config under /etc/slurm, state under
# /var/spool, logs under /var/log. Everything is idempotent: `start` twice is fine.
# install/start/stop/restart need root; status does not.
set -euo pipefail

CLUSTER_NAME="llmpq"
PARTITION="local"     # node 1, default partition, GPU type typea
PARTITION2="local2"   # node 2, GPU type typeb
GPU_TYPE="typea"
GPU_TYPE2="typeb"
GPUS_PER_NODE=2
SLURMD_PORT=6818
SLURMD_PORT2=6820
ACCOUNT="llmpq"
START_TIMEOUT="${LLMPQ_SLURM_START_TIMEOUT:-90}"   # seconds to wait for each daemon / the node

SLURM_CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
GRES_CONF=/etc/slurm/gres.conf
FAKE_GPU_PREFIX=/dev/llmpq-fakegpu
SLURM_LOG_DIR=/var/log/slurm
SLURM_RUN_DIR=/run/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID="$SLURM_RUN_DIR/slurmctld.pid"
OLD_SLURMD_PID="$SLURM_RUN_DIR/slurmd.pid"   # the single-node layout of earlier versions
DBD_PID="$SLURM_RUN_DIR/slurmdbd.pid"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
MYSQL_LOG_DIR=/var/log/mysql
MYSQL_ERR_LOG="$MYSQL_LOG_DIR/error.log"
DB_NAME=slurm_acct_db
DB_USER=slurm
MARKER="# Managed by llmpq profiles/slurm/local-cluster.sh; edits are overwritten by 'start'."
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)

PROG="local-cluster"
log() { printf '[%s] %s\n' "$PROG" "$*"; }
die() { printf '[%s] ERROR: %s\n' "$PROG" "$*" >&2; exit 1; }

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

require_root() {
    [[ $(id -u) -eq 0 ]] || die "'$1' must run as root (SLURM, munge and MariaDB daemons need root). Try: sudo $0 $1"
}

node_name() { hostname -s; }
node_names() { printf '%s\n' "$(node_name)" "$(node_name)2"; }
slurmd_pid_file() { printf '%s/slurmd-%s.pid' "$SLURM_RUN_DIR" "$1"; }

# Print the pid in pidfile $1 if that process is alive and its command name is $2.
pid_of() {
    local file=$1 comm=$2 pid
    [[ -r $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid ]] || return 1
    # /proc rather than `kill -0`, which fails for another user's process (status as non-root)
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    echo "$pid"
}

# wait_for SECONDS COMMAND...: poll COMMAND every 0.5 s until it succeeds.
wait_for() {
    local secs=$1 i
    shift
    for ((i = 0; i < secs * 2; i++)); do
        "$@" && return 0
        sleep 0.5
    done
    return 1
}

# stop_pidfile NAME PIDFILE COMM: SIGTERM, wait up to 30 s, then SIGKILL.
stop_pidfile() {
    local name=$1 file=$2 comm=$3 pid
    if ! pid=$(pid_of "$file" "$comm"); then
        log "$name: not running"
        return 0
    fi
    log "$name: stopping (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_for 30 not_alive "$pid"; then
        log "$name: still alive after 30 s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_for 10 not_alive "$pid" || die "$name (pid $pid) does not exit"
    fi
    rm -f "$file"
}
not_alive() { ! kill -0 "$1" 2>/dev/null; }

have() { command -v "$1" >/dev/null 2>&1; }
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# ---------------------------------------------------------------- health checks (no root needed)
munge_ok() { have munge && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
# `mysqladmin ping` exits 0 when the server answers, even with "access denied" (non-root callers).
mariadb_ok() { have mysqladmin && mysqladmin --connect-timeout=2 ping >/dev/null 2>&1; }
slurmdbd_ok() {
    pid_of "$DBD_PID" slurmdbd >/dev/null &&
        timeout 10 sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1
}
slurmctld_ok() { have scontrol && timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }
slurmd_ok() { # [NODE]: that node's slurmd, or every node's
    local n
    for n in ${1:-$(node_names)}; do
        pid_of "$(slurmd_pid_file "$n")" slurmd >/dev/null || return 1
    done
}
node_state() { timeout 10 sinfo -h -N -n "$1" -o '%T' 2>/dev/null | head -n1; }
node_usable() {
    case "$(node_state "$1")" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}
node_idle() { [[ $(node_state "$1") == idle ]]; }
sacct_ok() { timeout 10 sacct -n -X --starttime now-1minutes >/dev/null 2>&1; }

# ---------------------------------------------------------------- install
cmd_install() {
    require_root install
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        log "already installed: ${PACKAGES[*]}"
        return 0
    fi
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    log "installed: ${missing[*]}"
}

# ---------------------------------------------------------------- configuration
CONFIG_CHANGED=0

# write_managed PATH MODE CONTENT: write only if different; refuse to clobber foreign files.
write_managed() {
    local path=$1 mode=$2 content=$3
    if [[ -e $path ]] && ! grep -qxF "$MARKER" "$path"; then
        if [[ ${LLMPQ_SLURM_OVERWRITE:-0} != 1 ]]; then
            die "$path exists and was not written by this script; refusing to overwrite it. Move it away, or set LLMPQ_SLURM_OVERWRITE=1."
        fi
        cp -p "$path" "$path.bak.$(date +%Y%m%d%H%M%S)"
        log "$path: saved the previous file as $path.bak.*"
    fi
    if [[ -e $path ]] && [[ $(cat "$path") == "$content" ]]; then
        chmod "$mode" "$path"
        return 0
    fi
    local tmp
    tmp=$(mktemp "$path.XXXXXX")
    printf '%s\n' "$content" >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$path"
    CONFIG_CHANGED=1
    log "wrote $path"
}

db_password() {
    local pw=""
    if [[ -r $DBD_CONF ]]; then
        pw=$(sed -n 's/^StoragePass=//p' "$DBD_CONF" | head -n1)
    fi
    if [[ -z $pw ]]; then
        pw=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')
    fi
    printf '%s' "$pw"
}

# The fake GPUs: null-device files (reads give EOF, writes vanish), one per GPU of each node.
make_fake_gpus() {
    local i path
    for ((i = 0; i < 2 * GPUS_PER_NODE; i++)); do
        path="$FAKE_GPU_PREFIX$i"
        [[ -c $path || -f $path ]] && continue
        rm -f "$path"
        if ! mknod -m 0666 "$path" c 1 3 2>/dev/null; then
            # Without CAP_MKNOD (some containers): a regular file stands in. slurmd logs that it is no
            # device, but the node keeps its GRES and jobs get them (seen with SLURM 22.05).
            log "mknod $path not permitted: a regular file stands in"
            : >"$path" || die "cannot create $path"
        fi
    done
}

gpu_files() { # FIRST_INDEX: the device files of one node, in SLURM's range syntax
    printf '%s[%d-%d]' "$FAKE_GPU_PREFIX" "$1" $(($1 + GPUS_PER_NODE - 1))
}

write_configs() {
    local node node2 cpus mem_mb real_mb pw
    node=$(node_name)
    node2="${node}2"
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    real_mb=$((mem_mb * 95 / 100)) # slurmd drains a node that reports less than RealMemory
    pw=$(db_password)
    install -d -m 0755 /etc/slurm

    write_managed "$DBD_CONF" 600 "$MARKER
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$SLURM_LOG_DIR/slurmdbd.log
PidFile=$DBD_PID
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$pw
StorageLoc=$DB_NAME"

    write_managed "$SLURM_CONF" 644 "$MARKER
ClusterName=$CLUSTER_NAME
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURM_RUN_DIR/slurmd-%n.pid
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL/%n
SlurmctldLogFile=$SLURM_LOG_DIR/slurmctld.log
SlurmdLogFile=$SLURM_LOG_DIR/slurmd-%n.log
SchedulerType=sched/backfill
# Heterogeneous jobs are started by the backfill scheduler only: look every 2 s, not every 30 s.
SchedulerParameters=bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Jobs without --mem get this much per CPU (else they would take the whole node's memory).
DefMemPerCPU=1024
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu,gres/gpu:$GPU_TYPE,gres/gpu:$GPU_TYPE2
# sacct --format=Comment shows the rule and wildcards that the Snakemake plugin writes there
AccountingStoreFlags=job_comment
GresTypes=gpu
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
InactiveLimit=0
MinJobAge=300
KillWait=30
NodeName=$node NodeAddr=127.0.0.1 Port=$SLURMD_PORT CPUs=$cpus RealMemory=$real_mb Gres=gpu:$GPU_TYPE:$GPUS_PER_NODE State=UNKNOWN
NodeName=$node2 NodeAddr=127.0.0.1 Port=$SLURMD_PORT2 CPUs=$cpus RealMemory=$real_mb Gres=gpu:$GPU_TYPE2:$GPUS_PER_NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
PartitionName=$PARTITION2 Nodes=$node2 MaxTime=INFINITE State=UP"

    write_managed "$GRES_CONF" 644 "$MARKER
AutoDetect=off
NodeName=$node Name=gpu Type=$GPU_TYPE File=$(gpu_files 0)
NodeName=$node2 Name=gpu Type=$GPU_TYPE2 File=$(gpu_files "$GPUS_PER_NODE")"
}

# ---------------------------------------------------------------- start
start_munge() {
    if munge_ok; then
        log "munge: running"
        return 0
    fi
    if [[ ! -s $MUNGE_KEY ]]; then
        log "munge: creating $MUNGE_KEY"
        install -d -o munge -g munge -m 0700 /etc/munge
        (umask 077 && head -c 1024 /dev/urandom >"$MUNGE_KEY")
        chown munge:munge "$MUNGE_KEY"
        chmod 0400 "$MUNGE_KEY"
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    log "munge: starting"
    runuser -u munge -- /usr/sbin/munged --force </dev/null >/dev/null 2>&1 ||
        die "munged failed to start; see /var/log/munge/munged.log"
    wait_for "$START_TIMEOUT" munge_ok ||
        die "munge does not answer ('munge -n | unmunge' fails); see /var/log/munge/munged.log"
}

start_mariadb() {
    if mariadb_ok; then
        log "mariadb: running"
    else
        install -d -o mysql -g mysql -m 0755 /run/mysqld
        install -d -o mysql -g adm -m 2750 "$MYSQL_LOG_DIR"
        if [[ ! -d /var/lib/mysql/mysql ]]; then
            log "mariadb: initialising /var/lib/mysql"
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$MYSQL_LOG_DIR/install.log" 2>&1 ||
                die "mariadb-install-db failed; see $MYSQL_LOG_DIR/install.log"
        fi
        log "mariadb: starting"
        setsid nohup mysqld_safe --log-error="$MYSQL_ERR_LOG" </dev/null >>"$MYSQL_LOG_DIR/mysqld_safe.log" 2>&1 &
        wait_for "$START_TIMEOUT" mariadb_ok ||
            die "MariaDB does not answer after ${START_TIMEOUT}s; see $MYSQL_ERR_LOG and $MYSQL_LOG_DIR/mysqld_safe.log"
    fi
    local pw fresh=""
    pw=$(sed -n 's/^StoragePass=//p' "$DBD_CONF" | head -n1)
    if [[ ! -e $CTLD_SPOOL/job_state && ! -e $CTLD_SPOOL/job_state.old ]] && ! pid_of "$DBD_PID" slurmdbd >/dev/null; then
        # A controller without saved state numbers jobs from 1 again: start accounting afresh with it,
        # or sacct -j would find an earlier job of the same number.
        fresh="DROP DATABASE IF EXISTS $DB_NAME;"
        log "mariadb: no saved controller state: the accounting database starts empty"
    fi
    mysql --protocol=socket <<SQL || die "could not create the accounting database/user in MariaDB"
$fresh
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$pw';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$pw';
GRANT ALL PRIVILEGES ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
SQL
}

start_slurmdbd() {
    if slurmdbd_ok; then
        log "slurmdbd: running"
        return 0
    fi
    log "slurmdbd: starting"
    slurmdbd </dev/null >>"$SLURM_LOG_DIR/slurmdbd.start.log" 2>&1 ||
        die "slurmdbd failed to start; see $SLURM_LOG_DIR/slurmdbd.log and $SLURM_LOG_DIR/slurmdbd.start.log"
    wait_for "$START_TIMEOUT" slurmdbd_ok ||
        die "slurmdbd does not answer sacctmgr after ${START_TIMEOUT}s; see $SLURM_LOG_DIR/slurmdbd.log"
}

register_cluster() {
    if sacctmgr -n -P show cluster format=cluster | grep -qxF "$CLUSTER_NAME"; then
        return 0
    fi
    log "sacctmgr: adding cluster $CLUSTER_NAME"
    sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
}

register_account() {
    if ! sacctmgr -n -P show account format=account | grep -qxF "$ACCOUNT"; then
        log "sacctmgr: adding account $ACCOUNT"
        sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER_NAME" \
            Description="llmpq local cluster" Organization=llmpq >/dev/null
    fi
    local users=(root) u
    if [[ -n ${SUDO_USER:-} && ${SUDO_USER} != root ]]; then
        users+=("$SUDO_USER")
    fi
    for u in "${users[@]}"; do
        if ! sacctmgr -n -P show assoc where user="$u" account="$ACCOUNT" format=user | grep -q .; then
            log "sacctmgr: adding user $u to account $ACCOUNT"
            sacctmgr -i add user "$u" Account="$ACCOUNT" Cluster="$CLUSTER_NAME" >/dev/null
        fi
    done
}

start_slurmctld() {
    if pid_of "$CTLD_PID" slurmctld >/dev/null && slurmctld_ok; then
        log "slurmctld: running"
        return 0
    fi
    log "slurmctld: starting"
    slurmctld </dev/null >>"$SLURM_LOG_DIR/slurmctld.start.log" 2>&1 ||
        die "slurmctld failed to start; see $SLURM_LOG_DIR/slurmctld.log and $SLURM_LOG_DIR/slurmctld.start.log"
    wait_for "$START_TIMEOUT" slurmctld_ok ||
        die "slurmctld is not UP after ${START_TIMEOUT}s (scontrol ping); see $SLURM_LOG_DIR/slurmctld.log"
}

start_slurmd() { # NODE
    local node=$1
    if slurmd_ok "$node"; then
        log "slurmd $node: running"
        return 0
    fi
    install -d -m 0755 "$SLURMD_SPOOL/$node"
    log "slurmd $node: starting"
    slurmd -N "$node" </dev/null >>"$SLURM_LOG_DIR/slurmd-$node.start.log" 2>&1 ||
        die "slurmd $node failed to start; see $SLURM_LOG_DIR/slurmd-$node.log and $SLURM_LOG_DIR/slurmd-$node.start.log"
}

wait_node() { # NODE
    local node=$1 state
    if wait_for "$START_TIMEOUT" node_idle "$node"; then
        log "node $node: idle"
        return 0
    fi
    state=$(node_state "$node")
    if [[ $state == *drain* || $state == down* || $state == inval* ]]; then
        log "node $node is '$state'; trying State=RESUME once"
        scontrol update NodeName="$node" State=RESUME || true
        if wait_for 20 node_usable "$node"; then
            log "node $node: $(node_state "$node")"
            return 0
        fi
    elif node_usable "$node"; then
        log "node $node: $state (running jobs)"
        return 0
    fi
    sinfo -R >&2 || true
    die "node $node is '$(node_state "$node")', not idle, after ${START_TIMEOUT}s; see $SLURM_LOG_DIR/slurmd-$node.log and $SLURM_LOG_DIR/slurmctld.log"
}

cmd_start() {
    require_root start
    local b
    for b in munged mysqld_safe slurmdbd slurmctld slurmd sacctmgr; do
        have "$b" || [[ -x /usr/sbin/$b ]] || die "$b not found; run '$0 install' first"
    done
    install -d -m 0755 "$SLURM_LOG_DIR" "$SLURM_RUN_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
    make_fake_gpus
    write_configs
    if ((CONFIG_CHANGED)) && slurm_daemon_running; then
        # Daemons read their config at start: restart the ones that run with an older one.
        log "configuration changed: restarting the SLURM daemons"
        stop_slurm_daemons
    fi
    start_munge
    start_mariadb
    start_slurmdbd
    register_cluster
    start_slurmctld
    local n
    for n in $(node_names); do
        start_slurmd "$n"
    done
    for n in $(node_names); do
        wait_node "$n"
    done
    register_account
    log "cluster '$CLUSTER_NAME' is up: partitions '$PARTITION' (gpu:$GPU_TYPE) and '$PARTITION2' (gpu:$GPU_TYPE2), account '$ACCOUNT'"
}

# ---------------------------------------------------------------- stop
slurm_daemon_running() {
    local n
    for n in $(node_names); do
        pid_of "$(slurmd_pid_file "$n")" slurmd >/dev/null && return 0
    done
    pid_of "$OLD_SLURMD_PID" slurmd >/dev/null || pid_of "$CTLD_PID" slurmctld >/dev/null ||
        pid_of "$DBD_PID" slurmdbd >/dev/null
}

stop_slurm_daemons() {
    local n
    for n in $(node_names); do
        stop_pidfile "slurmd $n" "$(slurmd_pid_file "$n")" slurmd
    done
    stop_pidfile slurmd "$OLD_SLURMD_PID" slurmd
    stop_pidfile slurmctld "$CTLD_PID" slurmctld
    stop_pidfile slurmdbd "$DBD_PID" slurmdbd
}

stop_mariadb() {
    if ! mariadb_ok; then
        log "mariadb: not running"
        return 0
    fi
    log "mariadb: stopping"
    mysqladmin --protocol=socket shutdown || die "mysqladmin shutdown failed"
    wait_for 60 not_mariadb || die "MariaDB still answers 60 s after shutdown; see $MYSQL_ERR_LOG"
}
not_mariadb() { ! mariadb_ok; }

cmd_stop() {
    require_root stop
    stop_slurm_daemons
    stop_mariadb
    stop_pidfile munged "$MUNGE_PID" munged
    log "all daemons stopped"
}

# ---------------------------------------------------------------- status
cmd_status() {
    local ok=0 state="" ctld_up=0 dbd_up=0
    report() { # NAME UP(0|1) [DETAIL]
        if (($2)); then
            printf '  %-12s up%s\n' "$1" "${3:+ ($3)}"
        else
            printf '  %-12s DOWN%s\n' "$1" "${3:+ ($3)}"
            ok=1
        fi
    }
    echo "SLURM local cluster '$CLUSTER_NAME' on $(node_name):"
    report munge "$(munge_ok && echo 1 || echo 0)"
    report mariadb "$(mariadb_ok && echo 1 || echo 0)"
    slurmdbd_ok && dbd_up=1
    report slurmdbd "$dbd_up"
    slurmctld_ok && ctld_up=1
    report slurmctld "$ctld_up"
    local n partitions=("$PARTITION" "$PARTITION2") types=("$GPU_TYPE" "$GPU_TYPE2") i=0
    for n in $(node_names); do
        report "slurmd $n" "$(slurmd_ok "$n" && echo 1 || echo 0)"
    done
    for n in $(node_names); do
        state=""
        # sinfo and sacct retry for seconds when their daemon is down: only ask a live one.
        if ((ctld_up)); then
            state=$(node_state "$n" || true)
        fi
        case "$state" in
            idle | mixed | allocated | completing)
                report "node $n" 1 "$state, partition ${partitions[i]}, gpu:${types[i]}:$GPUS_PER_NODE" ;;
            *) report "node $n" 0 "${state:-unknown}" ;;
        esac
        i=$((i + 1))
    done
    report sacct "$( ((dbd_up)) && sacct_ok && echo 1 || echo 0)"
    if ((ok)); then
        echo "cluster is NOT usable; start it with: $0 start (logs under $SLURM_LOG_DIR)"
    else
        echo "cluster is usable"
    fi
    return "$ok"
}

main() {
    [[ $# -eq 1 ]] || usage
    case "$1" in
        install) cmd_install ;;
        start) cmd_start ;;
        stop) cmd_stop ;;
        restart)
            cmd_stop
            cmd_start
            ;;
        status) cmd_status ;;
        -h | --help | help) usage ;;
        *) usage ;;
    esac
}

main "$@"
