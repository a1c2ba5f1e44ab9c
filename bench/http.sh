#!/usr/bin/env bash
# Weft's HTTP benchmark (issue 4): one run that measures, against the same
# nginx app on loopback,
#   direct        wrk -> nginx
#   haproxy-http  a pair of HAProxy proxies in HTTP mode, mTLS between them
#   haproxy-tcp   a reference floor: the same pair in TCP mode, plaintext,
#                 so two proxies that only copy bytes (no TLS, no parsing)
#   weft-l4       two agents, the port declared tcp (bytes spliced)
#   weft-l7       two agents, the port declared http, with L7 policies in
#                 force: an HTTPRoute rule (header filter), a Retry policy
#                 and a TrafficPermission rule on method and path
#   weft-l7-detect  the same with the port's protocol left undeclared:
#                 both agents detect HTTP from each connection's first bytes
# and prints latency percentiles with one connection (closed loop),
# requests/s with 16 and with $WIDE (256) connections, the proxies' peak RSS
# and CPU, and each setup's requests/s against the HAProxy HTTP pair's.
#   bench/http.sh            (DUR=10 by default)
# Needs: haproxy wrk nginx-light openssl bc.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
DUR=${DUR:-10}
# The second requests/s phase's connections: a busy service's callers.
WIDE=${WIDE:-256}
APP=18180

cargo build --release -p weft-agent --manifest-path "$root/Cargo.toml" >&2
BIN=$root/target/release/weft-agent

need() { command -v "$1" >/dev/null || { echo "missing $1 (apt-get install $2)"; exit 2; }; }
need haproxy haproxy; need wrk wrk; need nginx nginx-light; need openssl openssl; need bc bc

