//! `weft-agent`: the data plane. Workload traffic travels in mutually
//! authenticated HBONE tunnels (TLS 1.3, HTTP/2 CONNECT) between agents.

pub mod admin;
pub mod admin_client;
pub mod agent;
pub mod config;
pub mod controller;
pub mod credentials;
pub mod detect;
pub mod dns;
pub mod drain;
pub mod external;
pub mod grpc;
pub mod handoff;
pub mod inbound;
pub mod l7;
pub mod listen;
pub mod local_workload;
pub mod locality;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod outbound;
pub mod plaintext;
pub mod pool;
pub mod redirect;
pub mod resident;
pub mod resilience;
pub mod service_status;
pub mod socket;
pub mod splice;
pub mod state;
pub mod tls;
pub mod view;
pub mod workload_proxy;
