#!/usr/bin/env bash
# A one-node SLURM cluster on this machine for the tests (.ci/run): Debian's slurm-wlm (slurmctld
# and slurmd, run as root) with munge, no cgroups (proctrack/linuxproc, task/none), and
# accounting through slurmdbd on a private MariaDB. Accounting is not optional: submitit learns
# that a job ended without a result (scancel) only from `sacct`, which fails without slurmdbd,
# so a cancelled job would never be done for it. Needs root; one such cluster per machine (fixed
# ports 6817-6819, /etc/slurm/*.conf, /run/munge).
#
#   slurm.sh start    install the packages if missing, write /etc/slurm/slurm.conf and
#                     slurmdbd.conf, start munged, MariaDB, slurmdbd, slurmctld and slurmd, wait
#                     until the node is idle (idempotent: a running cluster is left as it is)
#   slurm.sh status   sinfo; exit 0 when the node is up
#   slurm.sh stop     cancel every job, stop the daemons (idempotent); the state stays
#   slurm.sh destroy  stop and remove $SLURM_BASE
#
# Environment (all optional):
#   SLURM_BASE      state, spool, logs, pid files, MariaDB's data; default /tmp/ci-slurm
#   SLURM_KILLWAIT  seconds from scancel's SIGTERM to its SIGKILL; default 5 (SLURM's own: 30)
#   SLURM_DB_PORT   MariaDB's port on 127.0.0.1; default 3307
set -euo pipefail
# shellcheck source=scripts/ci/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SLURM_BASE=${SLURM_BASE:-/tmp/ci-slurm}
KILLWAIT=${SLURM_KILLWAIT:-5}
DB_PORT=${SLURM_DB_PORT:-3307}
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
DB_RUN=$SLURM_BASE/mysql-run
MUNGE_PID=/run/munge/munged.pid
NODE=$(hostname -s)

install_cluster() {
    local command
    for command in slurmctld slurmd slurmdbd sbatch munged mariadbd; do
        if ! command -v "$command" >/dev/null && [[ ! -x /usr/sbin/$command ]]; then
            apt_install slurm-wlm munge slurmdbd mariadb-server ||
                die "apt-get could not install slurm-wlm munge slurmdbd mariadb-server"
            return
        fi
    done
}

