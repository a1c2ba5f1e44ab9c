//! `weftctl`, the operator CLI, as a library: the command line ([`Cli`]),
//! what each command does ([`run`]) against a zone controller's HTTP API,
//! and the errors it reports ([`Error`]). The binary only parses arguments
//! and maps the outcome to an exit code, so tests drive the same code.

mod client;
mod inspect;
mod mesh;
mod output;
mod quickstart;
mod tokens;

use std::io::{Read, Write};

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use http::{Method, StatusCode};
use serde::Deserialize;
use weft_api::Resource;

pub use client::{Answer, Client};
pub use inspect::Inspected;
pub use mesh::MeshCommand;
pub use quickstart::QuickstartArgs;
pub use tokens::{IssuedToken, Token, TokenCommand, TokenFormat};

/// Operate a Weft zone: apply, get and delete resources; issue bootstrap
/// tokens.
#[derive(Debug, Parser)]
#[command(name = "weftctl", version, about)]
pub struct Cli {
    /// The zone controller's HTTP API.
    #[arg(long, global = true, default_value = "http://127.0.0.1:5681")]
    pub server: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Creates or replaces the resources of a YAML (or JSON) file: all of
    /// them, or none if any is invalid.
    Apply {
        /// The file, or `-` for standard input.
        #[arg(short = 'f', long = "filename")]
        file: String,
    },
    /// Lists the resources of a kind, or shows one.
    Get {
        /// The kind (`Workload`, `workload` or `workloads`).
        kind: String,
        /// One resource's name; all of the kind when left out.
        name: Option<String>,
        /// Only this mesh (for one resource: its mesh, default `default`).
        #[arg(short, long)]
        mesh: Option<String>,
        /// Only this namespace.
        #[arg(short, long)]
        namespace: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Deletes one resource.
    Delete {
        /// The kind.
        kind: String,
        /// The resource's name.
        name: String,
        /// Its mesh (default `default`).
        #[arg(short, long)]
        mesh: Option<String>,
        /// Its namespace (needed only when the name is in several).
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// Shows the zone's inventory: agents (liveness, config version, last
    /// refusal), services (virtual IPs, endpoints) or workloads; or the
    /// policies of one workload (`policies --workload <ns>/<name>`): which
    /// apply, in merge order, and what its agent receives (`-o yaml`).
    Inspect {
        /// What to show.
        #[arg(value_enum)]
        what: Inspected,
        /// For `policies`: the workload, as `<namespace>/<name>`.
        #[arg(short, long)]
        workload: Option<String>,
        /// For `policies`: the workload's mesh.
        #[arg(short, long, default_value = "default")]
        mesh: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Issues, lists and revokes bootstrap tokens (what a new agent
    /// enrols with).
    Token {
        /// What to do with tokens.
        #[command(subcommand)]
        action: TokenCommand,
    },
    /// Shows and rotates a mesh's CAs.
    Mesh {
        /// What to do with the mesh.
        #[command(subcommand)]
        action: MeshCommand,
    },
    /// Shows the zone controller's log filter, or replaces it while the
    /// controller runs (no restart, so no agent's stream ends).
    LogLevel {
        /// The new filter: a level (`debug`) or directives
        /// (`info,weft_zone::hub=debug`).
        filter: Option<String>,
    },
    /// Brings up a whole zone on this machine (a controller on the embedded
    /// store, two agents, a demo service) and shows live calls between them
    /// over mTLS until Ctrl-C. Needs no root and no set-up.
    Quickstart(QuickstartArgs),
}

/// How `get` prints resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns: name, mesh, namespace, version and kind-specific.
    Table,
    /// The resources as a YAML stream that `apply -f` reads back.
    Yaml,
    /// The API's JSON answer, with versions.
    Json,
}

/// One problem with refused input, as the controller reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// The document's number in the input, from 1.
    pub document: usize,
    /// The document's kind, when known.
    pub kind: Option<String>,
    /// The resource's name, when known.
    pub name: Option<String>,
    /// The field at fault (empty for the whole document).
    pub path: String,
    /// Why.
    pub reason: String,
    /// The line of the field in the input, when known.
    pub line: Option<usize>,
    /// The column of the field, when known.
    pub column: Option<usize>,
    /// The line where the document starts, when known.
    pub document_line: Option<usize>,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "document {}", self.document)?;
        if !self.path.is_empty() {
            write!(f, ", {}", self.path)?;
        }
        write!(f, ": {}", self.reason)?;
        match (self.line, self.document_line) {
            (Some(line), _) => write!(f, " (line {line})"),
            (None, Some(start)) => write!(f, " (document starts at line {start})"),
            (None, None) => Ok(()),
        }
    }
}

