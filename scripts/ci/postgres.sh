#!/usr/bin/env bash
# A throw-away PostgreSQL server for the tests (.ci/run): Debian's postgresql, a cluster made by
# initdb in $PG_BASE, run as the `postgres` user, listening on 127.0.0.1 only. Needs root.
#
#   postgres.sh start          install postgresql if missing, initdb and start (idempotent); prints
#                              the URL of role $PG_USER (LOGIN CREATEDB) on database $PG_DB
#   postgres.sh url [DB]       the URL of database DB (default $PG_DB)
#   postgres.sh newdb NAME     drop (if it exists) and create database NAME; prints its URL
#   postgres.sh status         exit 0 when the server runs
#   postgres.sh stop           fast shutdown (idempotent); the data directory stays
#   postgres.sh destroy        stop and remove $PG_BASE
#
# Environment (all optional):
#   PG_BASE      state directory (data/, run/ socket, log, port, password); default /tmp/ci-postgres.
#                `postgres` must be able to reach it: not below a 0700 directory (mktemp -d makes one)
#   PG_PORT      TCP port; default: a free one, picked at the first start and kept in $PG_BASE/port
#   PG_USER PG_DB  role and its database; default ci, ci
#   PG_PASSWORD  the role's password; default: random, made at the first start, kept in $PG_BASE
#   PG_DURABLE=1 keep fsync, synchronous_commit and full_page_writes on (default off: a test server)
#
# URLs use psycopg 3 (postgresql+psycopg://), the driver gradalign installs.
set -euo pipefail
# shellcheck source=scripts/ci/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PG_BASE=${PG_BASE:-/tmp/ci-postgres}
PG_USER=${PG_USER:-ci}
PG_DB=${PG_DB:-ci}
DATA=$PG_BASE/data
SOCK=$PG_BASE/run

as_postgres() { runuser -u postgres -- "$@"; }

bindir() {  # the newest installed server's bin/, or nothing
    local dir
    dir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin 2>/dev/null | sort -V | tail -n1)
    if [[ -n $dir && -x $dir/initdb ]]; then echo "$dir"; fi
}

install_server() {
    if [[ -n $(bindir) ]] && getent passwd postgres >/dev/null; then return 0; fi
    # Debian's postinst would create and start a cluster 'main' on port 5432: not wanted here.
    mkdir -p /etc/postgresql-common
    [[ -e /etc/postgresql-common/createcluster.conf ]] ||
        echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.conf
    apt_install postgresql || die "apt-get could not install postgresql"
    [[ -n $(bindir) ]] || die "postgresql is installed but has no initdb"
}

running() {
    [[ -s $DATA/postmaster.pid && -n $(bindir) ]] &&
        as_postgres "$(bindir)/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

port() { cat "$PG_BASE/port"; }

password() {
    if [[ -n ${PG_PASSWORD:-} ]]; then echo "$PG_PASSWORD"; else cat "$PG_BASE/password"; fi
}

url() { echo "postgresql+psycopg://$PG_USER:$(password)@127.0.0.1:$(port)/${1:-$PG_DB}"; }

admin_psql() {  # as the superuser, over the private socket (peer authentication)
    as_postgres env PGOPTIONS=--client-min-messages=warning \
        psql -X -q -v ON_ERROR_STOP=1 -h "$SOCK" -p "$(port)" -U postgres -d postgres "$@"
}

start() {
    install_server
    if running; then url; return 0; fi
    local bin
    bin=$(bindir)
    mkdir -p "$PG_BASE"
    chown postgres:postgres "$PG_BASE"
    chmod 0755 "$PG_BASE"
    as_postgres test -w "$PG_BASE" || die "user postgres cannot write $PG_BASE (is a directory above it 0700?)"
    if [[ -n ${PG_PORT:-} ]]; then echo "$PG_PORT" >"$PG_BASE/port"; fi
    if [[ ! -s $PG_BASE/port ]]; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
            >"$PG_BASE/port"
    fi
    if [[ -z ${PG_PASSWORD:-} && ! -s $PG_BASE/password ]]; then
        (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(12))' >"$PG_BASE/password")
    fi
    install -d -o postgres -g postgres -m 0700 "$SOCK"
    if [[ ! -s $DATA/PG_VERSION ]]; then
        rm -rf "$DATA"
        as_postgres "$bin/initdb" -D "$DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
            --auth-local=peer --auth-host=scram-sha-256 --no-sync >"$PG_BASE/initdb.log" 2>&1 ||
            { cat "$PG_BASE/initdb.log" >&2; die "initdb failed"; }
        {
            echo "listen_addresses = '127.0.0.1'"
            echo "unix_socket_directories = '$SOCK'"
            echo "max_connections = 200"
            if [[ ${PG_DURABLE:-0} != 1 ]]; then
                echo "fsync = off"
                echo "synchronous_commit = off"
                echo "full_page_writes = off"
            fi
        } >>"$DATA/postgresql.conf"
    fi
    # the port on the command line, so that a kept data directory follows $PG_BASE/port
    as_postgres "$bin/pg_ctl" -D "$DATA" -l "$PG_BASE/postgres.log" -o "-p $(port)" -w -t 60 start \
        >/dev/null || { tail -n 20 "$PG_BASE/postgres.log" >&2; die "pg_ctl start failed"; }
    admin_psql -v user="$PG_USER" -v password="$(password)" <<'SQL'
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user') AS absent \gset
\if :absent
CREATE ROLE :"user" LOGIN CREATEDB;
\endif
ALTER ROLE :"user" LOGIN CREATEDB PASSWORD :'password';
SQL
    if [[ -z $(admin_psql -tA -v db="$PG_DB" <<<"SELECT 1 FROM pg_database WHERE datname = :'db'") ]]; then
        admin_psql -v db="$PG_DB" -v user="$PG_USER" <<<'CREATE DATABASE :"db" OWNER :"user"'
    fi
    url
}

newdb() {
    local name=${1:?usage: postgres.sh newdb NAME}
    running || die "the server is not running (postgres.sh start)"
    admin_psql -v db="$name" <<<'DROP DATABASE IF EXISTS :"db" WITH (FORCE)'
    admin_psql -v db="$name" -v user="$PG_USER" <<<'CREATE DATABASE :"db" OWNER :"user"'
    url "$name"
}

stop() {
    if running; then as_postgres "$(bindir)/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null; fi
}

case ${1:-} in
    start) start ;;
    url) [[ -s $PG_BASE/port ]] || die "no server in $PG_BASE (postgres.sh start)"; url "${2:-}" ;;
    newdb) newdb "${2:-}" ;;
    status) running ;;
    stop) stop ;;
    destroy) stop; rm -rf "$PG_BASE" ;;
    *) echo "usage: ${0##*/} start | url [DB] | newdb NAME | status | stop | destroy" >&2; exit 2 ;;
esac