W=$(mktemp -d)
# nginx workers run unprivileged and must read the page.
chmod 755 "$W"
cleanup() { for p in $(cat "$W"/*.pid 2>/dev/null); do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT
cd "$W"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=bench-ca 2>/dev/null
for who in client server; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $who.key -out $who.csr -subj /CN=$who 2>/dev/null
  printf 'subjectAltName=URI:spiffe://bench.local/ns/default/sa/%s,DNS:localhost,IP:127.0.0.1\n' $who > $who.ext
  openssl x509 -req -in $who.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile $who.ext -out $who.crt 2>/dev/null
  cat $who.crt $who.key > $who.pem
done

mkdir -p www; head -c 1024 /dev/zero | tr '\0' 'x' > www/index.html
cat > nginx.conf <<NG
worker_processes 1; daemon off; pid $W/nginx.pidfile; error_log $W/nginx.err;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:$APP; root $W/www; keepalive_requests 1000000; } }
NG
nginx -c "$W/nginx.conf" & echo $! > app.pid

cpu_s() { awk '{print ($14+$15)/100}' /proc/$1/stat 2>/dev/null || echo 0; }
hwm_kib() { awk '/VmHWM/{print $2}' /proc/$1/status 2>/dev/null || echo 0; }
# read- and write-family system calls so far (socket reads and writes among them)
sys_rw() { awk '/^syscr|^syscw/{s+=$2} END{print s+0}' /proc/$1/io 2>/dev/null || echo 0; }
wait_http() { for _ in $(seq 100); do curl -fsS -o /dev/null "http://127.0.0.1:$1/" 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never answered" >&2; exit 1; }

measure() { # name port pids...
  local name=$1 port=$2; shift 2; local pids="$*"
  wait_http "$port"
  local c0=0 s0=0; for p in $pids; do c0=$(echo "$c0 + $(cpu_s $p)" | bc); s0=$((s0 + $(sys_rw $p))); done
  local one; one=$(wrk -t1 -c1 -d${DUR}s --latency "http://127.0.0.1:$port/" 2>/dev/null)
  local lat; lat=$(echo "$one" | awk '/^ +50%/{a=$2} /^ +90%/{b=$2} /^ +99%/{c=$2} END{print a, b, c}')
  local many; many=$(wrk -t2 -c16 -d${DUR}s "http://127.0.0.1:$port/" 2>/dev/null)
  local rps; rps=$(echo "$many" | awk '/Requests\/sec/{printf "%.0f", $2}')
  local wide; wide=$(wrk -t2 -c$WIDE -d${DUR}s "http://127.0.0.1:$port/" 2>/dev/null)
  local rps_wide; rps_wide=$(echo "$wide" | awk '/Requests\/sec/{printf "%.0f", $2}')
  local n; n=$( (echo "$one"; echo "$many"; echo "$wide") | awk '/requests in/{s+=$1} END{print s+0}')
  local c1=0 s1=0 mem=0; for p in $pids; do c1=$(echo "$c1 + $(cpu_s $p)" | bc); s1=$((s1 + $(sys_rw $p))); mem=$((mem + $(hwm_kib $p))); done
  local cpu; cpu=$(echo "$c1 - $c0" | bc)
  local per="-" calls="-"
  if [ "$n" -gt 0 ] && [ -n "$pids" ]; then
    per=$(echo "scale=1; $cpu * 1000000 / $n" | bc)
    calls=$(echo "scale=1; ($s1 - $s0) / $n" | bc)
  fi
  printf '%-14s %9s %9s %9s %9s %9s %8.1f %7.1f %10s %8s\n' "$name" $lat "$rps" "$rps_wide" "$(echo "scale=1; $mem/1024" | bc)" "$cpu" "$per" "$calls"
  echo "$name $rps $rps_wide" >> rates
}

echo "# $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, $(uname -r), DUR=${DUR}s, 1 KiB body"
printf '%-14s %9s %9s %9s %9s %9s %8s %7s %10s %8s\n' setup p50 p90 p99 req/s@16 "req/s@$WIDE" RSS_MiB CPU_s CPU_us/req rw/req
measure direct $APP ""

# HAProxy pair in HTTP mode: the client side parses HTTP and keeps
# connections to the server side alive (http-reuse), mTLS between them.
cat > hap.cfg <<HP
global
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
listen c_http
  bind 127.0.0.1:19211
  server s 127.0.0.1:19212 ssl crt $W/client.pem ca-file $W/ca.crt verify required sni str(localhost) ssl-min-ver TLSv1.3
listen s_http
  bind 127.0.0.1:19212 ssl crt $W/server.pem ca-file $W/ca.crt verify required ssl-min-ver TLSv1.3
  server a 127.0.0.1:$APP
HP
haproxy -f hap.cfg -db >/dev/null 2>&1 & echo $! > hap.pid
measure haproxy-http 19211 "$(cat hap.pid)"
kill "$(cat hap.pid)"; rm hap.pid

cat > hap-tcp.cfg <<HP
global
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen c_tcp
  bind 127.0.0.1:19221
  server s 127.0.0.1:19222
listen s_tcp
  bind 127.0.0.1:19222
  server a 127.0.0.1:$APP
HP
haproxy -f hap-tcp.cfg -db >/dev/null 2>&1 & echo $! > hap.pid
measure haproxy-tcp 19221 "$(cat hap.pid)"
kill "$(cat hap.pid)"; rm hap.pid

# Two Weft agents on their own loopback addresses: `proto` is the app
# port's declared protocol; `policy` adds L7 policies on both sides.
weft_pair() { # name listen_port proto policy(yes|no) n
  local name=$1 lp=$2 proto=$3 policy=$4 n=$5
  local cip=127.0.$n.2 sip=127.0.$n.3
  local server_policy="" client_policy="" listener_extra=""
  if [ "$policy" = yes ]; then
    server_policy="policy:
  workload: server
  inbound:
    permissions:
      - policy: client-reads
        from: [ \"spiffe://bench.local/ns/default/sa/client\" ]
        action: Allow
        http: [ { method: GET, path: { type: PathPrefix, value: / } } ]
      - policy: no-admin
        from: [ \"spiffe://bench.local/*\" ]
        action: Deny
        http: [ { path: { type: PathPrefix, value: /admin } } ]"
    client_policy="policy:
  workload: client
  outbound:
    default/server:
      routes:
        - policy: tag
          rule: { default: { filters: [ { type: RequestHeaderModifier, set: [ { name: x-route, value: tag } ] } ] } }
      retry: { numRetries: 2, retryOn: [ 5xx, ConnectFailure ] }"
    listener_extra=", protocol: http, service: default/server"
    # Undeclared: both agents detect HTTP from the first bytes.
    [ "$proto" = detect ] && listener_extra=", service: default/server"
  fi
  local allow='allow: [ "spiffe://bench.local/ns/default/sa/client" ]'
  [ "$policy" = yes ] && allow=""
  cat > s-$name.yaml <<YAML
identity: { cert: $W/server.crt, key: $W/server.key, trust_bundle: $W/ca.crt }
workload: { address: 127.0.0.1, ports: [ { port: $APP, protocol: $proto } ] }
inbound: { listen: $sip:15008, plaintext_listen: $sip:15006 $( [ -n "$allow" ] && echo ", $allow") }
outbound: { capture_listen: $sip:15001 }
admin: { listen: $sip:15000 }
metrics: { listen: $sip:15020 }
log: { level: warn }
$( [ "$policy" = yes ] && echo "$server_policy")
YAML
  cat > c-$name.yaml <<YAML
identity: { cert: $W/client.crt, key: $W/client.key, trust_bundle: $W/ca.crt }
workload: { address: $cip, ports: [ { port: 1 } ] }
inbound: { listen: $cip:15008, plaintext_listen: $cip:15006 }
outbound:
  capture_listen: $cip:15001
  listeners: [ { listen: "127.0.0.1:$lp", target: "127.0.0.1:$APP"$listener_extra } ]
  endpoints: [ { address: 127.0.0.1, agent: "$sip:15008", identity: "spiffe://bench.local/ns/default/sa/server" } ]
admin: { listen: $cip:15000 }
metrics: { listen: $cip:15020 }
log: { level: warn }
$( [ "$policy" = yes ] && echo "$client_policy")
YAML
  "$BIN" run -c s-$name.yaml > s-$name.log 2>&1 & echo $! > s-$name.pid
  "$BIN" run -c c-$name.yaml > c-$name.log 2>&1 & echo $! > c-$name.pid
  measure "$name" "$lp" "$(cat s-$name.pid)" "$(cat c-$name.pid)"
  kill "$(cat s-$name.pid)" "$(cat c-$name.pid)"; rm s-$name.pid c-$name.pid
}
[ -n "${ONLY_L7:-}" ] || weft_pair weft-l4 19411 tcp no 41
weft_pair weft-l7 19421 http yes 42
[ -n "${ONLY_L7:-}" ] || weft_pair weft-l7-detect 19431 detect yes 43

echo "# requests/s against haproxy-http's (16 and $WIDE connections)"
awk '$1 == "haproxy-http" { a = $2; b = $3 } { n[NR] = $1; x[NR] = $2; y[NR] = $3 }
  END { for (i = 1; i <= NR; i++) printf "%-14s %5.2fx %5.2fx\n", n[i], x[i] / a, y[i] / b }' rates
