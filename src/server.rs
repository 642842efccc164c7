//! The composition root: opens the store, recovers, wires worker, supervisor and API
//! together, and shuts them down in order.
//!
//! `start` takes an already-bound listener (port 0 in tests) and returns a [`Running`]
//! server that can be stopped at will.

use crate::api::{self, AppState};
use crate::backend::Backend;
use crate::config::Config;
use crate::domain::unix_now;
use crate::gpu::GpuMonitor;
use crate::store::{Store, StoreError};
use crate::supervisor::{self, Parts, RecoveredBatch, Supervisor};
use crate::worker::{self, Limiter};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store could not be opened or recovered.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration cannot work (e.g. the backend URL).
    #[error("{0}")]
    Config(String),
    /// Listening or serving failed.
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// A started server.
pub struct Running {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// What recovery found at start.
    pub report: Vec<RecoveredBatch>,
    /// Batches whose validation restarts.
    pub revalidating: usize,
    stop: CancellationToken,
    done: JoinHandle<Result<(), ServerError>>,
}

impl Running {
    /// Asks for a graceful stop (idempotent).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// A token that stops the server when cancelled.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Waits until the server has stopped and flushed.
    pub async fn wait(self) -> Result<(), ServerError> {
        match self.done.await {
            Ok(r) => r,
            Err(e) => Err(ServerError::Io(std::io::Error::other(e.to_string()))),
        }
    }
}

