//! The controller's settings: a YAML file (`--config`, what a package
//! installs as /etc/weft/zone.yaml), overridden field by field by flags,
//! then checked, so every refusal names the field and where it came from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use weft_store::VipRange;

/// The shortest agent grace: three heartbeats must fit in it.
const MIN_AGENT_GRACE: Duration = Duration::from_secs(1);

/// The shortest change feed retention: a replica or view that pauses
/// longer than this (a slow refresh, a busy store) reads everything again,
/// so a shorter one would turn pauses into full re-reads.
const MIN_FEED_RETENTION: Duration = Duration::from_secs(60);

/// The settings file as written: every field optional, unknown ones
/// refused (a misspelt key must not silently fall back to a default).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsFile {
    pub zone: Option<String>,
    pub store: Option<String>,
    pub listen: Option<String>,
    pub grpc_listen: Option<String>,
    pub sans: Option<Vec<String>>,
    pub vip_range: Option<String>,
    pub replica_id: Option<String>,
    pub mesh_ca_lifetime: Option<String>,
    pub agent_grace: Option<String>,
    pub feed_retention: Option<String>,
    pub log_format: Option<String>,
}

/// How the controller writes its log lines (on stderr, the journal under
/// systemd): human-readable text, or JSON for log pipelines (the words
/// the agent's `log.format` uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

impl FromStr for LogFormat {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            _ => Err("must be human or json"),
        }
    }
}

/// The settings in force, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub zone: String,
    pub store: String,
    pub listen: SocketAddr,
    pub grpc_listen: SocketAddr,
    pub sans: Vec<String>,
    pub vip_range: VipRange,
    pub replica_id: Option<String>,
    pub mesh_ca_lifetime: Duration,
    pub agent_grace: Duration,
    pub feed_retention: Duration,
    pub log_format: LogFormat,
}

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("invalid {field} {value:?} ({origin}): {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        origin: String,
        reason: String,
    },
}

impl SettingsFile {
    /// Reads `path`; an empty file is all defaults.
    pub fn read(path: &Path) -> Result<Self, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_owned(),
            source,
        })?;
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        yaml_serde::from_str(&text).map_err(|e| SettingsError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }
}

/// One field's value and where it came from, for error messages.
struct Source<'a> {
    file: Option<&'a Path>,
}

impl Source<'_> {
    /// The flag's value if given, else the file's, else the default; parsed,
    /// with a refusal that names the flag or the file key.
    fn pick<T: FromStr>(
        &self,
        field: &'static str,
        flag: Option<String>,
        file: Option<String>,
        default: &str,
    ) -> Result<T, SettingsError>
    where
        T::Err: std::fmt::Display,
    {
        let (value, origin) = match (flag, file) {
            (Some(v), _) => (v, format!("--{}", field.replace('_', "-"))),
            (None, Some(v)) => (v, self.key(field)),
            (None, None) => (default.to_owned(), "default".to_owned()),
        };
        value.parse().map_err(|e: T::Err| SettingsError::Invalid {
            field,
            value,
            origin,
            reason: e.to_string(),
        })
    }

    fn key(&self, field: &str) -> String {
        match self.file {
            Some(path) => format!("`{field}` in {}", path.display()),
            None => format!("`{field}`"),
        }
    }
}

/// What the command line gave; `None` leaves the file's value (or the
/// default) in force.
#[derive(Debug, Default)]
pub struct Overrides {
    pub zone: Option<String>,
    pub store: Option<String>,
    pub listen: Option<String>,
    pub grpc_listen: Option<String>,
    pub sans: Vec<String>,
    pub vip_range: Option<String>,
    pub replica_id: Option<String>,
    pub mesh_ca_lifetime: Option<String>,
    pub agent_grace: Option<String>,
    pub feed_retention: Option<String>,
    pub log_format: Option<String>,
}

impl Settings {
    /// The file at `path` (if any) under the command line's `overrides`.
    pub fn load(path: Option<&Path>, overrides: Overrides) -> Result<Self, SettingsError> {
        let file = match path {
            Some(path) => SettingsFile::read(path)?,
            None => SettingsFile::default(),
        };
        Self::resolve(path, file, overrides)
    }

