//! `weftctl token`: issue, list and revoke bootstrap tokens.

use std::io::Write;

use bytes::Bytes;
use clap::{Subcommand, ValueEnum};
use http::Method;
use serde::{Deserialize, Serialize};

use crate::{decode, encode, expect_ok, Client, Error};

/// The `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Issues a token for the controller's zone and prints its secret,
    /// which is shown this once only.
    Issue {
        /// The mesh the agent joins.
        #[arg(long)]
        mesh: String,
        /// A workload the agent may register (repeatable).
        #[arg(
            long = "workload",
            value_name = "NAME",
            required_unless_present = "workload_prefix",
            conflicts_with = "workload_prefix"
        )]
        workloads: Vec<String>,
        /// Any workload whose name starts with this.
        #[arg(long, value_name = "PREFIX")]
        workload_prefix: Option<String>,
        /// How long the token works: 1s to 720h (30 days).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// How many agents may enrol with it (1 to 1000).
        #[arg(long, default_value_t = 1)]
        max_uses: u32,
        /// Output format; `secret` prints only the secret (for scripts).
        #[arg(short, long, value_enum, default_value_t = TokenFormat::Table)]
        output: TokenFormat,
    },
    /// Lists the tokens (never their secrets).
    List {
        /// Output format (`secret` is not available here).
        #[arg(short, long, value_enum, default_value_t = TokenFormat::Table)]
        output: TokenFormat,
    },
    /// Revokes a token: it no longer enrols anyone.
    Revoke {
        /// The token's id (from `token list`).
        id: String,
    },
}

/// How `token` commands print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TokenFormat {
    /// Aligned columns (for `issue`: the token, then the secret).
    Table,
    /// The API's JSON answer.
    Json,
    /// Only the secret and a newline (`issue` only).
    Secret,
}

/// Which workloads a token's agent may register, as the API spells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Workloads {
    /// Exactly these names.
    Names(Vec<String>),
    /// Names starting with this.
    Prefix(String),
}

impl std::fmt::Display for Workloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workloads::Names(names) => f.write_str(&names.join(",")),
            Workloads::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// A token as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Token {
    /// Its id.
    pub id: String,
    /// Its mesh.
    pub mesh: String,
    /// The zone that accepts it.
    pub zone: String,
    /// The workloads it allows.
    pub workloads: Workloads,
    /// Its expiry (RFC 3339).
    pub expires_at: String,
    /// Enrolments so far.
    pub uses: u32,
    /// Its bound on enrolments.
    pub max_uses: u32,
    /// Whether it was revoked.
    pub revoked: bool,
    /// Whether its expiry has passed.
    #[serde(default)]
    pub expired: bool,
}

impl Token {
    /// One word for whether it still enrols anyone, and if not why.
    pub fn state(&self) -> &'static str {
        if self.revoked {
            "revoked"
        } else if self.expired {
            "expired"
        } else if self.uses >= self.max_uses {
            "used up"
        } else {
            "active"
        }
    }
}

/// The answer to an issue request.
#[derive(Debug, Clone, Deserialize)]
pub struct IssuedToken {
    /// The token.
    #[serde(flatten)]
    pub token: Token,
    /// Its secret, shown once.
    pub secret: String,
    /// The zone CA's pin (`sha256:<hex>`), for the agent's first contact;
    /// absent from older controllers.
    #[serde(rename = "caPin", default)]
    pub ca_pin: Option<String>,
}

#[derive(Deserialize)]
struct Tokens {
    items: Vec<Token>,
}

/// Runs a `token` subcommand.
pub(crate) async fn run(
    client: &Client,
    command: TokenCommand,
    out: &mut dyn Write,
) -> Result<(), Error> {
    match command {
        TokenCommand::Issue {
            mesh,
            workloads,
            workload_prefix,
            ttl,
            max_uses,
            output,
        } => {
            let workloads = match workload_prefix {
                Some(prefix) => Workloads::Prefix(prefix),
                None => Workloads::Names(workloads),
            };
            let request = serde_json::json!({
                "mesh": mesh,
                "workloads": workloads,
                "ttl": ttl,
                "maxUses": max_uses,
            });
            let answer = client
                .request(
                    Method::POST,
                    "/v1/tokens",
                    Some(("application/json", Bytes::from(request.to_string()))),
                )
                .await?;
            let body = expect_ok(answer).map_err(|error| match error {
                Error::Refused { problems } => Error::TokenRefused { problems },
                other => other,
            })?;
            let issued: IssuedToken = decode(&body)?;
            match output {
                TokenFormat::Secret => writeln!(out, "{}", issued.secret)?,
                TokenFormat::Json => crate::output::write_json_body(out, &body)?,
                TokenFormat::Table => {
                    table(out, std::slice::from_ref(&issued.token))?;
                    writeln!(out)?;
                    writeln!(out, "Secret (shown only now; store it safely):")?;
                    writeln!(out, "{}", issued.secret)?;
                    if let Some(pin) = &issued.ca_pin {
                        writeln!(out)?;
                        writeln!(out, "Zone CA pin (give it to the agent with the secret):")?;
                        writeln!(out, "{pin}")?;
                    }
                }
            }
            Ok(())
        }
        TokenCommand::List { output } => {
            let answer = client.request(Method::GET, "/v1/tokens", None).await?;
            let body = expect_ok(answer)?;
            let tokens: Tokens = decode(&body)?;
            match output {
                TokenFormat::Json => crate::output::write_json_body(out, &body),
                TokenFormat::Table => table(out, &tokens.items),
                TokenFormat::Secret => Err(Error::Usage(
                    "secrets are shown only when a token is issued; use -o table or -o json"
                        .to_owned(),
                )),
            }
        }
        TokenCommand::Revoke { id } => {
            let answer = client
                .request(Method::DELETE, &format!("/v1/tokens/{}", encode(&id)), None)
                .await?;
            expect_ok(answer)?;
            writeln!(out, "token {id} revoked")?;
            Ok(())
        }
    }
}

fn table(out: &mut dyn Write, tokens: &[Token]) -> Result<(), Error> {
    if tokens.is_empty() {
        writeln!(out, "No tokens found.")?;
        return Ok(());
    }
    let mut rows: Vec<Vec<String>> = vec![[
        "ID",
        "MESH",
        "ZONE",
        "WORKLOADS",
        "EXPIRES",
        "USES",
        "STATE",
    ]
    .iter()
    .map(|h| (*h).to_owned())
    .collect()];
    for token in tokens {
        rows.push(vec![
            token.id.clone(),
            token.mesh.clone(),
            token.zone.clone(),
            token.workloads.to_string(),
            token.expires_at.clone(),
            format!("{}/{}", token.uses, token.max_uses),
            token.state().to_owned(),
        ]);
    }
    crate::output::write_rows(out, &rows)
}
