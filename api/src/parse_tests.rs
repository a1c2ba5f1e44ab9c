//! Tests of reading resources as users write them: good files of every
//! kind, and each kind of bad input with the exact path (and, for decoding
//! errors, position) it must be reported at.

use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::kinds::{CaChoice, PemChoice, ServiceStatus, ZoneBackend};
use crate::mesh::Protocol;
use crate::resource::DEFAULT_MESH;
use crate::validation::{check_references, KnownNames};

const MESH: &str = "\
apiVersion: weft.io/v1alpha1
kind: Mesh
metadata:
  name: prod
spec:
  trustDomain: prod.example
  workloadCertificateLifetime: 12h
";

const MESH_PROVIDED_CA: &str = "\
apiVersion: weft.io/v1alpha1
kind: Mesh
metadata:
  name: partner
spec:
  trustDomain: partner.example
  ca:
    provided:
      certificate:
        file: /etc/weft/ca.crt
      key:
        inline: |
          -----BEGIN EC PRIVATE KEY-----
          MHcCAQEEIB
          -----END EC PRIVATE KEY-----
";

const ZONE: &str = "\
apiVersion: weft.io/v1alpha1
kind: Zone
metadata:
  name: eu-west
spec:
  backend: universal
";

const WORKLOAD: &str = "\
apiVersion: weft.io/v1alpha1
kind: Workload
metadata:
  name: payments-vm-1
  mesh: prod
  namespace: payments
  labels:
    app: payments
    weft.io/version: v1.2
spec:
  address: 10.0.1.5
  service: payments
  serviceAccount: payments-api
  ports:
  - port: 8080
    protocol: http
  - port: 9000
";

const SERVICE: &str = "\
apiVersion: weft.io/v1alpha1
kind: Service
metadata:
  name: payments
  namespace: payments
spec:
  ports:
  - port: 8080
    protocol: http
";

const EXTERNAL_SERVICE: &str = "\
apiVersion: weft.io/v1alpha1
kind: ExternalService
metadata:
  name: stripe
  namespace: payments
spec:
  host: api.stripe.com
  port: 443
";

fn one(input: &str) -> Resource {
    match parse_yaml(input) {
        Ok(mut resources) if resources.len() == 1 => resources.remove(0),
        Ok(resources) => panic!("expected one resource, got {}", resources.len()),
        Err(e) => panic!("expected a valid resource, got:\n{e}"),
    }
}

/// The single problem of a single-document input.
fn only_error(input: &str) -> FieldError {
    let errors = all_errors(input);
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    errors.into_iter().next().unwrap()
}

fn all_errors(input: &str) -> Vec<FieldError> {
    match parse_yaml(input) {
        Ok(resources) => panic!("expected an error, parsed {resources:?}"),
        Err(e) => {
            assert_eq!(e.documents.len(), 1, "expected one bad document: {e}");
            e.documents[0].errors.clone()
        }
    }
}

fn paths(errors: &[FieldError]) -> Vec<String> {
    errors.iter().map(|e| e.path.to_string()).collect()
}

#[test]
fn good_resources_of_every_kind() {
    let Resource::Mesh(mesh) = one(MESH) else {
        panic!("not a Mesh")
    };
    assert_eq!(mesh.metadata.name, "prod");
    assert_eq!(mesh.mesh(), None);
    assert_eq!(mesh.spec.trust_domain, "prod.example");
    assert_eq!(mesh.spec.workload_certificate_lifetime.to_string(), "12h");
    assert!(matches!(mesh.spec.ca.choice(), Some(CaChoice::Builtin(_))));

    let Resource::Mesh(partner) = one(MESH_PROVIDED_CA) else {
        panic!("not a Mesh")
    };
    let Some(CaChoice::Provided(ca)) = partner.spec.ca.choice() else {
        panic!("not a provided CA")
    };
    assert_eq!(
        ca.certificate.choice(),
        Some(PemChoice::File("/etc/weft/ca.crt"))
    );
    assert!(
        matches!(ca.key.choice(), Some(PemChoice::Inline(pem)) if pem.contains("EC PRIVATE KEY"))
    );
    assert_eq!(
        partner.spec.workload_certificate_lifetime.to_string(),
        "24h",
        "default lifetime"
    );

    let Resource::Zone(zone) = one(ZONE) else {
        panic!("not a Zone")
    };
    assert_eq!(zone.spec.backend, ZoneBackend::Universal);

    let Resource::Workload(workload) = one(WORKLOAD) else {
        panic!("not a Workload")
    };
    assert_eq!(workload.mesh(), Some("prod"));
    assert_eq!(
        workload.spec.address,
        IpAddr::V4(Ipv4Addr::new(10, 0, 1, 5))
    );
    assert_eq!(workload.spec.ports[0].protocol, Protocol::Http);
    assert_eq!(
        workload.spec.ports[1].protocol,
        Protocol::Detect,
        "default protocol"
    );
    assert_eq!(workload.metadata.labels["weft.io/version"], "v1.2");
    assert_eq!(
        workload.identity(&mesh.spec).unwrap().as_str(),
        "spiffe://prod.example/ns/payments/sa/payments-api"
    );

    let Resource::Service(service) = one(SERVICE) else {
        panic!("not a Service")
    };
    assert_eq!(
        service.metadata.mesh.as_deref(),
        Some(DEFAULT_MESH),
        "mesh defaulted and made explicit"
    );
    assert_eq!(service.status, None);

    let Resource::ExternalService(external) = one(EXTERNAL_SERVICE) else {
        panic!("not an ExternalService")
    };
    assert_eq!(external.spec.host, "api.stripe.com");
    assert_eq!(external.spec.protocol, Protocol::Tcp);
}

