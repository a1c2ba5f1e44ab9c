//! Mesh certificate authorities and workload certificates.
//!
//! # Trust model
//!
//! Each mesh has one trust domain and a CA for it: built in (generated and
//! stored by the controller, [`MeshCa::generate`]) or provided by the
//! operator ([`MeshCa::from_pem`]). Agents trust the CAs in a
//! [`TrustBundle`] and prove their workloads' SPIFFE identities
//! (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`) with
//! certificates chained to one of them.
//!
//! Private keys never leave the host that uses them: an agent generates a
//! [`WorkloadKey`] locally and sends only a CSR. The controller decides which
//! identity that agent may hold (from its token and registration), and
//! [`MeshCa::sign_csr`] certifies the CSR's key for that identity only,
//! refusing a CSR that asks for anything else. What the CA writes into a
//! certificate (usages, lifetime, names) is the CA's decision, never copied
//! from the request.
//!
//! Certificates are short-lived (default [`DEFAULT_WORKLOAD_LIFETIME`]) and
//! renewed at 50-80% of their life ([`renewal_at`]); a CA rotation adds the
//! new CA to the bundle before any certificate it issues is used, and removes
//! the old one once nothing it issued is still in use.

#![warn(missing_docs)]

mod bundle;
mod ca;
mod clock;
mod csr;
mod issue;
mod pem;
mod renewal;
mod server;
mod verify;
mod workload;

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

pub use bundle::{BundleError, TrustBundle};
pub use ca::{CaError, CaPem, MeshCa, CLOCK_SKEW, DEFAULT_CA_LIFETIME};
pub use issue::{IssueError, IssuedCert, DEFAULT_WORKLOAD_LIFETIME};
pub use renewal::{renewal_at, RENEW_BY, RENEW_FROM};
pub use server::ServerCert;
pub use workload::{WorkloadKey, WorkloadKeyError};