    fn resolve(
        path: Option<&Path>,
        file: SettingsFile,
        flags: Overrides,
    ) -> Result<Self, SettingsError> {
        let src = Source { file: path };
        let zone: String = src.pick("zone", flags.zone, file.zone, "default")?;
        if let Err(reason) = weft_api::validation::dns1123_label(&zone) {
            return Err(SettingsError::Invalid {
                field: "zone",
                origin: src.key("zone"),
                value: zone,
                reason: reason.to_string(),
            });
        }
        let agent_grace: weft_api::Duration =
            src.pick("agent_grace", flags.agent_grace, file.agent_grace, "60s")?;
        if agent_grace.as_std() < MIN_AGENT_GRACE {
            return Err(SettingsError::Invalid {
                field: "agent_grace",
                value: agent_grace.to_string(),
                origin: src.key("agent_grace"),
                reason: "must be at least 1s (streams heartbeat within a third of it)".into(),
            });
        }
        let feed_retention: weft_api::Duration = src.pick(
            "feed_retention",
            flags.feed_retention,
            file.feed_retention,
            "1h",
        )?;
        if feed_retention.as_std() < MIN_FEED_RETENTION {
            return Err(SettingsError::Invalid {
                field: "feed_retention",
                value: feed_retention.to_string(),
                origin: src.key("feed_retention"),
                reason:
                    "must be at least 1m (a replica that falls further behind re-reads everything)"
                        .into(),
            });
        }
        let mesh_ca_lifetime: weft_api::Duration = src.pick(
            "mesh_ca_lifetime",
            flags.mesh_ca_lifetime,
            file.mesh_ca_lifetime,
            "87600h",
        )?;
        Ok(Self {
            zone,
            store: src.pick("store", flags.store, file.store, "sqlite://weft-zone.db")?,
            listen: src.pick("listen", flags.listen, file.listen, "127.0.0.1:5681")?,
            grpc_listen: src.pick(
                "grpc_listen",
                flags.grpc_listen,
                file.grpc_listen,
                "0.0.0.0:5678",
            )?,
            // Flags add names to the file's: both are wanted on the certificate.
            sans: file
                .sans
                .unwrap_or_default()
                .into_iter()
                .chain(flags.sans)
                .collect(),
            vip_range: src.pick(
                "vip_range",
                flags.vip_range,
                file.vip_range,
                "240.240.0.0/16",
            )?,
            replica_id: flags.replica_id.or(file.replica_id),
            mesh_ca_lifetime: mesh_ca_lifetime.as_std(),
            agent_grace: agent_grace.as_std(),
            feed_retention: feed_retention.as_std(),
            log_format: src.pick("log_format", flags.log_format, file.log_format, "human")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(yaml: &str) -> Result<Settings, SettingsError> {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(&mut f, yaml.as_bytes()).expect("write");
        Settings::load(Some(f.path()), Overrides::default())
    }

    #[test]
    fn defaults_without_a_file() {
        let s = Settings::load(None, Overrides::default()).expect("defaults");
        assert_eq!(s.zone, "default");
        assert_eq!(s.listen, "127.0.0.1:5681".parse().unwrap());
        assert_eq!(s.grpc_listen, "0.0.0.0:5678".parse().unwrap());
        assert_eq!(s.agent_grace, Duration::from_secs(60));
        assert_eq!(s.feed_retention, Duration::from_secs(3600));
        assert_eq!(s.log_format, LogFormat::Human);
        let s = file("feed_retention: 15m\n").expect("valid");
        assert_eq!(s.feed_retention, Duration::from_secs(900));
        let s = file("log_format: json\n").expect("valid");
        assert_eq!(s.log_format, LogFormat::Json);
    }

    #[test]
    fn file_values_and_flag_overrides() {
        let s = file("zone: east\nlisten: 0.0.0.0:5681\nsans: [zone.example]\nagent_grace: 10s\n")
            .expect("valid");
        assert_eq!(s.zone, "east");
        assert_eq!(s.listen, "0.0.0.0:5681".parse().unwrap());
        assert_eq!(s.sans, vec!["zone.example".to_owned()]);
        assert_eq!(s.agent_grace, Duration::from_secs(10));
        let s = Settings::resolve(
            None,
            SettingsFile {
                zone: Some("east".into()),
                sans: Some(vec!["a".into()]),
                ..Default::default()
            },
            Overrides {
                zone: Some("west".into()),
                sans: vec!["b".into()],
                ..Default::default()
            },
        )
        .expect("valid");
        assert_eq!(s.zone, "west");
        assert_eq!(s.sans, vec!["a".to_owned(), "b".to_owned()]);
    }

    #[test]
    fn refusals_name_the_field_and_origin() {
        let err = file("zone: east\nlisten_addr: 1.2.3.4:1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `listen_addr`"), "{err}");
        let err = file("listen: nowhere\n").unwrap_err().to_string();
        assert!(
            err.contains("invalid listen \"nowhere\" (`listen` in "),
            "{err}"
        );
        let err = file("zone: East_1\n").unwrap_err().to_string();
        assert!(err.contains("invalid zone \"East_1\""), "{err}");
        let err = file("agent_grace: 10ms\n").unwrap_err().to_string();
        assert!(err.contains("must be at least 1s"), "{err}");
        let err = file("feed_retention: 10s\n").unwrap_err().to_string();
        assert!(
            err.contains("invalid feed_retention \"10s\" (`feed_retention` in ")
                && err.contains("must be at least 1m"),
            "{err}"
        );
        let err = Settings::load(
            None,
            Overrides {
                vip_range: Some("10.0.0.0".into()),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("(--vip-range)"), "{err}");
        let err = file("log_format: xml\n").unwrap_err().to_string();
        assert!(
            err.contains("invalid log_format \"xml\" (`log_format` in ")
                && err.contains("human or json"),
            "{err}"
        );
        let err = file("zone: [a\n").unwrap_err().to_string();
        assert!(err.starts_with("config file "), "{err}");
    }
}
