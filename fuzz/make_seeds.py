#!/usr/bin/env python3
"""Writes the seed corpus under corpus/<target>/seed-*: a few valid inputs
per target, so that the fuzzer starts past the syntax checks. Run from the
fuzz/ directory; the output is committed, so this is only needed when the
formats change."""

import json
import os
import re
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# resources: the examples of the reference docs, a stream of several, JSON.
docs = open(os.path.join(ROOT, "docs", "resources.md")).read()
docs += open(os.path.join(ROOT, "docs", "vm-zone.md")).read()
examples = [b for b in re.findall(r"```yaml\n(.*?)```", docs, re.S) if "apiVersion:" in b]
for i, b in enumerate(examples):
    write("resources", f"doc-{i}.yaml", b)
write("resources", "stream.yaml", "---\n".join(examples) + "...\n")
write("resources", "mesh.json", json.dumps({
    "apiVersion": "weft.io/v1alpha1", "kind": "Mesh",
    "metadata": {"name": "default"},
    "spec": {"trustDomain": "prod.example", "workloadCertificateLifetime": "24h"}}))
write("resources", "workload.json", json.dumps({
    "apiVersion": "weft.io/v1alpha1", "kind": "Workload",
    "metadata": {"name": "web-1", "namespace": "default", "labels": {"app": "web"}},
    "spec": {"address": "10.0.0.5"}}))

# policy_compile: policies with every section, then NUL, then a request.
routes = {"routes": [
    {"policy": "r", "rule": {
        "matches": [{"path": {"type": "PathPrefix", "value": "/api/"},
                     "method": "GET",
                     "headers": [{"type": "Exact", "name": "x-a", "value": "1"},
                                 {"type": "RegularExpression", "name": "x-b", "value": "v[0-9]+"},
                                 {"type": "Absent", "name": "x-c"}],
                     "queryParams": [{"type": "RegularExpression", "name": "q", "value": ".*"}]}],
        "default": {
            "filters": [
                {"type": "RequestHeaderModifier", "set": [{"name": "x-s", "value": "1"}], "remove": ["x-r"]},
                {"type": "UrlRewrite", "hostname": "h.example:80",
                 "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}},
                {"type": "RequestRedirect", "scheme": "https", "port": 443, "statusCode": 308},
                {"type": "RequestMirror", "backendRef": {"name": "m"}, "percentage": 10}],
            "backendRefs": [{"name": "a", "weight": 2}, {"name": "b", "namespace": "x", "port": 81}]}}}],
    "timeout": {"connectTimeout": "1s", "requestTimeout": "0s", "idleTimeout": "1h"},
    "retry": {"numRetries": 3, "perTryTimeout": "500ms", "retryOn": ["5xx", "Reset"],
              "retriableStatusCodes": [503], "backoff": {"baseInterval": "10ms", "maxInterval": "1s"},
              "budget": {"percent": 50, "minRetryConcurrency": 1}},
    "rateLimit": {"http": {"requests": 10, "interval": "1s",
                           "onRateLimit": {"status": 429, "headers": [{"name": "x-l", "value": "1"}]}},
                  "tcp": {"connections": 5, "interval": "1m"}},
    "fault": {"http": [{"delay": {"percentage": 50, "value": "5ms"},
                        "abort": {"percentage": 10, "httpStatus": 503}}]},
    "loadBalancing": {"algorithm": {"type": "ConsistentHash", "hashOn": {"type": "Header", "name": "x-u"}}},
    "accessLog": {"backends": [{"type": "Stdout", "format": {"type": "Text", "template": "%METHOD% %PATH%"}},
                               {"type": "File", "path": "/tmp/a.log"}]}}
policy = [{
    "workload": "web",
    "inbound": {
        "permissions": [
            {"policy": "p", "from": ["spiffe://td/ns/default/*"], "action": "Allow",
             "http": [{"method": "GET", "path": {"type": "Exact", "value": "/x"}}]},
            {"policy": "d", "from": ["spiffe://td/ns/default/sa/web"], "action": "Deny"}],
        "rateLimits": [{"policy": "l", "from": ["spiffe://td/*"],
                        "default": {"http": {"requests": 1, "interval": "1s"}}}],
        "accessLog": {"backends": [{"type": "Stdout"}]}},
    "outboundDefaults": {"timeout": {"requestTimeout": "15s"}},
    "outbound": {"default/api": routes}}]
req = b"GET /api/users?q=1\nx-a: 1\nx-b: v2\nhost: api.default.mesh"
write("policy_compile", "full.bin", json.dumps(policy).encode() + b"\0" + req)
write("policy_compile", "empty.bin", b"[]\0GET /")
write("policy_compile", "minimal.bin", b'[{"workload":"web"}]\0POST http://a.b:80/c?d=e\nx-c: 1')

# config_update: ConfigUpdate in protobuf, whole and as a delta on the
# target's fixed base (version "1").
BUNDLE = open(os.path.join(HERE, "src", "lib.rs")).read()
BUNDLE = BUNDLE[BUNDLE.index("-----BEGIN"):BUNDLE.index("-----END CERTIFICATE-----") + 25] + "\n"


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, value):
    if isinstance(value, bool):
        return varint(num << 3) + varint(int(value))
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


