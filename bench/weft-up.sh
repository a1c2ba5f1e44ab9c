#!/usr/bin/env bash
# EXTRA_UP hook for ../shared/bench/peers.sh: starts one Weft tunnel (a client
# agent and a server agent) from 127.0.0.1:$LISTEN_PORT to the app on
# 127.0.0.1:$TARGET_PORT, using the certificates peers.sh generated.
set -euo pipefail
: "${TARGET_PORT:?} ${LISTEN_PORT:?} ${PIDS_FILE:?} ${CA_CRT:?}"
BIN=${WEFT_AGENT_BIN:-$(dirname "$0")/../target/release/weft-agent}
dir=$(dirname "$PIDS_FILE")/weft-$LISTEN_PORT
mkdir -p "$dir"
# Each tunnel gets its own loopback addresses for the agents' ports.
n=$(( (LISTEN_PORT / 100) % 250 ))
client_ip=127.0.$n.2 server_ip=127.0.$n.3
cat > "$dir/server.yaml" <<YAML
identity: { cert: $SERVER_CRT, key: $SERVER_KEY, trust_bundle: $CA_CRT }
workload: { address: 127.0.0.1, ports: [ { port: $TARGET_PORT } ] }
inbound: { listen: $server_ip:15008, plaintext_listen: $server_ip:15006, allow: [ "spiffe://bench.local/ns/default/sa/client" ] }
outbound: { capture_listen: $server_ip:15001 }
admin: { listen: $server_ip:15000 }
metrics: { listen: $server_ip:15020 }
log: { level: warn }
YAML
cat > "$dir/client.yaml" <<YAML
identity: { cert: $CLIENT_CRT, key: $CLIENT_KEY, trust_bundle: $CA_CRT }
workload: { address: $client_ip, ports: [ { port: 1 } ] }
inbound: { listen: $client_ip:15008, plaintext_listen: $client_ip:15006 }
outbound:
  capture_listen: $client_ip:15001
  listeners: [ { listen: "127.0.0.1:$LISTEN_PORT", target: "127.0.0.1:$TARGET_PORT" } ]
  endpoints: [ { address: 127.0.0.1, agent: "$server_ip:15008", identity: "spiffe://bench.local/ns/default/sa/server" } ]
admin: { listen: $client_ip:15000 }
metrics: { listen: $client_ip:15020 }
log: { level: warn }
YAML
for side in server client; do
  "$BIN" run -c "$dir/$side.yaml" > "$dir/$side.log" 2>&1 &
  echo $! >> "$PIDS_FILE"
  echo $! > "$dir/$side.pid"
done
for ip in $server_ip $client_ip; do
  for _ in $(seq 100); do
    curl -sf "http://$ip:15000/ready" >/dev/null && break
    sleep 0.05
  done
  curl -sf "http://$ip:15000/ready" >/dev/null || { echo "agent on $ip did not become ready" >&2; cat "$dir"/*.log >&2; exit 1; }
done
