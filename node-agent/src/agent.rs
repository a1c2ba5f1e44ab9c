//! Wires the agent together: loads the identity, binds every listener, runs
//! until SIGTERM or SIGINT, then drains.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::config::{AgentConfig, Mode};
use crate::controller::{self, Controller, LocalWorkloads, Sidecar};
use crate::credentials::Credentials;
use crate::dns::{self, Dns};
use crate::drain::Drain;
use crate::handoff::{self, Predecessor};
use crate::listen::bind;
use crate::local_workload::LocalWorkload;
use crate::logging::LogHandle;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::view::{self, MeshView};
use crate::workload_proxy::{Listeners, Shared, WorkloadProxy};

/// The workloads this agent carries, by mode.
enum Carried {
    /// A sidecar's one workload.
    Sidecar(WorkloadProxy),
    /// A node agent's enrolled workloads.
    Node(Arc<Node>),
}

impl Carried {
    /// Connections in flight that the agent's own drain does not track: a
    /// sidecar's proxy runs on the agent's drain, a node agent's workloads
    /// each on their own.
    fn in_flight_elsewhere(&self) -> usize {
        match self {
            Carried::Sidecar(_) => 0,
            Carried::Node(n) => n.in_flight(),
        }
    }

    /// Drains what [`Carried::in_flight_elsewhere`] counts; what is left
    /// at the deadline.
    async fn drain_elsewhere(&self, deadline: Duration) -> usize {
        match self {
            Carried::Sidecar(_) => 0,
            Carried::Node(n) => n.drain(deadline).await,
        }
    }
}