def endpoint(addr, ready=True):
    return (field(1, addr) + field(2, addr + ":15008")
            + field(3, "spiffe://td/ns/default/sa/api") + field(4, ready))


def service(name, ns, vip, eps, ports=((8080, 1),)):
    out = field(1, name) + field(2, ns) + field(3, "east") + field(4, vip)
    for port, proto in ports:
        out += field(5, field(1, port) + field(2, proto))
    for e in eps:
        out += field(6, e)
    return out


whole = (field(1, "2") + field(2, BUNDLE)
         + field(3, service("api", "default", "10.96.0.1", [endpoint("10.0.0.1"), endpoint("10.0.0.9", False)]))
         + field(3, service("web", "default", "fd00::1", [endpoint("fd00::10")], ports=((80, 1), (81, 0))))
         + field(4, field(1, "web") + field(2, "spiffe://td/ns/default/*"))
         + field(5, "default") + field(6, "east")
         + field(11, json.dumps(policy)))
write("config_update", "whole.pb", whole)
delta = (field(1, "3") + field(7, "1") + field(8, "data/db")
         + field(10, field(1, service("api", "default", "10.96.0.1", [endpoint("10.0.0.3")]))
                 + field(2, endpoint("10.0.0.2", False)))
         + field(3, service("new", "default", "10.96.0.7", [endpoint("10.0.0.7")]))
         + field(11, '[{"workload":"web"}]'))
write("config_update", "delta.pb", delta)
write("config_update", "chunk.pb", field(1, "4") + field(2, BUNDLE) + field(9, True))

# http_request: HTTP/1.1 requests for each route, pipelined, and HTTP/2.
h1 = [
    b"GET /api/users?x=1 HTTP/1.1\r\nHost: api.default.mesh:8080\r\nConnection: close, x-secret\r\nx-secret: 1\r\nx-remove: 1\r\n\r\n",
    b"POST /full/a HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\nTE: gzip\r\n\r\nhello",
    b"GET /old?q HTTP/1.1\r\nHost: a:1\r\nx-redirect: 1\r\n\r\nGET /old HTTP/1.1\r\nHost: b\r\n\r\n",
    b"PUT http://api.default.mesh/admin HTTP/1.1\r\nTransfer-Encoding: chunked\r\nx-user: root\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET /api/v1/x?debug=1 HTTP/1.0\r\n\r\n",
]
for i, r in enumerate(h1):
    write("http_request", f"h1-{i}.http", r)


def h2_frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_literal(name, value):
    # Literal header field without indexing, new name.
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


headers = (hpack_literal(b":method", b"GET") + hpack_literal(b":scheme", b"http")
           + hpack_literal(b":path", b"/api/x?y=1") + hpack_literal(b":authority", b"api.default.mesh")
           + hpack_literal(b"x-redirect", b"1"))
h2 = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b"")
      + h2_frame(1, 0x5, 1, headers))
write("http_request", "h2.bin", h2)

# access_log_template: the documented example and edge cases.
write("access_log_template", "example.txt", "%START_TIME% %METHOD% %PATH% %STATUS%")
write("access_log_template", "all.txt", "%DIRECTION% %SOURCE% %DESTINATION% %ROUTE% %AUTHORITY% %PROTOCOL% %DURATION% %UPSTREAM% %FLAG%")
write("access_log_template", "odd.txt", "100% %% %NOPE% %é% trailing %")

# dns: queries as applications send them (mesh names, A and AAAA, a name
# outside the mesh), and a resolv.conf.


def dns_query(qid, name, qtype):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack(">HH", qtype, 1)


write("dns", "a.bin", dns_query(1, "api.default.mesh", 1))
write("dns", "aaaa.bin", dns_query(2, "db.data.east.mesh", 28))
write("dns", "unknown.bin", dns_query(3, "nope.default.mesh", 1))
write("dns", "outside.bin", dns_query(4, "example.com", 1))
write("dns", "resolv.conf", "# generated\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nsearch default.svc\noptions ndots:5\n")

# protocol_detect: a client's first bytes, HTTP and not.
write("protocol_detect", "get.bin", b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
write("protocol_detect", "h2.bin", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
write("protocol_detect", "tls.bin", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
write("protocol_detect", "partial.bin", b"OPTI")
write("protocol_detect", "postgres.bin", b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
