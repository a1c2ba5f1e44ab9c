//! SIGHUP reloads the identity files: new tunnels present the new
//! certificate, established ones run on, and a bad file (unreadable, or a
//! certificate for another workload) keeps the last good identity in force.

use std::time::Duration;

use anyhow::Result;
use weft_e2e::client::{echo_on, open_echo_connections, payload};
use weft_e2e::hbone::{first_certificate, peer_certificate};
use weft_e2e::pki::spiffe_id;
use weft_e2e::topology::{self, Pair, ECHO_LISTENER, HBONE_PORT};
use weft_e2e::{echo_bin, unique_marker};

const T: Duration = Duration::from_secs(15);
const RELOADS: &str = "weft_identity_reloads_total";

#[test]
fn sighup_rotates_the_certificate_without_dropping_connections() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let _app = pair.start_server_app("reload")?;
    let server_ids = pair.identity("server")?;
    let mut server = pair.start_server_agent(&pair.server_spec(&server_ids), None)?;
    let client_ids = pair.identity("client")?;
    let _client = pair.start_client_agent(&pair.client_spec(&client_ids), None)?;
    let hbone = topology::server(HBONE_PORT);
    let presented = |pair: &Pair| {
        pair.client
            .enter(|| peer_certificate(&client_ids, hbone, T))
    };

    let first = first_certificate(&server_ids.cert)?;
    assert_eq!(
        presented(&pair)?,
        first,
        "the agent presents its certificate"
    );
    let mut held = pair
        .client
        .enter(|| open_echo_connections(ECHO_LISTENER, 1, T))?;

    // Rotate: a new key and certificate for the same workload, same paths.
    let rotated = pair.identity("server")?;
    let second = first_certificate(&rotated.cert)?;
    assert_ne!(first, second);
    server.proc.signal(libc::SIGHUP)?;
    server.wait_metric(RELOADS, &[("result", "ok")], 1.0)?;
    assert_eq!(
        presented(&pair)?,
        second,
        "new tunnels present the new certificate"
    );
    let data = payload(&unique_marker("held"), 10_000);
    pair.client.enter(|| echo_on(&mut held[0], &data))?;

    // A broken file: the reload fails and the second certificate stays.
    std::fs::write(&rotated.cert, "not a certificate")?;
    server.proc.signal(libc::SIGHUP)?;
    server.wait_metric(RELOADS, &[("result", "failed")], 1.0)?;
    assert_eq!(
        presented(&pair)?,
        second,
        "a failed reload keeps the identity in force"
    );

    // A valid certificate for another workload: refused the same way.
    let other = pair.ca.leaf(&spiffe_id("intruder"))?;
    let other_ids = other.write(pair.dir.path(), "intruder", &[&pair.ca])?;
    std::fs::copy(&other_ids.cert, &rotated.cert)?;
    std::fs::copy(&other_ids.key, &rotated.key)?;
    server.proc.signal(libc::SIGHUP)?;
    server.wait_metric(RELOADS, &[("result", "failed")], 2.0)?;
    assert_eq!(presented(&pair)?, second);
    assert!(
        server
            .proc
            .stderr()
            .contains("restart the agent to change identity"),
        "the refusal says why:\n{}",
        server.proc.stderr()
    );
    pair.client.enter(|| echo_on(&mut held[0], &data))?;
    Ok(())
}
