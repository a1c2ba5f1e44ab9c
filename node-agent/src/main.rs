//! The `weft-agent` command: run the agent, check a config, or manage the
//! nftables rules of transparent capture.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use weft_agent::config::AgentConfig;
use weft_agent::{agent, logging, redirect};

#[derive(Parser)]
#[command(name = "weft-agent", version, about = "Weft's data plane agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        #[arg(short, long, default_value = "/etc/weft/agent.yaml")]
        config: PathBuf,
    },
    /// Validate a config file (and `WEFT_*` overrides) and exit.
    Check {
        #[arg(short, long, default_value = "/etc/weft/agent.yaml")]
        config: PathBuf,
    },
    /// Manage the nftables rules that send traffic to the agent.
    Redirect {
        #[command(subcommand)]
        action: RedirectAction,
    },
    /// Node mode: enrol, unenrol or list the workloads of a running agent.
    Workload {
        /// The node agent's control socket (`node.control_socket`).
        #[arg(long, default_value = "/run/weft/agent.sock", global = true)]
        socket: PathBuf,
        #[command(subcommand)]
        action: WorkloadAction,
    },
}

#[derive(Subcommand)]
enum WorkloadAction {
    /// Enrol a running workload (no restart): its own certificate, its
    /// listeners and capture rules inside its network namespace.
    Enroll {
        #[arg(long)]
        name: String,
        #[arg(long)]
        service: String,
        /// Its IP address, inside its namespace.
        #[arg(long)]
        address: std::net::IpAddr,
        /// Its network namespace: /run/netns/<name> or /proc/<pid>/ns/net.
        #[arg(long)]
        netns: PathBuf,
        #[arg(long, default_value = "default")]
        namespace: String,
        #[arg(long, default_value = "default")]
        service_account: String,
        /// A port it serves: `8080` (protocol detected), `8080/http` or
        /// `8080/tcp` (never parsed); repeatable.
        #[arg(long = "port", value_parser = parse_port)]
        ports: Vec<weft_api::WorkloadPort>,
        /// A label, `key=value`; repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Unenrol a workload: its rules and sockets go, its namespace is left
    /// as it was.
    Unenroll { name: String },
    /// The enrolled workloads, as JSON.
    List,
}

fn parse_port(s: &str) -> Result<weft_api::WorkloadPort, String> {
    let (port, protocol) = s.split_once('/').unwrap_or((s, "detect"));
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port number"))?;
    let protocol = match protocol {
        "tcp" => weft_api::Protocol::Tcp,
        "http" => weft_api::Protocol::Http,
        "detect" => weft_api::Protocol::Detect,
        other => return Err(format!("{other:?} is not a protocol (tcp, http or detect)")),
    };
    Ok(weft_api::WorkloadPort { port, protocol })
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

#[derive(Subcommand)]
enum RedirectAction {
    /// Install (or replace) the capture rules for this config.
    Install {
        #[arg(short, long, default_value = "/etc/weft/agent.yaml")]
        config: PathBuf,
    },
    /// Remove the capture rules, leaving the rest of the ruleset untouched.
    Remove,
    /// Show whether capture rules are installed, and which.
    Status,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Proxied bytes pass through short-lived buffers. With glibc's default
/// trim threshold the heap top is given back and taken again every few
/// requests (a `brk` each time); keeping up to 1 MiB of it costs little
/// memory and saves those syscalls.
fn keep_heap_top(worker_threads: usize) {
    // SAFETY: mallopt only tunes the allocator; it is called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TOP_PAD, 256 << 10);
        // Fixing the trim threshold also fixes glibc's mmap threshold at its
        // 128 KiB default; keep proxy buffers on the heap, not in mmaps.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        // An arena per thread that ever allocates (the runtime's workers,
        // and the blocking pool's that apply config updates now and then)
        // would keep each one's pages for the life of the agent: one arena
        // per worker, which the occasional blocking thread shares.
        let arenas = libc::c_int::try_from(worker_threads.max(1)).unwrap_or(libc::c_int::MAX);
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            // Before anything opens a descriptor of its own.
            let predecessor = weft_agent::handoff::adopt_from_env();
            let cfg = AgentConfig::load(&config)?;
            keep_heap_top(cfg.worker_threads);
            // Every proxied connection takes two descriptors; the soft limit
            // (often 1024) would cap the agent long before its own limits.
            let nofile =
                rlimit::increase_nofile_limit(u64::MAX).context("raising the open files limit")?;
            // One thread needs no work stealing and no cross-thread wake-ups,
            // which is what a sidecar wants; more threads suit a node agent.
            let mut builder = match cfg.worker_threads {
                1 => tokio::runtime::Builder::new_current_thread(),
                n => {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(n);
                    b
                }
            };
            let runtime = builder
                .enable_all()
                .build()
                .context("starting the runtime")?;
            let log = logging::init(&cfg.log);
            tracing::debug!(nofile, "open files limit");
            runtime.block_on(agent::run(cfg, log, predecessor))
        }
        Command::Check { config } => {
            AgentConfig::load(&config)?;
            println!("{}: valid", config.display());
            Ok(())
        }
        Command::Workload { socket, action } => workload(&socket, action),
        Command::Redirect { action } => match action {
            RedirectAction::Install { config } => {
                let cfg = AgentConfig::load(&config)?;
                if cfg.redirect.agent_uid == Some(0) {
                    eprintln!(
                        "warning: redirect.agent_uid is 0: every process running as root bypasses capture; \
                         run the agent as a dedicated user instead"
                    );
                }
                redirect::install(&cfg)?;
                println!("capture rules installed (nftables table inet weft)");
                Ok(())
            }
            RedirectAction::Remove => {
                if redirect::remove()? {
                    println!("capture rules removed");
                } else {
                    println!("no capture rules were installed");
                }
                Ok(())
            }
            RedirectAction::Status => {
                match redirect::status()? {
                    Some(rules) => println!("installed:\n{rules}"),
                    None => println!("not installed"),
                }
                Ok(())
            }
        },
    }
}

fn workload(socket: &std::path::Path, action: WorkloadAction) -> anyhow::Result<()> {
    use http::Method;
    let (method, path, body) = match action {
        WorkloadAction::Enroll {
            name,
            service,
            address,
            netns,
            namespace,
            service_account,
            ports,
            labels,
        } => {
            let spec = weft_agent::node::spec::NodeWorkload {
                name,
                namespace,
                service,
                service_account,
                labels: labels.into_iter().collect(),
                address,
                ports,
                netns,
            };
            spec.validate().context("workload spec")?;
            (
                Method::POST,
                "/workloads".to_owned(),
                Some(serde_json::to_vec(&spec)?),
            )
        }
        WorkloadAction::Unenroll { name } => (Method::DELETE, format!("/workloads/{name}"), None),
        WorkloadAction::List => (Method::GET, "/workloads".to_owned(), None),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let (status, body) =
        runtime.block_on(weft_agent::admin_client::call(socket, method, &path, body))?;
    if status.is_success() {
        print!("{body}");
        if !body.ends_with('\n') {
            println!();
        }
        Ok(())
    } else {
        anyhow::bail!("{}: {}", status, body.trim_end())
    }
}
