//! `weftctl quickstart`: a whole VM zone on this machine, without root and
//! without set-up: a zone controller on the embedded store, two agents in
//! controller mode (enrolled with tokens, certificates from the built-in
//! CA) on their own loopback addresses, a demo service behind one of them,
//! and live calls from the other over mTLS, until Ctrl-C.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

use crate::{Client, Error};

/// The demo's mesh and trust domain.
const MESH: &str = "default";
const TRUST_DOMAIN: &str = "quickstart.weft";
/// How long a start-up step may take.
const STEP: Duration = Duration::from_secs(30);

/// Options of `weftctl quickstart`.
#[derive(Debug, Clone, clap::Args)]
pub struct QuickstartArgs {
    /// Where configs, state, the store and logs go (default: a new
    /// directory under the system's temporary directory, removed at exit).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the directory at exit, e.g. to read the logs.
    #[arg(long)]
    pub keep: bool,
    /// Stop by itself after this long (e.g. `30s`); runs until Ctrl-C
    /// when left out.
    #[arg(long)]
    pub duration: Option<weft_api::Duration>,
    /// Workload certificate lifetime (e.g. `2m` to watch renewals).
    #[arg(long, default_value = "1h")]
    pub cert_lifetime: weft_api::Duration,
    /// The first of the loopback addresses the agents use (two in a row).
    #[arg(long, default_value = "127.0.1.1")]
    pub loopback: Ipv4Addr,
}

fn failed(step: &str, reason: impl std::fmt::Display) -> Error {
    Error::Quickstart {
        step: step.to_owned(),
        reason: reason.to_string(),
    }
}

/// A child process killed when dropped, so that an error anywhere leaves
/// nothing running.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn spawn(
        name: &'static str,
        mut cmd: Command,
        dir: &Path,
        stdout: bool,
    ) -> Result<Proc, Error> {
        let log = |ext: &str| {
            std::fs::File::create(dir.join(format!("{name}.{ext}")))
                .map_err(|e| failed(&format!("creating {name}'s log"), e))
        };
        cmd.stdin(Stdio::null())
            .stderr(log("log")?)
            .kill_on_drop(true);
        if stdout {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(log("out")?);
        }
        let child = cmd
            .spawn()
            .map_err(|e| failed(&format!("starting {name}"), e))?;
        Ok(Proc { name, child })
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    async fn stop(mut self) -> String {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill has no memory-safety preconditions; the child is
            // not reaped yet, so the pid is still ours.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        match tokio::time::timeout(STEP, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => format!("{} stopped", self.name),
            Ok(Ok(status)) => format!("{} exited {status}", self.name),
            _ => {
                let _ = self.child.kill().await;
                format!("{} killed (did not stop in time)", self.name)
            }
        }
    }
}

/// Finds a sibling binary of `weftctl` (they are installed together).
fn sibling(name: &str) -> Result<PathBuf, Error> {
    let exe = std::env::current_exe().map_err(|e| failed("finding weftctl's directory", e))?;
    let path = exe.with_file_name(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(failed(
            &format!("finding {name}"),
            format!(
                "{} does not exist; build all binaries first: cargo build --release",
                path.display()
            ),
        ))
    }
}

/// The running demo: what `run` prints about and what `stop` takes down.
struct Demo {
    controller: Proc,
    agents: Vec<Proc>,
    api_url: String,
    client_listener: SocketAddr,
    client_metrics: SocketAddr,
}

/// Runs the quickstart, printing progress and live calls to `out`.
pub async fn run(args: QuickstartArgs, out: &mut dyn std::io::Write) -> Result<(), Error> {
    let (dir, remove) = match &args.dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("weft-quickstart-{}", std::process::id())),
            !args.keep,
        ),
    };
    std::fs::create_dir_all(&dir).map_err(|e| failed(&format!("creating {}", dir.display()), e))?;
    writeln!(
        out,
        "weft quickstart: a zone controller, two agents and a demo service on this machine\n  files in {}",
        dir.display()
    )?;
    let outcome = match start(&args, &dir, out).await {
        Ok(demo) => {
            let calls = traffic(&demo, args.duration.map(Into::into), out).await;
            writeln!(out, "\nstopping...")?;
            for agent in demo.agents {
                writeln!(out, "  {}", agent.stop().await)?;
            }
            writeln!(out, "  {}", demo.controller.stop().await)?;
            calls
        }
        Err(e) => Err(e),
    };
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        writeln!(out, "  files kept in {}", dir.display())?;
    }
    outcome
}

