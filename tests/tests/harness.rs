//! Checks of the harness itself, without the agent: hosts, links and their
//! cleanup, the echo programs, the packet capture (it must see plaintext
//! when there is some), and the certificates and raw HBONE client against
//! a minimal HBONE server written here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use weft_e2e::capture::Capture;
use weft_e2e::client::{self, payload};
use weft_e2e::hbone::{self, Attempt};
use weft_e2e::netns::{self, Host};
use weft_e2e::pki::{spiffe_id, Ca, IdentityFiles};
use weft_e2e::topology::{self, Pair, ECHO_PORT, HTTP_PORT, SERVER_IP};
use weft_e2e::{echo_bin, http, unique_marker};

const T: Duration = Duration::from_secs(10);

#[test]
fn hosts_link_run_programs_and_clean_up() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let marker = unique_marker("harness");
    let mut app = pair.start_server_app(&marker)?;
    let data = payload(&marker, 300_000);
    pair.client
        .enter(|| client::echo_roundtrip(topology::server(ECHO_PORT), &data, T))?;
    let resp = pair
        .client
        .enter(|| http::get(topology::server(HTTP_PORT), "/x", T))?;
    assert_eq!(resp.status, 200);
    assert!(resp.text().contains(&marker), "{}", resp.text());

    let names = [pair.client.name().to_owned(), pair.server.name().to_owned()];
    let pid = app.pid();
    drop(pair);
    for name in names {
        assert!(
            !std::path::Path::new(&format!("/run/netns/{name}")).exists(),
            "{name} still exists"
        );
    }
    assert!(
        app.try_exit()?.is_some(),
        "the app (pid {pid}) survived its host"
    );
    Ok(())
}

#[test]
fn a_panicking_test_still_cleans_up() -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let host = Host::new().expect("host");
        let child = host.command("sleep").arg("600").spawn().expect("sleep");
        tx.send((host.name().to_owned(), child)).expect("send");
        panic!("on purpose");
    });
    assert!(result.is_err());
    let (name, mut child) = rx.recv()?;
    assert!(
        !std::path::Path::new(&format!("/run/netns/{name}")).exists(),
        "{name} survived the panic"
    );
    // The host's drop killed what ran in it; reap it here.
    let status = weft_e2e::wait::until("sleep to be killed", T, || Ok(child.try_wait()?));
    let status = status.inspect_err(|_| {
        let _ = child.kill();
        let _ = child.wait();
    })?;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "sleep ended with {status}"
    );
    Ok(())
}

#[test]
fn veth_names_fit_and_links_are_only_in_the_hosts() -> Result<()> {
    let a = Host::new()?;
    let b = Host::new()?;
    let (a_if, b_if) = netns::link(&a, "10.210.9.1/24", &b, "10.210.9.2/24")?;
    assert!(a.run("ip", &["link", "show", &a_if]).is_ok());
    assert!(b.run("ip", &["link", "show", &b_if]).is_ok());
    let root = std::process::Command::new("ip")
        .args(["link", "show", &a_if])
        .output()?;
    assert!(
        !root.status.success(),
        "{a_if} is visible in the root namespace"
    );
    a.run("ping", &["-c", "1", "-W", "2", "10.210.9.2"])
        .or_else(|_| {
            // ping may be missing; a TCP connect attempt that gets RST proves the path too.
            a.enter(
                || match std::net::TcpStream::connect_timeout(&"10.210.9.2:9".parse()?, T) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        Ok(String::new())
                    }
                    other => anyhow::bail!("expected a refusal from 10.210.9.2:9, got {other:?}"),
                },
            )
        })?;
    Ok(())
}

