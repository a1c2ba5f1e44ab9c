//! L7: HTTP/1.1, HTTP/2 and gRPC parsed by the agent on ports declared
//! `http`, so that policies act per request with no extra proxy hop. On the
//! caller's side ([`outbound`]) the agent routes, retries, times out,
//! limits, injects faults and balances load; on the destination's side
//! ([`inbound`]) it authorizes each request, limits and logs it, then hands
//! it to the workload.

pub mod access_log;
pub mod inbound;
pub mod matcher;
pub mod outbound;
pub mod policy;
pub mod rate_limit;
pub mod response;
pub mod trace;
pub mod tunnel_io;
pub mod upstream;

use bytes::Bytes;
use http_body_util::{Either, Full};

/// A request or response body: streamed from a peer, or made whole by the
/// agent (its own answers, and request bodies buffered for retries).
pub type Body = Either<hyper::body::Incoming, Full<Bytes>>;
