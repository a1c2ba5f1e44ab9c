//! `weft-demo`: two real Weft agents and a demo service on loopback, with
//! certificates generated on the fly, and traffic crossing the mTLS tunnel
//! once a second until Ctrl-C (or `--requests N`).
//!
//! ```text
//! cargo build --release && ./target/release/weft-demo [--requests N] [--agent PATH]
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use std::os::unix::process::CommandExt;
use weft_e2e::agent::AgentSpec;
use weft_e2e::metrics::{self, Metrics};
use weft_e2e::pki::Ca;
use weft_e2e::process::Proc;
use weft_e2e::servers::{self, HttpIdentity};
use weft_e2e::tempdir::TempDir;
use weft_e2e::{http, wait};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const CLIENT_ID: &str = "spiffe://weft.demo/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://weft.demo/ns/demo/sa/server";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

struct Options {
    requests: Option<u64>,
    agent: Option<PathBuf>,
}

fn parse_args() -> Result<Options> {
    let mut opts = Options {
        requests: None,
        agent: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--requests" | "-n" => {
                let n = args.next().context("--requests needs a number")?;
                opts.requests = Some(
                    n.parse()
                        .with_context(|| format!("--requests {n:?} is not a number"))?,
                );
            }
            "--agent" => opts.agent = Some(args.next().context("--agent needs a path")?.into()),
            "--help" | "-h" => {
                println!("usage: weft-demo [--requests N] [--agent PATH-TO-weft-agent]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(opts)
}

fn agent_path(opts: &Options) -> Result<PathBuf> {
    if let Some(p) = opts
        .agent
        .clone()
        .or_else(|| std::env::var_os("WEFT_AGENT_BIN").map(PathBuf::from))
    {
        return Ok(p);
    }
    let exe = std::env::current_exe().context("finding weft-demo's own path")?;
    let path = exe
        .parent()
        .context("weft-demo has no parent directory")?
        .join("weft-agent");
    if !path.is_file() {
        bail!(
            "{} not found: build it first: cargo build --release",
            path.display()
        );
    }
    Ok(path)
}

/// One agent's config: every listener on its own loopback address.
fn spec(dir: &TempDir, name: &str, ip: Ipv4Addr, ca: &Ca, id: &str) -> Result<AgentSpec> {
    let files = ca.leaf(id)?.write(dir.path(), name, &[ca])?;
    let mut spec = AgentSpec::new(&files, IpAddr::V4(ip), &[(8080, "http")]);
    spec.set("inbound.listen", at(ip, 15008).to_string())
        .set("inbound.plaintext_listen", at(ip, 15006).to_string())
        .set("outbound.capture_listen", at(ip, 15001).to_string())
        .set("admin.listen", at(ip, 15000).to_string())
        .set("metrics.listen", at(ip, 15020).to_string())
        .set("log.level", "info")
        .set("drain_timeout", "5s");
    Ok(spec)
}

fn start_agent(bin: &PathBuf, dir: &TempDir, name: &str, spec: &AgentSpec) -> Result<Proc> {
    let config = dir.join(&format!("{name}.yaml"));
    spec.write(&config)?;
    let mut cmd = Command::new(bin);
    cmd.arg("run").arg("-c").arg(&config);
    weft_e2e::agent::without_weft_env(&mut cmd);
    // Its own process group: Ctrl-C reaches only the demo, which then drains the agents.
    cmd.process_group(0);
    Proc::spawn(name, cmd, dir.path())
}

fn wait_ready(agent: &mut Proc, admin: SocketAddr) -> Result<()> {
    let ready = wait::until(
        &format!("{} to be ready", agent.name()),
        Duration::from_secs(20),
        || {
            if STOP.load(Ordering::SeqCst) {
                return Err(wait::fatal("interrupted"));
            }
            if let Some(status) = agent.try_exit()? {
                return Err(wait::fatal(format!("exited ({status})")));
            }
            Ok((http::get(admin, "/ready", Duration::from_secs(2))?.status == 200).then_some(()))
        },
    );
    ready.map_err(|e| anyhow!("{e:#}\n{}", agent.logs()))
}

/// The tunnel as the agents' metrics show it.
fn report_tunnel(client: &Metrics, server: &Metrics) {
    let hs = |m: &Metrics, dir: &str| m.sum("weft_handshakes_total", &[("direction", dir)]);
    println!(
        "      tunnel: handshakes client->server {} (client agent, outbound) / {} (server agent, inbound)",
        hs(client, "outbound"),
        hs(server, "inbound")
    );
    for s in client
        .find("weft_bytes_sent_total", &[("direction", "outbound")])
        .filter(|s| s.value > 0.0)
    {
        let received = client.sum(
            "weft_bytes_received_total",
            &[
                ("direction", "outbound"),
                (
                    "source_identity",
                    s.labels.get("source_identity").map_or("", String::as_str),
                ),
                (
                    "destination_identity",
                    s.labels
                        .get("destination_identity")
                        .map_or("", String::as_str),
                ),
            ],
        );
        println!(
            "      mTLS {} -> {}: {} bytes sent, {received} received",
            s.labels.get("source_identity").map_or("?", String::as_str),
            s.labels
                .get("destination_identity")
                .map_or("?", String::as_str),
            s.value
        );
    }
    for s in server
        .find("weft_connections_opened_total", &[("direction", "inbound")])
        .filter(|s| s.value > 0.0)
    {
        println!(
            "      server agent accepted {} connection(s) from {} ({})",
            s.value,
            s.labels.get("source_identity").map_or("?", String::as_str),
            s.labels.get("tls").map_or("?", String::as_str)
        );
    }
}

fn pause(d: Duration) {
    let end = Instant::now() + d;
    while !STOP.load(Ordering::SeqCst) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(opts: &Options) -> Result<bool> {
    let bin = agent_path(opts)?;
    let dir = TempDir::new("weft-demo")?;
    let ca = Ca::new("weft demo CA")?;
    let client_spec = {
        let mut s = spec(&dir, "client", CLIENT_IP, &ca, CLIENT_ID)?;
        s.endpoint(IpAddr::V4(SERVER_IP), SERVER_ID)
            .listener(at(CLIENT_IP, 9000), at(SERVER_IP, 8080));
        s
    };
    let server_spec = {
        let mut s = spec(&dir, "server", SERVER_IP, &ca, SERVER_ID)?;
        s.allow(CLIENT_ID);
        s
    };
    let service = servers::bind(at(SERVER_IP, 8080)).context("starting the demo service")?;
    let who = HttpIdentity {
        name: "the demo service".into(),
        marker: "weft-demo".into(),
    };
    std::thread::spawn(move || servers::serve_http(service, who));

    let mut server = start_agent(&bin, &dir, "server-agent", &server_spec)?;
    let mut client = start_agent(&bin, &dir, "client-agent", &client_spec)?;
    let started = wait_ready(&mut server, at(SERVER_IP, 15000))
        .and_then(|_| wait_ready(&mut client, at(CLIENT_IP, 15000)));
    let outcome = started.and_then(|_| traffic(opts, &dir));
    for agent in [&mut client, &mut server] {
        if agent.signal(libc::SIGTERM).is_ok() {
            match agent.wait_exit(Duration::from_secs(15)) {
                Ok(status) => println!("{} stopped ({status})", agent.name()),
                Err(e) => eprintln!("{e:#}"),
            }
        }
    }
    outcome
}

fn traffic(opts: &Options, dir: &TempDir) -> Result<bool> {
    println!(
        "weft demo: two agents and a demo service on loopback (certificates in {})",
        dir.path().display()
    );
    println!("  HTTP client -> 127.0.0.2:9000 client agent [{CLIENT_ID}]");
    println!("     ==mTLS (HBONE, TLS 1.3 + HTTP/2 CONNECT)==> 127.0.0.3:15008 server agent [{SERVER_ID}]");
    println!("     -> 127.0.0.3:8080 the demo service");
    println!("  metrics: http://127.0.0.2:15020/metrics and http://127.0.0.3:15020/metrics; Ctrl-C stops");
    let mut failures = 0u64;
    let mut n = 0u64;
    while !STOP.load(Ordering::SeqCst) && opts.requests.is_none_or(|max| n < max) {
        n += 1;
        let t0 = Instant::now();
        match http::get(
            at(CLIENT_IP, 9000),
            &format!("/hello/{n}"),
            Duration::from_secs(5),
        ) {
            Ok(resp) => {
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                println!(
                    "[{n:>4}] {} in {ms:>6.2} ms: {}",
                    resp.status,
                    resp.text().trim()
                );
                if resp.status != 200 {
                    failures += 1;
                }
            }
            Err(e) => {
                failures += 1;
                println!("[{n:>4}] failed: {e:#}");
            }
        }
        let last = opts.requests == Some(n);
        if n % 5 == 1 || last {
            match (
                metrics::scrape_here(at(CLIENT_IP, 15020)),
                metrics::scrape_here(at(SERVER_IP, 15020)),
            ) {
                (Ok(c), Ok(s)) => report_tunnel(&c, &s),
                (Err(e), _) | (_, Err(e)) => println!("      metrics unavailable: {e:#}"),
            }
        }
        if !last {
            pause(Duration::from_secs(1));
        }
    }
    println!("{n} request(s), {failures} failed");
    Ok(failures == 0 && opts.requests.is_none_or(|max| n == max))
}

fn main() -> ExitCode {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let result = parse_args().and_then(|opts| run(&opts));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("weft-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
