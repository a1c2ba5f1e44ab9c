//! `weft-agent`: the data plane. Workload traffic travels in mutually
//! authenticated HBONE tunnels (TLS 1.3, HTTP/2 CONNECT) between agents.

pub mod config;