/// What can go wrong in a command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--server` is not usable.
    #[error("bad --server {server:?}: {reason}")]
    Server {
        /// What was given.
        server: String,
        /// Why it is not usable.
        reason: String,
    },
    /// The controller could not be reached or the exchange failed.
    #[error("talking to {server}: {reason}")]
    Http {
        /// host:port.
        server: String,
        /// What failed.
        reason: String,
    },
    /// The input file could not be read.
    #[error("cannot read {path}: {source}")]
    Input {
        /// The file (`-` for stdin).
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The controller refused the input; nothing was applied.
    #[error("refused, nothing was applied:\n{}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Refused {
        /// Every problem, in input order.
        problems: Vec<Problem>,
    },
    /// The controller refused a token request; no token was issued.
    #[error("no token was issued:\n{}", problems.iter().map(|p| if p.path.is_empty() { p.reason.clone() } else { format!("{}: {}", p.path, p.reason) }).collect::<Vec<_>>().join("\n"))]
    TokenRefused {
        /// Every problem, one per field at fault.
        problems: Vec<Problem>,
    },
    /// The controller answered with an error.
    #[error("{message} (HTTP {status})")]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The controller's message.
        message: String,
    },
    /// The command line asks for something that cannot be done.
    #[error("{0}")]
    Usage(String),
    /// The controller's answer was not what this CLI understands.
    #[error("unexpected answer from the controller: {0}")]
    Decode(String),
    /// A quickstart step failed; everything it started was stopped.
    #[error("quickstart: {step}: {reason}")]
    Quickstart {
        /// What it was doing.
        step: String,
        /// What went wrong.
        reason: String,
    },
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl Error {
    /// The error as printed for a person: prefixed with `error:`.
    pub fn for_humans(&self) -> String {
        format!("error: {self}")
    }
}

/// One resource with its version, as the API answers.
#[derive(Debug, Clone, Deserialize)]
pub struct Item {
    /// The stored version.
    pub version: u64,
    /// The resource.
    pub resource: Resource,
}

#[derive(Deserialize)]
struct Items {
    items: Vec<Item>,
}

#[derive(Deserialize)]
struct Applied {
    applied: Vec<AppliedEntry>,
}

#[derive(Deserialize)]
struct AppliedEntry {
    kind: String,
    name: String,
    mesh: Option<String>,
    namespace: Option<String>,
    version: u64,
    outcome: String,
}

/// Runs a parsed command line, reading `apply -f -` input from `stdin` and
/// writing results to `out`.
pub async fn run(cli: Cli, stdin: &mut dyn Read, out: &mut dyn Write) -> Result<(), Error> {
    let client = Client::new(&cli.server)?;
    match cli.command {
        Command::Quickstart(args) => quickstart::run(args, out).await,
        Command::Apply { file } => apply(&client, &file, stdin, out).await,
        Command::Get {
            kind,
            name,
            mesh,
            namespace,
            output,
        } => {
            let query = query(mesh.as_deref(), namespace.as_deref());
            let kind_path = encode(&kind);
            match name {
                Some(name) => {
                    let answer = client
                        .request(
                            Method::GET,
                            &format!("/v1/resources/{kind_path}/{}{query}", encode(&name)),
                            None,
                        )
                        .await?;
                    let body = expect_ok(answer)?;
                    let item: Item = decode(&body)?;
                    output::print(out, output, &body, &[item])
                }
                None => {
                    let answer = client
                        .request(
                            Method::GET,
                            &format!("/v1/resources/{kind_path}{query}"),
                            None,
                        )
                        .await?;
                    let body = expect_ok(answer)?;
                    let items: Items = decode(&body)?;
                    output::print(out, output, &body, &items.items)
                }
            }
        }
        Command::Delete {
            kind,
            name,
            mesh,
            namespace,
        } => {
            let query = query(mesh.as_deref(), namespace.as_deref());
            let answer = client
                .request(
                    Method::DELETE,
                    &format!("/v1/resources/{}/{}{query}", encode(&kind), encode(&name)),
                    None,
                )
                .await?;
            let body = expect_ok(answer)?;
            #[derive(Deserialize)]
            struct Deleted {
                deleted: Item,
            }
            let deleted: Deleted = decode(&body)?;
            writeln!(out, "{} deleted", describe(&deleted.deleted.resource))?;
            Ok(())
        }
        Command::Inspect {
            what: Inspected::Policies,
            workload,
            mesh,
            output,
        } => inspect::policies(&client, &mesh, workload.as_deref(), output, out).await,
        Command::Inspect {
            what,
            workload: None,
            output,
            ..
        } => inspect::run(&client, what, output, out).await,
        Command::Inspect { .. } => Err(Error::Usage(
            "--workload is only for `inspect policies`".to_owned(),
        )),
        Command::Token { action } => tokens::run(&client, action, out).await,
        Command::Mesh { action } => mesh::run(&client, action, out).await,
        Command::LogLevel { filter } => log_level(&client, filter, out).await,
    }
}

