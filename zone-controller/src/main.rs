//! `weft-zone`: a zone's control plane. This first slice serves the
//! resource API over HTTP on an embedded SQLite (or PostgreSQL) store.

mod api_server;
mod apply;
mod tokens;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
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
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The store: sqlite:///path/file.db (created if missing) or
    /// postgres://user@host/db.
    #[arg(long, default_value = "sqlite://weft-zone.db")]
    store: String,
    /// Address of the HTTP API. Port 0 picks a free port; the bound address
    /// is printed on stdout as `listening on ADDR`.
    #[arg(long, default_value = "127.0.0.1:5681")]
    listen: SocketAddr,
    /// The name of this zone (a DNS-1123 label).
    #[arg(long, default_value = "default")]
    zone: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Run(args) => runtime.block_on(run(args)),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    if let Err(reason) = weft_api::validation::dns1123_label(&args.zone) {
        bail!("invalid --zone {:?}: {reason}", args.zone);
    }
    let store = Store::open(&args.store)
        .await
        .with_context(|| format!("cannot open the store {}", args.store))?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener
        .local_addr()
        .context("cannot read the bound address")?;
    // On stdout for scripts and tests (e.g. with --listen 127.0.0.1:0).
    println!("listening on {bound}");
    tracing::info!(zone = %args.zone, store = store.url(), %bound, "weft-zone serving the HTTP API");

    let shutdown = shutdown_signal().await?;
    let state = Arc::new(api_server::AppState::new(store.clone(), args.zone));
    api_server::serve(listener, state, shutdown).await;
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
