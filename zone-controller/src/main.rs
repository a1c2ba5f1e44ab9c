//! `weft-zone`: a zone's control plane: the resource, token and inspect
//! API over HTTP, and the agent API over gRPC with mutual TLS (enrolment,
//! certificates, config stream), on an embedded SQLite store or a
//! PostgreSQL database shared by several replicas.

mod agent_service;
mod api_server;
mod apply;
mod ca_rotation;
mod ca_view;
mod cutoff;
mod feed;
mod grpc;
mod hub;
mod inspect;
mod leader;
mod logging;
mod mesh_ca;
mod metrics;
mod settings;
mod tokens;
mod views;
mod zone_ca;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use settings::Settings;
use tokio::net::TcpListener;
use weft_store::Store;

/// Weft zone controller.
#[derive(Debug, Parser)]
#[command(name = "weft-zone", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the controller until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Checks the settings (the file and flags) and prints them, as `run`
    /// would use them; exits 1 naming the field if one is invalid.
    Check(RunArgs),
}

/// Each flag overrides the same-named key of the `--config` file, which
/// overrides the default shown.
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// A YAML settings file whose keys are these flags' names in snake_case
    /// (e.g. /etc/weft/zone.yaml); unknown keys are refused.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The store: sqlite:///path/file.db (created if missing) or
    /// postgres://user@host/db [default: sqlite://weft-zone.db].
    #[arg(long)]
    store: Option<String>,
    /// Address of the HTTP API. Port 0 picks a free port; the bound address
    /// is printed on stdout as `listening on ADDR` [default: 127.0.0.1:5681].
    #[arg(long)]
    listen: Option<String>,
    /// The name of this zone (a DNS-1123 label) [default: default].
    #[arg(long)]
    zone: Option<String>,
    /// Address of the agent gRPC API (mutual TLS). Port 0 picks a free
    /// port; the bound address is printed as `grpc listening on ADDR`
    /// [default: 0.0.0.0:5678].
    #[arg(long)]
    grpc_listen: Option<String>,
    /// An extra DNS name or IP address for the gRPC server certificate,
    /// besides `weft-zone` (repeatable; added to the file's `sans`).
    #[arg(long = "san", value_name = "NAME_OR_IP")]
    sans: Vec<String>,
    /// The IPv4 range services' virtual IPs are allocated from
    /// [default: 240.240.0.0/16].
    #[arg(long)]
    vip_range: Option<String>,
    /// This replica's id in the agent inventory (default: hostname and
    /// process id).
    #[arg(long)]
    replica_id: Option<String>,
    /// How long the built-in mesh CAs this controller generates are valid
    /// (e.g. `87600h`); the leader rotates one at 80% of its life
    /// [default: 87600h].
    #[arg(long)]
    mesh_ca_lifetime: Option<String>,
    /// How long an agent may go unseen (no heartbeat, no stream) before the
    /// leader takes its workloads out of every endpoint list (e.g. `60s`).
    /// Streams heartbeat every 5 s, or a third of this if shorter
    /// [default: 60s].
    #[arg(long)]
    agent_grace: Option<String>,
    /// How long the change feed keeps its entries (e.g. `1h`, at least
    /// `1m`); the leader prunes older ones (the newest 10,000 always stay).
    /// A replica left further behind re-reads everything [default: 1h].
    #[arg(long)]
    feed_retention: Option<String>,
    /// How log lines are written on stderr: `human` or `json` (one object
    /// per line, for log pipelines) [default: human]. RUST_LOG sets the level.
    #[arg(long)]
    log_format: Option<String>,
}

impl RunArgs {
    fn settings(self) -> Result<Settings, settings::SettingsError> {
        Settings::load(
            self.config.as_deref(),
            settings::Overrides {
                zone: self.zone,
                store: self.store,
                listen: self.listen,
                grpc_listen: self.grpc_listen,
                sans: self.sans,
                vip_range: self.vip_range,
                replica_id: self.replica_id,
                mesh_ca_lifetime: self.mesh_ca_lifetime,
                agent_grace: self.agent_grace,
                feed_retention: self.feed_retention,
                log_format: self.log_format,
            },
        )
    }
}

/// How long open streams and requests get to end at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "weft-zone".to_owned());
    format!("{host}-{}", std::process::id())
}

/// glibc gives each thread that allocates an arena of its own (up to 8 per
/// core): with the runtime's workers, the blocking pool and SQLite's
/// connection threads, memory a stream frees on one thread stays in
/// another's arena. Two arenas cut the peak RSS with 10,000 agents
/// connected from 1,098 to 898 MiB at the same latency
/// (docs/benchmarks.md). An operator's `MALLOC_ARENA_MAX` wins.
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: mallopt only tunes the allocator; it is called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let (settings, check) = match cli.command {
        Command::Run(args) => (args.settings()?, false),
        Command::Check(args) => (args.settings()?, true),
    };
    let log_filter = logging::init(settings.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if !check {
        return runtime.block_on(run(settings, log_filter));
    }
    let s = settings;
    println!(
        "zone {}: store {}, API {}, agents {}, certificate names {:?}, virtual IPs {}, agent grace {:?}, feed retention {:?}, mesh CA lifetime {:?}, logs {:?}",
        s.zone, s.store, s.listen, s.grpc_listen, s.sans, s.vip_range, s.agent_grace, s.feed_retention, s.mesh_ca_lifetime, s.log_format
    );
    Ok(())
}

