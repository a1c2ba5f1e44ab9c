#!/usr/bin/env bash
# Weft's tunnel benchmark: one run of ../shared/bench/peers.sh that measures
# the direct path, the stunnel and HAProxy pairs and a pair of Weft agents,
# then the agents' memory idle and with 1,000 concurrent tunneled connections.
#   bench/run.sh            (DUR=10 by default; CONNS=1000)
# Needs: iperf3 stunnel4 haproxy wrk nginx-light openssl bc curl python3.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
peers=${PEERS_SH:-$root/../shared/bench/peers.sh}
export DUR=${DUR:-10}
CONNS=${CONNS:-1000}

cargo build --release -p weft-agent --manifest-path "$root/Cargo.toml" >&2
export WEFT_AGENT_BIN=$root/target/release/weft-agent

echo "# $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
EXTRA_NAME=weft EXTRA_UP=$here/weft-up.sh EXTRA_DOWN=$here/weft-down.sh "$peers"

# Memory with many concurrent tunneled connections: an echo server, one
# tunnel, CONNS connections held open at once.
work=$(mktemp -d)
trap 'kill $(cat "$work/pids" 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=bench-ca 2>/dev/null
for who in client server; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $who.key -out $who.csr -subj /CN=$who 2>/dev/null
  printf 'subjectAltName=URI:spiffe://bench.local/ns/default/sa/%s\n' $who > $who.ext
  openssl x509 -req -in $who.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile $who.ext -out $who.crt 2>/dev/null
done
export PIDS_FILE=$work/pids CA_CRT=$work/ca.crt CLIENT_CRT=$work/client.crt CLIENT_KEY=$work/client.key \
  SERVER_CRT=$work/server.crt SERVER_KEY=$work/server.key
TARGET_PORT=18090 LISTEN_PORT=19601 "$here/weft-up.sh"
echo
echo "memory of the two agents (client, server), idle and holding $CONNS tunneled connections:"
for p in $(cat pids); do printf 'pid %s idle VmRSS %s kB\n' "$p" "$(awk '/VmRSS/{print $2}' /proc/$p/status)"; done
python3 "$here/hold_connections.py" --echo 127.0.0.1:18090 --via 127.0.0.1:19601 --conns "$CONNS" --pids "$(paste -sd, pids)"
for p in $(cat pids); do printf 'pid %s peak VmHWM %s kB\n' "$p" "$(awk '/VmHWM/{print $2}' /proc/$p/status)"; done
