//! Wires the agent together: loads the identity, binds every listener, runs
//! until SIGTERM or SIGINT, then drains.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::config::AgentConfig;
use crate::controller::{self, Controller};
use crate::credentials::Credentials;
use crate::dns::{self, Dns};
use crate::drain::Drain;
use crate::inbound::Inbound;
use crate::listen::{bind, bind_udp};
use crate::logging::LogHandle;
use crate::metrics::Metrics;
use crate::outbound::{Outbound, Target};
use crate::plaintext::Plaintext;
use crate::pool::Pool;
use crate::view::{self, MeshView};

/// Runs the agent until it is told to stop and has drained.
pub async fn run(config: AgentConfig, log: LogHandle) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let (files, view, state) = match (&config.identity, &config.controller) {
        (Some(files), _) => (files.clone(), MeshView::from_static(&config), None),
        (None, _) => {
            let startup = controller::prepare(&config).await?;
            (startup.files, startup.view, Some(startup.state))
        }
    };
    let view = view::shared(view);
    let credentials = Arc::new(Credentials::load(&files)?);
    let identity = credentials.id();
    let metrics = Arc::new(Metrics::new());
    metrics.certificate_expires(credentials.current().identity.not_after);
    let drain = Drain::new();

    if config.redirect.on_start {
        crate::redirect::install(&config).context(
            "redirect.on_start: cannot install the capture rules (the agent needs CAP_NET_ADMIN, \
             or install them as root with `weft-agent redirect install`)",
        )?;
        info!("capture rules installed (redirect.on_start)");
    }
    // Bind everything first: a port in use fails the start, naming its field.
    let hbone = bind("inbound.listen", config.inbound.listen)?;
    let plaintext = bind("inbound.plaintext_listen", config.inbound.plaintext_listen)?;
    let capture = bind("outbound.capture_listen", config.outbound.capture_listen)?;
    let mut explicit = Vec::new();
    for (i, l) in config.outbound.listeners.iter().enumerate() {
        let target = match (&l.service, l.protocol) {
            (Some(key), weft_api::Protocol::Http) if config.controller.is_none() => {
                Target::Service {
                    key: key.clone().into(),
                    port: l.target.port(),
                }
            }
            _ => Target::Fixed(l.target),
        };
        explicit.push((
            bind(format!("outbound.listeners[{i}].listen"), l.listen)?,
            target,
        ));
    }
    let dns_sockets = if config.dns_enabled() {
        Some((
            bind_udp("dns.listen", config.dns.listen)?,
            bind("dns.listen", config.dns.listen)?,
        ))
    } else {
        None
    };
    let admin_listener = bind("admin.listen", config.admin.listen)?;
    let metrics_listener = bind("metrics.listen", config.metrics.listen)?;

    let inbound = Arc::new(Inbound::new(
        config.clone(),
        credentials.clone(),
        metrics.clone(),
        drain.clone(),
        view.clone(),
    ));
    let pool = Pool::new(credentials.clone(), config.tunnel.clone(), metrics.clone());
    let source = identity.as_str();
    let outbound = Arc::new(Outbound::new(
        config.clone(),
        metrics.clone(),
        drain.clone(),
        pool,
        view.clone(),
        source,
        crate::l7::policy::Policy::unconfigured()
            .context("compiling the default outbound policy")?,
    ));
    let plain = Arc::new(Plaintext::new(
        config.clone(),
        metrics.clone(),
        drain.clone(),
        source,
    ));
    let controller = state.map(|state| {
        Controller::new(
            config.clone(),
            state,
            credentials.clone(),
            view.clone(),
            metrics.clone(),
        )
    });
    let state = Arc::new(AdminState {
        config: config.clone(),
        credentials: credentials.clone(),
        metrics: metrics.clone(),
        drain: drain.clone(),
        log,
        view: view.clone(),
        controller: controller.clone(),
        ready: Default::default(),
    });

    tokio::spawn(inbound.serve(hbone));
    tokio::spawn(crate::l7::keep_timer_wheel_warm());
    tokio::spawn(plain.serve(plaintext));
    tokio::spawn(outbound.clone().serve(capture, Target::Captured));
    tokio::spawn(crate::resilience::supervise(
        outbound.clone(),
        drain.clone(),
    ));
    for (listener, target) in explicit {
        tokio::spawn(outbound.clone().serve(listener, target));
    }
    tokio::spawn(admin::serve(
        admin_listener,
        state.clone(),
        admin::Endpoint::Admin,
    ));
    tokio::spawn(admin::serve(
        metrics_listener,
        state.clone(),
        admin::Endpoint::Metrics,
    ));
    if let Some((udp, tcp)) = dns_sockets {
        let upstreams = dns::upstreams(&config.dns.upstream);
        if upstreams.is_empty() {
            warn!("no DNS upstream (dns.upstream is empty and /etc/resolv.conf names none): only mesh names will resolve");
        }
        info!(listen = %config.dns.listen, upstreams = ?upstreams, "DNS proxy listening");
        let proxy = Dns::new(view.clone(), metrics.clone(), upstreams);
        tokio::spawn(proxy.clone().serve_udp(udp));
        tokio::spawn(proxy.serve_tcp(tcp));
    }
    if let Some(controller) = &controller {
        tokio::spawn(controller.clone().run(drain.clone()));
    }
    info!(
        identity = %identity,
        mode = ?config.mode,
        mtls = ?config.inbound.mtls,
        hbone = %config.inbound.listen,
        view_version = %view.load().version,
        "agent ready"
    );
    // Logged before /ready turns 200, so whoever waits on /ready finds it.
    if controller.is_some() && view.load().version.is_empty() {
        // Freshly enrolled: ready once the zone's first view is applied, so
        // that the first calls do not fail for want of endpoints.
        let (view, state) = (view.clone(), state.clone());
        tokio::spawn(async move {
            while view.load().version.is_empty() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            info!(view_version = %view.load().version, "first view from the zone applied, ready");
            state.ready.store(true, Ordering::Release);
        });
    } else {
        state.ready.store(true, Ordering::Release);
    }

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let which = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => reload(&credentials, &metrics),
        }
    };
    info!(signal = which, in_flight = drain.active(), deadline = ?config.drain_timeout, "draining");
    let left = drain.drain(config.drain_timeout).await;
    if let Some(controller) = &controller {
        // The stream was closed when the drain began; make sure the zone
        // heard the goodbye before exiting.
        if tokio::time::timeout(Duration::from_secs(2), controller.closed())
            .await
            .is_err()
        {
            warn!("the config stream did not close in time");
        }
    }
    if left > 0 {
        warn!(
            in_flight = left,
            "drain deadline reached, closing what is left"
        );
    } else {
        info!("drained, exiting");
    }
    Ok(())
}

/// SIGHUP: reads the identity files again. New tunnels use the new
/// certificate; established ones are not touched; a bad file keeps the last
/// good identity in force.
fn reload(credentials: &Credentials, metrics: &Metrics) {
    match credentials.reload() {
        Ok(current) => {
            metrics.identity_reloaded(true, current.identity.not_after);
            info!(
                identity = %current.identity.id,
                not_after_unix = current.identity.not_after,
                generation = current.generation,
                "identity reloaded"
            );
        }
        Err(e) => {
            metrics.identity_reloaded(false, credentials.current().identity.not_after);
            error!(error = %e, "identity reload failed, keeping the identity in force");
        }
    }
}