async fn start(
    args: &QuickstartArgs,
    dir: &Path,
    out: &mut dyn std::io::Write,
) -> Result<Demo, Error> {
    let (api_url, grpc, controller) = start_controller(dir).await?;
    let api = Client::new(&api_url)?;
    writeln!(
        out,
        "  zone controller   API {api_url}, agents' gRPC {grpc}, store {}/zone.db",
        dir.display()
    )?;
    let lifetime = args.cert_lifetime.to_string();
    let mesh = format!(
        "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: {MESH}\nspec:\n  \
         trustDomain: {TRUST_DOMAIN}\n  workloadCertificateLifetime: {lifetime}\n"
    );
    call(
        &api,
        Method::PUT,
        "/v1/resources",
        Some(("application/yaml", Bytes::from(mesh))),
        "applying the Mesh",
    )
    .await?;
    writeln!(
        out,
        "  mesh {MESH}      trust domain {TRUST_DOMAIN}, built-in CA, certificates live {lifetime}"
    )?;

    let first = u32::from(args.loopback);
    let server_ip = Ipv4Addr::from(first + 1);
    let client_ip = Ipv4Addr::from(first);
    let app = SocketAddr::new(IpAddr::V4(server_ip), 8080);
    serve_demo_app(app).await?;

    let mut agents = Vec::new();
    let server = AgentPlan {
        name: "payments-1",
        service: "payments",
        ip: server_ip,
        ports: &[8080],
        listener: None,
    };
    agents.push(start_agent(&api, &grpc, dir, &server).await?);
    let vip = wait_for_vip(&api, "payments").await?;
    writeln!(
        out,
        "  payments-1        the demo service at {app}, enrolled; payments.default.mesh = {vip}"
    )?;
    let client_listener = SocketAddr::new(IpAddr::V4(client_ip), 9080);
    let client = AgentPlan {
        name: "web-1",
        service: "web",
        ip: client_ip,
        ports: &[],
        listener: Some((client_listener, SocketAddr::new(vip, 8080))),
    };
    agents.push(start_agent(&api, &grpc, dir, &client).await?);
    writeln!(out, "  web-1             enrolled; calls payments through {client_listener} -> {vip}:8080 over mTLS")?;
    writeln!(
        out,
        "\ntry: weftctl --server {api_url} inspect agents    (Ctrl-C stops everything)\n"
    )?;
    Ok(Demo {
        controller,
        agents,
        api_url,
        client_listener,
        client_metrics: SocketAddr::new(IpAddr::V4(client_ip), 15020),
    })
}

