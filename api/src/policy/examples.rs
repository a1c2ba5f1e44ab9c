//! Example policies: the one the reference shows per kind, and variants
//! that together set every field (the docs test checks the reference
//! against them, and docs/policies.md shows the same texts).

use crate::policy::target::TargetRef;
use crate::resource::{Kind, Resource};

/// The example of a policy kind that the reference shows (`TrafficPermission`
/// for kinds that are not policies).
pub fn example(kind: Kind) -> Resource {
    parse(text(kind))
}

/// The YAML of [`example`].
pub fn text(kind: Kind) -> &'static str {
    match kind {
        Kind::HttpRoute => HTTP_ROUTE,
        Kind::Timeout => TIMEOUT,
        Kind::Retry => RETRY,
        Kind::RateLimit => RATE_LIMIT,
        Kind::FaultInjection => FAULT_INJECTION,
        Kind::LoadBalancing => LOAD_BALANCING,
        Kind::AccessLog => ACCESS_LOG,
        Kind::TcpRoute => TCP_ROUTE,
        Kind::Trace => TRACE,
        Kind::CircuitBreaker => CIRCUIT_BREAKER,
        Kind::HealthCheck => HEALTH_CHECK,
        _ => TRAFFIC_PERMISSION,
    }
}

/// More examples of a policy kind, setting the fields and variants the
/// main one leaves out.
pub fn variants(kind: Kind) -> Vec<Resource> {
    let texts: &[&str] = match kind {
        Kind::TrafficPermission => &[TRAFFIC_PERMISSION_VARIANTS],
        Kind::HttpRoute => &[HTTP_ROUTE_VARIANTS, HTTP_ROUTE_MATCHES],
        Kind::LoadBalancing => &[LOAD_BALANCING_VARIANTS],
        Kind::AccessLog => &[ACCESS_LOG_VARIANTS, ACCESS_LOG_FROM],
        Kind::RateLimit => &[RATE_LIMIT_VARIANTS],
        Kind::Retry => &[RETRY_VARIANTS],
        Kind::TcpRoute => &[TCP_ROUTE_VARIANTS],
        Kind::HealthCheck => &[HEALTH_CHECK_VARIANTS],
        _ => &[],
    };
    let mut out: Vec<Resource> = texts.iter().map(|t| parse(t)).collect();
    // Every kind of targetRef, on the main example.
    let labels = TargetRef::Labels {
        labels: [("app".to_owned(), "web".to_owned())].into(),
    };
    let service = TargetRef::Service {
        name: "web".to_owned(),
        namespace: "shop".to_owned(),
    };
    let workload = TargetRef::Workload {
        name: "web-1".to_owned(),
        namespace: "shop".to_owned(),
    };
    for target in [TargetRef::Mesh, labels, service, workload] {
        let mut resource = example(kind);
        set_target(&mut resource, target);
        out.push(resource);
    }
    out
}

fn set_target(resource: &mut Resource, target: TargetRef) {
    let slot = match resource {
        Resource::TrafficPermission(o) => &mut o.spec.target_ref,
        Resource::HttpRoute(o) => &mut o.spec.target_ref,
        Resource::Timeout(o) => &mut o.spec.target_ref,
        Resource::Retry(o) => &mut o.spec.target_ref,
        Resource::RateLimit(o) => &mut o.spec.target_ref,
        Resource::FaultInjection(o) => &mut o.spec.target_ref,
        Resource::LoadBalancing(o) => &mut o.spec.target_ref,
        Resource::AccessLog(o) => &mut o.spec.target_ref,
        Resource::TcpRoute(o) => &mut o.spec.target_ref,
        Resource::Trace(o) => &mut o.spec.target_ref,
        Resource::CircuitBreaker(o) => &mut o.spec.target_ref,
        Resource::HealthCheck(o) => &mut o.spec.target_ref,
        Resource::Mesh(_)
        | Resource::Zone(_)
        | Resource::Workload(_)
        | Resource::Service(_)
        | Resource::ExternalService(_) => return,
    };
    *slot = target;
}

fn parse(text: &str) -> Resource {
    match crate::parse::parse_yaml(text) {
        Ok(mut resources) if resources.len() == 1 => resources.remove(0),
        // The texts are constants, every one of them parsed by the tests.
        other => panic!("a built-in example does not parse: {other:?}"),
    }
}

const TRAFFIC_PERMISSION: &str = "\
apiVersion: weft.io/v1alpha1
kind: TrafficPermission
metadata:
  name: payments-callers
  mesh: default
