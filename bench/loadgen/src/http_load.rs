//! `weft-loadgen http`: a fixed-rate HTTP/1.1 load generator. Requests are
//! scheduled open loop (request `i` is released at `start + i / rate`,
//! whatever happened to the ones before it) and sent over a few keep-alive
//! connections; each request's latency runs from its release to the end of
//! its response body, so a stalled connection shows as latency instead of
//! as fewer requests (no coordinated omission). Prints one JSON object:
//! counts, errors, percentiles and, with `--samples`, every latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};

/// Fixed-rate HTTP/1.1 GETs to one URL.
#[derive(Debug, clap::Args)]
pub struct HttpArgs {
    /// `http://host:port/path`; host is an IP address or a name the
    /// system resolver knows.
    #[arg(long)]
    url: String,
    /// Requests per second.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// How long to send, e.g. 15s or 500ms.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    duration: Duration,
    /// Keep-alive connections (each carries one request at a time).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// A request not answered within this counts as an error.
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    timeout: Duration,
    /// Also print every latency (µs), for merging runs exactly.
    #[arg(long)]
    samples: bool,
}

struct Target {
    addr: String,
    host: String,
    path: String,
}

fn parse_url(url: &str) -> anyhow::Result<Target> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url:?}: only http:// URLs"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        bail!("{url:?}: no host");
    }
    let addr = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok(Target {
        addr,
        host: authority.to_owned(),
        path: path.to_owned(),
    })
}

#[derive(Default)]
struct Outcome {
    latencies_us: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

type Conn = http1::SendRequest<Empty<Bytes>>;

async fn connect(target: &Target) -> anyhow::Result<Conn> {
    let tcp = TcpStream::connect(&target.addr)
        .await
        .with_context(|| format!("connecting to {}", target.addr))?;
    tcp.set_nodelay(true)?;
    let (send, conn) = http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn request(target: &Target, conn: &mut Option<Conn>) -> anyhow::Result<()> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        *conn = Some(connect(target).await?);
    }
    let send = conn.as_mut().expect("connected above");
    send.ready().await?;
    let req = http::Request::get(target.path.as_str())
        .header(http::header::HOST, target.host.as_str())
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    resp.into_body().collect().await?;
    if !status.is_success() {
        bail!("status {status}");
    }
    Ok(())
}

/// One connection's loop: takes release times off the schedule until it
/// ends.
async fn worker(
    target: Arc<Target>,
    schedule: Arc<Mutex<mpsc::UnboundedReceiver<Instant>>>,
    timeout: Duration,
) -> Outcome {
    let mut out = Outcome::default();
    let mut conn = None;
    loop {
        let released = match schedule.lock().await.recv().await {
            Some(at) => at,
            None => return out,
        };
        match tokio::time::timeout(timeout, request(&target, &mut conn)).await {
            Ok(Ok(())) => out.latencies_us.push(
                released
                    .elapsed()
                    .as_micros()
                    .try_into()
                    .unwrap_or(u64::MAX),
            ),
            failed => {
                let why = match failed {
                    Ok(Err(e)) => format!("{e:#}"),
                    _ => format!("no answer within {timeout:?}"),
                };
                out.errors += 1;
                out.first_error.get_or_insert(why);
                // A connection that failed or timed out is not reused.
                conn = None;
            }
        }
    }
}

fn percentile_ms(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    crate::round(sorted[i] as f64 / 1000.0)
}

pub fn main(args: HttpArgs) -> anyhow::Result<()> {
    if !args.rate.is_finite() || args.rate <= 0.0 || args.connections == 0 {
        bail!("--rate must be positive and --connections at least 1");
    }
    let target = Arc::new(parse_url(&args.url)?);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(args, target))
}

async fn run(args: HttpArgs, target: Arc<Target>) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    let rx = Arc::new(Mutex::new(rx));
    let workers: Vec<_> = (0..args.connections)
        .map(|_| tokio::spawn(worker(target.clone(), rx.clone(), args.timeout)))
        .collect();
    let total = (args.rate * args.duration.as_secs_f64()).round() as u64;
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / args.rate);
        tokio::time::sleep_until(due.into()).await;
        // Latency counts from when the request was released: any wait for
        // a free connection is in it, the timer's own lateness (up to a
        // millisecond) is not.
        if tx.send(Instant::now()).is_err() {
            break;
        }
    }
    drop(tx);
    let mut all = Outcome::default();
    for w in workers {
        let out = w.await?;
        all.latencies_us.extend(out.latencies_us);
        all.errors += out.errors;
        if all.first_error.is_none() {
            all.first_error = out.first_error;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut sorted = all.latencies_us.clone();
    sorted.sort_unstable();
    let mut report = serde_json::json!({
        "url": args.url,
        "rate": args.rate,
        "scheduled": total,
        "ok": sorted.len(),
        "errors": all.errors,
        "first_error": all.first_error,
        "elapsed_s": crate::seconds(elapsed),
        "p50_ms": percentile_ms(&sorted, 0.50),
        "p90_ms": percentile_ms(&sorted, 0.90),
        "p99_ms": percentile_ms(&sorted, 0.99),
        "max_ms": percentile_ms(&sorted, 1.0),
    });
    if args.samples {
        report["samples_us"] = serde_json::json!(all.latencies_us);
    }
    println!("{report}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_url("http://10.0.0.1:8081/x?y").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.path.as_str()),
            ("10.0.0.1:8081", "/x?y")
        );
        let t = parse_url("http://web.default.mesh").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.host.as_str(), t.path.as_str()),
            ("web.default.mesh:80", "web.default.mesh", "/")
        );
        assert!(parse_url("https://x/").is_err());
    }

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_ms(&v, 0.5), 50.0);
        assert_eq!(percentile_ms(&v, 0.99), 99.0);
        assert_eq!(percentile_ms(&v, 1.0), 100.0);
    }
}