/// Opens the store, recovers, and starts everything.
pub async fn start(cfg: Config, listener: TcpListener) -> Result<Running, ServerError> {
    let addr = listener.local_addr()?;
    let cfg = Arc::new(cfg);
    let store = {
        let dir = cfg.state_dir.clone();
        let cache = cfg.cache_bytes;
        tokio::task::spawn_blocking(move || Store::open(&dir, cache))
            .await
            .map_err(|e| ServerError::Config(e.to_string()))??
    };
    let store = Arc::new(store);
    let recovery = {
        let (s, c) = (store.clone(), cfg.clone());
        tokio::task::spawn_blocking(move || supervisor::recover(&s, &c))
            .await
            .map_err(|e| ServerError::Config(e.to_string()))??
    };
    let report = recovery.report.clone();
    let to_validate = recovery.to_validate.clone();
    for line in &report {
        tracing::info!(report = %line, "recovered batch");
    }

    // One client and one limiter per backend; one lane per slot of each.
    let mut backends = Vec::new();
    let mut limiters = Vec::new();
    for ((url, _), slots) in cfg.backends.iter().zip(cfg.slots()) {
        let b = Backend::for_url(&cfg, url).map_err(ServerError::Config)?;
        b.check_certificate().await.map_err(ServerError::Config)?;
        backends.push(b);
        limiters.push(Arc::new(Limiter::new(slots)));
    }
    let lanes: Vec<worker::Lane> = cfg
        .lane_map()
        .into_iter()
        .map(|(b, slot)| worker::Lane {
            backend: backends[b].clone(),
            limiter: limiters[b].clone(),
            slot,
        })
        .collect();
    let backend = backends
        .first()
        .cloned()
        .ok_or_else(|| ServerError::Config("no --backend-url: a model server is needed".into()))?;
    let gpu = GpuMonitor::start();
    let window = cfg.lease_window();
    let (jobs_tx, jobs_rx) = mpsc::channel(window + 1);
    // Two events per job (started, finished); at most `window` jobs are leased.
    let (events_tx, events_rx) = mpsc::channel(window * 2 + 16);
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();

    let metrics = Arc::new(crate::metrics::Metrics::new());
    worker::spawn(
        lanes,
        worker::Answers {
            schemas: Default::default(),
            reask: cfg.reask,
            reuse_options: cfg.reuse_options(),
        },
        metrics.clone(),
        jobs_rx,
        events_tx,
        &tracker,
        stop.clone(),
    );
    let (sup, handle) = Supervisor::new(
        Parts {
            store: store.clone(),
            cfg: cfg.clone(),
            backends: backends.clone(),
            jobs: jobs_tx,
            events: events_rx,
            tracker: tracker.clone(),
            stop: stop.clone(),
            gpu: gpu.clone(),
        },
        recovery,
    );
    let sup_task = tokio::spawn(sup.run());
    for id in &to_validate {
        tracing::info!(batch = %id, "validation restarts");
        supervisor::spawn_intake(store.clone(), cfg.clone(), handle.clone(), &tracker, *id);
    }
    for (i, (b, slots)) in backends.iter().zip(cfg.slots()).enumerate() {
        if cfg.slot_affinity == crate::config::SlotAffinity::On
            && cfg.backend == crate::config::BackendKind::Openai
        {
            b.set_slots(slots);
        }
        spawn_health_probe(
            b.clone(),
            i,
            handle.live.clone(),
            (cfg.slot_affinity == crate::config::SlotAffinity::Auto).then_some(slots),
            &tracker,
            stop.clone(),
        );
    }
    if cfg.backend == crate::config::BackendKind::Ollama {
        spawn_ps_poll(backend.clone(), gpu.clone(), &tracker, stop.clone());
    }
    let sweeping = store.clone();
    spawn_every(
        &tracker,
        stop.clone(),
        cfg.expiry_sweep_interval,
        move || {
            let store = sweeping.clone();
            async move {
                let r = tokio::task::spawn_blocking(move || {
                    supervisor::sweep_expired(&store, crate::domain::unix_now())
                })
                .await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "the expired-file sweep failed; it runs again later");
                }
            }
        },
    );

    let webhooks = crate::webhook::spawn(store.clone(), &cfg, &tracker, stop.clone())
        .map_err(ServerError::Config)?;
    if !cfg.webhook_urls.is_empty() || cfg.on_finish_cmd.is_some() {
        tracing::info!(
            receivers = cfg.webhook_urls.len(),
            on_finish_cmd = cfg.on_finish_cmd.is_some(),
            "batch webhooks on"
        );
    }

    let state = AppState {
        webhooks,
        store: store.clone(),
        cfg: cfg.clone(),
        supervisor: handle,
        tracker: tracker.clone(),
        started: Instant::now(),
        limiters,
        gpu: gpu.clone(),
        metrics,
        stop: stop.clone(),
        retries: Default::default(),
    };
    let app = api::router(state);
    tracing::info!(
        listen = %addr,
        backend = cfg.backend.as_str(),
        backend_url = %crate::domain::redact_urls(&cfg.backends.iter().map(|b| b.0.as_str()).collect::<Vec<_>>().join(", ")),
        state = %cfg.state_dir.display(),
        "ollama-batch listening"
    );
    if cfg.api_keys.is_empty() && !addr.ip().is_loopback() {
        tracing::warn!(
            listen = %addr,
            "LISTENING ON A NON-LOOPBACK ADDRESS WITHOUT AN API KEY: anyone who can reach this port can upload, cancel and read every result. Start with --api-key (or OLLAMA_BATCH_API_KEY), or listen on 127.0.0.1"
        );
    }
    let http = tokio::spawn(serve(listener, app, stop.clone(), cfg.client_timeout));
    let grace = cfg.shutdown_grace;
    let done_stop = stop.clone();
    let done = tokio::spawn(async move {
        done_stop.cancelled().await;
        // HTTP first (bounded: a stuck client must not hold the stop), then the supervisor,
        // which lets in-flight calls finish within the grace and requeues the rest.
        let http_abort = http.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), http)
            .await
            .is_err()
        {
            http_abort.abort();
        }
        let _ = sup_task.await;
        tracker.close();
        if tokio::time::timeout(grace + Duration::from_secs(5), tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop in time; their work resumes at the next start");
        }
        gpu.stop();
        store.flush_async().await?;
        tracing::info!("stopped");
        Ok(())
    });
    Ok(Running {
        addr,
        report,
        revalidating: to_validate.len(),
        stop,
        done,
    })
}