async fn run(args: Settings, log_filter: logging::LogFilter) -> anyhow::Result<()> {
    let agent_grace = args.agent_grace;
    let replica = args.replica_id.clone().unwrap_or_else(default_replica_id);
    let store = Store::open(&args.store)
        .await
        .with_context(|| format!("cannot open the store {}", args.store))?;
    let zone_ca = Arc::new(zone_ca::ZoneCa::load_or_create(&store, &args.zone).await?);
    let server_cert = Arc::new(zone_ca::ServerCert::issue(
        &zone_ca,
        &args.sans,
        zone_ca::SERVER_CERT_LIFETIME,
    )?);
    let tls = zone_ca.server_config(server_cert.clone())?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let grpc_listener = TcpListener::bind(args.grpc_listen)
        .await
        .with_context(|| format!("cannot listen on grpc_listen {}", args.grpc_listen))?;
    let grpc_bound = grpc_listener
        .local_addr()
        .context("cannot read the bound gRPC address")?;
    // On stdout for scripts and tests (e.g. with --listen 127.0.0.1:0).
    println!("listening on {bound}");
    println!("grpc listening on {grpc_bound}");
    tracing::info!(zone = %args.zone, store = store.url(), %bound, grpc = %grpc_bound, %replica, ca_pin = %zone_ca.pin, "weft-zone serving");

    let shutdown = shutdown_signal().await?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let leading = Arc::new(AtomicBool::new(false));
    let cas = Arc::new(mesh_ca::MeshCas::new(store.clone(), args.mesh_ca_lifetime));
    let metrics = Arc::new(metrics::ZoneMetrics::new(leading.clone()));
    let hub = Arc::new(hub::Hub::new(
        store.clone(),
        args.zone.clone(),
        cas.clone(),
        metrics.clone(),
    ));
    let hub_task = tokio::spawn(hub.clone().run(stop.clone()));
    let cutoff = Arc::new(cutoff::Cutoff::new(store.clone(), args.zone.clone()));
    let cutoff_task = tokio::spawn(cutoff.clone().run(stop.clone()));
    let heartbeat_task = {
        let cutoff = cutoff.clone();
        tokio::spawn(hub.clone().heartbeats(
            replica.clone(),
            agent_service::heartbeat_period(agent_grace),
            move |agent| cutoff.lose(agent),
            stop.clone(),
        ))
    };
    let acks_task = tokio::spawn(hub.clone().write_acks(stop.clone()));
    let server_cert_task = tokio::spawn(server_cert.renew(zone_ca.clone(), stop.clone()));
    let leader_task = tokio::spawn(
        leader::Leader {
            store: store.clone(),
            zone: args.zone.clone(),
            vips: args.vip_range,
            leading: leading.clone(),
            cas: cas.clone(),
            agent_grace,
            feed_retention: args.feed_retention,
            metrics: metrics.clone(),
        }
        .run(stop.clone()),
    );
    let api = agent_service::AgentApi {
        store: store.clone(),
        zone: args.zone.clone(),
        replica: replica.clone(),
        zone_ca: zone_ca.clone(),
        cas: cas.clone(),
        hub: hub.clone(),
        cutoff,
        stop: stop.clone(),
        metrics: metrics.clone(),
    };
    let grpc_task = tokio::spawn(grpc::serve(
        grpc_listener,
        tls,
        zone_ca.clone(),
        api,
        stop.clone(),
    ));
    let status_task = tokio::spawn(report_status(
        format!(
            "zone {} on {bound} (API) and {grpc_bound} (agents), store {}",
            args.zone,
            store.url()
        ),
        leading.clone(),
        stop.clone(),
    ));
    let state = Arc::new(
        api_server::AppState::new(
            store.clone(),
            args.zone,
            zone_ca.pem.clone(),
            zone_ca.pin.clone(),
            leading,
            replica,
            cas,
        )
        .with_metrics(metrics)
        .with_log_filter(log_filter),
    );
    let http_task = tokio::spawn(api_server::serve(
        listener,
        state,
        grpc::stopped(stop.clone()),
    ));
    weft_service_manager::spawn_watchdog();
    shutdown.await;
    weft_service_manager::stopping("stopping: closing agent streams and API connections");
    // Nobody may be left to hear it; that is fine.
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        match grpc_task.await {
            Ok(Err(error)) => tracing::warn!(%error, "gRPC server stopped with an error"),
            Err(error) => tracing::warn!(%error, "gRPC server task failed"),
            Ok(Ok(())) => {}
        }
        let _ = http_task.await;
        let _ = leader_task.await;
        let _ = hub_task.await;
        let _ = cutoff_task.await;
        let _ = heartbeat_task.await;
        let _ = acks_task.await;
        let _ = server_cert_task.await;
        let _ = status_task.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("some connections did not close in time");
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// A future that completes on SIGTERM or SIGINT. The handlers are installed
/// before it is returned, so no signal is missed once serving starts.
async fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// Tells systemd the zone serves (READY=1, once both servers are bound),
/// then keeps its status line current: which replica role it has.
async fn report_status(
    serving: String,
    leading: Arc<AtomicBool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let line = |leader: bool| {
        let role = if leader {
            "leader"
        } else {
            "not leading (electing, or another replica leads)"
        };
        format!("serving {serving}; {role}")
    };
    let mut leader = leading.load(Ordering::Acquire);
    weft_service_manager::ready(&line(leader));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            _ = stop.changed() => return,
        }
        let now = leading.load(Ordering::Acquire);
        if now != leader {
            leader = now;
            weft_service_manager::status(&line(leader));
        }
    }
}