async fn log_level(
    client: &Client,
    filter: Option<String>,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let body = filter.map(|filter| {
        let json = serde_json::json!({ "filter": filter });
        ("application/json", Bytes::from(json.to_string()))
    });
    let method = if body.is_some() {
        Method::PUT
    } else {
        Method::GET
    };
    let answer = client.request(method, "/v1/logging", body).await?;
    #[derive(Deserialize)]
    struct Shown {
        filter: String,
    }
    let shown: Shown = decode(&expect_ok(answer)?)?;
    writeln!(out, "{}", shown.filter)?;
    Ok(())
}

async fn apply(
    client: &Client,
    file: &str,
    stdin: &mut dyn Read,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let input_error = |source| Error::Input {
        path: file.to_owned(),
        source,
    };
    let text = if file == "-" {
        let mut text = Vec::new();
        stdin.read_to_end(&mut text).map_err(input_error)?;
        text
    } else {
        std::fs::read(file).map_err(input_error)?
    };
    let content_type = if file.ends_with(".json") {
        "application/json"
    } else {
        "application/yaml"
    };
    let answer = client
        .request(
            Method::PUT,
            "/v1/resources",
            Some((content_type, Bytes::from(text))),
        )
        .await?;
    let body = expect_ok(answer)?;
    let applied: Applied = decode(&body)?;
    for entry in applied.applied {
        let mut name = String::new();
        for part in [&entry.mesh, &entry.namespace].into_iter().flatten() {
            name.push_str(part);
            name.push('/');
        }
        name.push_str(&entry.name);
        writeln!(
            out,
            "{} {name} {} (version {})",
            entry.kind, entry.outcome, entry.version
        )?;
    }
    Ok(())
}

/// `Kind mesh/namespace/name` for messages.
fn describe(resource: &Resource) -> String {
    let meta = resource.metadata();
    let mut name = String::new();
    for part in [resource.mesh(), meta.namespace.as_deref()]
        .into_iter()
        .flatten()
    {
        name.push_str(part);
        name.push('/');
    }
    name.push_str(&meta.name);
    format!("{} {name}", resource.kind())
}

/// The body of a 2xx answer, or the error the controller reported.
pub(crate) fn expect_ok(answer: Answer) -> Result<Bytes, Error> {
    if answer.status.is_success() {
        return Ok(answer.body);
    }
    #[derive(Deserialize)]
    struct Refused {
        errors: Vec<Problem>,
    }
    #[derive(Deserialize)]
    struct Failed {
        error: String,
    }
    if answer.status == StatusCode::UNPROCESSABLE_ENTITY {
        if let Ok(refused) = serde_json::from_slice::<Refused>(&answer.body) {
            return Err(Error::Refused {
                problems: refused.errors,
            });
        }
    }
    let message = match serde_json::from_slice::<Failed>(&answer.body) {
        Ok(failed) => failed.error,
        Err(_) => String::from_utf8_lossy(&answer.body).trim().to_owned(),
    };
    Err(Error::Api {
        status: answer.status,
        message,
    })
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::Decode(e.to_string()))
}

/// `?mesh=..&namespace=..` (or nothing).
fn query(mesh: Option<&str>, namespace: Option<&str>) -> String {
    let pairs: Vec<String> = [("mesh", mesh), ("namespace", namespace)]
        .into_iter()
        .filter_map(|(key, value)| value.map(|v| format!("{key}={}", encode(v))))
        .collect();
    if pairs.is_empty() {
        String::new()
    } else {
        format!("?{}", pairs.join("&"))
    }
}

/// Percent-encodes everything but unreserved characters, for a path
/// segment or query value.
pub(crate) fn encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_read_as_one_line() {
        let problem = Problem {
            document: 1,
            kind: None,
            name: None,
            path: "spec.ports[1].port".into(),
            reason: "must be 1-65535".into(),
            line: Some(12),
            column: Some(11),
            document_line: Some(1),
        };
        assert_eq!(
            problem.to_string(),
            "document 1, spec.ports[1].port: must be 1-65535 (line 12)"
        );
    }

    #[test]
    fn queries_are_encoded() {
        assert_eq!(query(None, None), "");
        assert_eq!(
            query(Some("prod"), Some("a b")),
            "?mesh=prod&namespace=a%20b"
        );
    }
}
