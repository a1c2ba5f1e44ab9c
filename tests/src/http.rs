//! A minimal blocking HTTP/1.1 client, enough for admin, metrics and the
//! demo service (one request per connection).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header names (lowercased) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The decoded body.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` on `addr`.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response> {
    request(addr, "GET", path, timeout)
}

/// Sends one request without a body and reads the whole response.
pub fn request(addr: SocketAddr, method: &str, path: &str, timeout: Duration) -> Result<Response> {
    request_with(addr, method, path, &[], timeout)
}

/// Like [`request`], with extra request headers.
pub fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\nUser-Agent: weft-e2e\r\n{extra}\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .with_context(|| format!("sending {method} {path} to {addr}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(resp) = parse(&buf, false)? {
            return Ok(resp);
        }
        let n = stream
            .read(&mut chunk)
            .with_context(|| format!("reading the answer to {method} {path} from {addr}"))?;
        if n == 0 {
            return parse(&buf, true)?.ok_or_else(|| {
                anyhow!(
                    "{addr} closed the connection after {} bytes of answer",
                    buf.len()
                )
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Parses a response if `raw` holds all of it; `eof` says no more bytes come.
pub fn parse(raw: &[u8], eof: bool) -> Result<Option<Response>> {
    let Some(end) = find(raw, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&raw[..end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let rest = &raw[end + 4..];
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        return Ok(dechunk(rest)?.map(|body| Response { body, ..resp }));
    }
    if let Some(len) = resp.header("content-length") {
        let len: usize = len
            .parse()
            .with_context(|| format!("bad content-length {len:?}"))?;
        if rest.len() < len {
            if eof {
                bail!("body cut short: {} of {len} bytes", rest.len());
            }
            return Ok(None);
        }
        resp.body = rest[..len].to_vec();
        return Ok(Some(resp));
    }
    if eof {
        resp.body = rest.to_vec();
        return Ok(Some(resp));
    }
    Ok(None)
}

fn dechunk(mut rest: &[u8]) -> Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        let Some(eol) = find(rest, b"\r\n") else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&rest[..eol])?
            .split(';')
            .next()
            .unwrap_or_default();
        let size = usize::from_str_radix(size_text.trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(Some(body));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// The position of `needle` in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_and_chunked() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false)
            .unwrap()
            .unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "hello"));
        assert!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", false)
                .unwrap()
                .is_none()
        );
        let raw =
            b"HTTP/1.1 503 X\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let r = parse(raw, false).unwrap().unwrap();
        assert_eq!((r.status, r.text().as_str()), (503, "abcde"));
        let r = parse(b"HTTP/1.0 404 Nope\r\n\r\nrest", true)
            .unwrap()
            .unwrap();
        assert_eq!((r.status, r.text().as_str()), (404, "rest"));
    }
}
