//! `ExternalService`: a destination outside the mesh that workloads may
//! call through their agent (and that policies can name). The zone gives
//! each one a stable virtual IP; agents answer `<name>.<namespace>.mesh`
//! (and the host's own DNS name) with it and connect to the host
//! themselves, under the outbound policies that name it.

use std::net::IpAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::mesh::Protocol;
use crate::resource::{Kind, Object, ObjectMeta, Resource, Spec};
use crate::validation::{dns1123_subdomain, unicast_address, FieldPath, Problems};

/// What the zone controller sets on an ExternalService; `apply` refuses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalServiceStatus {
    /// The stable virtual IP that agents answer for the service's mesh name
    /// and host name, once the zone has allocated one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_ip: Option<IpAddr>,
}

/// A service outside the mesh, reached at a host and port. The zone gives it
/// a stable virtual IP; agents answer `<name>.<namespace>.mesh` (and `host`,
/// when it is a DNS name) with that address, and a connection to it (or to
/// `host` and `port`, when `host` is an IP address) is dialled by the
/// caller's agent itself, in plaintext, under the outbound policies whose
/// `to[]` names the ExternalService. HTTP requests name `host` in their
/// `Host` header. Destinations no ExternalService declares go by the agent's
/// `outbound.unknown_destination` (passthrough or deny).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalServiceSpec {
    /// Where the service is: a DNS name (lowercase, e.g. `api.example.com`)
    /// or an IP address.
    pub host: String,
    /// The port it listens on (1-65535).
    pub port: u16,
    /// The protocol it speaks: `tcp` (the default), or `http` to get L7
    /// policy. Not detected: `detect` is for workload ports.
    #[serde(default = "tcp")]
    pub protocol: Protocol,
}

/// External services keep `tcp` as their default: the agent detects
/// protocols on workload ports only.
fn tcp() -> Protocol {
    Protocol::Tcp
}

impl Spec for ExternalServiceSpec {
    const KIND: Kind = Kind::ExternalService;
    type Status = ExternalServiceStatus;

    fn validate(&self, _: &ObjectMeta, path: &FieldPath, problems: &mut Problems) {
        let host = match self.host.parse::<IpAddr>() {
            Ok(address) => unicast_address(address),
            Err(_) => dns1123_subdomain(&self.host)
                .map_err(|reason| format!("must be an IP address or a DNS name: {reason}")),
        };
        problems.check(path.field("host"), host);
        if self.port == 0 {
            problems.add(
                path.field("port"),
                "must be between 1 and 65535 (0 is not a port)",
            );
        }
        if self.protocol == Protocol::Detect {
            problems.add(
                path.field("protocol"),
                "must be tcp or http: detect is for workload ports",
            );
        }
    }

    fn validate_status(status: &ExternalServiceStatus, path: &FieldPath, problems: &mut Problems) {
        if let Some(vip) = status.virtual_ip {
            problems.check(path.field("virtualIp"), unicast_address(vip));
        }
    }

    fn into_resource(object: Object<Self>) -> Resource {
        Resource::ExternalService(object)
    }
}
