//! Network namespaces of node-mode workloads. A socket belongs to the
//! namespace of the thread that created it, for its whole life: so the
//! agent enters a workload's namespace just long enough to create a socket
//! (a listener there, or a connection to the workload), then returns to its
//! own, and serves that socket from its runtime like any other. Nothing in
//! the workload changes and it is not restarted.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Why a workload's network namespace cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("netns {path}: cannot open it: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("netns {path}: cannot enter it (not a network namespace, or the agent lacks CAP_SYS_ADMIN): {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("netns {path} is the agent's own network namespace, not a workload's")]
    Own { path: PathBuf },
}

/// The agent's own namespace, taken once before any workload's is entered.
fn home() -> io::Result<&'static File> {
    static HOME: OnceLock<File> = OnceLock::new();
    if let Some(f) = HOME.get() {
        return Ok(f);
    }
    let f = File::open("/proc/self/ns/net")?;
    Ok(HOME.get_or_init(|| f))
}

/// An open handle on a workload's network namespace: it stays valid even
/// if the file it was opened from (e.g. `/run/netns/<name>`) is removed.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
}

impl Netns {
    /// Opens `path` and checks that it is a network namespace other than
    /// the agent's own, by entering it once.
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let open = |source| NetnsError::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(open)?;
        let own = home().map_err(open)?;
        let (a, b) = (
            file.metadata().map_err(open)?,
            own.metadata().map_err(open)?,
        );
        if (a.dev(), a.ino()) == (b.dev(), b.ino()) {
            return Err(NetnsError::Own {
                path: path.to_owned(),
            });
        }
        let netns = Netns {
            path: path.to_owned(),
            file,
        };
        netns.run(|| ())?;
        Ok(netns)
    }

    /// The path it was opened from, for logs and errors.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on this thread inside the namespace, then returns to the
    /// agent's own. `f` must not block or await: the thread is a runtime
    /// worker.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        let enter = |source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        };
        let home = home().map_err(enter)?;
        setns(&self.file).map_err(enter)?;
        let out = f();
        if let Err(e) = setns(home) {
            // A runtime thread left in a workload's namespace would open
            // every later socket there: better to stop than to leak.
            tracing::error!(netns = %self.path.display(), error = %e, "cannot return to the agent's network namespace, aborting");
            std::process::abort();
        }
        Ok(out)
    }

    /// A TCP socket in the namespace, to connect to the workload from
    /// inside (over its loopback, which its capture rules leave alone).
    pub fn tcp_socket(&self, v4: bool) -> io::Result<tokio::net::TcpSocket> {
        self.run(|| {
            if v4 {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }
        })
        .map_err(io::Error::other)?
    }
}

fn setns(file: &File) -> io::Result<()> {
    // SAFETY: setns only reads the descriptor, which `file` keeps open.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_own_namespace_is_refused() {
        let err = Netns::open(Path::new("/proc/self/ns/net")).unwrap_err();
        assert!(matches!(err, NetnsError::Own { .. }), "{err}");
    }

    #[test]
    fn a_file_that_is_no_namespace_is_refused_with_its_path() {
        let err = Netns::open(Path::new("/proc/self/status")).unwrap_err();
        assert!(matches!(err, NetnsError::Enter { .. }), "{err}");
        assert!(err.to_string().contains("/proc/self/status"), "{err}");
        let err = Netns::open(Path::new("/run/netns/no-such-weft-netns")).unwrap_err();
        assert!(matches!(err, NetnsError::Open { .. }), "{err}");
    }
}