/// Starts `weft-zone` on free ports and reads the addresses it prints.
async fn start_controller(dir: &Path) -> Result<(String, String, Proc), Error> {
    let mut cmd = Command::new(sibling("weft-zone")?);
    cmd.args([
        "run",
        "--listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
        "--zone",
        "default",
    ])
    .arg("--store")
    .arg(format!("sqlite://{}", dir.join("zone.db").display()));
    let mut proc = Proc::spawn("weft-zone", cmd, dir, true)?;
    let stdout = proc
        .child
        .stdout
        .take()
        .ok_or_else(|| failed("starting weft-zone", "no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let (mut api, mut grpc) = (None, None);
    let read = async {
        while let Some(line) = lines
            .next_line()
            .await
            .map_err(|e| failed("reading weft-zone's output", e))?
        {
            if let Some(addr) = line.strip_prefix("grpc listening on ") {
                grpc = Some(addr.trim().to_owned());
            } else if let Some(addr) = line.strip_prefix("listening on ") {
                api = Some(addr.trim().to_owned());
            }
            if api.is_some() && grpc.is_some() {
                return Ok(());
            }
        }
        Err(failed(
            "starting weft-zone",
            format!("it exited; see {}", dir.join("weft-zone.log").display()),
        ))
    };
    tokio::time::timeout(STEP, read)
        .await
        .map_err(|_| failed("starting weft-zone", "it printed no addresses in time"))??;
    let (Some(api), Some(grpc)) = (api, grpc) else {
        return Err(failed("starting weft-zone", "no addresses"));
    };
    Ok((format!("http://{api}"), grpc, proc))
}

/// One API call that must succeed.
async fn call(
    api: &Client,
    method: Method,
    path: &str,
    body: Option<(&'static str, Bytes)>,
    step: &str,
) -> Result<Value, Error> {
    let answer = api.request(method, path, body).await?;
    if !answer.status.is_success() {
        return Err(failed(
            step,
            format!(
                "HTTP {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            ),
        ));
    }
    serde_json::from_slice(&answer.body).map_err(|e| failed(step, e))
}

struct AgentPlan {
    name: &'static str,
    service: &'static str,
    ip: Ipv4Addr,
    ports: &'static [u16],
    listener: Option<(SocketAddr, SocketAddr)>,
}

/// Issues a token for `plan`, writes its config and starts the agent, then
/// waits until it is ready (enrolled and serving).
async fn start_agent(
    api: &Client,
    grpc: &str,
    dir: &Path,
    plan: &AgentPlan,
) -> Result<Proc, Error> {
    let step = format!("enrolling {}", plan.name);
    let token = call(
        api,
        Method::POST,
        "/v1/tokens",
        Some(("application/json", Bytes::from(json!({"mesh": MESH, "workloads": {"names": [plan.name]}, "ttl": "10m", "maxUses": 1}).to_string()))),
        &step,
    )
    .await?;
    let field = |name: &str| {
        token
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| failed(&step, format!("the token answer has no {name}")))
    };
    let token_file = dir.join(format!("{}.token", plan.name));
    std::fs::write(&token_file, field("secret")?).map_err(|e| failed(&step, e))?;
    let at = |port: u16| SocketAddr::new(IpAddr::V4(plan.ip), port).to_string();
    let ports: Vec<Value> = plan
        .ports
        .iter()
        .map(|p| json!({"port": p, "protocol": "http"}))
        .collect();
    let listeners: Vec<Value> = plan
        .listener
        .iter()
        .map(|(listen, target)| json!({"listen": listen.to_string(), "target": target.to_string()}))
        .collect();
    let config = json!({
        "controller": {
            "address": grpc, "ca_pin": field("caPin")?, "token_file": token_file,
            "state_dir": dir.join(format!("{}-state", plan.name)), "agent_name": plan.name,
        },
        "workload": {
            "name": plan.name, "namespace": "default", "service": plan.service,
            "service_account": plan.service, "address": plan.ip.to_string(), "ports": ports,
        },
        "inbound": {"listen": at(15008), "plaintext_listen": at(15006)},
        "outbound": {"capture_listen": at(15001), "listeners": listeners},
        "admin": {"listen": at(15000)},
        "metrics": {"listen": at(15020)},
        "dns": {"enabled": true, "listen": at(15053)},
        "drain_timeout": "2s",
    });
    let path = dir.join(format!("{}.yaml", plan.name));
    // JSON is YAML: the agent reads it as is.
    std::fs::write(&path, config.to_string()).map_err(|e| failed(&step, e))?;
    let mut cmd = Command::new(sibling("weft-agent")?);
    cmd.arg("run").arg("-c").arg(&path);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("WEFT_") {
            cmd.env_remove(key);
        }
    }
    let mut proc = Proc::spawn(
        if plan.name == "web-1" {
            "web-1"
        } else {
            "payments-1"
        },
        cmd,
        dir,
        false,
    )?;
    let admin = Client::new(&format!("http://{}", at(15000)))?;
    let deadline = Instant::now() + STEP;
    loop {
        if let Ok(Some(status)) = proc.child.try_wait() {
            let log =
                std::fs::read_to_string(dir.join(format!("{}.log", proc.name))).unwrap_or_default();
            return Err(failed(
                &step,
                format!("the agent exited ({status}):\n{}", tail(&log, 15)),
            ));
        }
        if let Ok(answer) = admin.request(Method::GET, "/ready", None).await {
            if answer.status == StatusCode::OK {
                return Ok(proc);
            }
        }
        if Instant::now() > deadline {
            return Err(failed(
                &step,
                format!(
                    "not ready after {} s; see {}",
                    STEP.as_secs(),
                    dir.join(format!("{}.log", proc.name)).display()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits until the controller has given `service` a virtual IP.
async fn wait_for_vip(api: &Client, service: &str) -> Result<IpAddr, Error> {
    let step = format!("waiting for {service}'s virtual IP");
    let deadline = Instant::now() + STEP;
    loop {
        let services = call(api, Method::GET, "/v1/inspect/services", None, &step).await?;
        let vip = services.as_array().into_iter().flatten().find_map(|s| {
            (s.get("name").and_then(Value::as_str) == Some(service))
                .then(|| s.get("virtualIp").and_then(Value::as_str))
                .flatten()
                .and_then(|v| v.parse().ok())
        });
        if let Some(vip) = vip {
            return Ok(vip);
        }
        if Instant::now() > deadline {
            return Err(failed(&step, format!("none after {} s", STEP.as_secs())));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The demo service: answers every HTTP request with who it is and a count.
async fn serve_demo_app(addr: SocketAddr) -> Result<(), Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| failed(&format!("binding the demo service on {addr}"), e))?;
    let count = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                    let body = format!("hello from payments-1, request {n}\n");
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from(body)),
                        ))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    Ok(())
}

/// Calls the demo service once a second through the client agent and
/// prints each answer with the agent's tunnel counters, until Ctrl-C or
/// `duration`. Fails if no call ever succeeded.
async fn traffic(
    demo: &Demo,
    duration: Option<Duration>,
    out: &mut dyn std::io::Write,
) -> Result<(), Error> {
    let through = Client::new(&format!("http://{}", demo.client_listener))?;
    let metrics = Client::new(&format!("http://{}", demo.client_metrics))?;
    let start = Instant::now();
    let (mut ok, mut failed_calls) = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tick.tick() => {}
        }
        let elapsed = start.elapsed();
        if duration.is_some_and(|d| elapsed >= d) {
            break;
        }
        let line = match through.request(Method::GET, "/", None).await {
            Ok(answer) => {
                if answer.status.is_success() {
                    ok += 1
                } else {
                    failed_calls += 1
                }
                format!(
                    "{} {:?}",
                    answer.status.as_u16(),
                    String::from_utf8_lossy(&answer.body).trim()
                )
            }
            Err(e) => {
                failed_calls += 1;
                format!("failed: {e}")
            }
        };
        let counters = match metrics.request(Method::GET, "/metrics", None).await {
            Ok(answer) => {
                let text = String::from_utf8_lossy(&answer.body);
                format!(
                    "mTLS handshakes {}, bytes out {}",
                    sum(&text, "weft_handshakes_total"),
                    sum(&text, "weft_bytes_sent_total")
                )
            }
            Err(_) => String::from("metrics unavailable"),
        };
        writeln!(
            out,
            "[{:>4}s] web-1 -> payments.default.mesh: {line}  ({counters})",
            elapsed.as_secs()
        )?;
        out.flush()?;
    }
    writeln!(out, "{ok} calls answered, {failed_calls} failed; inspect with: weftctl --server {} inspect agents", demo.api_url)?;
    if ok == 0 {
        return Err(failed("calling the demo service", "no call succeeded"));
    }
    Ok(())
}

/// The sum of a Prometheus metric's samples in an exposition text.
fn sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.parse::<f64>().ok())?
        })
        .sum::<f64>() as u64
}
