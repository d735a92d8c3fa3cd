#!/usr/bin/env bash
# A real two-node Slurm cluster on one Linux machine: two compute nodes and a head node, each
# a network namespace with its own address, hostname (UTS namespace) and daemon, joined by veth
# links to a bridge (the "switch") in the root namespace.
#
#   slurm/two_node_cluster.sh up [RATE]        # e.g. `up`, or `up 1gbit` to shape each link
#   export SLURM_CONF=<state dir>/slurm.conf   # printed by up (and by env)
#   srun -N 2 --ntasks-per-node=2 --mpi=$(pybrain-mpi info --pmi) pybrain-mpi info
#   sbatch -N 2 --ntasks-per-node=2 slurm/train.sbatch examples/dca_fmri.toml
#   slurm/two_node_cluster.sh status           # daemons, node states; exit 0 only when usable
#   slurm/two_node_cluster.sh down             # stop daemons, remove namespaces (idempotent)
#   slurm/two_node_cluster.sh env              # print the export line only
#
# Layout (SUBNET defaults to 10.215.9):
#   head   namespace ${PREFIX}c,  SUBNET.253, hostname pbm-head: slurmctld
#   node0  namespace ${PREFIX}n0, SUBNET.1,   hostname node0:    slurmd -N node0
#   node1  namespace ${PREFIX}n1, SUBNET.2,   hostname node1:    slurmd -N node1
#   bridge ${PREFIX}br in the root namespace, SUBNET.254: Slurm clients (sbatch, srun, squeue)
#          run in the root namespace and reach the head node and both nodes through it (srun
#          advertises the address it reaches slurmctld from, the bridge's). The namespaces have
#          no default route: nothing they send leaves the subnet.
# Tasks started by a node's slurmd run inside that node's namespaces: `hostname` says node0 or
# node1 and the cluster's names resolve (a private /etc/hosts; the machine's is not touched).
# A TaskProlog keeps MPI's inter-node messages on TCP over the node's link (MPICH's UCX netmod
# and Open MPI's UCX PML would take the namespaces for one host and use shared memory) unless
# the job sets those variables itself; ranks of one node still share memory. RATE (a tc rate:
# 100mbit, 1gbit, 10gbit) shapes each node's link both ways. The file system (hence a shared
# one), /dev/shm and the CPUs are the machine's own.
#
# Debian's Slurm 22.05 (slurmctld slurmd slurm-client, installed with apt-get when missing, run
# as root), no munge (auth/none: never expose it), no cgroups, no systemd. MpiDefault=none, as
# Slurm's own default: a plain `srun` connects no PMI, the templates pick --mpi themselves.
# Each node declares PBM_2N_CPUS CPUs (default 4) whatever the hardware has. Needs root,
# iproute2 and util-linux (unshare, nsenter).
#
# Environment knobs:
#   PBM_2N_PREFIX   name prefix of namespaces and links (default pbm2n; at most 8 characters)
#   PBM_2N_SUBNET   first three octets of the /24 used (default 10.215.9)
#   PBM_2N_DIR      state dir: slurm.conf, logs, spool (default ${TMPDIR:-/tmp}/pbm-2n-$UID-$PREFIX)
#   PBM_2N_CPUS     CPUs each node declares (default 4)
#   PBM_2N_WAIT_S   how long `up` waits for both nodes to become idle (default 30)
#   PBM_SLURM_NO_INSTALL=1  never run apt-get; fail with the command to run instead
# Two clusters at once need different prefixes and subnets (the tests use their own).
set -Eeuo pipefail
# The slurm.conf settings this cluster shares with local_cluster.sh.
source "$(dirname "${BASH_SOURCE[0]}")/container_conf.sh"

