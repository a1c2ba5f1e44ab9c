//! Printing resources: an aligned table, YAML that `apply -f` reads back, or
//! the API's JSON.

use std::io::Write;

use weft_api::Resource;

use crate::{Error, Format, Item};

/// Prints `items` (whose API answer was `body`) in `format`.
pub(crate) fn print(
    out: &mut dyn Write,
    format: Format,
    body: &[u8],
    items: &[Item],
) -> Result<(), Error> {
    match format {
        Format::Json => write_json_body(out, body)?,
        Format::Yaml => {
            let resources: Vec<Resource> = items.iter().map(|i| i.resource.clone()).collect();
            let text = weft_api::to_yaml(&resources).map_err(|e| Error::Decode(e.to_string()))?;
            write!(out, "{text}")?;
        }
        Format::Table => table(out, items)?,
    }
    Ok(())
}

/// Prints an API view that is not a resource (inventory, a mesh's CAs) as
/// pretty JSON, as YAML, or as the table `table` draws.
pub(crate) fn print_view<T: serde::Serialize + ?Sized>(
    out: &mut dyn Write,
    format: Format,
    view: &T,
    table: impl FnOnce(&mut dyn Write) -> Result<(), Error>,
) -> Result<(), Error> {
    match format {
        Format::Json => write_json(out, view),
        Format::Yaml => {
            let text = yaml_serde::to_string(view).map_err(|e| Error::Decode(e.to_string()))?;
            write!(out, "{text}")?;
            Ok(())
        }
        Format::Table => table(out),
    }
}

/// Writes `value` as pretty JSON and a newline.
pub(crate) fn write_json<T: serde::Serialize + ?Sized>(
    out: &mut dyn Write,
    value: &T,
) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Decode(e.to_string()))?;
    writeln!(out, "{text}")?;
    Ok(())
}

/// Writes an API answer's JSON `body` pretty-printed.
pub(crate) fn write_json_body(out: &mut dyn Write, body: &[u8]) -> Result<(), Error> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| Error::Decode(e.to_string()))?;
    write_json(out, &value)
}

/// A JSON value as a table cell: `-` for null or empty, strings unquoted,
/// booleans as yes/no.
pub(crate) fn cell(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Bool(true) => "yes".to_owned(),
        Value::Bool(false) => "no".to_owned(),
        other => other.to_string(),
    }
}

fn table(out: &mut dyn Write, items: &[Item]) -> Result<(), Error> {
    let Some(first) = items.first() else {
        writeln!(out, "No resources found.")?;
        return Ok(());
    };
    let mut header = vec!["NAME", "MESH", "NAMESPACE", "VERSION"];
    header.extend(extra_header(&first.resource));
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for item in items {
        let meta = item.resource.metadata();
        let mut row = vec![
            meta.name.clone(),
            item.resource.mesh().unwrap_or("-").to_owned(),
            meta.namespace.clone().unwrap_or_else(|| "-".to_owned()),
            item.version.to_string(),
        ];
        row.extend(extra_columns(&item.resource));
        rows.push(row);
    }
    write_rows(out, &rows)
}

/// Writes `rows` (the first is the header) as left-aligned columns.
pub(crate) fn write_rows(out: &mut dyn Write, rows: &[Vec<String>]) -> Result<(), Error> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let width = widths.get(c).copied().unwrap_or(0);
                line.push_str(&format!("{cell:<width$}   "));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

fn extra_header(resource: &Resource) -> Vec<&'static str> {
    match resource {
        Resource::Mesh(_) => vec!["TRUST DOMAIN", "CA"],
        Resource::Zone(_) => vec!["BACKEND"],
        Resource::Workload(_) => vec!["ADDRESS", "SERVICE"],
        Resource::Service(_) => vec!["PORTS", "VIRTUAL IP"],
        Resource::ExternalService(_) => vec!["HOST", "PORT"],
        _ => vec!["TARGET"],
    }
}

/// A serde enum's name (`universal`, `http`) without depending on Display.
fn serde_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => "?".to_owned(),
    }
}

fn extra_columns(resource: &Resource) -> Vec<String> {
    match resource {
        Resource::Mesh(mesh) => vec![
            mesh.spec.trust_domain.clone(),
            if mesh.spec.ca.provided.is_some() {
                "provided"
            } else {
                "builtin"
            }
            .to_owned(),
        ],
        Resource::Zone(zone) => vec![serde_name(&zone.spec.backend)],
        Resource::Workload(workload) => vec![
            workload.spec.address.to_string(),
            workload.spec.service.clone(),
        ],
        Resource::Service(service) => vec![
            service
                .spec
                .ports
                .iter()
                .map(|p| format!("{}/{}", p.port, serde_name(&p.protocol)))
                .collect::<Vec<_>>()
                .join(","),
            service
                .status
                .as_ref()
                .and_then(|s| s.virtual_ip)
                .map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
        ],
        Resource::ExternalService(external) => {
            vec![external.spec.host.clone(), external.spec.port.to_string()]
        }
        policy => vec![policy
            .target_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string)],
    }
}