spec:
  targetRef:
    kind: Service
    name: payments
    namespace: payments
  rules:
  - from:
      kind: Service
      name: checkout
      namespace: shop
    default:
      action: Allow
  - from:
      kind: SpiffeIdPrefix
      value: spiffe://prod.example/ns/batch/
    default:
      action: Deny
      http:
      - path:
          type: PathPrefix
          value: /admin
        method: POST
";

const TRAFFIC_PERMISSION_VARIANTS: &str = "\
apiVersion: weft.io/v1alpha1
kind: TrafficPermission
metadata:
  name: variants
spec:
  targetRef:
    kind: Labels
    labels:
      app: payments
  rules:
  - from:
      kind: SpiffeId
      value: spiffe://prod.example/ns/shop/sa/checkout
    default:
      action: Allow
      http:
      - path:
          type: Exact
          value: /health
        headers:
        - type: Exact
          name: x-env
          value: prod
        - type: Prefix
          name: x-user
          value: admin-
        - type: RegularExpression
          name: x-id
          value: '[0-9]+'
        - type: Present
          name: x-trace
        - type: Absent
          name: x-debug
        queryParams:
        - type: Exact
          name: v
          value: '2'
        - type: RegularExpression
          name: id
          value: '[a-z]+'
  - from:
      kind: Labels
      labels:
        team: billing
    default:
      action: Allow
  - from:
      kind: Zone
      name: eu-west
    default:
      action: Allow
  - from:
      kind: Mesh
    default:
      action: Deny
      http:
      - path:
          type: RegularExpression
          value: /internal/.*
---
";

const HTTP_ROUTE: &str = "\
apiVersion: weft.io/v1alpha1
kind: HTTPRoute
metadata:
  name: payments-canary
  mesh: default
spec:
  to:
  - targetRef:
      kind: Service
      name: payments
      namespace: payments
    rules:
    - matches:
      - path:
          type: PathPrefix
          value: /v2
      default:
        filters:
        - type: UrlRewrite
          path:
            type: ReplacePrefixMatch
            replacePrefixMatch: /
        backendRefs:
        - name: payments-v2
          namespace: payments
          weight: 90
        - name: payments-v3
          namespace: payments
          weight: 10
          port: 8080
    - default:
        filters:
        - type: RequestHeaderModifier
          set:
          - name: x-route
            value: default
";

const HTTP_ROUTE_VARIANTS: &str = "\
apiVersion: weft.io/v1alpha1
kind: HTTPRoute
metadata:
  name: variants
spec:
  targetRef:
    kind: Workload
    name: web-1
  to:
  - targetRef:
      kind: Service
      name: web
    rules:
    - matches:
      - method: GET
      default:
        filters:
        - type: RequestHeaderModifier
          add:
          - name: x-a
            value: b
          remove:
          - x-c
        - type: ResponseHeaderModifier
          set:
          - name: x-served-by
            value: web
          add:
          - name: x-d
            value: e
          remove:
          - server
        - type: UrlRewrite
          hostname: web.internal
          path:
            type: ReplaceFullPath
            replaceFullPath: /index
        - type: RequestMirror
          backendRef:
            name: web-shadow
            port: 8080
            weight: 1
          percentage: 10
    - matches:
      - path:
          type: Exact
          value: /old
      default:
        filters:
        - type: RequestRedirect
          scheme: https
          hostname: www.example.com
          port: 443
          path:
            type: ReplaceFullPath
            replaceFullPath: /new
          statusCode: 301
";

const TIMEOUT: &str = "\
apiVersion: weft.io/v1alpha1
kind: Timeout
metadata:
  name: defaults
  mesh: default
spec:
  targetRef:
    kind: Mesh
  to:
  - targetRef:
      kind: Mesh
    default:
      connectTimeout: 5s
      idleTimeout: 1h
      requestTimeout: 15s
  - targetRef:
      kind: ExternalService
      name: stripe
      namespace: payments
    default:
      requestTimeout: 30s
";

const RETRY: &str = "\
apiVersion: weft.io/v1alpha1
kind: Retry
metadata:
  name: payments
  mesh: default