/// The HTTP accept loop: hyper with a timer, so that a client that does not finish sending its
/// request headers within `header_timeout` is disconnected (axum::serve sets no timer, so its
/// header timeout never fires). On `stop`, connections finish their current request and close.
async fn serve(
    listener: TcpListener,
    app: axum::Router,
    stop: CancellationToken,
    header_timeout: Duration,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use tower::ServiceExt;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    // half_close: a client that closes its side right after sending (a script that does not
    // wait for the answer) still has its request carried out. Without it hyper answers the
    // EOF by ending the connection, dropping the request's future, at times before its first
    // poll (a cancel never applied, an upload never stored).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .half_close(true);
    loop {
        let sock = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((sock, _)) => sock,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(app.clone().map_request(
            |req: axum::http::Request<hyper::body::Incoming>| req.map(axum::body::Body::new),
        ));
        // A connection that moves no byte for --client-timeout is cut (one second later, so
        // that an upload's own 408 answer goes out first): one that never sends a request, one
        // that stalls a body, a reader that stopped reading.
        let sock = Idle::new(sock, header_timeout + Duration::from_secs(1));
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(sock), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A socket that fails with `TimedOut` once no byte has moved either way for `limit`: a read or
/// a write that stays pending past the deadline ends the connection. Every byte read or
/// written pushes the deadline back, so slow but live transfers (a long upload, `/events`
/// with its snapshots each second and its keep-alives, a large download) go on.
struct Idle<S> {
    inner: S,
    limit: Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<S> Idle<S> {
    fn new(inner: S, limit: Duration) -> Idle<S> {
        Idle {
            inner,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
        }
    }

    fn touch(&mut self) {
        let at = tokio::time::Instant::now() + self.limit;
        self.deadline.as_mut().reset(at);
    }

    /// A pending operation: an error once the deadline has passed.
    fn expired<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        match self.deadline.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no byte moved on the connection within --client-timeout",
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Idle<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.touch();
                }
                std::task::Poll::Ready(Ok(()))
            }
            std::task::Poll::Pending => this.expired(cx),
            other => other,
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Idle<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_write(cx, buf) {
            std::task::Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.touch();
                }
                std::task::Poll::Ready(Ok(n))
            }
            std::task::Poll::Pending => this.expired(cx),
            other => other,
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_flush(cx) {
            std::task::Poll::Pending => this.expired(cx),
            other => other,
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Runs `round` now and then every `period` until `stop` fires (also in the middle of a round).
fn spawn_every<F, Fut>(
    tracker: &TaskTracker,
    stop: CancellationToken,
    period: Duration,
    mut round: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = round() => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
    });
}

/// Reads Ollama's `/api/ps` every 15 s: which models are loaded, and how much of each is in
/// GPU memory.
fn spawn_ps_poll(
    backend: Backend,
    gpu: Arc<GpuMonitor>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    spawn_every(tracker, stop, Duration::from_secs(15), move || {
        let (backend, gpu) = (backend.clone(), gpu.clone());
        async move {
            match backend.ollama_ps().await {
                Ok(models) => gpu.set_loaded_models(models),
                Err(e) => tracing::debug!(error = %e, "cannot read /api/ps"),
            }
        }
    });
}

/// Probes the backend every 30 s so `/status` says whether it answers, even when idle. With
/// `--slot-affinity auto` (`detect_slots` = the concurrency), the first answer also asks
/// llama.cpp's `/props` for its slots and pins calls to them.
fn spawn_health_probe(
    backend: Backend,
    index: usize,
    live: Arc<crate::live::LiveView>,
    detect_slots: Option<usize>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    let detected = Arc::new(std::sync::atomic::AtomicBool::new(detect_slots.is_none()));
    spawn_every(tracker, stop, Duration::from_secs(30), move || {
        let (backend, live, detected) = (backend.clone(), live.clone(), detected.clone());
        async move {
            let ok = backend.probe().await;
            if ok.is_ok() && !detected.swap(true, std::sync::atomic::Ordering::Relaxed) {
                let lanes = detect_slots.unwrap_or(0);
                match backend.llama_slots().await {
                    Some(n) => {
                        backend.set_slots(n);
                        if n == lanes {
                            tracing::info!(
                                slots = n,
                                "llama.cpp slots: each lane pinned to its slot (id_slot)"
                            );
                        } else {
                            tracing::warn!(
                                slots = n,
                                concurrency = lanes,
                                "llama.cpp has {n} slots but --concurrency is {lanes}: set them equal (llama-server -np {lanes}, or --concurrency {n}) so each lane keeps its own slot and prompt cache"
                            );
                        }
                    }
                    None => tracing::debug!("no llama.cpp /props: calls are not pinned to slots"),
                }
            }
            live.with(|l| {
                let b = l.backend_mut(index);
                b.last_probe_at = Some(unix_now());
                if b.down_since.is_none() {
                    b.reachable = Some(ok.is_ok());
                }
                match &ok {
                    Err(e) => b.last_error = Some(e.clone()),
                    // Back (or never gone): an old error is no longer the backend's state.
                    Ok(()) if b.down_since.is_none() => b.last_error = None,
                    Ok(()) => {}
                }
                l.merge_backends();
            });
            if let Err(e) = ok {
                tracing::warn!(url = backend.url(), error = %e, "backend probe failed");
            }
        }
    });
}