#[test]
fn an_undeclared_port_is_detected_and_a_declared_one_kept() {
    // Workloads stored before detection existed were written with their
    // protocol spelled out (`tcp` by default then): they stay TCP.
    let input = WORKLOAD.replace("  - port: 9000\n", "  - port: 9000\n    protocol: tcp\n");
    let Resource::Workload(workload) = one(&input) else {
        panic!("not a Workload")
    };
    assert_eq!(workload.spec.ports[1].protocol, Protocol::Tcp);
    let input = WORKLOAD.replace("  - port: 9000\n", "  - port: 9000\n    protocol: detect\n");
    let Resource::Workload(workload) = one(&input) else {
        panic!("not a Workload")
    };
    assert_eq!(workload.spec.ports[1].protocol, Protocol::Detect);
    // Written back, an undeclared port says `detect`, so a later change of
    // the default never changes what a stored port means.
    let json = serde_json::to_value(&workload.spec.ports[1]).unwrap();
    assert_eq!(json["protocol"], "detect");

    // An external service is not detected.
    let error = only_error(&format!("{EXTERNAL_SERVICE}  protocol: detect\n"));
    assert_eq!(error.path.to_string(), "spec.protocol");
}

#[test]
fn workload_service_account_defaults() {
    let input = WORKLOAD.replace("  serviceAccount: payments-api\n", "");
    let Resource::Workload(workload) = one(&input) else {
        panic!("not a Workload")
    };
    assert_eq!(workload.spec.service_account, "default");
}

#[test]
fn multi_document_yaml() {
    let input = format!(
        "# everything for payments\n---\n{MESH}---\n---\n# an empty document above\n{ZONE}...\n---\n{WORKLOAD}---\n{SERVICE}---\n{EXTERNAL_SERVICE}"
    );
    let resources = parse_yaml(&input).unwrap();
    let kinds: Vec<Kind> = resources.iter().map(Resource::kind).collect();
    assert_eq!(
        kinds,
        [
            Kind::Mesh,
            Kind::Zone,
            Kind::Workload,
            Kind::Service,
            Kind::ExternalService
        ]
    );
    assert!(parse_yaml("").unwrap().is_empty());
    assert!(parse_yaml("# nothing\n---\n").unwrap().is_empty());
}

#[test]
fn bad_yaml_reports_its_position_in_the_whole_file() {
    // The second document (starting at line 8) has a badly indented key.
    let input = format!(
        "{MESH}---\napiVersion: weft.io/v1alpha1\nkind: Zone\nmetadata:\n  name: eu-west\n   oops: 1\nspec:\n  backend: universal\n"
    );
    let err = parse_yaml(&input).unwrap_err();
    assert_eq!(err.documents.len(), 1);
    let document = &err.documents[0];
    assert_eq!(document.document, 2);
    assert_eq!(document.line, Some(8));
    let [error] = document.errors.as_slice() else {
        panic!("expected one error: {err}")
    };
    assert!(error.path.is_root());
    assert_eq!(
        error.position,
        Some(Position {
            line: 13,
            column: 8
        })
    );
    assert_eq!(
        error.reason,
        "mapping values are not allowed in this context"
    );
    assert_eq!(
        err.to_string(),
        "document 2 (from line 8): mapping values are not allowed in this context (at line 13 column 8)"
    );
}

#[test]
fn unclosed_flow_mapping() {
    let error = only_error("apiVersion: weft.io/v1alpha1\nkind: Zone\nmetadata: {name: z\nspec:\n  backend: universal\n");
    assert!(error.path.is_root());
    assert_eq!(error.position.map(|p| p.line), Some(4));
    assert!(error.reason.contains("flow mapping"), "{}", error.reason);
}

