#!/usr/bin/env bash
# An emulated multi-node cluster on one Linux machine: each "node" is a network namespace
# with one veth link to a bridge (the "switch") in the root namespace, shaped to RATE in
# both directions. MPI ranks run inside their node's namespace, so MPICH's shared-memory
# transport joins only the ranks of one node and everything between nodes crosses a shaped
# link as TCP, where the kernel counts its bytes.
#
#   slurm/emulated_cluster.sh up N_NODES RATE     # e.g. up 2 1gbit; replaces an existing one
#   slurm/emulated_cluster.sh status              # nodes, addresses, qdiscs, byte counters
#   slurm/emulated_cluster.sh counters            # one line per node: NODE TX_BYTES RX_BYTES
#   slurm/emulated_cluster.sh run [--ppn K] [--placement block|cyclic] [--netmod ucx|ofi] \
#         -- -n 4 python script.py                # mpiexec across the nodes
#   slurm/emulated_cluster.sh session N_NODES RATE [run options] -- <mpiexec args>
#                                                 # up, run, down (also on error or Ctrl-C)
#   slurm/emulated_cluster.sh probe [SECONDS]     # TCP round trip and throughput node0 -> node1
#   slurm/emulated_cluster.sh down                # remove namespaces, links, bridge (idempotent)
#
# Placement: block puts ranks 0..K-1 on node0, K..2K-1 on node1, ... (hydra -hosts ip:K);
# cyclic deals ranks round-robin (rank r on node r mod N_NODES).
# TX_BYTES of a node is what it sent into the switch, RX_BYTES what it received (Ethernet
# frames: payload plus TCP/IP/Ethernet headers), read from the root-namespace veth end.
#
# Limits: the kernels this was built on have tbf/htb/pfifo but no netem (nor fq/etf), so the
# links are rate-shaped but no latency can be added; `probe` measures the real round trip.
# Needs root (CAP_NET_ADMIN) and iproute2 (`ip`, `tc`); `probe` also needs python3 ($PYTHON).
#
# Environment knobs:
#   PBM_EMU_PREFIX   name prefix of namespaces and links (default pbmemu; at most 8 chars)
#   PBM_EMU_SUBNET   first three octets of the /24 used (default 10.213.7)
#   PBM_EMU_DIR      state dir (default ${TMPDIR:-/tmp}/pbm-emu-$UID-$PREFIX)
#   PBM_EMU_MTU      link MTU (default 1500; 9000 mimics jumbo-frame HPC Ethernet)
#   MPIEXEC          mpiexec to use (default: the one on PATH, else the checkout's .venv/bin)
set -Eeuo pipefail

PREFIX="${PBM_EMU_PREFIX:-pbmemu}"
SUBNET="${PBM_EMU_SUBNET:-10.213.7}"
STATE_DIR="${PBM_EMU_DIR:-${TMPDIR:-/tmp}/pbm-emu-$(id -u)-$PREFIX}"
MTU="${PBM_EMU_MTU:-1500}"
BRIDGE="${PREFIX}br"
NODE_IF="pbmlink"  # the same name inside every namespace, so one UCX/libfabric setting fits all
export PATH="$PATH:/usr/sbin:/sbin"

die() { echo "emulated_cluster.sh: $*" >&2; exit 1; }
ns_name() { echo "${PREFIX}n$1"; }
host_if() { echo "${PREFIX}h$1"; }
node_ip() { echo "$SUBNET.$(($1 + 1))"; }
BRIDGE_IP="$SUBNET.254"

