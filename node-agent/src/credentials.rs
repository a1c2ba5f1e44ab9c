//! The workload identity in force. It is replaced whole when its files are
//! reloaded (SIGHUP), so new tunnels present the new certificate while
//! established ones run on; a reload that fails keeps the last good one.

use std::sync::{Arc, RwLock};

use tokio_rustls::TlsAcceptor;
use weft_api::SpiffeId;

use crate::config::IdentityFiles;
use crate::tls::{Identity, IdentityError};

/// Why an identity could not be (re)loaded.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("identity.cert: cannot build the TLS server configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error(
        "identity.cert: the new certificate is for {new}, the agent serves {current}; \
         restart the agent to change identity"
    )]
    Changed {
        current: Box<SpiffeId>,
        new: Box<SpiffeId>,
    },
}

/// One loaded identity and the TLS server side built from it.
pub struct Current {
    pub identity: Identity,
    pub acceptor: TlsAcceptor,
    /// Bumped by every successful reload, so that the pool knows its client
    /// configurations are stale.
    pub generation: u64,
}

/// The identity in force and where it is loaded from.
pub struct Credentials {
    files: IdentityFiles,
    current: RwLock<Arc<Current>>,
}

fn build(files: &IdentityFiles, generation: u64) -> Result<Current, CredentialsError> {
    let identity = Identity::load(&files.cert, &files.key, &files.trust_bundle)?;
    let acceptor = TlsAcceptor::from(Arc::new(identity.server_config()?));
    Ok(Current {
        identity,
        acceptor,
        generation,
    })
}

impl Credentials {
    /// Loads the identity for the first time.
    pub fn load(files: &IdentityFiles) -> Result<Self, CredentialsError> {
        Ok(Credentials {
            files: files.clone(),
            current: RwLock::new(Arc::new(build(files, 0)?)),
        })
    }

    /// The identity in force; cheap, taken once per new connection.
    pub fn current(&self) -> Arc<Current> {
        // Writers only swap an Arc, so a poisoned lock still holds a
        // complete value.
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        guard.clone()
    }

    /// The workload's SPIFFE ID, fixed for the life of the agent.
    pub fn id(&self) -> SpiffeId {
        self.current().identity.id.clone()
    }

    /// Reads the files again and puts the result in force, unless it fails
    /// to load or names another workload; then the last good one stays.
    pub fn reload(&self) -> Result<Arc<Current>, CredentialsError> {
        let old = self.current();
        let new = build(&self.files, old.generation + 1)?;
        if new.identity.id != old.identity.id {
            return Err(CredentialsError::Changed {
                current: Box::new(old.identity.id.clone()),
                new: Box::new(new.identity.id),
            });
        }
        let new = Arc::new(new);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = new.clone();
        Ok(new)
    }
}