spec:
  targetRef:
    kind: Labels
    labels:
      app: checkout
  to:
  - targetRef:
      kind: Service
      name: payments
      namespace: payments
    default:
      numRetries: 3
      perTryTimeout: 2s
      retryOn:
      - ConnectFailure
      - Reset
      - GatewayError
      - RetriableStatusCodes
      retriableStatusCodes:
      - 409
      backoff:
        baseInterval: 25ms
        maxInterval: 250ms
      budget:
        percent: 20
        minRetryConcurrency: 3
";

const RETRY_VARIANTS: &str = "\
apiVersion: weft.io/v1alpha1
kind: Retry
metadata:
  name: grpc
spec:
  to:
  - targetRef:
      kind: Mesh
    default:
      retryOn:
      - 5xx
      - GrpcUnavailable
      - GrpcResourceExhausted
      - GrpcCancelled
      - GrpcDeadlineExceeded
";

const RATE_LIMIT: &str = "\
apiVersion: weft.io/v1alpha1
kind: RateLimit
metadata:
  name: payments
  mesh: default
spec:
  targetRef:
    kind: Service
    name: payments
    namespace: payments
  to:
  - targetRef:
      kind: ExternalService
      name: stripe
      namespace: payments
    default:
      http:
        requests: 100
        interval: 1s
  rules:
  - from:
      kind: Mesh
    default:
      http:
        requests: 1000
        interval: 1s
        onRateLimit:
          status: 429
          headers:
          - name: x-rate-limited
            value: 'true'
      tcp:
        connections: 100
        interval: 1s
";

const FAULT_INJECTION: &str = "\
apiVersion: weft.io/v1alpha1
kind: FaultInjection
metadata:
  name: chaos
  mesh: default
spec:
  targetRef:
    kind: Labels
    labels:
      env: staging
  to:
  - targetRef:
      kind: Service
      name: payments
      namespace: payments
    default:
      http:
      - delay:
          percentage: 10
          value: 2s
      - abort:
          percentage: 5
          httpStatus: 503
";

const LOAD_BALANCING: &str = "\
apiVersion: weft.io/v1alpha1
kind: LoadBalancing
metadata:
  name: sessions
  mesh: default
spec:
  to:
  - targetRef:
      kind: Service
      name: web
      namespace: shop
    default:
      algorithm:
        type: ConsistentHash
        hashOn:
          type: Cookie
          name: session
      localityAware: true
";

const LOAD_BALANCING_VARIANTS: &str = "\
apiVersion: weft.io/v1alpha1
kind: LoadBalancing
metadata:
  name: variants
spec:
  to:
  - targetRef:
      kind: Mesh
    default:
      algorithm:
        type: LeastRequest
  - targetRef:
      kind: Service
      name: a
    default:
      algorithm:
        type: RoundRobin
  - targetRef:
      kind: Service
      name: b
    default:
      algorithm:
        type: Random
  - targetRef:
      kind: Service
      name: c
    default:
      algorithm:
        type: ConsistentHash
        hashOn:
          type: Header
          name: x-user
  - targetRef:
      kind: Service
      name: d
    default:
      algorithm:
        type: ConsistentHash
        hashOn:
          type: SourceIp
";

const ACCESS_LOG: &str = "\
apiVersion: weft.io/v1alpha1
kind: AccessLog
metadata:
  name: everything
  mesh: default
spec:
  targetRef:
    kind: Mesh
  rules:
  - from:
      kind: Mesh
    default:
      backends:
      - type: File
        path: /var/log/weft/access.log
        format:
          type: Json
  to:
  - targetRef:
      kind: Mesh
    default:
      backends:
      - type: Stdout
        format:
          type: Text
          template: '%START_TIME% %METHOD% %PATH% %STATUS%'
";

const ACCESS_LOG_VARIANTS: &str = "\
apiVersion: weft.io/v1alpha1
kind: AccessLog
metadata:
  name: variants
spec:
  to:
  - targetRef:
      kind: Mesh
    default:
      backends:
      - type: Stdout
";

const HTTP_ROUTE_MATCHES: &str = "\
apiVersion: weft.io/v1alpha1
kind: HTTPRoute
metadata:
  name: matches
spec:
  targetRef:
    kind: Labels
    labels:
      app: web
  to:
  - targetRef:
      kind: Service
      name: web
    rules:
    - matches:
      - headers:
        - type: Exact
          name: x-env
          value: canary
        queryParams:
        - type: Exact
          name: canary
          value: '1'
      default:
        backendRefs:
        - name: web-canary
";

const RATE_LIMIT_VARIANTS: &str = "\
apiVersion: weft.io/v1alpha1
kind: RateLimit
metadata:
  name: variants