check_privileges() {
    command -v ip >/dev/null && command -v tc >/dev/null \
        || die "needs iproute2 ('ip' and 'tc'): apt-get install -y iproute2"
    [[ ${#PREFIX} -le 8 ]] || die "PBM_EMU_PREFIX=$PREFIX is longer than 8 characters (Linux limits link names to 15)"
    local probe="${PREFIX}probe$$"
    if ! ip netns add "$probe" 2>"$STATE_DIR.err"; then
        local why; why="$(cat "$STATE_DIR.err")"; rm -f "$STATE_DIR.err"
        die "cannot create network namespaces ('ip netns add' said: $why). Run as root, or in a
container started with --cap-add NET_ADMIN --cap-add SYS_ADMIN (or --privileged)."
    fi
    ip netns del "$probe"; rm -f "$STATE_DIR.err"
}

# "1gbit" -> bytes per second, for sizing tbf's bucket and queue.
rate_bytes_per_s() {
    local text="${1,,}" number unit
    [[ "$text" =~ ^([0-9]+(\.[0-9]+)?)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps)$ ]] \
        || die "rate '$1' is not understood: use tc units such as 100mbit, 1gbit, 10gbit"
    number="${BASH_REMATCH[1]}"; unit="${BASH_REMATCH[3]}"
    local -A scale=([bit]=0.125 [kbit]=125 [mbit]=125000 [gbit]=125000000 [tbit]=125000000000
                    [bps]=1 [kbps]=1000 [mbps]=1000000 [gbps]=1000000000)
    awk -v n="$number" -v s="${scale[$unit]}" 'BEGIN { printf "%d\n", n * s }'
}

# tbf on the egress of one link end. The bucket holds at least one 64 KiB GSO super-packet
# (veth passes those whole) or 200 us of line rate; the queue holds 20 ms of line rate, so
# TCP sees delay rather than drops at these rates.
shape() {
    local netns="$1" dev="$2" rate="$3" bytes burst limit
    bytes="$(rate_bytes_per_s "$rate")"
    burst=$(( bytes / 5000 > 131072 ? bytes / 5000 : 131072 ))
    limit=$(( bytes / 50 > 4 * burst ? bytes / 50 : 4 * burst ))
    ip ${netns:+-n "$netns"} link set "$dev" txqueuelen 10000
    tc ${netns:+-n "$netns"} qdisc replace dev "$dev" root tbf rate "$rate" burst "$burst" limit "$limit"
}

cmd_down() {
    local n
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}n[0-9]+$" || true); do
        ip netns del "$ns" 2>/dev/null || true
    done
    for dev in $(ls /sys/class/net | grep -E "^${PREFIX}h[0-9]+$" || true); do
        ip link del "$dev" 2>/dev/null || true
    done
    [[ -e "/sys/class/net/$BRIDGE" ]] && ip link del "$BRIDGE" 2>/dev/null || true
    # Deleting a namespace frees its veth asynchronously; wait so a following `up` can reuse names.
    for _ in $(seq 50); do
        ls /sys/class/net | grep -qE "^${PREFIX}(h[0-9]+|br)$" || break
        sleep 0.1
    done
    rm -rf "$STATE_DIR"
}

cmd_up() {
    [[ $# -eq 2 ]] || die "usage: up N_NODES RATE (e.g. up 2 1gbit)"
    local nodes="$1" rate="$2"
    [[ "$nodes" =~ ^[0-9]+$ && "$nodes" -ge 1 && "$nodes" -le 200 ]] || die "N_NODES must be 1..200, got '$nodes'"
    rate_bytes_per_s "$rate" >/dev/null
    mkdir -p "$(dirname "$STATE_DIR")"
    check_privileges
    cmd_down  # idempotent: whatever an earlier run left is replaced
    mkdir -p "$STATE_DIR"
    # A half-built cluster is worse than none: undo everything if any step fails.
    trap 'echo "emulated_cluster.sh: up failed; removing what was created" >&2; cmd_down' ERR
    ip link add "$BRIDGE" type bridge
    ip link set "$BRIDGE" mtu "$MTU"
    ip addr add "$BRIDGE_IP/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local i ns dev
    for ((i = 0; i < nodes; i++)); do
        ns="$(ns_name "$i")"; dev="$(host_if "$i")"
        ip netns add "$ns"
        ip link add "$dev" mtu "$MTU" type veth peer name "$NODE_IF" netns "$ns"
        ip link set "$dev" master "$BRIDGE" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "$(node_ip "$i")/24" dev "$NODE_IF"
        ip -n "$ns" link set "$NODE_IF" mtu "$MTU" up
        shape "$ns" "$NODE_IF" "$rate"   # node -> switch (the node's upload)
        shape "" "$dev" "$rate"          # switch -> node (its download)
    done
    trap - ERR
    cat >"$STATE_DIR/state" <<EOF
NODES=$nodes
RATE=$rate
EOF
    write_launcher "$nodes"
    echo "emulated cluster up: $nodes nodes at $rate each way, bridge $BRIDGE ($BRIDGE_IP), nodes $(node_ip 0)..$(node_ip $((nodes - 1)))"
}

# hydra calls its launcher like rsh: LAUNCHER HOST COMMAND...; ours runs COMMAND (the hydra
# proxy, which then starts that host's ranks) inside the host's namespace.
write_launcher() {
    local nodes="$1" i
    {
        echo '#!/usr/bin/env bash'
        echo '# written by emulated_cluster.sh up: hydra launcher mapping node addresses to namespaces'
        echo 'host="$1"; shift'
        echo 'case "$host" in'
        for ((i = 0; i < nodes; i++)); do
            echo "    $(node_ip "$i")) ns=$(ns_name "$i") ;;"
        done
        echo '    *) echo "emulated cluster launcher: unknown host $host" >&2; exit 1 ;;'
        echo 'esac'
        echo 'exec ip netns exec "$ns" /bin/sh -c "$*"'
    } >"$STATE_DIR/launcher"
    chmod +x "$STATE_DIR/launcher"
}

load_state() {
    [[ -f "$STATE_DIR/state" ]] || die "no emulated cluster is up (state $STATE_DIR/state missing); run: $0 up 2 1gbit"
    # shellcheck disable=SC1091
    source "$STATE_DIR/state"
}

cmd_counters() {
    load_state
    local i dev
    for ((i = 0; i < NODES; i++)); do
        dev="$(host_if "$i")"
        # The root-namespace end sees the node's transmissions as its receptions.
        echo "$(ns_name "$i") $(cat "/sys/class/net/$dev/statistics/rx_bytes") $(cat "/sys/class/net/$dev/statistics/tx_bytes")"
    done
}

cmd_status() {
    load_state
    echo "emulated cluster: $NODES nodes at $RATE, bridge $BRIDGE ($BRIDGE_IP), state $STATE_DIR"
    local i
    for ((i = 0; i < NODES; i++)); do
        echo "$(ns_name "$i") $(node_ip "$i"): up  $(tc -n "$(ns_name "$i")" qdisc show dev "$NODE_IF" | head -1)"
        echo "$(ns_name "$i") $(node_ip "$i"): down $(tc qdisc show dev "$(host_if "$i")" | head -1)"
    done
    echo "bytes (node tx rx):"
    cmd_counters
}

# $MPIEXEC, else the one on PATH, else the checkout's .venv (pip's mpich puts it there).
find_mpiexec() {
    local repo_venv
    repo_venv="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/mpiexec"
    if [[ -n "${MPIEXEC:-}" ]]; then echo "$MPIEXEC"
    elif command -v mpiexec >/dev/null; then command -v mpiexec
    elif [[ -x "$repo_venv" ]]; then echo "$repo_venv"
    fi
}

cmd_run() {
    load_state
    local ppn=2 placement=block netmod=ucx
    while [[ $# -gt 0 && "$1" != "--" ]]; do
        case "$1" in
            --ppn) ppn="$2"; shift 2 ;;
            --placement) placement="$2"; shift 2 ;;
            --netmod) netmod="$2"; shift 2 ;;
            *) die "run: unknown option '$1' (options: --ppn K --placement block|cyclic --netmod ucx|ofi, then -- mpiexec args)" ;;
        esac
    done
    [[ "${1:-}" == "--" ]] || die "run: put the mpiexec arguments after '--', e.g. run -- -n 4 python x.py"
    shift
    local hosts="" i slots
    case "$placement" in
        block) slots="$ppn" ;;
        cyclic) slots=1 ;;  # hydra fills each host's slots in turn, then wraps around
        *) die "--placement must be block or cyclic, got '$placement'" ;;
    esac
    for ((i = 0; i < NODES; i++)); do hosts+="${hosts:+,}$(node_ip "$i"):$slots"; done
    # MPICH's default UCX netmod treats all namespaces as one host and would carry inter-node
    # messages over UCX's own shared memory, bypassing the links: restrict it (or libfabric)
    # to TCP on the node's link. Ranks of one node still meet in MPICH's shared-memory module.
    local -a netenv
    case "$netmod" in
        ucx) netenv=(MPIR_CVAR_CH4_NETMOD=ucx UCX_TLS=tcp "UCX_NET_DEVICES=$NODE_IF") ;;
        ofi) netenv=(MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp "FI_TCP_IFACE=$NODE_IF") ;;
        *) die "--netmod must be ucx or ofi, got '$netmod'" ;;
    esac
    local mpiexec
    mpiexec="$(find_mpiexec)"
    [[ -n "$mpiexec" ]] || die "mpiexec not found: set MPIEXEC, put it on PATH, or pip install mpich into .venv"
    env "${netenv[@]}" PBM_EMU_NODES="$NODES" PBM_EMU_RATE="$RATE" PBM_EMU_PLACEMENT="$placement" \
        PBM_EMU_LINK="$NODE_IF" \
        "$mpiexec" -launcher rsh -launcher-exec "$STATE_DIR/launcher" -iface "$BRIDGE" \
        -hosts "$hosts" "$@"
}

