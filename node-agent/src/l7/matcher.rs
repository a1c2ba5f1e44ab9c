//! Request matching (HTTPRoute `matches`, TrafficPermission `http`),
//! compiled once per view: regular expressions are built when the view is
//! applied, so a bad one is a Nack, never a failure mid-request.

use http::header::HeaderName;
use http::request::Parts;
use http::Method;
use regex::Regex;
use weft_api::policy::conf::{HeaderMatch, HttpMatch, PathMatch, QueryMatch};

/// Why a match cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub enum MatchError {
    #[error("{0:?} is not a valid regular expression: {1}")]
    Regex(String, regex::Error),
    #[error("{0:?} is not a valid HTTP header name")]
    HeaderName(String),
    #[error("{0:?} is not a valid HTTP method")]
    Method(String),
}

/// One compiled [`HttpMatch`]: every part set must match.
#[derive(Debug, Clone)]
pub struct RequestMatch {
    path: Option<Path>,
    method: Option<Method>,
    headers: Vec<(HeaderName, Value)>,
    query: Vec<(String, Value)>,
}

#[derive(Debug, Clone)]
enum Path {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug, Clone)]
enum Value {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    Present,
    Absent,
}

fn anchored(expr: &str) -> Result<Regex, MatchError> {
    Regex::new(&format!("^(?:{expr})$")).map_err(|e| MatchError::Regex(expr.to_owned(), e))
}

fn header_name(name: &str) -> Result<HeaderName, MatchError> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| MatchError::HeaderName(name.to_owned()))
}

impl RequestMatch {
    /// Compiles a match as written in a policy.
    pub fn compile(m: &HttpMatch) -> Result<Self, MatchError> {
        let path = match &m.path {
            None => None,
            Some(PathMatch::Exact { value }) => Some(Path::Exact(value.clone())),
            Some(PathMatch::PathPrefix { value }) => {
                Some(Path::Prefix(value.trim_end_matches('/').to_owned()))
            }
            Some(PathMatch::RegularExpression { value }) => Some(Path::Regex(anchored(value)?)),
        };
        let method = m
            .method
            .as_deref()
            .map(|s| Method::from_bytes(s.as_bytes()).map_err(|_| MatchError::Method(s.to_owned())))
            .transpose()?;
        let mut headers = Vec::with_capacity(m.headers.len());
        for h in &m.headers {
            let (name, value) = match h {
                HeaderMatch::Exact { name, value } => (name, Value::Exact(value.clone())),
                HeaderMatch::Prefix { name, value } => (name, Value::Prefix(value.clone())),
                HeaderMatch::RegularExpression { name, value } => {
                    (name, Value::Regex(anchored(value)?))
                }
                HeaderMatch::Present { name } => (name, Value::Present),
                HeaderMatch::Absent { name } => (name, Value::Absent),
            };
            headers.push((header_name(name)?, value));
        }
        let mut query = Vec::with_capacity(m.query_params.len());
        for q in &m.query_params {
            let (name, value) = match q {
                QueryMatch::Exact { name, value } => (name, Value::Exact(value.clone())),
                QueryMatch::RegularExpression { name, value } => {
                    (name, Value::Regex(anchored(value)?))
                }
            };
            query.push((name.clone(), value));
        }
        Ok(RequestMatch {
            path,
            method,
            headers,
            query,
        })
    }

    /// Whether the request matches; for a `PathPrefix`, also the length of
    /// the prefix matched (what `ReplacePrefixMatch` replaces).
    pub fn matches(&self, req: &Parts) -> bool {
        if let Some(method) = &self.method {
            if req.method != method {
                return false;
            }
        }
        if let Some(path) = &self.path {
            let p = req.uri.path();
            let ok = match path {
                Path::Exact(want) => p == want,
                Path::Prefix(prefix) => prefix_matches(prefix, p),
                Path::Regex(re) => re.is_match(p),
            };
            if !ok {
                return false;
            }
        }
        for (name, want) in &self.headers {
            let got = req.headers.get(name).and_then(|v| v.to_str().ok());
            if !value_matches(want, got) {
                return false;
            }
        }
        if !self.query.is_empty() {
            let q = req.uri.query().unwrap_or("");
            for (name, want) in &self.query {
                let got = q.split('&').find_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == name).then_some(v)
                });
                if !value_matches(want, got) {
                    return false;
                }
            }
        }
        true
    }

    /// The prefix this match's `PathPrefix` stands for, if it has one.
    pub fn path_prefix(&self) -> Option<&str> {
        match &self.path {
            Some(Path::Prefix(p)) => Some(p),
            _ => None,
        }
    }
}

/// `/api` matches `/api`, `/api/` and `/api/x`, not `/apix`; `/` (kept as
/// the empty string) matches everything.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn value_matches(want: &Value, got: Option<&str>) -> bool {
    match (want, got) {
        (Value::Absent, got) => got.is_none(),
        (Value::Present, got) => got.is_some(),
        (_, None) => false,
        (Value::Exact(w), Some(g)) => w == g,
        (Value::Prefix(w), Some(g)) => g.starts_with(w.as_str()),
        (Value::Regex(re), Some(g)) => re.is_match(g),
    }
}

/// Whether any of `matches` matches (an empty list matches everything).
pub fn any_matches(matches: &[RequestMatch], req: &Parts) -> bool {
    matches.is_empty() || matches.iter().any(|m| m.matches(req))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn compile(yaml: &str) -> RequestMatch {
        RequestMatch::compile(&yaml_serde::from_str(yaml).unwrap()).unwrap()
    }

    #[test]
    fn prefix_respects_segments() {
        let m = compile("path: {type: PathPrefix, value: /api}");
        assert!(m.matches(&parts("GET", "/api", &[])));
        assert!(m.matches(&parts("GET", "/api/v1?x=1", &[])));
        assert!(!m.matches(&parts("GET", "/apix", &[])));
        let root = compile("path: {type: PathPrefix, value: /}");
        assert!(root.matches(&parts("GET", "/anything", &[])));
    }

    #[test]
    fn every_part_must_match() {
        let m = compile(
            "method: POST\npath: {type: RegularExpression, value: '/orders/[0-9]+'}\nheaders:\n- {type: Exact, name: x-user, value: alice}\n- {type: Absent, name: x-debug}\nqueryParams:\n- {type: Exact, name: v, value: '2'}",
        );
        let ok = parts("POST", "/orders/42?v=2", &[("x-user", "alice")]);
        assert!(m.matches(&ok));
        assert!(!m.matches(&parts("GET", "/orders/42?v=2", &[("x-user", "alice")])));
        assert!(!m.matches(&parts("POST", "/orders/42x?v=2", &[("x-user", "alice")])));
        assert!(!m.matches(&parts("POST", "/orders/42?v=2", &[("x-user", "bob")])));
        assert!(!m.matches(&parts(
            "POST",
            "/orders/42?v=2",
            &[("x-user", "alice"), ("x-debug", "1")]
        )));
        assert!(!m.matches(&parts("POST", "/orders/42?v=3", &[("x-user", "alice")])));
    }

    #[test]
    fn bad_regex_is_an_error_not_a_panic() {
        let m: HttpMatch =
            yaml_serde::from_str("path: {type: RegularExpression, value: '(('}").unwrap();
        assert!(matches!(
            RequestMatch::compile(&m),
            Err(MatchError::Regex(..))
        ));
    }
}