#[test]
fn capture_sees_plaintext_when_there_is_some() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let marker = unique_marker("plain");
    let _app = pair.start_server_app("x")?;
    let cap = Capture::start(&pair.server, &pair.server_if)?;
    let data = payload(&marker, 200_000);
    pair.client
        .enter(|| client::echo_roundtrip(topology::server(ECHO_PORT), &data, T))?;
    let seen = cap.finish()?;
    let streams: Vec<String> = seen
        .streams()
        .iter()
        .map(|((a, b), s)| {
            format!(
                "{a}->{b}: {} bytes, from_start {}",
                s.data.len(),
                s.from_start
            )
        })
        .collect();
    assert!(
        seen.payload_bytes() >= 400_000,
        "captured only {} bytes in {} frames / {} segments; streams {streams:?}",
        seen.payload_bytes(),
        seen.frames,
        seen.segments.len()
    );
    assert_eq!(seen.dropped, 0, "the capture dropped frames");
    assert!(
        seen.contains(marker.as_bytes()),
        "the capture missed plaintext that crossed"
    );
    assert!(seen.payload_ports().contains(&ECHO_PORT));
    assert!(!seen.contains(b"never-sent-anything-like-this"));
    Ok(())
}

/// A minimal HBONE server: mTLS with client certificates from `trust`,
/// ALPN h2, CONNECT answered 200 and echoed. Serves `conns` connections.
fn fake_hbone_server(
    ids: &IdentityFiles,
    listen: SocketAddr,
    conns: usize,
    bound: std::sync::mpsc::Sender<()>,
) -> Result<impl FnOnce() -> Result<()>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_file_iter(&ids.cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&ids.key)?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&ids.trust_bundle)? {
        roots.add(ca?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    Ok(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .context("bind")?;
            bound.send(())?;
            for _ in 0..conns {
                let (tcp, _) = listener.accept().await?;
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    continue;
                };
                tokio::spawn(async move {
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let ok = req.method() == ::http::Method::CONNECT;
                        let status = if ok { 200 } else { 405 };
                        let resp = ::http::Response::builder()
                            .status(status)
                            .body(())
                            .expect("response");
                        let Ok(mut tx) = respond.send_response(resp, !ok) else {
                            continue;
                        };
                        let mut body = req.into_body();
                        tokio::spawn(async move {
                            while let Some(Ok(chunk)) = body.data().await {
                                let _ = body.flow_control().release_capacity(chunk.len());
                                let _ = tx.send_data(chunk, false);
                            }
                            let _ = tx.send_data(Bytes::new(), true);
                        });
                    }
                });
            }
            Ok(())
        })
    })
}

#[test]
fn raw_hbone_client_and_certificates_work_against_a_minimal_server() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let other_ca = Ca::new("another CA")?;
    let server_ids = pair.identity("server")?;
    let good = pair.identity("client")?;
    let foreign =
        other_ca
            .leaf(&spiffe_id("client"))?
            .write(pair.dir.path(), "foreign", &[&pair.ca])?;
    let expired = pair.ca.expired_leaf(&spiffe_id("client"))?.write(
        pair.dir.path(),
        "expired",
        &[&pair.ca],
    )?;
    let listen = topology::server(topology::HBONE_PORT);
    let (bound_tx, bound) = std::sync::mpsc::channel();
    let serve = fake_hbone_server(&server_ids, listen, 3, bound_tx)?;
    let server = pair.server.spawn(serve)?;
    bound
        .recv_timeout(T)
        .context("the fake HBONE server did not bind")?;

    let marker = unique_marker("hbone");
    let cap = Capture::start(&pair.server, &pair.server_if)?;
    let authority = format!("{SERVER_IP}:{ECHO_PORT}");
    let data = payload(&marker, 100_000);
    let ok = pair
        .client
        .enter(|| hbone::attempt(&good, listen, &authority, &data, T))?;
    assert_eq!(
        ok,
        Attempt::Connected(data.clone()),
        "a good certificate must get through"
    );
    for (what, ids) in [("foreign CA", &foreign), ("expired", &expired)] {
        let got = pair
            .client
            .enter(|| hbone::attempt(ids, listen, &authority, b"hi", T))?;
        assert!(matches!(got, Attempt::Refused(_)), "{what}: {got:?}");
    }
    let seen = cap.finish()?;
    let tls = seen.tls_on_port(topology::HBONE_PORT);
    assert!(tls.malformed.is_empty(), "{tls:?}");
    assert!(tls.app_data_bytes >= 100_000, "{tls:?}");
    assert!(
        !seen.contains(marker.as_bytes()),
        "plaintext marker seen inside TLS"
    );
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    Ok(())
}