munge_works() { munge -n </dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if pid_alive "$MUNGE_PID" && munge_works; then return 0; fi
    if [[ ! -s /etc/munge/munge.key ]]; then  # the package's postinst normally makes it
        install -d -o munge -g munge -m 0700 /etc/munge
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    local _
    for _ in $(seq 50); do
        if munge_works; then return 0; fi
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

write_slurm_conf() {
    local spec memory topology
    # slurmd looks its own node name up
    getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >>/etc/hosts
    spec=$(slurmd -C | head -n1)  # NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105
    memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$spec")
    # the topology slurmd detects, so that it does not "reconfigure socket/core boundaries"
    topology=$(grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$spec" || true)
    mkdir -p /etc/slurm "$SLURM_BASE"/{ctld,d,log}
    # CR_CPU: CPUs are the consumable. With CR_CPU_Memory and no DefMemPerCPU, a job without
    # --mem would take the node's whole memory and jobs would run one at a time.
    cat >"$CONF.new" <<EOF
# written by scripts/ci/slurm.sh: a one-node test cluster, no cgroups
ClusterName=ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SLURM_BASE/ctld
SlurmdSpoolDir=$SLURM_BASE/d
SlurmctldPidFile=$SLURM_BASE/slurmctld.pid
SlurmdPidFile=$SLURM_BASE/slurmd.pid
SlurmctldLogFile=$SLURM_BASE/log/slurmctld.log
SlurmdLogFile=$SLURM_BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=defer_batch=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$SLURM_BASE/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=$KILLWAIT
MinJobAge=300
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) $topology RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.new" "$CONF"
}

mariadb_sql() { mariadb --no-defaults --socket="$DB_RUN/mysqld.sock" "$@"; }

start_mariadb() {  # slurmdbd's database: a private server, data in $SLURM_BASE, 127.0.0.1 only
    if pid_alive "$DB_RUN/mysqld.pid" && mariadb_sql -e 'SELECT 1' >/dev/null 2>&1; then return 0; fi
    install -d -o mysql -g mysql -m 0755 "$DB_RUN"
    if [[ ! -d $SLURM_BASE/mysql/mysql ]]; then
        rm -rf "$SLURM_BASE/mysql"
        install -d -o mysql -g mysql -m 0750 "$SLURM_BASE/mysql"
        mariadb-install-db --no-defaults --user=mysql --datadir="$SLURM_BASE/mysql" \
            --auth-root-authentication-method=socket --skip-test-db >"$DB_RUN/install.log" 2>&1 ||
            { tail -n 20 "$DB_RUN/install.log" >&2; die "mariadb-install-db failed"; }
    fi
    (cd / && exec /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$SLURM_BASE/mysql" \
        --socket="$DB_RUN/mysqld.sock" --pid-file="$DB_RUN/mysqld.pid" \
        --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
        --log-error="$DB_RUN/mariadb.log" --innodb-buffer-pool-size=256M \
        --innodb-lock-wait-timeout=900 --innodb-flush-log-at-trx-commit=2 \
        </dev/null >"$DB_RUN/stdout" 2>&1 &)
    local _
    for _ in $(seq 300); do
        if mariadb_sql -e 'SELECT 1' >/dev/null 2>&1; then break; fi
        sleep 0.1
    done
    mariadb_sql -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" ||
        die "MariaDB did not start: $(tail -n 5 "$DB_RUN/mariadb.log")"
}

start_slurmdbd() {
    start_mariadb
    cat >"$DBD_CONF" <<EOF
# written by scripts/ci/slurm.sh
AuthType=auth/munge
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$SLURM_BASE/log/slurmdbd.log
PidFile=$SLURM_BASE/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 0600 "$DBD_CONF"  # slurmdbd refuses a readable one
    pid_alive "$SLURM_BASE/slurmdbd.pid" || slurmdbd ||
        die "slurmdbd failed: $(tail -n 5 "$SLURM_BASE/log/slurmdbd.log")"
    local _
    for _ in $(seq 300); do
        if sacctmgr -n -P list cluster >/dev/null 2>&1; then break; fi
        sleep 0.1
    done
    sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx ci ||
        sacctmgr -i -Q add cluster ci >/dev/null || die "sacctmgr could not add cluster ci"
}

node_state() { sinfo -h -N -o '%t' 2>/dev/null | head -n1; }

node_up() { [[ $(node_state) =~ ^(idle|mix|alloc) ]]; }

start() {
    install_cluster
    start_munge
    if pid_alive "$SLURM_BASE/slurmctld.pid" && pid_alive "$SLURM_BASE/slurmd.pid" && node_up; then
        return 0
    fi
    write_slurm_conf
    start_slurmdbd
    pid_alive "$SLURM_BASE/slurmctld.pid" || slurmctld ||
        die "slurmctld failed: $(tail -n 5 "$SLURM_BASE/log/slurmctld.log")"
    pid_alive "$SLURM_BASE/slurmd.pid" || slurmd ||
        die "slurmd failed: $(tail -n 5 "$SLURM_BASE/log/slurmd.log")"
    local i state=
    for i in $(seq 300); do
        state=$(node_state)
        case $state in
            idle | mix | alloc) log "node $NODE $state after $((i / 10)) s"; return 0 ;;
            down* | drain* | drng*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.1
    done
    sinfo -N -l >&2 || true
    tail -n 20 "$SLURM_BASE/log/slurmctld.log" "$SLURM_BASE/log/slurmd.log" >&2 || true
    die "node $NODE not up after 30 s (state: ${state:-none})"
}

stop() {
    if command -v scancel >/dev/null && pid_alive "$SLURM_BASE/slurmctld.pid"; then
        # a job's slurmstepd outlives slurmd: cancel every job and wait for them to go
        local jobs _
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086  # one word per job id
            scancel $jobs 2>/dev/null || true
            for _ in $(seq $(((KILLWAIT + 10) * 10))); do
                if [[ -z $(squeue -h -o %i 2>/dev/null) ]] && ! pgrep -x -r D,R,S,T slurmstepd >/dev/null; then
                    break
                fi
                sleep 0.1
            done
        fi
    fi
    stop_pid "$SLURM_BASE/slurmd.pid"
    stop_pid "$SLURM_BASE/slurmctld.pid"
    stop_pid "$SLURM_BASE/slurmdbd.pid"
    stop_pid "$DB_RUN/mysqld.pid"
    stop_pid "$MUNGE_PID"
}

case ${1:-} in
    start) start ;;
    status) sinfo -N -l && node_up ;;
    stop) stop ;;
    destroy) stop; rm -rf "$SLURM_BASE" ;;
    *) echo "usage: ${0##*/} start | status | stop | destroy" >&2; exit 2 ;;
esac
