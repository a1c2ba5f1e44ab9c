//! `weftctl mesh ca MESH` and `weftctl mesh rotate-ca MESH`: a mesh's CAs
//! (fingerprint, role, expiry) and starting a rotation to a new built-in
//! CA.

use std::io::Write;

use clap::Subcommand;
use http::Method;
use serde_json::Value;

use crate::output::{cell, print_view};
use crate::{encode, expect_ok, Client, Error, Format};

/// The `mesh` subcommands.
#[derive(Debug, Subcommand)]
pub enum MeshCommand {
    /// Shows a mesh's CAs: the signing one, a pending one during a
    /// rotation, and retired ones still trusted until their certificates
    /// expire.
    Ca {
        /// The mesh.
        mesh: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Rotates a mesh's built-in CA: a new CA joins every trust bundle,
    /// signs once every online agent trusts it, and the old one is dropped
    /// when its certificates have expired. Prints the CAs afterwards.
    RotateCa {
        /// The mesh.
        mesh: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
}

/// Runs a `mesh` subcommand.
pub(crate) async fn run(
    client: &Client,
    command: MeshCommand,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let (method, mesh, output) = match command {
        MeshCommand::Ca { mesh, output } => (Method::GET, mesh, output),
        MeshCommand::RotateCa { mesh, output } => (Method::POST, mesh, output),
    };
    let suffix = if method == Method::POST {
        "/rotate"
    } else {
        ""
    };
    let path = format!("/v1/meshes/{}/ca{suffix}", encode(&mesh));
    let body = expect_ok(client.request(method.clone(), &path, None).await?)?;
    let view: Value = crate::decode(&body)?;
    print_view(out, output, &view, |out| {
        if method == Method::POST {
            writeln!(
                out,
                "CA rotation of mesh {mesh} started: the new CA is pending until every online agent trusts it"
            )?;
        }
        table(&view, out)
    })
}

fn table(view: &Value, out: &mut dyn Write) -> Result<(), Error> {
    let mut rows = vec![["FINGERPRINT", "ROLE", "SOURCE", "NOT AFTER", "SUBJECT"]
        .map(str::to_owned)
        .to_vec()];
    for ca in view["cas"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let role = match ca["role"].as_str() {
            Some("trusted-until") => format!("trusted-until {}", cell(&ca["trustedUntil"])),
            _ => cell(&ca["role"]),
        };
        rows.push(vec![
            cell(&ca["fingerprint"]),
            role,
            cell(&ca["source"]),
            cell(&ca["notAfter"]),
            cell(&ca["subject"]),
        ]);
    }
    crate::output::write_rows(out, &rows)?;
    let rotation = &view["rotation"];
    if !rotation.is_null() {
        let waiting: Vec<String> = rotation["waitingFor"]
            .as_array()
            .map(|w| w.iter().map(cell).collect())
            .unwrap_or_default();
        if waiting.is_empty() {
            writeln!(
                out,
                "Rotation: pending CA trusted by every online agent; it signs at the leader's next pass."
            )?;
        } else {
            writeln!(
                out,
                "Rotation: waiting for {} to trust the pending CA (it signs by {} regardless).",
                waiting.join(", "),
                cell(&rotation["signsBy"])
            )?;
        }
    }
    Ok(())
}
