//! Following the store's change feed: where a follower starts.

use std::time::Duration;

use tokio::sync::watch;
use weft_store::Store;

/// The feed's current sequence, where a follower starts reading, retried
/// every second while the store does not answer; `None` once `stop` turns
/// true first.
pub async fn start(store: &Store, stop: &mut watch::Receiver<bool>) -> Option<u64> {
    loop {
        match store.current_seq().await {
            Ok(seq) => return Some(seq),
            Err(error) => {
                tracing::warn!(%error, "cannot read the change sequence; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return None,
                }
            }
        }
    }
}