spec:
  to:
  - targetRef:
      kind: Mesh
    default:
      http:
        requests: 10
        interval: 100ms
        onRateLimit:
          status: 503
          headers:
          - name: x-limited
            value: '1'
      tcp:
        connections: 5
        interval: 1s
  rules:
  - from:
      kind: SpiffeId
      value: spiffe://prod.example/ns/shop/sa/checkout
    default:
      tcp:
        connections: 5
        interval: 1s
  - from:
      kind: SpiffeIdPrefix
      value: spiffe://prod.example/ns/batch/
    default:
      tcp:
        connections: 1
        interval: 1s
  - from:
      kind: Service
      name: checkout
      namespace: shop
    default:
      tcp:
        connections: 5
        interval: 1s
  - from:
      kind: Labels
      labels:
        app: web
    default:
      tcp:
        connections: 5
        interval: 1s
  - from:
      kind: Zone
      name: eu-west
    default:
      tcp:
        connections: 5
        interval: 1s
";

const ACCESS_LOG_FROM: &str = "\
apiVersion: weft.io/v1alpha1
kind: AccessLog
metadata:
  name: from
spec:
  rules:
  - from:
      kind: SpiffeId
      value: spiffe://prod.example/ns/shop/sa/checkout
    default:
      backends:
      - type: Stdout
  - from:
      kind: SpiffeIdPrefix
      value: spiffe://prod.example/ns/batch/
    default:
      backends:
      - type: File
        path: /var/log/batch.log
        format:
          type: Text
          template: '%PATH%'
  - from:
      kind: Service
      name: checkout
      namespace: shop
    default: {}
  - from:
      kind: Labels
      labels:
        app: web
    default: {}
  - from:
      kind: Zone
      name: eu-west
    default: {}
  to:
  - targetRef:
      kind: ExternalService
      name: stripe
      namespace: payments
    default:
      backends:
      - type: File
        path: /var/log/stripe.log
";

const TCP_ROUTE: &str = "\
apiVersion: weft.io/v1alpha1
kind: TCPRoute
metadata:
  name: orders-db-migration
  mesh: default
spec:
  targetRef:
    kind: Mesh
  to:
  - targetRef:
      kind: Service
      name: orders-db
      namespace: orders
    rules:
    - default:
        backendRefs:
        - name: orders-db
          namespace: orders
          weight: 90
        - name: orders-db-v2
          namespace: orders
          weight: 10
";

const TCP_ROUTE_VARIANTS: &str = "\
apiVersion: weft.io/v1alpha1
kind: TCPRoute
metadata:
  name: variants
spec:
  to:
  - targetRef:
      kind: Service
      name: cache
    rules:
    - default:
        backendRefs:
        - name: cache-b
          port: 6380
";

const TRACE: &str = "\
apiVersion: weft.io/v1alpha1
kind: Trace
metadata:
  name: mesh-tracing
  mesh: default
spec:
  targetRef:
    kind: Mesh
  default:
    sampling: 10
    backend:
      type: Otlp
      endpoint: http://otel-collector.observability:4318
";

const CIRCUIT_BREAKER: &str = "\
apiVersion: weft.io/v1alpha1
kind: CircuitBreaker
metadata:
  name: payments
  mesh: default
spec:
  targetRef:
    kind: Mesh
  to:
  - targetRef:
      kind: Service
      name: payments
      namespace: payments
    default:
      maxConnections: 1024
      maxPendingRequests: 64
      maxRequests: 256
      outlierDetection:
        consecutive5xx: 5
        consecutiveGatewayErrors: 3
        interval: 10s
        baseEjectionTime: 30s
        maxEjectionPercent: 50
";

const HEALTH_CHECK: &str = "\
apiVersion: weft.io/v1alpha1
kind: HealthCheck
metadata:
  name: payments
  mesh: default
spec:
  targetRef:
    kind: Mesh
  to:
  - targetRef:
      kind: Service
      name: payments
      namespace: payments
    default:
      interval: 5s
      timeout: 1s
      unhealthyThreshold: 3
      healthyThreshold: 1
      http:
        path: /healthz
        expectedStatuses:
        - 200
        - 204
";

const HEALTH_CHECK_VARIANTS: &str = "\
apiVersion: weft.io/v1alpha1
kind: HealthCheck
metadata:
  name: tcp
spec:
  to:
  - targetRef:
      kind: Mesh
    default:
      tcp: {}
";