#[test]
fn unknown_kind_lists_the_known_ones() {
    let error = only_error(&ZONE.replace("kind: Zone", "kind: Gateway"));
    assert_eq!(error.path.to_string(), "kind");
    assert_eq!(
        error.reason,
        "unknown kind \"Gateway\"; known kinds: Mesh, Zone, Workload, Service, ExternalService, TrafficPermission, HTTPRoute, Timeout, Retry, RateLimit, FaultInjection, LoadBalancing, AccessLog, TCPRoute, Trace, CircuitBreaker, HealthCheck"
    );
}

#[test]
fn missing_or_wrong_api_version_and_kind_are_reported_together() {
    let errors = all_errors("metadata:\n  name: x\nspec: {}\n");
    assert_eq!(paths(&errors), ["apiVersion", "kind"]);
    let error = only_error(&ZONE.replace("weft.io/v1alpha1", "v1"));
    assert_eq!(error.path.to_string(), "apiVersion");
    assert_eq!(
        error.reason,
        "unsupported apiVersion \"v1\"; expected weft.io/v1alpha1"
    );
    let error = only_error(&format!("kind: Mesh\n{MESH}"));
    assert_eq!(error.path.to_string(), "kind");
    assert_eq!(error.reason, "is given more than once");
}

#[test]
fn unknown_field_lists_the_expected_ones() {
    let error = only_error(&WORKLOAD.replace(
        "  service: payments\n",
        "  service: payments\n  replicas: 3\n",
    ));
    assert_eq!(error.path.to_string(), "spec.replicas");
    assert_eq!(
        error.reason,
        "unknown field `replicas`, expected one of `address`, `service`, `serviceAccount`, `ports`, `hboneAddress`, `node`"
    );
    assert_eq!(
        error.position,
        Some(Position {
            line: 13,
            column: 3
        })
    );

    let error = only_error(&MESH.replace("  name: prod\n", "  name: prod\n  annotations: {}\n"));
    assert_eq!(error.path.to_string(), "metadata.annotations");

    // A kind without status refuses the field like any other unknown one.
    let error = only_error(&format!("{ZONE}status: {{}}\n"));
    assert_eq!(error.path.to_string(), "status");
    assert!(error
        .reason
        .contains("expected one of `apiVersion`, `kind`, `metadata`, `spec`"));
}