cmd_session() {
    [[ $# -ge 2 ]] || die "usage: session N_NODES RATE [run options] -- <mpiexec args>"
    local nodes="$1" rate="$2"; shift 2
    trap 'cmd_down' EXIT
    trap 'exit 130' INT TERM
    cmd_up "$nodes" "$rate"
    cmd_run "$@"
}

# TCP round trip (1-byte ping-pong, TCP_NODELAY) and one-way throughput from node0 to node1.
cmd_probe() {
    load_state
    [[ "$NODES" -ge 2 ]] || die "probe needs at least 2 nodes"
    local seconds="${1:-1}" port=47391
    ip netns exec "$(ns_name 1)" "${PYTHON:-python3}" - "$port" <<'EOF' &
import socket, sys
server = socket.socket(); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", int(sys.argv[1]))); server.listen(2)
conn, _ = server.accept(); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while (b := conn.recv(1)) and b != b"q":
    conn.sendall(b)
conn.close()
conn, _ = server.accept()
while conn.recv(1 << 20):
    pass
EOF
    local server=$!
    sleep 0.3
    ip netns exec "$(ns_name 0)" "${PYTHON:-python3}" - "$(node_ip 1)" "$port" "$seconds" "$RATE" <<'EOF'
import socket, statistics, sys, time
host, port, seconds, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = socket.create_connection((host, port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(2000):
    t = time.perf_counter(); s.sendall(b"x"); s.recv(1); rtts.append(time.perf_counter() - t)
s.sendall(b"q"); s.close()
s = socket.create_connection((host, port)); block = bytes(1 << 20); sent = 0
t = time.perf_counter()
while time.perf_counter() - t < seconds:
    s.sendall(block); sent += len(block)
s.close(); elapsed = time.perf_counter() - t
print(f"round trip node0<->node1 (TCP, 1 byte, median of 2000): {statistics.median(rtts) * 1e6:.0f} us "
      f"(p10 {sorted(rtts)[200] * 1e6:.0f}, p90 {sorted(rtts)[1800] * 1e6:.0f})")
print(f"throughput node0->node1: {sent * 8 / elapsed / 1e9:.3f} Gbit/s of TCP payload (link shaped to {rate})")
EOF
    wait "$server"
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) shift; cmd_down ;;
    status) shift; cmd_status ;;
    counters) shift; cmd_counters ;;
    run) shift; cmd_run "$@" ;;
    session) shift; cmd_session "$@" ;;
    probe) shift; cmd_probe "$@" ;;
    *) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
