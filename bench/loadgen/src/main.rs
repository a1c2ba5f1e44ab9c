//! `weft-loadgen`: the control-plane benchmark. Starts a zone controller
//! (release build, embedded store), enrols N simulated agents with bounded
//! use tokens, holds N config streams over mTLS that ack every update,
//! then applies one change every agent sees and measures, per stream, the
//! time until it acked the version carrying it; plus the controller's peak
//! RSS and CPU time, and the latency of one enrolment (token to
//! certificate to first config).

mod http_load;
mod sim;
mod zone;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::sim::{Marker, Shared, Target};
use crate::zone::Zone;

/// Enrolments one token allows (the API's maximum).
const USES_PER_TOKEN: u32 = 1000;
/// The service the change modifies, seen by every agent.
const MARKER_SERVICE: &str = "bench-target";
/// The port the change adds to it.
const MARKER_PORT: u32 = 9001;

/// Simulated agents against one zone controller.
#[derive(Debug, Parser)]
#[command(
    name = "weft-loadgen",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Simulated agents (each one workload, one stream, one connection).
    #[arg(long, default_value_t = 1000)]
    agents: u32,
    /// Services the agents' workloads are spread over.
    #[arg(long, default_value_t = 100)]
    services: u32,
    /// Enrolments and stream openings in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Sequential enrolments timed (token to first config), on the empty
    /// zone and again with all agents connected.
    #[arg(long, default_value_t = 20)]
    enrolments: u32,
    /// The zone controller binary (default: `weft-zone` next to this one).
    #[arg(long)]
    zone_binary: Option<PathBuf>,
    /// How long the mesh must be quiet (no update to any stream) before the
    /// change is applied.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    settle: Duration,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Fixed-rate HTTP/1.1 load to one URL, with latency percentiles (the
    /// data-plane benchmarks' client; see `bench/nodemode.py`).
    Http(http_load::HttpArgs),
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected e.g. 2s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        _ => Err(format!("{text:?}: unit must be s or ms")),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Http(http)) = args.command {
        return http_load::main(http);
    }
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    // Both sides of N connections live in this process and the child.
    let limit = rlimit::increase_nofile_limit(u64::MAX).context("raising the open files limit")?;
    let needed = u64::from(args.agents) + 1024;
    if limit < needed {
        bail!(
            "the open files limit is {limit}; {needed} are needed for --agents {}",
            args.agents
        );
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

/// Percentiles of a sample, in ms.
fn percentiles(mut samples: Vec<Duration>) -> serde_json::Value {
    samples.sort();
    let at = |q: f64| -> f64 {
        if samples.is_empty() {
            return f64::NAN;
        }
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    };
    serde_json::json!({
        "count": samples.len(),
        "p50_ms": round(at(0.50)),
        "p99_ms": round(at(0.99)),
        "max_ms": round(at(1.0)),
    })
}

fn round(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}

fn seconds(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

fn mib(bytes: u64) -> f64 {
    round(bytes as f64 / (1024.0 * 1024.0))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let binary = match &args.zone_binary {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the loadgen's directory")?
            .join("weft-zone"),
    };
    let dir = std::env::temp_dir().join(format!("weft-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = bench(&args, &binary, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    let report = result?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

async fn bench(
    args: &Args,
    binary: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    let zone = Zone::start(binary, dir).await?;
    let info = zone.get_json("/v1/zone").await?;
    let pin_text = info["caPin"].as_str().context("/v1/zone has no caPin")?;
    let target = Target {
        grpc: zone.grpc,
        pin: parse_pin(pin_text)?,
    };
    zone.apply(&format!(
        "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: default\nspec:\n  trustDomain: bench.weft\n---\n{}",
        marker_workload(&[9000])
    ))
    .await?;
    eprintln!(
        "zone pid {} at {}; enrolment latency on the empty zone",
        zone.pid(),
        zone.grpc
    );
    let probe_token = zone.token("sim-", USES_PER_TOKEN).await?;
    let empty = probe_enrolments(&target, &probe_token, "sim-probe-a", args).await?;

    let tokens = {
        let mut tokens = Vec::new();
        for _ in 0..args.agents.div_ceil(USES_PER_TOKEN) {
            tokens.push(zone.token("sim-", USES_PER_TOKEN).await?);
        }
        Arc::new(tokens)
    };
    let shared = Arc::new(Shared {
        counters: Default::default(),
        epoch: Instant::now(),
        marker: Marker {
            service: MARKER_SERVICE.to_owned(),
            port: MARKER_PORT,
        },
    });
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    // Each agent opens its config stream as soon as it has enrolled, as a
    // real one does: an agent that enrolled and then waited for all the
    // others would outlive the zone's agent grace before connecting, and
    // the ramp-up would churn the endpoints of agents that "vanished".
    eprintln!(
        "enrolling {} agents ({} tokens), each opening its stream at once",
        args.agents,
        tokens.len()
    );
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let mut tasks = JoinSet::new();
    for i in 0..args.agents {
        let (target, tokens, gate, shared, seen) = (
            target.clone(),
            tokens.clone(),
            gate.clone(),
            shared.clone(),
            seen_tx.clone(),
        );
        let services = args.services;
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let name = format!("sim-{i}");
            let token = &tokens[(i / USES_PER_TOKEN) as usize];
            let agent =
                sim::enrol(&target, token, &name, sim::workload(&name, i, services)).await?;
            let enrolled = started.elapsed();
            sim::open_stream(&target, agent, shared, seen).await?;
            anyhow::Ok(enrolled)
        });
    }
    let mut enrol_all = Duration::ZERO;
    while let Some(done) = tasks.join_next().await {
        enrol_all = enrol_all.max(done??);
    }
    let connect_all = started.elapsed();
    eprintln!("last agent enrolled at {enrol_all:?}");
    eprintln!(
        "{} streams up in {connect_all:?}; waiting for the mesh to settle",
        args.agents
    );
    settle(&shared, args.settle, Duration::from_secs(600)).await?;
    let before = zone.usage()?;
    let acks_before = shared.counters.acks.load(Ordering::Relaxed);
    let chunks_before = shared.counters.chunks.load(Ordering::Relaxed);

    eprintln!("applying the change (port {MARKER_PORT} on {MARKER_SERVICE})");
    let t0 = Instant::now();
    zone.apply(&marker_workload(&[9000, MARKER_PORT])).await?;
    let mut latencies = Vec::with_capacity(args.agents as usize);
    let deadline = t0 + Duration::from_secs(120);
    while latencies.len() < args.agents as usize {
        match tokio::time::timeout_at(deadline.into(), seen_rx.recv()).await {
            Ok(Some(at)) => latencies.push(at.saturating_duration_since(t0)),
            Ok(None) => break,
            Err(_) => break,
        }
    }
    let propagated = latencies.len();
    let change = percentiles(latencies);
    let after = zone.usage()?;
    let acks_change = shared.counters.acks.load(Ordering::Relaxed) - acks_before;
    let chunks_change = shared.counters.chunks.load(Ordering::Relaxed) - chunks_before;
    eprintln!("change acked by {propagated}/{}: {change}", args.agents);

    eprintln!("enrolment latency with {} agents connected", args.agents);
    let loaded = probe_enrolments(&target, &probe_token, "sim-probe-b", args).await?;
    let end = zone.usage()?;
    let c = &shared.counters;
    Ok(serde_json::json!({
        "agents": args.agents,
        "services": args.services + 1,
        "change": {
            "acked_by": propagated,
            "latency": change,
            "acks_during_change": acks_change,
            "messages_during_change": chunks_change,
            "controller_cpu_seconds": seconds(after.cpu_seconds - before.cpu_seconds),
        },
        "setup": {
            "enrol_all_s": seconds(enrol_all.as_secs_f64()),
            // From the start: each stream opens right after its enrolment.
            "all_streams_up_s": seconds(connect_all.as_secs_f64()),
            "largest_message_bytes": c.largest.load(Ordering::Relaxed),
            "messages": c.chunks.load(Ordering::Relaxed),
            "streams_ended": c.ended.load(Ordering::Relaxed),
        },
        "enrolment": {
            "empty_zone": empty,
            "loaded_zone": loaded,
        },
        "controller": {
            "peak_rss_mib": mib(end.peak_rss),
            "rss_mib_before_change": mib(before.rss),
            "rss_mib_end": mib(end.rss),
            "cpu_seconds_total": seconds(end.cpu_seconds),
        },
    }))
}

/// `sha256:<hex>` to bytes.
fn parse_pin(text: &str) -> anyhow::Result<[u8; 32]> {
    let hex = text
        .strip_prefix("sha256:")
        .with_context(|| format!("caPin {text:?} is not sha256:<hex>"))?;
    if hex.len() != 64 {
        bail!("caPin {text:?}: expected 64 hex digits");
    }
    let mut pin = [0u8; 32];
    for (i, byte) in pin.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .with_context(|| format!("caPin {text:?}: not hex"))?;
    }
    Ok(pin)
}

/// The Workload behind the marker service, with `ports`.
fn marker_workload(ports: &[u32]) -> String {
    let ports: String = ports.iter().map(|p| format!("    - port: {p}\n")).collect();
    format!(
        "apiVersion: weft.io/v1alpha1\nkind: Workload\nmetadata:\n  name: {MARKER_SERVICE}-1\n  mesh: default\n  namespace: default\nspec:\n  address: 10.63.255.1\n  service: {MARKER_SERVICE}\n  ports:\n{ports}"
    )
}

/// `args.enrolments` sequential enrolments (token to first config).
async fn probe_enrolments(
    target: &Target,
    token: &str,
    prefix: &str,
    args: &Args,
) -> anyhow::Result<serde_json::Value> {
    let mut samples = Vec::new();
    for k in 0..args.enrolments {
        let name = format!("{prefix}-{k}");
        // Addresses above the simulated agents'.
        let workload = sim::workload(
            &name,
            1_000_000 + k + if prefix.ends_with('b') { 1000 } else { 0 },
            1,
        );
        samples.push(sim::enrol_and_first_config(target, token, &name, workload).await?);
    }
    Ok(percentiles(samples))
}

/// Waits until every stream acked its first update and no update reached
/// any stream for `quiet`, within `limit`.
async fn settle(shared: &Shared, quiet: Duration, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let now_ms = shared.epoch.elapsed().as_millis() as u64;
        let last = shared.counters.last_update_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) >= quiet.as_millis() as u64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("updates still flowing after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
