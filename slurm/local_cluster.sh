#!/usr/bin/env bash
# Brings up (or stops) a real single-node Slurm cluster on this machine, for tests and for
# trying the sbatch templates without a cluster.
#
#   slurm/local_cluster.sh start     # install if missing, start daemons, wait until idle
#   slurm/local_cluster.sh status    # daemons and node state; exit 0 only when usable
#   slurm/local_cluster.sh stop      # stop the daemons started from this state dir
#   slurm/local_cluster.sh env       # print the export line only
#
# Then: export SLURM_CONF=<state dir>/slurm.conf (start prints it).
#
# Environment knobs:
#   PBM_SLURM_DIR        state dir (default ${TMPDIR:-/tmp}/pbm-slurm-$UID)
#   PBM_SLURM_CPUS       CPUs the node declares (default 8: lets 4- and 8-rank jobs schedule on
#                        a 2-core machine; Slurm is told to trust the config, not the hardware)
#   PBM_SLURM_CTLD_PORT  slurmctld port (default 6817), PBM_SLURM_SLURMD_PORT (default 6818)
#   PBM_SLURM_NO_INSTALL=1  never run apt-get; fail with the command to run instead
#
# No systemd and no munge: Debian's Slurm 22.05 accepts AuthType=auth/none with
# CredType=cred/none, and the daemons run in the background as root. This is a test cluster:
# auth/none means any local user can act as any other, so never expose its ports.
set -euo pipefail
# The slurm.conf settings this cluster shares with two_node_cluster.sh.
source "$(dirname "${BASH_SOURCE[0]}")/container_conf.sh"

STATE_DIR="${PBM_SLURM_DIR:-${TMPDIR:-/tmp}/pbm-slurm-$(id -u)}"
CONF="$STATE_DIR/slurm.conf"
CPUS="${PBM_SLURM_CPUS:-8}"
CTLD_PORT="${PBM_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${PBM_SLURM_SLURMD_PORT:-6818}"
WAIT_S="${PBM_SLURM_WAIT_S:-30}"
APT_PACKAGES="slurmctld slurmd slurm-client munge"
# Daemons live in sbin, which a non-login root shell may not have on PATH.
export PATH="$PATH:/usr/sbin:/sbin"

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

have_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v sinfo >/dev/null
}

ensure_installed() {
    have_slurm && return 0
    local install="apt-get install -y --no-install-recommends $APT_PACKAGES"
    if [[ "${PBM_SLURM_NO_INSTALL:-0}" == 1 ]] || ! command -v apt-get >/dev/null; then
        die "Slurm is not installed (need slurmctld, slurmd, sbatch, sinfo). Install it with:
    sudo apt-get update && sudo $install"
    fi
    if [[ "$(id -u)" != 0 ]]; then
        die "Slurm is not installed and installing needs root. Run:
    sudo apt-get update && sudo $install"
    fi
    echo "local_cluster.sh: installing Slurm: $install" >&2
    # policy-rc.d may refuse to start the packaged services; that is expected and harmless.
    DEBIAN_FRONTEND=noninteractive $install >"$STATE_DIR/apt.log" 2>&1 \
        || { DEBIAN_FRONTEND=noninteractive apt-get update >>"$STATE_DIR/apt.log" 2>&1 \
             && DEBIAN_FRONTEND=noninteractive $install >>"$STATE_DIR/apt.log" 2>&1; } \
        || die "installing Slurm failed; see $STATE_DIR/apt.log (command: $install)"
    have_slurm || die "apt-get succeeded but slurmctld/slurmd/sbatch are still missing; see $STATE_DIR/apt.log"
}

real_memory_mb() {
    # Declared memory only matters for jobs that ask for --mem; use what the machine has.
    awk '/MemTotal/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo
}

