//! The agent's state directory in controller mode: the zone's CA, the
//! agent's and the workload's keys and certificates, the trust bundle and the
//! last good config. With it the agent restarts and serves while the
//! controller is away, and never enrols twice (tokens are single use).
//!
//! Every file is written whole (temporary file, fsync, rename, fsync of the
//! directory), so a crash leaves the old or the new version, never a mix. A
//! key and its chain share one PEM file for the same reason.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use prost::Message;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use weft_api::proto::agent::v1::ConfigUpdate;

use crate::config::IdentityFiles;

/// The zone's control-plane CA (PEM), pinned at enrolment.
pub const CONTROLLER_CA: &str = "controller-ca.pem";
/// The agent's control-plane key and certificate chain (PEM).
pub const AGENT: &str = "agent.pem";
/// The workload's key and certificate chain (PEM).
pub const WORKLOAD: &str = "workload.pem";
/// Every CA peers' certificates may chain to (PEM).
pub const BUNDLE: &str = "bundle.pem";
/// Who the agent is in its zone (JSON); written last at enrolment, so its
/// presence means the enrolment is complete.
pub const ENROLMENT: &str = "enrolment.json";
/// The last `ConfigUpdate` applied (protobuf).
pub const CONFIG: &str = "config.pb";

/// Why the state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "state file {path} is corrupt: {reason} (remove the state directory and enrol again \
         with a new token)"
    )]
    Corrupt { path: PathBuf, reason: String },
}

/// What enrolment established, kept for restarts and shown by the admin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrolment {
    pub agent_id: String,
    pub mesh: String,
    pub zone: String,
    /// When the agent enrolled (Unix seconds).
    pub enrolled_at_unix: i64,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

impl StateDir {
    /// Creates the directory if needed and makes it private (0700).
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        Ok(StateDir {
            dir: dir.to_owned(),
        })
    }

    /// The path of one state file.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Replaces `name` with `data` atomically; the file is 0600 (several
    /// hold private keys, and none is for other users).
    pub fn write(&self, name: &str, data: &[u8]) -> Result<(), StateError> {
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        file.write_all(data).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        // The rename itself is durable only once the directory is synced.
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }

    /// Puts a checked candidate file in place of `name`, atomically.
    pub fn promote(&self, candidate: &str, name: &str) -> Result<(), StateError> {
        let path = self.path(name);
        fs::rename(self.path(candidate), &path).map_err(io_err(&path))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }

    /// The contents of `name`, or `None` when it does not exist.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.path(name);
        match fs::read(&path) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// A file that must exist once enrolled.
    pub fn read_required(&self, name: &str) -> Result<Vec<u8>, StateError> {
        self.read(name)?
            .ok_or_else(|| self.corrupt(name, "missing"))
    }

    /// An error naming the state file and why it cannot be used.
    pub fn corrupt(&self, name: &str, reason: impl Into<String>) -> StateError {
        StateError::Corrupt {
            path: self.path(name),
            reason: reason.into(),
        }
    }

    /// The enrolment record, or `None` before the first enrolment.
    pub fn enrolment(&self) -> Result<Option<Enrolment>, StateError> {
        let Some(data) = self.read(ENROLMENT)? else {
            return Ok(None);
        };
        serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| self.corrupt(ENROLMENT, e.to_string()))
    }

    /// Records a completed enrolment.
    pub fn save_enrolment(&self, enrolment: &Enrolment) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(enrolment).unwrap_or_default();
        self.write(ENROLMENT, &json)
    }

    /// The last good config, or `None` if none was received yet.
    pub fn config(&self) -> Result<Option<ConfigUpdate>, StateError> {
        let Some(data) = self.read(CONFIG)? else {
            return Ok(None);
        };
        ConfigUpdate::decode(data.as_slice())
            .map(Some)
            .map_err(|e| self.corrupt(CONFIG, format!("not a ConfigUpdate: {e}")))
    }

    /// Persists an update that was validated and is about to be served.
    pub fn save_config(&self, update: &ConfigUpdate) -> Result<(), StateError> {
        self.write(CONFIG, &update.encode_to_vec())
    }

    /// The workload identity as the loader reads it: key and chain in one
    /// file, and the bundle.
    pub fn workload_files(&self) -> IdentityFiles {
        IdentityFiles {
            cert: self.path(WORKLOAD),
            key: self.path(WORKLOAD),
            trust_bundle: self.path(BUNDLE),
        }
    }

    /// The agent's control-plane identity, checked against the zone's CA.
    pub fn agent_files(&self) -> IdentityFiles {
        IdentityFiles {
            cert: self.path(AGENT),
            key: self.path(AGENT),
            trust_bundle: self.path(CONTROLLER_CA),
        }
    }

    /// The validity of the leaf in a key-and-chain file.
    pub fn validity(&self, name: &str) -> Result<Validity, StateError> {
        let data = self.read_required(name)?;
        leaf_validity(&data).map_err(|reason| self.corrupt(name, reason))
    }
}

/// When a certificate is valid, in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    /// Whether the certificate is usable now (with a few seconds to spare,
    /// so that a handshake started now does not fail mid-way).
    pub fn usable(&self) -> bool {
        let now = now_unix();
        self.not_before <= now + 300 && now + 5 < self.not_after
    }
}

/// Seconds since the epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The validity of the first certificate in `pem`.
pub fn leaf_validity(pem: &[u8]) -> Result<Validity, String> {
    let leaf = CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or("holds no PEM certificate")?
        .map_err(|e| format!("not PEM: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    Ok(Validity {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// One file holding a private key and its certificate chain.
pub fn key_and_chain(key_pem: &str, chain_pem: &str) -> String {
    let mut out = String::with_capacity(key_pem.len() + chain_pem.len() + 1);
    out.push_str(chain_pem.trim_end());
    out.push('\n');
    out.push_str(key_pem.trim_end());
    out.push('\n');
    out
}
