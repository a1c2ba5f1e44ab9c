//! Virtual IPs for mesh services (what the agents' DNS proxy answers):
//! allocated once per service from a configured IPv4 range, stable across
//! restarts, unique, and released when the Service is deleted.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use weft_api::Kind;

use crate::backend::{on_pool, on_writer, Store};
use crate::error::StoreError;
use crate::resources::ResourceKey;

/// How often one allocation may lose a race for an address.
const ALLOCATION_ATTEMPTS: usize = 64;

/// An IPv4 range in CIDR notation (`240.0.0.0/16`) to allocate from; its
/// network and broadcast addresses are never handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VipRange {
    network: u32,
    prefix_len: u8,
}

impl VipRange {
    /// A range from its network address and prefix length (at most 30, so
    /// that it has usable addresses).
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Result<VipRange, String> {
        if !(1..=30).contains(&prefix_len) {
            return Err(format!("prefix length {prefix_len} is not in 1..=30"));
        }
        let mask = u32::MAX << (32 - prefix_len);
        let network = u32::from(network);
        if network & !mask != 0 {
            return Err(format!(
                "{} has host bits set for /{prefix_len}",
                Ipv4Addr::from(network)
            ));
        }
        Ok(VipRange {
            network,
            prefix_len,
        })
    }

    /// How many addresses can be allocated.
    pub fn capacity(&self) -> u32 {
        (1u32 << (32 - self.prefix_len)) - 2
    }

    fn address(&self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1 + offset)
    }
}

impl FromStr for VipRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not in CIDR notation (a.b.c.d/len)"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|e| format!("{ip:?}: {e}"))?;
        let len: u8 = len.parse().map_err(|e| format!("{len:?}: {e}"))?;
        VipRange::new(ip, len)
    }
}

impl fmt::Display for VipRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network), self.prefix_len)
    }
}

/// The name under which a Service's or an ExternalService's virtual IP is
/// stored (the two kinds may share a name; a mesh name holds no `:`);
/// `None` for other kinds.
pub(crate) fn service_name(key: &ResourceKey) -> Option<String> {
    let (_, mesh, namespace, name) = key.columns();
    match key.kind {
        Kind::Service => Some(format!("{mesh}/{namespace}/{name}")),
        Kind::ExternalService => Some(format!("external:{mesh}/{namespace}/{name}")),
        _ => None,
    }
}

impl Store {
    /// The virtual IP of a Service: the one it already has, or the lowest
    /// free address of `range`. Concurrent allocations (even from two
    /// replicas) cannot give one address twice nor two addresses to one
    /// service: the table's unique keys decide and the loser re-reads.
    pub async fn allocate_vip(
        &self,
        service: &ResourceKey,
        range: &VipRange,
    ) -> Result<IpAddr, StoreError> {
        let name = service_name(service).ok_or_else(|| StoreError::Corrupt {
            what: format!("virtual IP request for {service}"),
            reason: "only Services and ExternalServices get virtual IPs".to_owned(),
        })?;
        let op = format!("allocate a virtual IP for {service}");
        // Each lost race is another allocation's success, so an allocation
        // loses at most as often as others run at once: the leader makes
        // them one at a time, and this bound only stops a livelock. (8 was
        // too few for the store test's 10 at once on a loaded machine.)
        for _ in 0..ALLOCATION_ATTEMPTS {
            let (existing, used): (Option<String>, Vec<String>) = on_pool!(self, pool => {
                let existing = sqlx::query_scalar("SELECT ip FROM virtual_ips WHERE service = $1")
                    .bind(&name)
                    .fetch_optional(pool)
                    .await
                    .map_err(StoreError::db(&op))?;
                let used = if existing.is_none() {
                    sqlx::query_scalar("SELECT ip FROM virtual_ips")
                        .fetch_all(pool)
                        .await
                        .map_err(StoreError::db(&op))?
                } else {
                    Vec::new()
                };
                (existing, used)
            });
            if let Some(ip) = existing {
                return ip
                    .parse()
                    .map_err(StoreError::corrupt(format!("virtual IP of {service}")));
            }
            let used: HashSet<&str> = used.iter().map(String::as_str).collect();
            let free = (0..range.capacity())
                .map(|offset| range.address(offset))
                .find(|ip| !used.contains(ip.to_string().as_str()))
                .ok_or_else(|| StoreError::VipsExhausted {
                    range: range.to_string(),
                    service: service.to_string(),
                })?;
            let inserted = on_writer!(self, pool => {
                sqlx::query(
                    "INSERT INTO virtual_ips (service, ip) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .bind(&name)
                .bind(free.to_string())
                .execute(pool)
                .await
                .map_err(StoreError::db(&op))?
                .rows_affected()
            });
            if inserted == 1 {
                return Ok(IpAddr::V4(free));
            }
            // Lost a race for the address or the service: look again.
        }
        Err(StoreError::Database {
            operation: op,
            source: sqlx::Error::Protocol("too many concurrent allocations".to_owned()),
        })
    }

    /// Releases a Service's virtual IP; returns whether it had one.
    /// [`Store::delete`] of a Service does this itself.
    pub async fn release_vip(&self, service: &ResourceKey) -> Result<bool, StoreError> {
        let Some(name) = service_name(service) else {
            return Ok(false);
        };
        let op = format!("release the virtual IP of {service}");
        let affected = on_writer!(self, pool => {
            sqlx::query("DELETE FROM virtual_ips WHERE service = $1")
                .bind(&name)
                .execute(pool)
                .await
                .map_err(StoreError::db(&op))?
                .rows_affected()
        });
        Ok(affected > 0)
    }
}