write_conf() {
    mkdir -p "$STATE_DIR/state" "$STATE_DIR/spool"
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh; regenerated on every start.
ClusterName=pbm-local
$(slurm_first_job_id)
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# A requeued job waits cred_expire seconds before it may start again (default 120); 5 s keeps
# preempt-and-requeue tests short while leaving step launches (milliseconds here) ample time.
AuthInfo=cred_expire=${PBM_SLURM_CRED_EXPIRE_S:-5}
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
$(slurm_container_settings pmi2 "${PBM_SLURM_MIN_JOB_AGE_S:-4}")
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$(real_memory_mb) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

pid_alive() {  # pid_alive FILE NAME: the pid in FILE is running and is NAME
    local file="$1" name="$2" pid
    [[ -s "$file" ]] || return 1
    pid="$(cat "$file")"
    [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 1
    [[ "$(cat "/proc/$pid/comm")" == "$name" ]]
}

node_state() {
    SLURM_CONF="$CONF" timeout 10 sinfo -h -n localhost -o %T 2>/dev/null | head -n1 || true
}

print_env() { echo "export SLURM_CONF=$CONF"; }

start() {
    mkdir -p "$STATE_DIR"
    ensure_installed
    local started=0 t0=$SECONDS
    if ! pid_alive "$STATE_DIR/slurmctld.pid" slurmctld; then
        write_conf
        # -c: forget jobs of an earlier session so stale ones never hold the CPUs.
        SLURM_CONF="$CONF" slurmctld -c -f "$CONF" \
            || die "slurmctld failed to start; see $STATE_DIR/slurmctld.log"
        started=1
    fi
    if ! pid_alive "$STATE_DIR/slurmd.pid" slurmd; then
        [[ -f "$CONF" ]] || write_conf
        SLURM_CONF="$CONF" slurmd -N localhost -f "$CONF" \
            || die "slurmd failed to start; see $STATE_DIR/slurmd.log"
        started=1
    fi
    # Wait (bounded) until the node takes jobs; resume it if it came up DOWN or DRAINED.
    local state="" resumed=0
    while (( SECONDS - t0 < WAIT_S )); do
        state="$(node_state)"
        case "$state" in
            idle*|mixed*|allocated*|completing*) break ;;
            down*|drain*|fail*)
                if (( ! resumed )); then
                    SLURM_CONF="$CONF" scontrol update nodename=localhost state=resume || true
                    resumed=1
                fi ;;
        esac
        sleep 0.2
    done
    case "$state" in
        idle*|mixed*|allocated*|completing*) ;;
        *) die "node 'localhost' is '${state:-unknown}' after ${WAIT_S} s, not idle.
    Logs: $STATE_DIR/slurmctld.log $STATE_DIR/slurmd.log
    A port already in use (another Slurm on $CTLD_PORT/$SLURMD_PORT)? Set PBM_SLURM_CTLD_PORT/PBM_SLURM_SLURMD_PORT." ;;
    esac
    if (( started )); then
        echo "local_cluster.sh: Slurm up in $((SECONDS - t0)) s (node localhost: $state, CPUs=$CPUS, state dir $STATE_DIR)" >&2
    else
        echo "local_cluster.sh: already running (node localhost: $state)" >&2
    fi
    print_env
}

stop() {
    local name pid stopped=0
    for name in slurmd slurmctld; do
        if pid_alive "$STATE_DIR/$name.pid" "$name"; then
            pid="$(cat "$STATE_DIR/$name.pid")"
            kill -TERM "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
            stopped=1
        fi
        rm -f "$STATE_DIR/$name.pid"
    done
    if (( stopped )); then echo "local_cluster.sh: stopped" >&2; else echo "local_cluster.sh: not running" >&2; fi
}

status() {
    local ok=0 name
    for name in slurmctld slurmd; do
        if pid_alive "$STATE_DIR/$name.pid" "$name"; then
            echo "$name: running (pid $(cat "$STATE_DIR/$name.pid"))"
        else
            echo "$name: not running"; ok=1
        fi
    done
    if (( ok == 0 )); then
        local state; state="$(node_state)"
        echo "node localhost: ${state:-unknown}"
        case "$state" in idle*|mixed*|allocated*|completing*) ;; *) ok=1 ;; esac
    fi
    print_env
    return $ok
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) print_env ;;
    *) echo "usage: $0 {start|stop|status|env}" >&2; exit 2 ;;
esac