#[test]
fn wrong_type() {
    let error = only_error(&WORKLOAD.replace("  - port: 9000", "  - port: nine-thousand"));
    assert_eq!(error.path.to_string(), "spec.ports[1].port");
    assert_eq!(
        error.reason,
        "invalid type: string \"nine-thousand\", expected an integer from 0 to 65535"
    );
    assert_eq!(
        error.position,
        Some(Position {
            line: 17,
            column: 11
        })
    );

    let error = only_error(&WORKLOAD.replace("    app: payments", "    app: [payments]"));
    assert_eq!(error.path.to_string(), r#"metadata.labels["app"]"#);

    let error = only_error(&WORKLOAD.replace("protocol: http", "protocol: udp"));
    assert_eq!(error.path.to_string(), "spec.ports[0].protocol");
    assert_eq!(
        error.reason,
        "unknown variant `udp`, expected one of `tcp`, `http`, `detect`"
    );

    let error = only_error("[1, 2]\n");
    assert!(error.path.is_root());
    assert!(
        error.reason.contains("expected a resource"),
        "{}",
        error.reason
    );
}

#[test]
fn missing_field_points_at_the_field() {
    let error = only_error(&MESH.replace("  trustDomain: prod.example\n", ""));
    assert_eq!(error.path.to_string(), "spec.trustDomain");
    assert_eq!(error.reason, "is required");
    let error = only_error(&ZONE.replace("metadata:\n  name: eu-west\n", ""));
    assert_eq!(error.path.to_string(), "metadata");
}

#[test]
fn invalid_name() {
    let error = only_error(&ZONE.replace("name: eu-west", "name: EU_West"));
    assert_eq!(error.path.to_string(), "metadata.name");
    assert!(error.reason.contains("DNS-1123 label"), "{}", error.reason);
    assert_eq!(
        error.position, None,
        "checks of decoded values have no position"
    );
}

#[test]
fn invalid_labels() {
    let input = WORKLOAD.replace(
        "    app: payments\n",
        "    bad key: x\n    tier: -gold\n    app: payments\n",
    );
    let errors = all_errors(&input);
    assert_eq!(
        paths(&errors),
        [
            r#"metadata.labels["bad key"]"#,
            r#"metadata.labels["tier"]"#
        ]
    );
    assert!(errors[0].reason.starts_with("label key \"bad key\""));
    assert!(errors[1].reason.starts_with("label value \"-gold\""));
}

#[test]
fn port_zero_and_duplicates() {
    let error = only_error(&WORKLOAD.replace("  - port: 9000", "  - port: 0"));
    assert_eq!(error.path.to_string(), "spec.ports[1].port");
    assert_eq!(
        error.reason,
        "must be between 1 and 65535 (0 is not a port)"
    );

    let error = only_error(&WORKLOAD.replace("  - port: 9000", "  - port: 8080"));
    assert_eq!(error.path.to_string(), "spec.ports[1].port");
    assert_eq!(error.reason, "port 8080 is already listed at index 0");

    let error = only_error(&EXTERNAL_SERVICE.replace("port: 443", "port: 0"));
    assert_eq!(error.path.to_string(), "spec.port");

    let error = only_error(&WORKLOAD.replace("  - port: 9000", "  - port: 70000"));
    assert_eq!(error.path.to_string(), "spec.ports[1].port");
}

#[test]
fn invalid_addresses() {
    let error = only_error(&WORKLOAD.replace("10.0.1.5", "10.0.1.300"));
    assert_eq!(error.path.to_string(), "spec.address");
    assert_eq!(error.reason, "invalid IP address syntax");
    assert_eq!(
        error.position,
        Some(Position {
            line: 11,
            column: 12
        })
    );

    for unusable in ["0.0.0.0", "'::'", "224.0.0.1", "255.255.255.255"] {
        let error = only_error(&WORKLOAD.replace("10.0.1.5", unusable));
        assert_eq!(error.path.to_string(), "spec.address", "{unusable}");
    }

    for bad_host in ["Api.Stripe.com", "api_stripe.com", "0.0.0.0", "a..b"] {
        let error = only_error(&EXTERNAL_SERVICE.replace("api.stripe.com", bad_host));
        assert_eq!(error.path.to_string(), "spec.host", "{bad_host}");
    }
    let Resource::ExternalService(by_ip) =
        one(&EXTERNAL_SERVICE.replace("api.stripe.com", "192.0.2.10"))
    else {
        panic!("not an ExternalService")
    };
    assert_eq!(by_ip.spec.host, "192.0.2.10");
}

#[test]
fn lifetime_out_of_range() {
    for (lifetime, reason) in [
        ("5s", "5s is out of range; must be from 10s to 2160h"),
        ("2161h", "2161h is out of range; must be from 10s to 2160h"),
    ] {
        let error = only_error(&MESH.replace("12h", lifetime));
        assert_eq!(error.path.to_string(), "spec.workloadCertificateLifetime");
        assert_eq!(error.reason, reason);
    }
    assert!(
        parse_yaml(&MESH.replace("12h", "30s")).is_ok(),
        "short enough to test rotation"
    );

    let error = only_error(&MESH.replace("12h", "1d"));
    assert_eq!(error.path.to_string(), "spec.workloadCertificateLifetime");
    assert!(
        error.reason.starts_with("invalid duration \"1d\""),
        "{}",
        error.reason
    );
}

#[test]
fn ca_one_of() {
    let error = only_error(&MESH.replace("  workloadCertificateLifetime: 12h\n", "  ca: {}\n"));
    assert_eq!(error.path.to_string(), "spec.ca");
    assert_eq!(error.reason, "set exactly one of builtin, provided");

    let both = MESH_PROVIDED_CA.replace("  ca:\n", "  ca:\n    builtin: {}\n");
    assert_eq!(only_error(&both).path.to_string(), "spec.ca");

    let errors = all_errors(
        &MESH_PROVIDED_CA
            .replace("file: /etc/weft/ca.crt", "file: ca.crt")
            .replace("EC PRIVATE KEY", "CERTIFICATE"),
    );
    assert_eq!(
        paths(&errors),
        [
            "spec.ca.provided.certificate.file",
            "spec.ca.provided.key.inline"
        ]
    );

    let error = only_error(&MESH_PROVIDED_CA.replace(
        "        file: /etc/weft/ca.crt\n",
        "        file: /etc/weft/ca.crt\n        inline: x\n",
    ));
    assert_eq!(error.path.to_string(), "spec.ca.provided.certificate");
}

#[test]
fn scope_of_metadata() {
    let error = only_error(&WORKLOAD.replace("  namespace: payments\n", ""));
    assert_eq!(error.path.to_string(), "metadata.namespace");
    assert_eq!(error.reason, "is required: Workload is a namespaced kind");

    let errors = all_errors(&ZONE.replace(
        "  name: eu-west\n",
        "  name: eu-west\n  mesh: prod\n  namespace: x\n",
    ));
    assert_eq!(paths(&errors), ["metadata.mesh", "metadata.namespace"]);
    assert_eq!(
        errors[0].reason,
        "Zone is not inside a mesh; remove metadata.mesh"
    );
}

#[test]
fn every_problem_of_a_document_is_reported() {
    let input = "\
apiVersion: weft.io/v1alpha1
kind: Workload
metadata:
  name: Web_1
  namespace: payments
  labels:
    bad key: x
spec:
  address: 0.0.0.0
  service: Payments
  serviceAccount: -sa
  ports:
  - port: 0
  - port: 80
  - port: 80
";
    assert_eq!(
        paths(&all_errors(input)),
        [
            "metadata.name",
            r#"metadata.labels["bad key"]"#,
            "spec.address",
            "spec.service",
            "spec.serviceAccount",
            "spec.ports[0].port",
            "spec.ports[2].port",
        ]
    );
}

#[test]
fn every_bad_document_of_a_file_is_reported() {
    let input = format!(
        "{MESH}---\n{}---\n{ZONE}---\n{}",
        WORKLOAD.replace("  - port: 9000", "  - port: 0"),
        SERVICE.replace("kind: Service", "kind: Servce"),
    );
    let err = parse_yaml(&input).unwrap_err();
    let summary: Vec<(usize, Option<Kind>, String)> = err
        .documents
        .iter()
        .map(|d| (d.document, d.kind, paths(&d.errors).join(",")))
        .collect();
    assert_eq!(
        summary,
        [
            (2, Some(Kind::Workload), "spec.ports[1].port".to_owned()),
            (4, None, "kind".to_owned()),
        ]
    );
    // Its `---` marker is on line 33.
    assert_eq!(err.documents[1].line, Some(33));
}

#[test]
fn status_is_refused_on_apply() {
    let input = format!("{SERVICE}status:\n  zone: eu-west\n  virtualIp: 240.0.0.1\n");
    let error = only_error(&input);
    assert_eq!(error.path.to_string(), "status");
    assert_eq!(
        error.reason,
        "is set by the controller and cannot be applied; remove it"
    );
}

#[test]
fn dangling_mesh_reference() {
    let resources = parse_yaml(WORKLOAD).unwrap();
    let err = check_references(&resources, &KnownNames::new().with_mesh("default")).unwrap_err();
    let [document] = err.documents.as_slice() else {
        panic!("expected one document: {err}")
    };
    assert_eq!(document.document, 1);
    assert_eq!(document.kind, Some(Kind::Workload));
    assert_eq!(document.name.as_deref(), Some("payments-vm-1"));
    assert_eq!(paths(&document.errors), ["metadata.mesh"]);
    assert_eq!(
        document.errors[0].reason,
        "mesh \"prod\" does not exist; create the Mesh first"
    );
    assert_eq!(
        err.to_string(),
        "document 1 (Workload \"payments-vm-1\"): metadata.mesh: mesh \"prod\" does not exist; create the Mesh first"
    );

    // It exists in the store, or in the same file.
    check_references(&resources, &KnownNames::new().with_mesh("prod")).unwrap();
    let batch = parse_yaml(&format!("{MESH}---\n{WORKLOAD}")).unwrap();
    check_references(&batch, &KnownNames::new()).unwrap();

    // The defaulted mesh is checked too; kinds outside meshes never are.
    let batch = parse_yaml(&format!("{ZONE}---\n{SERVICE}")).unwrap();
    let err = check_references(&batch, &KnownNames::new()).unwrap_err();
    assert_eq!(err.documents[0].document, 2);
    assert_eq!(
        err.documents[0].errors[0].reason,
        "mesh \"default\" does not exist; create the Mesh first"
    );
}

#[test]
fn dangling_zone_in_a_controller_written_status() {
    let Resource::Service(mut service) = one(SERVICE) else {
        panic!("not a Service")
    };
    service.status = Some(ServiceStatus {
        zone: "us-east".to_owned(),
        virtual_ip: None,
    });
    let existing = KnownNames::new().with_mesh("default").with_zone("eu-west");
    let err = service.check_references(&existing).unwrap_err();
    assert_eq!(paths(err.errors()), ["status.zone"]);
}

#[test]
fn round_trip() {
    let input = format!(
        "{MESH}---\n{MESH_PROVIDED_CA}---\n{ZONE}---\n{WORKLOAD}---\n{SERVICE}---\n{EXTERNAL_SERVICE}"
    );
    let parsed = parse_yaml(&input).unwrap();
    let yaml = to_yaml(&parsed).unwrap();
    assert_eq!(parse_yaml(&yaml).unwrap(), parsed, "YAML:\n{yaml}");
    for resource in &parsed {
        let json = serde_json::to_string(resource).unwrap();
        assert_eq!(&parse_json(&json).unwrap(), resource, "JSON: {json}");
    }
}

#[test]
fn stored_resources_keep_their_status() {
    // What a store keeps (status included) reads back through `Deserialize`.
    let Resource::Service(mut service) = one(SERVICE) else {
        panic!("not a Service")
    };
    service.status = Some(ServiceStatus {
        zone: "eu-west".to_owned(),
        virtual_ip: Some(IpAddr::V4(Ipv4Addr::new(240, 0, 0, 7))),
    });
    let stored = serde_json::to_string(&Resource::from(service.clone())).unwrap();
    assert!(stored.contains(r#""status":{"zone":"eu-west","virtualIp":"240.0.0.7"}"#));
    let back: Resource = serde_json::from_str(&stored).unwrap();
    assert_eq!(back, Resource::Service(service));

    let bad = stored.replace(r#""virtualIp":"240.0.0.7""#, r#""virtualIp":7"#);
    let err = serde_json::from_str::<Resource>(&bad).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("status.virtualIp: invalid type"),
        "{err}"
    );
}

#[test]
fn json_errors_have_paths_and_positions() {
    let input = "{\"apiVersion\": \"weft.io/v1alpha1\", \"kind\": \"Zone\",\n \"metadata\": {\"name\": \"z\"},\n \"spec\": {\"backend\": \"vm\"}}";
    let err = parse_json(input).unwrap_err();
    let error = &err.documents[0].errors[0];
    assert_eq!(error.path.to_string(), "spec.backend");
    assert_eq!(
        error.reason,
        "unknown variant `vm`, expected `universal` or `kubernetes`"
    );
    assert_eq!(
        error.position,
        Some(Position {
            line: 3,
            column: 25
        })
    );

    let err = parse_json("{\"kind\": \"Zone\"} trailing").unwrap_err();
    assert_eq!(err.documents[0].errors[0].reason, "trailing characters");

    let err = parse_json(r#"{"apiVersion": "weft.io/v1alpha1", "kind": "Bogus"}"#).unwrap_err();
    assert_eq!(paths(&err.documents[0].errors), ["kind"]);
}

// Policies.

/// The problems of a policy document, as `path: reason` lines.
fn policy_errors(input: &str) -> Vec<String> {
    all_errors(input)
        .iter()
        .map(|e| format!("{}: {}", e.path, e.reason))
        .collect()
}

#[test]
fn good_policies_of_every_kind() {
    for kind in Kind::POLICIES {
        let text = crate::policy::examples::text(kind);
        let resource = one(text);
        assert_eq!(resource.kind(), kind);
        assert_eq!(resource.mesh(), Some("default"));
        assert_eq!(resource.metadata().namespace, None);
        // What is written back reads the same.
        let yaml = to_yaml(std::slice::from_ref(&resource)).unwrap();
        assert_eq!(one(&yaml), resource, "{kind} round trip");
        for variant in crate::policy::examples::variants(kind) {
            variant.validate().unwrap();
        }
    }
    let Resource::HttpRoute(route) = one(crate::policy::examples::text(Kind::HttpRoute)) else {
        panic!("not an HTTPRoute")
    };
    assert_eq!(
        route.spec.target_ref,
        crate::policy::target::TargetRef::Mesh
    );
    assert_eq!(route.spec.to[0].rules[0].default.backend_refs[1].weight, 10);
}

#[test]
fn policies_are_not_namespaced() {
    let input = crate::policy::examples::text(Kind::Timeout)
        .replace("  mesh: default\n", "  mesh: default\n  namespace: shop\n");
    assert_eq!(
        policy_errors(&input),
        ["metadata.namespace: Timeout is not namespaced; remove metadata.namespace"]
    );
}

#[test]
fn policy_unknown_field_and_wrong_type() {
    let timeout = crate::policy::examples::text(Kind::Timeout);
    let error = only_error(&timeout.replace(
        "      idleTimeout: 1h\n",
        "      idleTimeout: 1h\n      readTimeout: 1s\n",
    ));
    assert_eq!(error.path.to_string(), "spec.to[0].default.readTimeout");
    assert!(
        error.reason.starts_with("unknown field `readTimeout`"),
        "{}",
        error.reason
    );

    let error = only_error(&timeout.replace("connectTimeout: 5s", "connectTimeout: fast"));
    assert_eq!(error.path.to_string(), "spec.to[0].default.connectTimeout");

    let retry = crate::policy::examples::text(Kind::Retry);
    let error = only_error(&retry.replace("numRetries: 3", "numRetries: three"));
    assert_eq!(error.path.to_string(), "spec.to[0].default.numRetries");

    // A wrong tag names the tagged field.
    let error = only_error(&timeout.replace(
        "  targetRef:\n    kind: Mesh\n",
        "  targetRef:\n    kind: Everything\n",
    ));
    assert_eq!(error.path.to_string(), "spec.targetRef.kind");
    assert!(
        error.reason.contains("unknown variant `Everything`"),
        "{}",
        error.reason
    );
}

#[test]
fn policy_lists_are_required() {
    let permission = "\
apiVersion: weft.io/v1alpha1
kind: TrafficPermission
metadata:
  name: none
spec:
  rules: []
";
    assert_eq!(
        policy_errors(permission),
        ["spec.rules: must list at least one rule"]
    );
    let rate_limit = "\
apiVersion: weft.io/v1alpha1
kind: RateLimit
metadata:
  name: none
spec: {}
";
    assert_eq!(
        policy_errors(rate_limit),
        ["spec: set at least one of to, rules"]
    );
    let error = only_error(&permission.replace("  rules: []\n", "  targetRef:\n    kind: Mesh\n"));
    assert_eq!(error.path.to_string(), "spec.rules");
    assert_eq!(error.reason, "is required");
}

#[test]
fn bad_regexes_methods_and_headers() {
    let input = crate::policy::examples::text(Kind::TrafficPermission)
        .replace(
            "          type: PathPrefix\n          value: /admin\n",
            "          type: RegularExpression\n          value: /admin/(\n",
        )
        .replace("method: POST", "method: post");
    assert_eq!(
        paths(&all_errors(&input)),
        [
            "spec.rules[1].default.http[0].path.value",
            "spec.rules[1].default.http[0].method"
        ]
    );
    let errors = all_errors(&input);
    assert!(
        errors[0]
            .reason
            .starts_with("is not a valid regular expression"),
        "{}",
        errors[0].reason
    );
    assert!(!errors[0].reason.contains('\n'));

    let route = crate::policy::examples::text(Kind::HttpRoute)
        .replace("name: x-route", "name: 'x route'")
        .replace("value: /v2", "value: v2");
    assert_eq!(
        paths(&all_errors(&route)),
        [
            "spec.to[0].rules[0].matches[0].path.value",
            "spec.to[0].rules[1].default.filters[0].set[0].name"
        ]
    );
}

#[test]
fn bad_statuses_and_percentages() {
    let fault = crate::policy::examples::text(Kind::FaultInjection)
        .replace("httpStatus: 503", "httpStatus: 700")
        .replace("percentage: 10", "percentage: 101");
    assert_eq!(
        policy_errors(&fault),
        [
            "spec.to[0].default.http[0].delay.percentage: 101 is not a percentage; must be 0-100",
            "spec.to[0].default.http[1].abort.httpStatus: 700 is out of range; must be 200-599"
        ]
    );
    let rate = crate::policy::examples::text(Kind::RateLimit)
        .replace("status: 429", "status: 200")
        .replace("requests: 100\n", "requests: 0\n")
        .replace(
            "interval: 1s\n        onRateLimit",
            "interval: 10ms\n        onRateLimit",
        );
    assert_eq!(
        paths(&all_errors(&rate)),
        [
            "spec.to[0].default.http.requests",
            "spec.rules[0].default.http.interval",
            "spec.rules[0].default.http.onRateLimit.status"
        ]
    );
    let route = crate::policy::examples::text(Kind::HttpRoute).replace(
        "        - type: RequestHeaderModifier\n          set:\n          - name: x-route\n            value: default\n",
        "        - type: RequestRedirect\n          statusCode: 200\n",
    );
    assert_eq!(
        policy_errors(&route),
        ["spec.to[0].rules[1].default.filters[0].statusCode: 200 is not a redirect status; must be 301, 302, 303, 307 or 308"]
    );
    let retry =
        crate::policy::examples::text(Kind::Retry).replace("numRetries: 3", "numRetries: 11");
    assert_eq!(
        policy_errors(&retry),
        ["spec.to[0].default.numRetries: 11 is out of range; must be 0-10"]
    );
}

#[test]
fn route_rules_are_checked_as_a_whole() {
    let route = crate::policy::examples::text(Kind::HttpRoute);
    // ReplacePrefixMatch needs PathPrefix matches.
    let exact = route.replace(
        "          type: PathPrefix\n          value: /v2",
        "          type: Exact\n          value: /v2",
    );
    assert_eq!(
        policy_errors(&exact),
        ["spec.to[0].rules[0].default.filters[0].path: ReplacePrefixMatch needs every match of the rule to have a PathPrefix path"]
    );
    let zero = route
        .replace("weight: 90", "weight: 0")
        .replace("weight: 10", "weight: 0");
    assert_eq!(
        paths(&all_errors(&zero)),
        ["spec.to[0].rules[0].default.backendRefs"]
    );
    let mesh = route.replace(
        "  - targetRef:\n      kind: Service\n      name: payments\n      namespace: payments\n    rules:",
        "  - targetRef:\n      kind: Mesh\n    rules:",
    );
    assert_eq!(
        policy_errors(&mesh),
        ["spec.to[0].targetRef.kind: must be Service: an HTTPRoute routes the requests to one service"]
    );
}

#[test]
fn bad_selectors() {
    let input = crate::policy::examples::text(Kind::TrafficPermission)
        .replace(
            "value: spiffe://prod.example/ns/batch/",
            "value: spiffe://prod.example",
        )
        .replace("      name: checkout\n", "      name: Checkout\n")
        .replace(
            "    name: payments\n    namespace: payments\n",
            "    name: payments\n    namespace: pay_ments\n",
        );
    assert_eq!(
        paths(&all_errors(&input)),
        [
            "spec.targetRef.namespace",
            "spec.rules[0].from.name",
            "spec.rules[1].from.value"
        ]
    );
    let labels = "\
apiVersion: weft.io/v1alpha1
kind: TrafficPermission
metadata:
  name: labels
spec:
  targetRef:
    kind: Labels
    labels:
      'bad key': x
  rules:
  - from:
      kind: SpiffeId
      value: spiffe://td/ns/a
    default:
      action: Allow
";
    assert_eq!(
        paths(&all_errors(labels)),
        [
            r#"spec.targetRef.labels["bad key"]"#,
            "spec.rules[0].from.value"
        ]
    );
}

#[test]
fn access_log_paths_and_templates() {
    let input = crate::policy::examples::text(Kind::AccessLog)
        .replace("path: /var/log/weft/access.log", "path: access.log")
        .replace(
            "template: '%START_TIME% %METHOD% %PATH% %STATUS%'",
            "template: ''",
        );
    assert_eq!(
        paths(&all_errors(&input)),
        [
            "spec.to[0].default.backends[0].format.template",
            "spec.rules[0].default.backends[0].path"
        ]
    );
}

#[test]
fn policies_naming_a_missing_external_service() {
    let timeout = one(crate::policy::examples::text(Kind::Timeout));
    let mut known = KnownNames::new().with_mesh("default");
    // Unknown to the checker: not checked.
    check_references(std::slice::from_ref(&timeout), &known).unwrap();
    known.external_services = Some(Default::default());
    let errors = check_references(std::slice::from_ref(&timeout), &known).unwrap_err();
    let errors: Vec<_> = errors.errors().map(|e| e.path.to_string()).collect();
    assert_eq!(errors, ["spec.to[1].targetRef"]);
    known.external_services = Some(["default/payments/stripe".to_owned()].into());
    check_references(std::slice::from_ref(&timeout), &known).unwrap();
    // Defined in the same batch.
    known.external_services = Some(Default::default());
    let batch = parse_yaml(&format!(
        "{}---\n{}",
        crate::policy::examples::text(Kind::Timeout),
        EXTERNAL_SERVICE
    ))
    .unwrap();
    check_references(&batch, &known).unwrap();
}

#[test]
fn circuit_breaker_and_health_check_problems_name_their_fields() {
    let breaker = crate::policy::examples::text(Kind::CircuitBreaker)
        .replace("maxRequests: 256", "maxRequests: 0")
        .replace("consecutive5xx: 5", "consecutive5xx: 0")
        .replace("maxEjectionPercent: 50", "maxEjectionPercent: 101");
    assert_eq!(
        policy_errors(&breaker),
        [
            "spec.to[0].default.maxRequests: must be at least 1",
            "spec.to[0].default.outlierDetection.consecutive5xx: must be at least 1",
            "spec.to[0].default.outlierDetection.maxEjectionPercent: 101 is not a percentage; must be 0-100",
        ]
    );
    let check = crate::policy::examples::text(Kind::HealthCheck)
        .replace("interval: 5s", "interval: 10ms")
        .replace("path: /healthz", "path: healthz")
        .replace("- 204", "- 700");
    assert_eq!(
        policy_errors(&check),
        [
            "spec.to[0].default.interval: 10ms is too short; must be at least 100ms",
            "spec.to[0].default.http.path: \"healthz\" must start with /",
            "spec.to[0].default.http.expectedStatuses[1]: 700 is out of range; must be 100-599",
        ]
    );
    let both = crate::policy::examples::text(Kind::HealthCheck)
        .replace("      http:\n", "      tcp: {}\n      http:\n");
    assert_eq!(
        policy_errors(&both),
        ["spec.to[0].default: set one of tcp, http, not both"]
    );
}
