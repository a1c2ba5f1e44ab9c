//! The contract between Weft's parts: SPIFFE identities and the mesh view
//! (workloads, endpoints, peer matchers) that a controller pushes to agents
//! and that a static agent config spells out by hand.

pub mod identity;
pub mod mesh;

pub use identity::{IdentityError, SpiffeId};
pub use mesh::{Endpoint, PeerMatch, PeerMatchError, Protocol, WorkloadPort};
