# shellcheck shell=bash
# Shared by postgres.sh and slurm.sh (sourced): messages, and installing Debian packages without
# letting their maintainer scripts start the daemons (the scripts start their own, in $*_BASE).

log() { echo "${0##*/}: $*" >&2; }
die() { log "$*"; exit 1; }

# apt_install PKG...: install with apt-get (once more after an update if that fails: a stale
# package list), waiting up to 10 min for a dpkg lock that another apt-get holds. A temporary
# policy-rc.d (exit 101) stops invoke-rc.d from starting the daemons being installed; it is
# removed whatever happens (a policy-rc.d that was already there is left as it is).
apt_install() {
    local policy=/usr/sbin/policy-rc.d own=0 status=0
    log "installing $* (apt-get)"
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        own=1
    fi
    _apt install "$@" || { _apt update && _apt install "$@"; } || status=$?
    if [[ $own == 1 ]]; then rm -f "$policy"; fi
    return "$status"
}

_apt() {
    local command=$1
    shift
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -y -qq \
        --no-install-recommends "$command" "$@" >/dev/null
}

# pid_alive PIDFILE: the file names a live process. A zombie does not count: in some sandboxes
# PID 1 reaps orphans minutes late, and `kill -0` succeeds on a zombie.
pid_alive() {
    local p
    [[ -s $1 ]] && p=$(cat "$1" 2>/dev/null) && [[ -n $p && -r /proc/$p/stat ]] &&
        ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$p/stat"
}

# stop_pid PIDFILE: SIGTERM, up to 10 s for it to exit, then SIGKILL.
stop_pid() {
    local p _
    pid_alive "$1" || return 0
    p=$(cat "$1")
    kill "$p" 2>/dev/null || true
    for _ in $(seq 100); do
        pid_alive "$1" || return 0
        sleep 0.1
    done
    kill -9 "$p" 2>/dev/null || true
}
