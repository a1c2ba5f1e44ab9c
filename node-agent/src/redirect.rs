//! Transparent capture with nftables: `weft-agent redirect install|remove|status`.
//!
//! Every rule lives in one dedicated table, `table inet weft`, so removing it
//! leaves the rest of the host's ruleset exactly as it was. Install is one
//! `nft -f -` transaction that creates the table (if absent), deletes it and
//! defines it again, so a second install replaces rather than duplicates and
//! a failed install changes nothing.
//!
//! The output chain sends the host's outbound TCP to the agent's capture port,
//! except the agent's own traffic (by uid, which would otherwise loop),
//! loopback traffic and the configured exclusions. The prerouting chain, when
//! `redirect.inbound` is on, sends inbound TCP for the workload's ports to the
//! plaintext inbound port. With the DNS proxy on and `redirect.dns`, the
//! output chain first sends the host's DNS (UDP and TCP port 53) to it.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Command, Output, Stdio};

use crate::config::{parse_cidr, AgentConfig};

/// The nftables family of the agent's table; `inet` covers IPv4 and IPv6.
pub const TABLE_FAMILY: &str = "inet";
/// The name of the agent's table, so that tests and operators can find it.
pub const TABLE_NAME: &str = "weft";

/// Where `nft` is looked for: `PATH` first, then the usual sbin directories,
/// which a non-login root shell may not have on its `PATH`.
const NFT_CANDIDATES: [&str; 3] = ["nft", "/usr/sbin/nft", "/sbin/nft"];

/// Why the capture rules could not be rendered, installed, removed or shown.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// No `nft` binary anywhere we looked.
    #[error("`nft` was not found on PATH nor in /usr/sbin or /sbin: install the nftables package")]
    NftNotFound,
    /// `nft` exists but could not be started or fed its input.
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    /// `nft` ran and refused; its own message says why.
    #[error("nft failed to {action} ({status}): {stderr}{}", permission_hint(.stderr))]
    Nft {
        action: &'static str,
        status: String,
        stderr: String,
    },
    /// The configuration cannot be turned into rules.
    #[error("config field `{field}`: {reason}")]
    Config { field: String, reason: String },
}

fn permission_hint(stderr: &str) -> &'static str {
    if stderr.contains("Operation not permitted") {
        " (nftables needs root or CAP_NET_ADMIN)"
    } else {
        ""
    }
}