PREFIX="${PBM_2N_PREFIX:-pbm2n}"
SUBNET="${PBM_2N_SUBNET:-10.215.9}"
STATE_DIR="${PBM_2N_DIR:-${TMPDIR:-/tmp}/pbm-2n-$(id -u)-$PREFIX}"
CPUS="${PBM_2N_CPUS:-4}"
WAIT_S="${PBM_2N_WAIT_S:-30}"
CONF="$STATE_DIR/slurm.conf"
NODES=2
BRIDGE="${PREFIX}br"
NODE_IF="pbmlink"     # the same name inside every namespace, so one MPI setting fits all nodes
HEAD_NAME="pbm-head"
HEAD_NS="${PREFIX}c"
HEAD_HOSTIF="${PREFIX}hc"
HEAD_IP="$SUBNET.253"
BRIDGE_IP="$SUBNET.254"
APT_PACKAGES="slurmctld slurmd slurm-client iproute2"
export PATH="$PATH:/usr/sbin:/sbin"

die() { echo "two_node_cluster.sh: $*" >&2; exit 1; }
say() { echo "two_node_cluster.sh: $*" >&2; }
node_name() { echo "node$1"; }
node_ns() { echo "${PREFIX}n$1"; }
node_ip() { echo "$SUBNET.$(($1 + 1))"; }
node_hostif() { echo "${PREFIX}h$1"; }
NODELIST="node[0-$((NODES - 1))]"

have_tools() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v sinfo >/dev/null && command -v ip >/dev/null && command -v tc >/dev/null \
        && command -v unshare >/dev/null && command -v nsenter >/dev/null
}

ensure_installed() {
    have_tools && return 0
    local install="apt-get install -y --no-install-recommends $APT_PACKAGES"
    if [[ "${PBM_SLURM_NO_INSTALL:-0}" == 1 ]] || ! command -v apt-get >/dev/null || [[ "$(id -u)" != 0 ]]; then
        die "needs Slurm (slurmctld, slurmd, sbatch, sinfo), iproute2 (ip, tc) and util-linux (unshare, nsenter). Install with:
    sudo apt-get update && sudo $install"
    fi
    say "installing: $install"
    DEBIAN_FRONTEND=noninteractive $install >"$STATE_DIR.apt.log" 2>&1 \
        || { DEBIAN_FRONTEND=noninteractive apt-get update >>"$STATE_DIR.apt.log" 2>&1 \
             && DEBIAN_FRONTEND=noninteractive $install >>"$STATE_DIR.apt.log" 2>&1; } \
        || die "installing failed; see $STATE_DIR.apt.log (command: $install)"
    rm -f "$STATE_DIR.apt.log"
    have_tools || die "apt-get succeeded but tools are still missing (command: $install)"
}

