//! Reading an agent's Prometheus endpoint: a small parser of the text
//! exposition format, and lookups by metric name and a subset of labels.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::Netns;

/// One sample: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name, e.g. `weft_handshakes_total`.
    pub name: String,
    /// Label names and values.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// All samples of one scrape.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the Prometheus / OpenMetrics text format.
    pub fn parse(text: &str) -> Result<Metrics> {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_line(l).with_context(|| format!("metrics line {l:?}")))
            .collect::<Result<_>>()?;
        Ok(Metrics { samples })
    }

    /// Samples named `name` whose labels include every pair of `labels`.
    pub fn find<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of the matching samples, or `None` when none matches.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.find(name, labels).peekable();
        found.peek()?;
        Some(found.map(|s| s.value).sum())
    }

    /// The sum of the matching samples, 0 when none matches.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Every sample, in exposition order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The samples whose name starts with `prefix`, one per line, for messages.
    pub fn dump(&self, prefix: &str) -> String {
        self.samples
            .iter()
            .filter(|s| s.name.starts_with(prefix))
            .map(|s| format!("{s}\n"))
            .collect()
    }
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        write!(f, "{}{{{}}} {}", self.name, labels.join(","), self.value)
    }
}

fn parse_line(line: &str) -> Result<Sample> {
    let name_end = line
        .find(['{', ' ', '\t'])
        .ok_or_else(|| anyhow!("no value"))?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(body)?;
        labels = parsed;
        rest = after;
    }
    let value_text = rest
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow!("no value"))?;
    let value = value_text
        .parse()
        .with_context(|| format!("bad value {value_text:?}"))?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` and returns the labels and what follows `}`.
fn parse_labels(mut s: &str) -> Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = s.find('=').ok_or_else(|| anyhow!("label without '='"))?;
        let key = s[..eq].trim().to_owned();
        let quoted = s[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or_else(|| anyhow!("label {key} value is not quoted"))?;
        let mut value = String::new();
        let mut escaped = false;
        let mut end = None;
        for (i, c) in quoted.char_indices() {
            if escaped {
                value.push(if c == 'n' { '\n' } else { c });
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                end = Some(i);
                break;
            } else {
                value.push(c);
            }
        }
        let end = end.ok_or_else(|| anyhow!("unterminated value of label {key}"))?;
        s = &quoted[end + 1..];
        labels.insert(key, value);
    }
}

/// Scrapes `http://addr/metrics` from inside `ns`.
pub fn scrape(ns: &Netns, addr: SocketAddr) -> Result<Metrics> {
    ns.enter(|| scrape_here(addr))
}

/// Scrapes `http://addr/metrics` from the current namespace.
pub fn scrape_here(addr: SocketAddr) -> Result<Metrics> {
    let resp = crate::http::get(addr, "/metrics", Duration::from_secs(5))?;
    if resp.status != 200 {
        bail!(
            "GET http://{addr}/metrics answered {}: {}",
            resp.status,
            resp.text()
        );
    }
    Metrics::parse(&resp.text())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches_label_subsets() {
        let text = r#"# HELP weft_handshake_failures_total Failed handshakes.
# TYPE weft_handshake_failures_total counter
weft_handshake_failures_total{direction="inbound",reason="unknown_ca"} 2
weft_handshake_failures_total{direction="inbound",reason="expired"} 1
weft_handshake_failures_total{direction="outbound",reason="io"} 4 1700000000
weft_open_streams{direction="inbound"} 0
weft_odd{path="a\"b\\c,d}"} 1.5e0
up 1
# EOF
"#;
        let m = Metrics::parse(text).unwrap();
        let f = "weft_handshake_failures_total";
        assert_eq!(
            m.get(f, &[("direction", "inbound"), ("reason", "unknown_ca")]),
            Some(2.0)
        );
        assert_eq!(m.sum(f, &[("direction", "inbound")]), 3.0);
        assert_eq!(m.sum(f, &[]), 7.0);
        assert_eq!(m.get(f, &[("reason", "timeout")]), None);
        assert_eq!(m.get("weft_odd", &[("path", "a\"b\\c,d}")]), Some(1.5));
        assert_eq!(m.get("up", &[]), Some(1.0));
    }
}
