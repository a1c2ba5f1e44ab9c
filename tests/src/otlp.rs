//! A fake OpenTelemetry collector: an OTLP/HTTP receiver in a test host that
//! records the spans POSTed to `/v1/traces` as OTLP JSON, so scenarios can
//! check what the agents' Trace policy sent.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::netns::Host;

/// A running fake collector.
pub struct Collector {
    /// Where it listens.
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<Value>>>,
}

impl Collector {
    /// Listens on `addr` inside `host` and records every span it receives.
    pub fn start(host: &Host, addr: SocketAddr) -> Result<Collector> {
        let listener =
            host.enter(|| TcpListener::bind(addr).with_context(|| format!("binding {addr}")))?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let recorded = spans.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let recorded = recorded.clone();
                std::thread::spawn(move || {
                    let _ = receive(conn, &recorded);
                });
            }
        });
        Ok(Collector { addr, spans })
    }

    /// The spans received so far, each with `service.name` of its resource
    /// copied in as `"service"`.
    pub fn spans(&self) -> Vec<Value> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The base URL to configure as the Trace backend's endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// One request (or several, keep-alive): records the spans of a POST to
/// /v1/traces and answers 200 (404 to anything else).
fn receive(mut conn: TcpStream, recorded: &Mutex<Vec<Value>>) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    loop {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if conn.read(&mut byte)? == 0 || head.len() > 64 * 1024 {
                return Ok(());
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut words = head.split_whitespace();
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let length: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        conn.read_exact(&mut body)?;
        let ok = method == "POST" && path == "/v1/traces";
        if ok {
            let value: Value = serde_json::from_slice(&body).context("OTLP JSON")?;
            let mut out = recorded.lock().unwrap_or_else(|p| p.into_inner());
            for rs in value["resourceSpans"].as_array().into_iter().flatten() {
                let service = rs["resource"]["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|a| a["key"] == "service.name")
                    .map(|a| a["value"]["stringValue"].clone())
                    .unwrap_or(Value::Null);
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for span in ss["spans"].as_array().into_iter().flatten() {
                        let mut span = span.clone();
                        span["service"] = service.clone();
                        out.push(span);
                    }
                }
            }
        }
        let status = if ok { "200 OK" } else { "404 Not Found" };
        conn.write_all(
            format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}")
                .as_bytes(),
        )?;
        if head.to_ascii_lowercase().contains("connection: close") {
            let _ = conn.shutdown(Shutdown::Write);
            return Ok(());
        }
    }
}

/// A span attribute's value as text (string or int), if present.
pub fn attribute(span: &Value, key: &str) -> Option<String> {
    let a = span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)?;
    let v = &a["value"];
    v["stringValue"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| v["intValue"].as_str().map(str::to_owned))
        .or_else(|| v["intValue"].as_i64().map(|i| i.to_string()))
}