check_privileges() {
    [[ "$(id -u)" == 0 ]] || die "needs root (network namespaces, veth links, Slurm daemons as root)"
    [[ ${#PREFIX} -le 8 ]] || die "PBM_2N_PREFIX=$PREFIX is longer than 8 characters (Linux limits link names to 15)"
    [[ "$SUBNET" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "PBM_2N_SUBNET=$SUBNET must be three octets, e.g. 10.215.9"
    local probe="${PREFIX}probe$$" why
    if ! why="$(ip netns add "$probe" 2>&1)"; then
        die "cannot create network namespaces ('ip netns add' said: $why). Run as root, or in a
container started with --cap-add NET_ADMIN --cap-add SYS_ADMIN (or --privileged)."
    fi
    ip netns del "$probe"
}

# "1gbit" -> bytes per second, for sizing tbf's bucket and queue.
rate_bytes_per_s() {
    local text="${1,,}" number unit
    [[ "$text" =~ ^([0-9]+(\.[0-9]+)?)(kbit|mbit|gbit|tbit)$ ]] \
        || die "rate '$1' is not understood: use tc units such as 100mbit, 1gbit, 10gbit"
    number="${BASH_REMATCH[1]}"; unit="${BASH_REMATCH[3]}"
    local -A scale=([kbit]=125 [mbit]=125000 [gbit]=125000000 [tbit]=125000000000)
    awk -v n="$number" -v s="${scale[$unit]}" 'BEGIN { printf "%d\n", n * s }'
}

# tbf on the egress of one link end, sized as in emulated_cluster.sh: the bucket holds a 64 KiB
# GSO super-packet or 200 us of line rate, the queue 20 ms of line rate.
shape() {
    local netns="$1" dev="$2" rate="$3" bytes burst limit
    bytes="$(rate_bytes_per_s "$rate")"
    burst=$(( bytes / 5000 > 131072 ? bytes / 5000 : 131072 ))
    limit=$(( bytes / 50 > 4 * burst ? bytes / 50 : 4 * burst ))
    tc ${netns:+-n "$netns"} qdisc replace dev "$dev" root tbf rate "$rate" burst "$burst" limit "$limit"
}

real_memory_mb() {
    awk -v n="$NODES" '/MemTotal/ { printf "%d", $2 / 1024 * 0.9 / n }' /proc/meminfo
}

write_conf() {
    local i
    mkdir -p "$STATE_DIR/state"
    for ((i = 0; i < NODES; i++)); do
        mkdir -p "$STATE_DIR/$(node_name "$i")/spool" "$STATE_DIR/$(node_name "$i")/tmp"
    done
    {
        cat <<EOF
# Written by slurm/two_node_cluster.sh up; regenerated on every up.
ClusterName=pbm-two-node
$(slurm_first_job_id)
SlurmctldHost=$HEAD_NAME($HEAD_IP)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=${PBM_2N_CRED_EXPIRE_S:-5}
StateSaveLocation=$STATE_DIR/state
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
# %n is the node name: both slurmd share this file system, so each keeps its own files
# (Slurm's PMIx plugin puts its per-step server directories in the spool dir).
SlurmdSpoolDir=$STATE_DIR/%n/spool
SlurmdPidFile=$STATE_DIR/%n/slurmd.pid
SlurmdLogFile=$STATE_DIR/%n/slurmd.log
TmpFS=$STATE_DIR/%n/tmp
TaskProlog=$STATE_DIR/task_prolog.sh
$(slurm_container_settings none "${PBM_2N_MIN_JOB_AGE_S:-4}")
EOF
        for ((i = 0; i < NODES; i++)); do
            echo "NodeName=$(node_name "$i") NodeAddr=$(node_ip "$i") NodeHostname=$(node_name "$i")" \
                 "CPUs=$CPUS RealMemory=$(real_memory_mb) State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$NODELIST Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF"
}

# The machine's /etc/hosts plus the cluster's names, bind-mounted over /etc/hosts inside the
# namespaces: what runs in a job (hydra's mpiexec starting its proxies, say) resolves node names.
write_hosts() {
    local i
    { cat /etc/hosts 2>/dev/null || true
      echo "# slurm/two_node_cluster.sh"
      echo "$HEAD_IP $HEAD_NAME"
      for ((i = 0; i < NODES; i++)); do echo "$(node_ip "$i") $(node_name "$i")"; done
    } >"$STATE_DIR/hosts"
}

# Task environment through a TaskProlog ("export NAME=value" lines), each setting only when the
# job has not set that variable: MPICH's UCX netmod and Open MPI's UCX PML would see the
# namespaces as one machine and move inter-node messages through shared memory; these keep them
# on TCP over the node's link (Open MPI: ob1 PML, shared memory inside a node, TCP between).
write_task_prolog() {
    # MPICH: the OFI netmod over TCP. Its UCX netmod (the PyPI wheel's default) pads each
    # rank's address to a common length with uninitialised bytes, so the PMI-1 "put" lines
    # MPI_Init sends can exceed the 1024 bytes Slurm 22.05's pmi2 plugin reads per request:
    # the plugin then reports "invalid client request" and MPI_Init never returns (slurm/README.md).
    local settings="MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp FI_TCP_IFACE=$NODE_IF"
    settings+=" UCX_TLS=tcp UCX_NET_DEVICES=$NODE_IF OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader,tcp"
    settings+=" OMPI_MCA_btl_tcp_if_include=$NODE_IF OMPI_MCA_oob_tcp_if_include=$NODE_IF"
    {
        echo '#!/bin/sh'
        echo '# Written by slurm/two_node_cluster.sh up: MPI between nodes goes over the links.'
        echo "for setting in $settings; do"
        echo '    name="${setting%%=*}"'
        echo '    if ! env | grep -q "^$name="; then echo "export $setting"; fi'
        echo 'done'
    } >"$STATE_DIR/task_prolog.sh"
    chmod +x "$STATE_DIR/task_prolog.sh"
}

pid_alive() {  # pid_alive FILE NAME: the pid in FILE is running and is NAME
    local file="$1" name="$2" pid
    [[ -s "$file" ]] || return 1
    pid="$(cat "$file")"
    [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 1
    [[ "$(cat "/proc/$pid/comm")" == "$name" ]]
}

stop_daemon() {  # stop_daemon PIDFILE NAME
    local file="$1" name="$2" pid
    if pid_alive "$file" "$name"; then
        pid="$(cat "$file")"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$file"
}

add_namespace() {  # add_namespace NS HOSTIF IP
    local ns="$1" hostif="$2" address="$3"
    ip netns add "$ns"
    ip link add "$hostif" type veth peer name "$NODE_IF" netns "$ns"
    ip link set "$hostif" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$address/24" dev "$NODE_IF"
    ip -n "$ns" link set "$NODE_IF" up
}

# Starts a daemon inside a node's network namespace with a hostname of its own (UTS namespace)
# and a private mount namespace holding: a sysfs of that network namespace (tools reading
# /sys/class/net see the node's link, as under `ip netns exec`), the machine's cgroup mounts
# moved back under it (slurmd refuses to start without them) and the cluster's /etc/hosts.
# The daemon keeps all of these, and so does every task it starts.
start_in() {  # start_in NS HOSTNAME COMMAND...
    local ns="$1" host="$2"; shift 2
    mkdir -p "$STATE_DIR/.cgroup-hold"
    nsenter --net="/run/netns/$ns" -- unshare --uts --mount --propagation private /bin/sh -c '
        hold="$1"; host="$2"; hosts="$3"; shift 3
        if mountpoint -q /sys/fs/cgroup; then mount --rbind /sys/fs/cgroup "$hold" || exit 1; fi
        mount -t sysfs "$host" /sys || exit 1
        if mountpoint -q "$hold"; then mount --move "$hold" /sys/fs/cgroup || exit 1; fi
        mount --bind "$hosts" /etc/hosts || exit 1
        hostname "$host" && exec "$@"' sh "$STATE_DIR/.cgroup-hold" "$host" "$STATE_DIR/hosts" "$@"
}

node_states() {  # one "node0 idle" line per node
    SLURM_CONF="$CONF" timeout 10 sinfo -h -N -o "%N %T" 2>/dev/null || true
}

usable() {  # every node takes jobs
    local states="$1"
    (( $(grep -cE ' (idle|mixed|allocated|completing)' <<<"$states" || true) == NODES ))
}

log_tails() {
    local file
    for file in "$STATE_DIR/slurmctld.log" "$STATE_DIR"/node*/slurmd.log; do
        [[ -f "$file" ]] || continue
        echo "--- $file (last lines)"
        tail -n 8 "$file"
    done
}

cmd_down() {
    local i ns pid dev
    if [[ -d "$STATE_DIR" ]]; then
        for ((i = 0; i < NODES; i++)); do stop_daemon "$STATE_DIR/$(node_name "$i")/slurmd.pid" slurmd; done
        stop_daemon "$STATE_DIR/slurmctld.pid" slurmctld
    fi
    # Whatever still runs in a namespace (a step a killed slurmd left behind) would keep it alive.
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}(c|n[0-9]+)$" || true); do
        for pid in $(ip netns pids "$ns" 2>/dev/null || true); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    for dev in $(ls /sys/class/net | grep -E "^${PREFIX}h(c|[0-9]+)$" || true); do
        ip link del "$dev" 2>/dev/null || true
    done
    if [[ -e "/sys/class/net/$BRIDGE" ]]; then ip link del "$BRIDGE" 2>/dev/null || true; fi
    # Deleting a namespace frees its veth asynchronously; wait so a following `up` can reuse names.
    for _ in $(seq 50); do
        ls /sys/class/net | grep -qE "^${PREFIX}(h(c|[0-9]+)|br)$" || break
        sleep 0.1
    done
    rm -rf "$STATE_DIR"
}

up_failed() {
    say "up failed; removing what was created. Logs:"
    log_tails >&2 || true
    cmd_down
}

cmd_up() {
    local rate="${1:-}" t0=$SECONDS i
    [[ -z "$rate" ]] || rate_bytes_per_s "$rate" >/dev/null
    mkdir -p "$(dirname "$STATE_DIR")"
    ensure_installed
    check_privileges
    cmd_down  # idempotent: whatever an earlier run left is replaced
    mkdir -p "$STATE_DIR"
    # A half-built cluster is worse than none: undo everything if any step fails.
    trap 'up_failed' ERR
    ip link add "$BRIDGE" type bridge
    ip addr add "$BRIDGE_IP/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    add_namespace "$HEAD_NS" "$HEAD_HOSTIF" "$HEAD_IP"
    for ((i = 0; i < NODES; i++)); do
        add_namespace "$(node_ns "$i")" "$(node_hostif "$i")" "$(node_ip "$i")"
        if [[ -n "$rate" ]]; then
            shape "$(node_ns "$i")" "$NODE_IF" "$rate"    # node -> switch (its upload)
            shape "" "$(node_hostif "$i")" "$rate"        # switch -> node (its download)
        fi
    done
    write_conf
    write_hosts
    write_task_prolog
    echo "RATE=${rate:-unshaped}" >"$STATE_DIR/state.env"
    # -c: no jobs of an earlier session.
    start_in "$HEAD_NS" "$HEAD_NAME" slurmctld -c -f "$CONF"
    for ((i = 0; i < NODES; i++)); do
        start_in "$(node_ns "$i")" "$(node_name "$i")" slurmd -N "$(node_name "$i")" -f "$CONF"
    done
    # Wait (bounded) until every node takes jobs; resume nodes that came up DOWN.
    local states resumed=0
    while :; do
        states="$(node_states)"
        usable "$states" && break
        if (( SECONDS - t0 >= WAIT_S )); then
            say "nodes not idle after ${WAIT_S} s: $(tr '\n' ' ' <<<"$states")"
            false  # ERR: tear down, show the logs
        fi
        if grep -qE ' (down|drain|fail)' <<<"$states" && (( ! resumed )); then
            SLURM_CONF="$CONF" scontrol update nodename="$NODELIST" state=resume 2>/dev/null || true
            resumed=1
        fi
        sleep 0.2
    done
    trap - ERR
    say "up in $((SECONDS - t0)) s: $(tr '\n' ',' <<<"$states" | sed 's/,$//'), $CPUS CPUs each," \
        "links ${rate:-unshaped}, state dir $STATE_DIR"
    print_env
}

print_env() { echo "export SLURM_CONF=$CONF"; }

cmd_status() {
    local ok=0 i file
    if pid_alive "$STATE_DIR/slurmctld.pid" slurmctld; then
        echo "slurmctld on $HEAD_NAME ($HEAD_IP): running (pid $(cat "$STATE_DIR/slurmctld.pid"))"
    else
        echo "slurmctld on $HEAD_NAME ($HEAD_IP): not running"; ok=1
    fi
    for ((i = 0; i < NODES; i++)); do
        file="$STATE_DIR/$(node_name "$i")/slurmd.pid"
        if pid_alive "$file" slurmd; then
            echo "slurmd on $(node_name "$i") ($(node_ip "$i"), namespace $(node_ns "$i")): running (pid $(cat "$file"))"
        else
            echo "slurmd on $(node_name "$i") ($(node_ip "$i"), namespace $(node_ns "$i")): not running"; ok=1
        fi
    done
    if (( ok == 0 )); then
        local states; states="$(node_states)"
        echo "nodes: $(tr '\n' ',' <<<"$states" | sed 's/,$//')"
        usable "$states" || ok=1
        echo "links: $(sed 's/^RATE=//' "$STATE_DIR/state.env" 2>/dev/null || echo unknown)"
    fi
    print_env
    return $ok
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) cmd_down; say "down" ;;
    status) cmd_status ;;
    env) print_env ;;
    *) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
