//! The AccessLog policy: one entry per HTTP request (or TCP connection),
//! as JSON or from a text template, to a file or to standard output.
//!
//! Entries go through a bounded queue to one writer task per file, so the
//! data path never waits on a disk; when the queue is full the entry is
//! dropped and counted rather than slowing traffic down.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use std::sync::mpsc;
use weft_api::policy::conf::{AccessLogBackend, LogFormat};

/// Entries waiting for a writer at most, per file.
const QUEUE: usize = 4096;

/// Entries dropped because a writer fell behind, for the metrics.
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Why an access log cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("{0:?} is not an absolute path")]
    Relative(String),
    #[error("cannot open {path:?}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
}

/// The agent's open log files.
pub static FILES: std::sync::LazyLock<Files> = std::sync::LazyLock::new(Files::default);

/// The writers of open log files, shared by every view so that a new view
/// reuses them (and a file is not opened twice).
#[derive(Default)]
pub struct Files(Mutex<HashMap<PathBuf, mpsc::SyncSender<String>>>);

impl Files {
    fn writer(&self, path: Option<&str>) -> Result<mpsc::SyncSender<String>, AccessLogError> {
        let key = PathBuf::from(path.unwrap_or("-"));
        let mut files = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = files.get(&key) {
            return Ok(tx.clone());
        }
        let mut out: Box<dyn std::io::Write + Send> = match path {
            None => Box::new(std::io::stdout()),
            Some(p) if !p.starts_with('/') => return Err(AccessLogError::Relative(p.to_owned())),
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| AccessLogError::Open {
                        path: p.to_owned(),
                        source,
                    })?,
            ),
        };
        let (tx, rx) = mpsc::sync_channel::<String>(QUEUE);
        // A thread of its own: file writes must not stall the runtime's
        // workers, and a config check runs outside any runtime.
        std::thread::Builder::new()
            .name("weft-access-log".to_owned())
            .spawn(move || {
                while let Ok(line) = rx.recv() {
                    if out.write_all(line.as_bytes()).is_err() {
                        DROPPED.fetch_add(1, Ordering::Relaxed);
                    }
                    // Flushed when the queue runs dry, not per line.
                    if let Ok(next) = rx.try_recv() {
                        if out.write_all(next.as_bytes()).is_err() {
                            DROPPED.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    let _ = out.flush();
                }
            })
            .map_err(|source| AccessLogError::Open {
                path: key.display().to_string(),
                source,
            })?;
        files.insert(key, tx.clone());
        Ok(tx)
    }
}

/// What one entry records.
#[derive(Debug, Default)]
pub struct Entry<'a> {
    /// `inbound` or `outbound`.
    pub direction: &'a str,
    /// When the request started (RFC 3339).
    pub start_time: String,
    /// The caller's identity (inbound) or the local workload's (outbound).
    pub source: &'a str,
    /// The service or workload called.
    pub destination: &'a str,
    /// The HTTPRoute that took the request, if any.
    pub route: &'a str,
    /// HTTP method.
    pub method: &'a str,
    /// Path and query.
    pub path: &'a str,
    /// `Host` / `:authority`.
    pub authority: &'a str,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: &'a str,
    /// Response status (0 when none was received).
    pub status: u16,
    /// Time to the response headers.
    pub duration_ms: f64,
    /// The endpoint that answered, if any.
    pub upstream: &'a str,
    /// Why the agent answered itself: `denied`, `rate_limited`,
    /// `fault_abort`, `timeout`, `no_endpoints`, `upstream_failed`.
    pub flag: &'a str,
}

struct Backend {
    tx: mpsc::SyncSender<String>,
    format: LogFormat,
}

/// A configured access log: every backend gets every entry.
pub struct AccessLog {
    backends: Vec<Backend>,
}

impl AccessLog {
    /// Opens (or reuses) the backends' writers.
    pub fn new(backends: &[AccessLogBackend], files: &Files) -> Result<Self, AccessLogError> {
        let mut out = Vec::with_capacity(backends.len());
        for b in backends {
            let (path, format) = match b {
                AccessLogBackend::File { path, format } => (Some(path.as_str()), format),
                AccessLogBackend::Stdout { format } => (None, format),
            };
            out.push(Backend {
                tx: files.writer(path)?,
                format: format.clone(),
            });
        }
        Ok(AccessLog { backends: out })
    }

    /// Queues an entry for every backend.
    pub fn record(&self, entry: &Entry<'_>) {
        for b in &self.backends {
            let line = match &b.format {
                LogFormat::Json => json(entry),
                LogFormat::Text { template } => text(template, entry),
            };
            if b.tx.try_send(line).is_err() {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn json(e: &Entry<'_>) -> String {
    let mut line = serde_json::json!({
        "start_time": e.start_time,
        "direction": e.direction,
        "source": e.source,
        "destination": e.destination,
        "route": e.route,
        "method": e.method,
        "path": e.path,
        "authority": e.authority,
        "protocol": e.protocol,
        "status": e.status,
        "duration_ms": e.duration_ms,
        "upstream": e.upstream,
        "flag": e.flag,
    })
    .to_string();
    line.push('\n');
    line
}

/// Replaces `%NAME%` placeholders; an unknown name is kept as written so a
/// typo shows in the output. Public so that the fuzz targets reach the
/// template code of user-written policies.
pub fn text(template: &str, e: &Entry<'_>) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(start) = rest.find('%') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('%') else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let name = &after[..end];
        match name {
            "START_TIME" => out.push_str(&e.start_time),
            "DIRECTION" => out.push_str(e.direction),
            "SOURCE" => out.push_str(e.source),
            "DESTINATION" => out.push_str(e.destination),
            "ROUTE" => out.push_str(e.route),
            "METHOD" => out.push_str(e.method),
            "PATH" => out.push_str(e.path),
            "AUTHORITY" => out.push_str(e.authority),
            "PROTOCOL" => out.push_str(e.protocol),
            "STATUS" => {
                let _ = write!(out, "{}", e.status);
            }
            "DURATION" => {
                let _ = write!(out, "{:.3}", e.duration_ms);
            }
            "UPSTREAM" => out.push_str(e.upstream),
            "FLAG" => out.push_str(e.flag),
            _ => {
                out.push('%');
                out.push_str(name);
                out.push('%');
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_template_fills_known_placeholders_and_keeps_others() {
        let e = Entry {
            method: "GET",
            path: "/x",
            status: 403,
            flag: "denied",
            ..Entry::default()
        };
        assert_eq!(
            text("%METHOD% %PATH% %STATUS% %FLAG% %NOPE% 100%", &e),
            "GET /x 403 denied %NOPE% 100%\n"
        );
    }
}