/// Runs the agent until it is told to stop and has drained.
pub async fn run(
    config: AgentConfig,
    log: LogHandle,
    predecessor: Option<Predecessor>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    // The agent's own drain: /ready, the controller stream and the admin
    // report it; each workload proxy drains on its own.
    let drain = Drain::new();
    let (view, state, files) = match (&config.identity, config.mode) {
        (Some(files), _) => (MeshView::from_static(&config), None, Some(files.clone())),
        (None, _) => {
            let startup = controller::prepare(&config).await?;
            (startup.view, Some(startup.state), startup.files)
        }
    };
    let view = view::shared(view);

    if config.redirect.on_start {
        let uid = crate::redirect::install_as_self(&config).context(
            "redirect.on_start: cannot install the capture rules (the agent needs CAP_NET_ADMIN, \
             or install them as root with `weft-agent redirect install`)",
        )?;
        if uid == 0 {
            warn!("capture exempts uid 0, the agent's: every process running as root bypasses it; run the agent as a dedicated user (the package's unit runs it as weft)");
        }
        info!(
            exempt_uid = uid,
            "capture rules installed (redirect.on_start)"
        );
    }
    // Bind everything first: a port in use fails the start, naming its field.
    let admin_listener = bind("admin.listen", config.admin.listen)?;
    let metrics_listener = bind("metrics.listen", config.metrics.listen)?;
    let dns = config.dns_enabled().then(|| {
        let upstreams = dns::upstreams(&config.dns.upstream);
        if upstreams.is_empty() {
            warn!("no DNS upstream (dns.upstream is empty and /etc/resolv.conf names none): only mesh names will resolve");
        }
        info!(listen = %config.dns.listen, upstreams = ?upstreams, "DNS proxy listening");
        Dns::new(view.clone(), metrics.clone(), upstreams)
    });
    let shared = Shared {
        config: config.clone(),
        metrics: metrics.clone(),
        view: view.clone(),
        dns,
    };
    let mut sockets: Vec<handoff::Socket> = vec![
        ("admin.listen".to_owned(), admin_listener.as_raw_fd()),
        ("metrics.listen".to_owned(), metrics_listener.as_raw_fd()),
    ];
    // The one place the mode is chosen: a gateway will be one more arm.
    let (carried, locals, identity, outbounds): (
        Carried,
        Option<Arc<dyn LocalWorkloads>>,
        String,
        crate::resilience::Outbounds,
    ) = match (config.mode, files, &config.workload) {
        (Mode::Sidecar, Some(files), Some(workload)) => {
            let credentials = Arc::new(Credentials::load(&files)?);
            let identity = credentials.id();
            metrics.certificate_expires(credentials.current().identity.not_after);
            let listeners = Listeners::bind(&config, config.dns_enabled())?;
            sockets.extend(listeners.sockets(&config));
            let local = Arc::new(LocalWorkload {
                name: workload.name.as_deref().unwrap_or(identity.as_str()).into(),
                address: workload.address,
                ports: workload.ports.clone(),
                netns: None,
                locality: weft_api::Locality::from_labels(&workload.labels),
            });
            let proxy = WorkloadProxy::start(
                &shared,
                local,
                credentials.clone(),
                listeners,
                drain.clone(),
            )?;
            let locals = Arc::new(Sidecar {
                config: config.clone(),
                credentials,
                metrics: metrics.clone(),
            });
            let outbound = proxy.outbound.clone();
            (
                Carried::Sidecar(proxy),
                Some(locals),
                identity.as_str().to_owned(),
                Box::new(move || vec![outbound.clone()]),
            )
        }
        (Mode::Node, None, None) => {
            let state = state
                .clone()
                .context("node mode runs with a zone (`controller`)")?;
            let node = Node::new(shared.clone(), state);
            node.restore().await;
            let outbounds = node.clone();
            (
                Carried::Node(node.clone()),
                Some(node),
                "node".to_owned(),
                Box::new(move || outbounds.outbounds()),
            )
        }
        (mode, _, _) => anyhow::bail!("mode {mode:?} cannot run with this config"),
    };
    handoff::release_unused();
    if matches!(carried, Carried::Sidecar(_)) {
        handoff::keep_across_restarts(&sockets);
    }

    let controller = match (state, locals) {
        (Some(state), Some(locals)) => Some(Controller::new(
            config.clone(),
            state,
            locals,
            view.clone(),
            metrics.clone(),
        )),
        _ => None,
    };
    if let (Carried::Node(node), Some(controller)) = (&carried, &controller) {
        node.set_controller(controller.clone());
    }
    let state = Arc::new(AdminState {
        config: config.clone(),
        credentials: match &carried {
            Carried::Sidecar(p) => Some(p.credentials.clone()),
            Carried::Node(_) => None,
        },
        node: match &carried {
            Carried::Sidecar(_) => None,
            Carried::Node(n) => Some(n.clone()),
        },
        metrics: metrics.clone(),
        drain: drain.clone(),
        log,
        view: view.clone(),
        controller: controller.clone(),
        ready: Default::default(),
    });

    tokio::spawn(crate::l7::keep_timer_wheel_warm());
    tokio::spawn(crate::resilience::supervise(
        view.clone(),
        outbounds,
        drain.clone(),
    ));
    // Kept to stop accepting after a handoff: the new process answers
    // /ready and /metrics from then on.
    let admin_tasks = [
        tokio::spawn(admin::serve(
            admin_listener,
            state.clone(),
            admin::Endpoint::Admin,
        )),
        tokio::spawn(admin::serve(
            metrics_listener,
            state.clone(),
            admin::Endpoint::Metrics,
        )),
    ];
    if matches!(carried, Carried::Node(_)) {
        let control = admin::bind_control(&config.node.control_socket)?;
        info!(socket = %config.node.control_socket.display(), "enrolment control socket listening");
        tokio::spawn(admin::serve_control(control, state.clone()));
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

    tokio::spawn(crate::service_status::report(state.clone(), predecessor));
    tokio::spawn(release_startup_code(state.clone()));
    weft_service_manager::spawn_watchdog();

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;
    let which = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => match &carried {
                Carried::Sidecar(p) => reload(&p.credentials, &metrics),
                Carried::Node(n) => n.reload("SIGHUP"),
            },
            _ = usr2.recv() => {
                if hand_over(&carried, &sockets, &admin_tasks).await {
                    break "SIGUSR2 (handed over to a new process)";
                }
            }
        }
    };
    info!(signal = which, in_flight = drain.active() + carried.in_flight_elsewhere(), deadline = ?config.drain_timeout, "draining");
    weft_service_manager::stopping(&format!(
        "{which}: draining {} connection(s), at most {:?}",
        drain.active() + carried.in_flight_elsewhere(),
        config.drain_timeout
    ));
    let (elsewhere, own) = tokio::join!(
        carried.drain_elsewhere(config.drain_timeout),
        drain.drain(config.drain_timeout)
    );
    let left = elsewhere + own;
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

/// SIGUSR2: starts the binary on disk again with this process's sockets,
/// and once it serves, stops answering on the admin ports; the caller then
/// drains. Whether the new process took over (if not, this one serves on).
async fn hand_over(
    carried: &Carried,
    sockets: &[handoff::Socket],
    admin_tasks: &[tokio::task::JoinHandle<()>],
) -> bool {
    if matches!(carried, Carried::Node(_)) {
        // A node agent's listeners live in its workloads' namespaces, one
        // set each, opened as they are enrolled.
        warn!("SIGUSR2: handing over is for sidecars; restart a node agent instead");
        return false;
    }
    info!(
        sockets = sockets.len(),
        "SIGUSR2: handing the listening sockets to a new agent process"
    );
    match handoff::hand_over(sockets).await {
        Ok(pid) => {
            for task in admin_tasks {
                task.abort();
            }
            info!(pid, "the new agent process serves; draining this one");
            true
        }
        Err(e) => {
            error!(error = %e, "handoff failed; this process serves on");
            weft_service_manager::status(&format!("handoff failed ({e}); serving on"));
            false
        }
    }
}

/// Once serving, drops the start-up code from the resident set (see
/// [`crate::resident`]).
async fn release_startup_code(state: Arc<AdminState>) {
    while !state.ready.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match crate::resident::release_code_pages() {
        Ok(bytes) => info!(released_kib = bytes / 1024, "start-up code pages released"),
        Err(e) => warn!(error = %e, "cannot release the start-up code pages"),
    }
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