fn config_err(field: impl Into<String>, reason: impl Into<String>) -> RedirectError {
    RedirectError::Config {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Only a connection's opening SYN is redirected. A nat chain sees the
/// first packet conntrack tracks of each connection; for connections that
/// were open before the rules came (an operator's SSH session, when no nat
/// table existed and nothing was tracked), that is a packet picked up
/// mid-stream, e.g. an SSH reply leaving from port 22, which must not be
/// sent to the agent.
const FIRST_PACKET_ONLY: &str = "tcp flags & (fin | syn | rst | ack) != syn return";

/// The nftables script that `install` feeds to `nft -f -`: the replace
/// prelude followed by the whole `table inet weft`. Pure, so that it can be
/// tested and shown without touching the kernel.
pub fn render(cfg: &AgentConfig) -> Result<String, RedirectError> {
    let uid = cfg.redirect.agent_uid.ok_or_else(|| {
        config_err(
            "redirect.agent_uid",
            "is required to install redirect rules from outside the agent: it is how the agent's own \
             connections are told apart, and without it they would be captured and sent back to the \
             agent in a loop; set it to the uid the agent runs as (with redirect.on_start the agent \
             uses its own)",
        )
    })?;
    render_rules(cfg, Some(uid), &workload_ports(cfg))
}

fn workload_ports(cfg: &AgentConfig) -> BTreeSet<u16> {
    cfg.workload
        .as_ref()
        .map(|w| w.ports.iter().map(|p| p.port).collect())
        .unwrap_or_default()
}

/// The rules for a node-mode workload's own network namespace, serving
/// `ports`. The agent makes no connection of its own from there (its
/// tunnels leave from the host's namespace, and it reaches the workload
/// over the namespace's loopback), so there is no uid to exempt: every
/// process of the workload is captured, root included.
pub fn render_workload(cfg: &AgentConfig, ports: &BTreeSet<u16>) -> Result<String, RedirectError> {
    render_rules(cfg, None, ports)
}

fn render_rules(
    cfg: &AgentConfig,
    uid: Option<u32>,
    ports: &BTreeSet<u16>,
) -> Result<String, RedirectError> {
    let capture = nat_target(
        "outbound.capture_listen",
        cfg.outbound.capture_listen,
        Hook::Output,
    )?;

    let mut excluded_v4 = BTreeSet::new();
    let mut excluded_v6 = BTreeSet::new();
    for (i, cidr) in cfg.redirect.exclude_cidrs.iter().enumerate() {
        let (addr, len) = parse_cidr(cidr)
            .map_err(|reason| config_err(format!("redirect.exclude_cidrs[{i}]"), reason))?;
        match addr {
            IpAddr::V4(a) => excluded_v4.insert(format!("{}/{len}", mask_v4(a, len))),
            IpAddr::V6(a) => excluded_v6.insert(format!("{}/{len}", mask_v6(a, len))),
        };
    }
    let excluded_ports: BTreeSet<u16> = cfg.redirect.exclude_ports.iter().copied().collect();

    let t = format!("table {TABLE_FAMILY} {TABLE_NAME}");
    let mut s = String::new();
    // Creating then deleting makes the delete safe when the table is absent;
    // all three statements are one transaction, so there is never a moment
    // with no rules or with two copies.
    let _ = writeln!(s, "{t} {{}}");
    let _ = writeln!(s, "delete {t}");
    let _ = writeln!(s, "{t} {{");

    let _ = writeln!(s, "\tchain output {{");
    let _ = writeln!(s, "\t\ttype nat hook output priority -100; policy accept;");
    // DNS first: queries to a local stub resolver travel over lo, which the
    // TCP rules below leave alone.
    if cfg.redirect.dns && cfg.dns_enabled() {
        dns_rules(&mut s, cfg, uid)?;
    }
    let _ = writeln!(s, "\t\tmeta l4proto != tcp return");
    let _ = writeln!(s, "\t\t{FIRST_PACKET_ONLY}");
    let _ = writeln!(s, "\t\toifname \"lo\" return");
    if let Some(uid) = uid {
        let _ = writeln!(s, "\t\tmeta skuid {uid} return");
    }
    let _ = writeln!(s, "\t\tip daddr 127.0.0.0/8 return");
    let _ = writeln!(s, "\t\tip6 daddr ::1 return");
    if !excluded_ports.is_empty() {
        let _ = writeln!(s, "\t\ttcp dport {} return", set(&excluded_ports));
    }
    if !excluded_v4.is_empty() {
        let _ = writeln!(s, "\t\tip daddr {} return", set(&excluded_v4));
    }
    if !excluded_v6.is_empty() {
        let _ = writeln!(s, "\t\tip6 daddr {} return", set(&excluded_v6));
    }
    // `redirect to :port` needs the protocol on the same rule.
    let _ = writeln!(
        s,
        "\t\t{}meta l4proto tcp {}",
        capture.family_match, capture.action
    );
    let _ = writeln!(s, "\t}}");

    if cfg.redirect.inbound {
        if ports.is_empty() {
            return Err(config_err(
                "workload.ports",
                "inbound redirect needs at least one workload port (or set redirect.inbound: false)",
            ));
        }
        let plaintext = nat_target(
            "inbound.plaintext_listen",
            cfg.inbound.plaintext_listen,
            Hook::Prerouting,
        )?;
        let mut own_ports = BTreeSet::from([cfg.inbound.listen.port()]);
        own_ports.remove(&0);
        let _ = writeln!(s, "\tchain prerouting {{");
        let _ = writeln!(
            s,
            "\t\ttype nat hook prerouting priority -100; policy accept;"
        );
        let _ = writeln!(s, "\t\tiifname \"lo\" return");
        let _ = writeln!(s, "\t\t{FIRST_PACKET_ONLY}");
        if !own_ports.is_empty() {
            let _ = writeln!(s, "\t\ttcp dport {} return", set(&own_ports));
        }
        // The same exclusions as outbound: an SSH port must never end up in
        // the agent's hands, whatever the workload declares.
        if !excluded_ports.is_empty() {
            let _ = writeln!(s, "\t\ttcp dport {} return", set(&excluded_ports));
        }
        let _ = writeln!(
            s,
            "\t\t{}tcp dport {} {}",
            plaintext.family_match,
            set(ports),
            plaintext.action
        );
        let _ = writeln!(s, "\t}}");
    }
    let _ = writeln!(s, "}}");
    Ok(s)
}

/// Sends the host's DNS queries (UDP and TCP port 53) to the DNS proxy,
/// except the agent's own (it forwards them upstream). When an upstream is a
/// local stub resolver (on loopback, like systemd-resolved), only queries to
/// it are sent: the stub's own queries to the real resolvers then pass, and
/// do not loop back through the agent.
fn dns_rules(s: &mut String, cfg: &AgentConfig, uid: Option<u32>) -> Result<(), RedirectError> {
    let not_agent = uid
        .map(|uid| format!("meta skuid != {uid} "))
        .unwrap_or_default();
    let target = nat_target("dns.listen", cfg.dns.listen, Hook::Output)?;
    let upstreams = crate::dns::upstreams(&cfg.dns.upstream);
    let listen = cfg.dns.listen.ip();
    // A listener receives only its own family (a wildcard IPv6 one both).
    let reachable = |ip: &IpAddr| match listen {
        IpAddr::V6(a) if a.is_unspecified() => true,
        _ => ip.is_ipv4() == listen.is_ipv4(),
    };
    let local: Vec<IpAddr> = upstreams
        .iter()
        .map(|u| u.ip())
        .filter(IpAddr::is_loopback)
        .collect();
    let local_v4: BTreeSet<String> = local
        .iter()
        .filter(|ip| ip.is_ipv4() && reachable(ip))
        .map(ToString::to_string)
        .collect();
    let local_v6: BTreeSet<String> = local
        .iter()
        .filter(|ip| ip.is_ipv6() && reachable(ip))
        .map(ToString::to_string)
        .collect();
    let destinations: Vec<String> = if local.is_empty() {
        vec![String::new()]
    } else {
        let mut d = Vec::new();
        if !local_v4.is_empty() {
            d.push(format!("ip daddr {} ", set(&local_v4)));
        }
        if !local_v6.is_empty() {
            d.push(format!("ip6 daddr {} ", set(&local_v6)));
        }
        d
    };
    for daddr in &destinations {
        for proto in ["udp", "tcp"] {
            let _ = writeln!(
                s,
                "\t\t{not_agent}{}{daddr}{proto} dport 53 {}",
                target.family_match, target.action
            );
        }
    }
    Ok(())
}

/// Installs (or replaces) the capture rules in the current network namespace,
/// atomically.
pub fn install(cfg: &AgentConfig) -> Result<(), RedirectError> {
    apply(&render(cfg)?)
}

/// Installs the rules from inside the agent (`redirect.on_start`): the
/// process is the agent, so without `redirect.agent_uid` its own uid is the
/// one exempted. That is what a package wants: the `weft` user's uid is
/// allocated at install time and differs from host to host.
pub fn install_as_self(cfg: &AgentConfig) -> Result<u32, RedirectError> {
    // SAFETY: geteuid cannot fail and touches no memory.
    let uid = cfg
        .redirect
        .agent_uid
        .unwrap_or_else(|| unsafe { libc::geteuid() });
    apply(&render_rules(cfg, Some(uid), &workload_ports(cfg))?)?;
    Ok(uid)
}

/// Installs a rendered ruleset in the current network namespace, atomically.
pub fn apply(script: &str) -> Result<(), RedirectError> {
    run_nft(&["-f", "-"], Some(script), "install the weft table")?;
    Ok(())
}

/// Removes the capture rules, leaving every other table untouched. Returns
/// whether a table was there to remove; absent is not an error, so remove is
/// safe to run twice or on a host that never had the rules.
pub fn remove() -> Result<bool, RedirectError> {
    if !table_exists()? {
        return Ok(false);
    }
    // Create-then-delete, as in install, so a concurrent remove does not
    // turn into an error.
    let t = format!("table {TABLE_FAMILY} {TABLE_NAME}");
    let script = format!("{t} {{}}\ndelete {t}\n");
    run_nft(&["-f", "-"], Some(&script), "delete the weft table")?;
    Ok(true)
}

/// The installed table as `nft list` shows it, or `None` when the rules are
/// not installed, so operators can see what the kernel actually holds.
pub fn status() -> Result<Option<String>, RedirectError> {
    if !table_exists()? {
        return Ok(None);
    }
    let out = run_nft(
        &["list", "table", TABLE_FAMILY, TABLE_NAME],
        None,
        "list the weft table",
    )?;
    Ok(Some(out))
}

/// Whether `table inet weft` exists, asked without relying on the wording of
/// nft's error for a missing table.
fn table_exists() -> Result<bool, RedirectError> {
    let out = run_nft(&["list", "tables", TABLE_FAMILY], None, "list tables")?;
    let wanted = format!("table {TABLE_FAMILY} {TABLE_NAME}");
    Ok(out.lines().any(|l| l.trim() == wanted))
}

/// Runs nft with `args`, feeding `stdin` if given; returns its stdout.
fn run_nft(
    args: &[&str],
    stdin: Option<&str>,
    action: &'static str,
) -> Result<String, RedirectError> {
    let out = spawn_nft(args, stdin)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(RedirectError::Nft {
            action,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn spawn_nft(args: &[&str], stdin: Option<&str>) -> Result<Output, RedirectError> {
    for program in NFT_CANDIDATES {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(RedirectError::Spawn {
                    program: program.to_owned(),
                    source,
                })
            }
        };
        let spawn_err = |source| RedirectError::Spawn {
            program: program.to_owned(),
            source,
        };
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A write error (nft exiting early) is reported through nft's
            // own exit status and stderr below, which say more.
            let _ = pipe.write_all(text.as_bytes());
            // Dropping the pipe closes it, so nft sees end of input.
        }
        return child.wait_with_output().map_err(spawn_err);
    }
    Err(RedirectError::NftNotFound)
}

/// Which NAT hook a target is for: loopback destinations only work from
/// locally generated traffic.
#[derive(Clone, Copy)]
enum Hook {
    Output,
    Prerouting,
}

/// The verdict that sends a connection to one of the agent's listeners, and
/// the address family it is limited to (a listener on one family cannot
/// receive the other's connections).
struct NatTarget {
    /// Empty or `meta nfproto ipvN ` (with trailing space).
    family_match: &'static str,
    action: String,
}

fn nat_target(field: &str, listen: SocketAddr, hook: Hook) -> Result<NatTarget, RedirectError> {
    let port = listen.port();
    if port == 0 {
        return Err(config_err(
            field,
            "port 0 cannot receive redirected connections",
        ));
    }
    let ip = listen.ip();
    let family_match = if ip.is_ipv4() {
        "meta nfproto ipv4 "
    } else {
        "meta nfproto ipv6 "
    };
    let redirect = format!("redirect to :{port}");
    // `redirect` sends locally generated traffic to 127.0.0.1 / ::1, and
    // inbound traffic to the receiving interface's primary address.
    let target = match (ip, hook) {
        // A wildcard IPv6 socket is dual-stack on Linux (bindv6only=0), so it
        // takes both families.
        (IpAddr::V6(a), _) if a.is_unspecified() => NatTarget {
            family_match: "",
            action: redirect,
        },
        (IpAddr::V4(a), _) if a.is_unspecified() => NatTarget {
            family_match,
            action: redirect,
        },
        (IpAddr::V4(a), Hook::Output) if a == Ipv4Addr::LOCALHOST => NatTarget {
            family_match,
            action: redirect,
        },
        (IpAddr::V6(a), Hook::Output) if a == Ipv6Addr::LOCALHOST => NatTarget {
            family_match,
            action: redirect,
        },
        (_, Hook::Prerouting) if ip.is_loopback() => return Err(config_err(
            field,
            "a loopback address cannot receive redirected inbound traffic (the kernel drops it \
                 as martian); listen on 0.0.0.0, :: or the workload's address",
        )),
        (IpAddr::V4(a), _) => NatTarget {
            family_match,
            action: format!("dnat ip to {a}:{port}"),
        },
        (IpAddr::V6(a), _) => NatTarget {
            family_match,
            action: format!("dnat ip6 to [{a}]:{port}"),
        },
    };
    Ok(target)
}

/// An anonymous nftables set, `{ a, b }`.
fn set<T: std::fmt::Display>(items: &BTreeSet<T>) -> String {
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

fn mask_v4(a: Ipv4Addr, len: u8) -> Ipv4Addr {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    Ipv4Addr::from(u32::from(a) & mask)
}

fn mask_v6(a: Ipv6Addr, len: u8) -> Ipv6Addr {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    Ipv6Addr::from(u128::from(a) & mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(redirect: serde_json::Value) -> AgentConfig {
        serde_json::from_value(json!({
            "identity": {
                "cert": "/nonexistent/cert.pem",
                "key": "/nonexistent/key.pem",
                "trust_bundle": "/nonexistent/ca.pem"
            },
            "workload": {
                "address": "10.0.0.5",
                "ports": [{ "port": 8080 }, { "port": 9090 }, { "port": 8080 }]
            },
            "redirect": redirect
        }))
        .expect("test config deserializes")
    }

    fn line_count(s: &str, line: &str) -> usize {
        s.lines().filter(|l| l.trim() == line).count()
    }

    #[test]
    fn renders_default_ruleset() {
        let s = render(&cfg(json!({ "agent_uid": 1337 }))).expect("renders");
        assert!(s.starts_with("table inet weft {}\ndelete table inet weft\ntable inet weft {\n"));
        for line in [
            "type nat hook output priority -100; policy accept;",
            "meta l4proto != tcp return",
            "oifname \"lo\" return",
            "meta skuid 1337 return",
            "ip daddr 127.0.0.0/8 return",
            "ip6 daddr ::1 return",
            "meta nfproto ipv4 meta l4proto tcp redirect to :15001",
            "type nat hook prerouting priority -100; policy accept;",
            "iifname \"lo\" return",
            "tcp dport { 15008 } return",
            "meta nfproto ipv4 tcp dport { 8080, 9090 } redirect to :15006",
        ] {
            assert_eq!(line_count(&s, line), 1, "line {line:?} once in:\n{s}");
        }
        // Default exclusion: SSH, in both chains.
        assert_eq!(line_count(&s, "tcp dport { 22 } return"), 2, "{s}");
        // Connections picked up mid-stream are never redirected, in both.
        assert_eq!(line_count(&s, FIRST_PACKET_ONLY), 2, "{s}");
        // The skuid exemption comes before the redirect.
        let uid_at = s.find("meta skuid").expect("uid rule");
        let redirect_at = s.find("redirect to :15001").expect("redirect rule");
        assert!(uid_at < redirect_at);
    }

    #[test]
    fn dns_is_redirected_when_the_proxy_runs() {
        let mut c = cfg(json!({ "agent_uid": 1337 }));
        // Static mode: no proxy, so DNS is left alone.
        let s = render(&c).expect("renders");
        assert!(!s.contains("dport 53"), "{s}");

        c.dns.enabled = Some(true);
        c.dns.upstream = vec!["10.0.0.2:53".parse().expect("addr")];
        let s = render(&c).expect("renders");
        for line in [
            "meta skuid != 1337 meta nfproto ipv4 udp dport 53 redirect to :15053",
            "meta skuid != 1337 meta nfproto ipv4 tcp dport 53 redirect to :15053",
        ] {
            assert_eq!(line_count(&s, line), 1, "line {line:?} once in:\n{s}");
        }
        // Before the rules that skip non-TCP and loopback traffic.
        assert!(s.find("udp dport 53").unwrap() < s.find("meta l4proto != tcp return").unwrap());

        // A local stub resolver: only queries to it are redirected.
        c.dns.upstream = vec!["127.0.0.53:53".parse().expect("addr")];
        let s = render(&c).expect("renders");
        assert_eq!(
            line_count(
                &s,
                "meta skuid != 1337 meta nfproto ipv4 ip daddr { 127.0.0.53 } udp dport 53 redirect to :15053"
            ),
            1,
            "{s}"
        );

        c.redirect.dns = false;
        assert!(!render(&c).expect("renders").contains("dport 53"));
    }

    #[test]
    fn renders_exclusions_by_family() {
        let s = render(&cfg(json!({
            "agent_uid": 0,
            "exclude_ports": [443, 22, 443],
            "exclude_cidrs": ["10.0.0.0/8", "fd00::/8", "192.168.1.7/24", "2001:db8::1/128"]
        })))
        .expect("renders");
        assert_eq!(line_count(&s, "meta skuid 0 return"), 1, "{s}");
        assert_eq!(line_count(&s, "tcp dport { 22, 443 } return"), 2, "{s}");
        assert_eq!(
            line_count(&s, "ip daddr { 10.0.0.0/8, 192.168.1.0/24 } return"),
            1,
            "{s}"
        );
        assert_eq!(
            line_count(&s, "ip6 daddr { 2001:db8::1/128, fd00::/8 } return"),
            1,
            "{s}"
        );
    }

    #[test]
    fn empty_exclusions_render_no_empty_sets() {
        let s = render(&cfg(json!({ "agent_uid": 1, "exclude_ports": [] }))).expect("renders");
        assert!(!s.contains("{ }"), "{s}");
        assert!(!s.contains("tcp dport { 22 }"), "{s}");
    }

    #[test]
    fn inbound_off_has_no_prerouting_chain() {
        let s = render(&cfg(json!({ "agent_uid": 1337, "inbound": false }))).expect("renders");
        assert!(!s.contains("prerouting"), "{s}");
        assert!(!s.contains("15006"), "{s}");
        assert!(s.contains("redirect to :15001"), "{s}");
    }

    #[test]
    fn missing_uid_is_refused() {
        let err = render(&cfg(json!({}))).expect_err("refused");
        match &err {
            RedirectError::Config { field, reason } => {
                assert_eq!(field, "redirect.agent_uid");
                assert!(reason.contains("loop"), "{reason}");
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(err.to_string().contains("redirect.agent_uid"));
    }

    #[test]
    fn bad_cidr_names_its_index() {
        let err = render(&cfg(
            json!({ "agent_uid": 1, "exclude_cidrs": ["10.0.0.0/8", "nonsense"] }),
        ))
        .expect_err("refused");
        assert!(
            matches!(&err, RedirectError::Config { field, .. } if field == "redirect.exclude_cidrs[1]"),
            "{err}"
        );
    }

    #[test]
    fn listen_ports_and_addresses_are_followed() {
        let mut c = cfg(json!({ "agent_uid": 7 }));
        c.outbound.capture_listen = "[::1]:16001".parse().expect("addr");
        c.inbound.plaintext_listen = "[::]:16006".parse().expect("addr");
        c.inbound.listen = "0.0.0.0:16008".parse().expect("addr");
        let s = render(&c).expect("renders");
        assert_eq!(
            line_count(&s, "meta nfproto ipv6 meta l4proto tcp redirect to :16001"),
            1,
            "{s}"
        );
        assert_eq!(
            line_count(&s, "tcp dport { 8080, 9090 } redirect to :16006"),
            1,
            "{s}"
        );
        assert_eq!(line_count(&s, "tcp dport { 16008 } return"), 1, "{s}");

        c.outbound.capture_listen = "127.0.0.2:15001".parse().expect("addr");
        c.inbound.plaintext_listen = "10.0.0.5:15006".parse().expect("addr");
        let s = render(&c).expect("renders");
        assert!(
            s.contains("meta nfproto ipv4 meta l4proto tcp dnat ip to 127.0.0.2:15001"),
            "{s}"
        );
        assert!(
            s.contains("meta nfproto ipv4 tcp dport { 8080, 9090 } dnat ip to 10.0.0.5:15006"),
            "{s}"
        );
    }

    #[test]
    fn loopback_plaintext_listen_is_refused_for_inbound() {
        let mut c = cfg(json!({ "agent_uid": 7 }));
        c.inbound.plaintext_listen = "127.0.0.1:15006".parse().expect("addr");
        let err = render(&c).expect_err("refused");
        assert!(
            matches!(&err, RedirectError::Config { field, .. } if field == "inbound.plaintext_listen"),
            "{err}"
        );
        c.redirect.inbound = false;
        assert!(render(&c).is_ok());
    }

    #[test]
    fn inbound_without_ports_is_refused() {
        let mut c = cfg(json!({ "agent_uid": 7 }));
        c.workload.as_mut().unwrap().ports.clear();
        assert!(matches!(
            render(&c),
            Err(RedirectError::Config { field, .. }) if field == "workload.ports"
        ));
    }

    #[test]
    fn nft_errors_read_well() {
        let e = RedirectError::Nft {
            action: "install the weft table",
            status: "exit status: 1".into(),
            stderr: "Error: Could not process rule: Operation not permitted".into(),
        };
        let msg = e.to_string();
        assert!(
            msg.contains("Operation not permitted") && msg.contains("CAP_NET_ADMIN"),
            "{msg}"
        );
        assert!(RedirectError::NftNotFound
            .to_string()
            .contains("nftables package"));
    }

    /// Asks the real nft (check mode, nothing applied) whether it accepts the
    /// rendered script. Needs nft and CAP_NET_ADMIN, as the test suite has.
    #[test]
    fn rendered_script_passes_nft_check() {
        let mut c = cfg(json!({
            "agent_uid": 1337,
            "exclude_ports": [22, 443],
            "exclude_cidrs": ["10.0.0.0/8", "fd00::/8"]
        }));
        for (capture, plaintext) in [
            ("127.0.0.1:15001", "0.0.0.0:15006"),
            ("[::1]:15001", "[::]:15006"),
            ("127.0.0.2:15001", "10.0.0.5:15006"),
            ("127.0.0.1:15001", "[fd00::5]:15006"),
        ] {
            c.outbound.capture_listen = capture.parse().expect("addr");
            c.inbound.plaintext_listen = plaintext.parse().expect("addr");
            c.dns.enabled = Some(true);
            c.dns.upstream = vec![
                "127.0.0.53:53".parse().expect("addr"),
                "[::1]:53".parse().expect("addr"),
            ];
            let script = render(&c).expect("renders");
            if let Err(e) = run_nft(&["-c", "-f", "-"], Some(&script), "check the script") {
                panic!("nft -c refused:\n{script}\n{e}");
            }
        }
    }
}
