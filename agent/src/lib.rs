//! edgerelay: a store-and-forward relay agent for edge gateways.
//!
//! Data flow (the module tree follows it):
//! `ingest` (sockets) → `store` (redb, group commit) → `uplink` (MQTT to the central
//! broker), configured by `config`; `record` is the unit that flows through.
//!
//! `run` wires them together and owns shutdown order: stop ingest (so nothing new is
//! accepted), let the uplink finish what is in flight, then commit and close the store.

pub mod central;
pub mod config;
pub mod control;
pub mod ingest;
pub mod link;
pub mod notify;
pub mod policy;
pub mod record;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod topic;
pub mod uplink;
pub mod wire;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, DictionarySetting, UpstreamMode};
use crate::ingest::socket::SocketIngest;
use crate::store::{Budget, Store, StoreOptions};
use crate::uplink::dictionary::{DictMode, DictPolicy, Persisted};

/// Sleep until `deadline`, or forever when there is none: a `select!` branch that is
/// armed only while a deadline is set.
pub(crate) async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

pub use policy::DEFAULT_STREAM;
/// File name of the buffer inside `data_dir`.
pub const BUFFER_FILE: &str = "buffer.redb";
/// Where a running agent's endpoint listens, inside `data_dir` (for `edgerelay
/// status` and `dead-letters`, also when `[metrics] listen` names port 0).
pub const ENDPOINT_FILE: &str = "endpoint";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Ingest(#[from] ingest::IngestError),
    #[error(transparent)]
    Uplink(#[from] uplink::forward::UplinkError),
    #[error("compression dictionary {path}: {detail}")]
    Dictionary {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error(transparent)]
    Endpoint(#[from] telemetry::http::HttpError),
    #[error("internal task failed: {0}")]
    Task(String),
}

/// Store options for a validated config.
pub fn store_options(config: &Config) -> StoreOptions {
    let b = &config.buffer;
    let mut o = StoreOptions::new(
        config.agent.data_dir.join(BUFFER_FILE),
        b.max_size,
        b.when_full,
    );
    o.budget = Budget::from_max_size(b.max_size, b.when_full);
    o.max_age = b.max_age;
    o.commit_max_records = b.commit_max_records.get();
    o.commit_linger = b.commit_linger;
    o.cache_size = usize::try_from(b.cache_size).unwrap_or(usize::MAX);
    o
}

/// The fixed dictionary `[compression] dictionary = PATH` names, checked.
pub fn load_dictionary(path: &std::path::Path) -> Result<wire::Dictionary, RunError> {
    let err = |detail: String| RunError::Dictionary {
        path: path.to_path_buf(),
        detail,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.len() > wire::MAX_DICTIONARY as u64 {
        return Err(err(format!(
            "{} bytes; the limit is {} (the central side refuses bigger ones)",
            meta.len(),
            wire::MAX_DICTIONARY
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    if bytes.is_empty() {
        return Err(err("is empty".into()));
    }
    // Any bytes make a raw-content dictionary, but a file with zstd's dictionary magic
    // and a broken body would fail only later, at the first batch: check it loads now.
    zstd::bulk::Compressor::with_dictionary(3, &bytes)
        .map_err(|e| err(format!("not a usable zstd dictionary: {e}")))?;
    Ok(wire::Dictionary::new(bytes))
}

/// The rate controller's settings for a validated config.
pub fn control_settings(config: &Config) -> control::ControlSettings {
    control::ControlSettings {
        adapt: config.rate.adapt,
        max_rate: config.rate.max_rate_bps.map(|b| b / 8),
        batch_size: config.upstream.batch_size.get(),
        linger: config.upstream.batch_linger,
        level: config.compression.level,
        auto_level: config.compression.auto_level,
        // 512 kbit/s until measured; startup doubles it every second the link keeps up.
        initial_rate: 64_000,
    }
}

/// Where a reload's live changes go.
struct Reloaded {
    routes: ingest::Routes,
    store: Store,
    policies: tokio::sync::watch::Sender<std::sync::Arc<policy::Policies>>,
    max_rate: tokio::sync::watch::Sender<Option<u64>>,
}

async fn apply_reloads(
    mut rx: tokio::sync::watch::Receiver<std::sync::Arc<Config>>,
    started: std::sync::Arc<Config>,
    to: Reloaded,
    cancel: CancellationToken,
) {
    let mut current = started.clone();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = rx.changed() => if changed.is_err() { break },
        }
        let new = rx.borrow_and_update().clone();
        let live = config::reload::changes(&current, &new).live;
        let restart = config::reload::changes(&started, &new).restart;
        if live.iter().any(|k| k == "policy") {
            let p = std::sync::Arc::new(new.policies.clone());
            to.routes.replace(&to.store, p.clone());
            to.policies.send_replace(p);
        }
        if live.iter().any(|k| k == "rate.max_rate") {
            to.max_rate
                .send_replace(new.rate.max_rate_bps.map(|b| b / 8));
        }
        if live.is_empty() && restart.is_empty() {
            tracing::info!("config reloaded: nothing changed");
        } else {
            tracing::info!(
                applied = ?live,
                needs_restart = ?restart,
                "config reloaded"
            );
        }
        if !restart.is_empty() {
            tracing::warn!(keys = ?restart, "these changes take effect only after a restart");
        }
        // What is in force now: the live parts of `new` (the rest is compared with
        // the configuration the agent started with).
        current = new;
    }
}

/// Run the agent until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    run_with_reload(config, shutdown, None).await
}

/// Run the agent until `shutdown` is cancelled, putting in force what each config sent
/// on `reloads` changes that can change live (`config::reload`; the log level is the
/// caller's, who owns logging) and saying what needs a restart.
pub async fn run_with_reload(
    config: Config,
    shutdown: CancellationToken,
    reloads: Option<tokio::sync::watch::Receiver<std::sync::Arc<Config>>>,
) -> Result<(), RunError> {
    let started = std::sync::Arc::new(config.clone());
    let control = control_settings(&config);
    let dict_mode = match &config.compression.dictionary {
        DictionarySetting::Off => DictMode::Off,
        DictionarySetting::Auto => DictMode::Auto,
        DictionarySetting::File(path) => DictMode::Fixed(load_dictionary(path)?),
    };
    let opts = store_options(&config);
    // Opening may repair the file after a crash: blocking work, off the executor.
    let (store, store_thread) = tokio::task::spawn_blocking(move || Store::open(opts))
        .await
        .map_err(|e| RunError::Task(e.to_string()))??;
    let routes = ingest::Routes::open(&store, config.policies.clone()).await?;

    let mut sockets = Vec::with_capacity(config.sockets.len());
    for sc in config.sockets {
        let stream = routes.stream(&sc.topic);
        sockets.push(SocketIngest::bind(sc, store.clone(), stream).await?);
    }
    let local_mqtt = match config.local_mqtt {
        Some(cfg) => Some(ingest::mqtt::LocalMqtt::bind(cfg, store.clone(), routes.clone()).await?),
        None => None,
    };
    // Bound with the other listeners, before anything runs: a taken port is a start-up
    // error, not a half-started agent.
    let (status_tx, status_rx) = tokio::sync::watch::channel(telemetry::Status::default());
    let endpoint = match config.metrics.listen {
        Some(addr) => Some(
            telemetry::http::Endpoint::bind(
                addr,
                status_rx,
                Some(std::sync::Arc::new(telemetry::admin::DeadLetterAdmin {
                    store: store.clone(),
                })),
            )
            .await?,
        ),
        None => None,
    };
    let ingest_cancel = CancellationToken::new();
    let ingest = TaskTracker::new();
    for s in sockets {
        let (tracker, cancel) = (ingest.clone(), ingest_cancel.clone());
        ingest.spawn(s.run(tracker, cancel));
    }
    if let Some(m) = local_mqtt {
        let (tracker, cancel) = (ingest.clone(), ingest_cancel.clone());
        ingest.spawn(m.run(tracker, cancel));
    }
    if let Some(cfg) = config.local_broker {
        ingest.spawn(
            ingest::bridge::Bridge::new(cfg, store.clone(), routes.clone())
                .run(ingest_cancel.clone()),
        );
    }
    ingest.close();

    let uplink_cancel = CancellationToken::new();
    let telemetry_cancel = CancellationToken::new();
    let (mut monitor, link_feed, link_quality) = link::Monitor::new(
        config.link.clone(),
        &config.upstream.host,
        config.upstream.port,
    );
    monitor.start().await;
    let monitor = tokio::spawn(monitor.run(uplink_cancel.clone()));
    let uplink_state = std::sync::Arc::new(telemetry::UplinkShared::default());
    let (listening, listening_rx) = tokio::sync::watch::channel(false);
    let hub = telemetry::Hub::new(
        telemetry::HubSettings {
            gateway_id: config.agent.gateway_id.clone(),
            mode: match config.upstream.mode {
                UpstreamMode::Batch => "batch".into(),
                UpstreamMode::Passthrough => "passthrough".into(),
            },
            stuck_after: config.metrics.stuck_after,
            priorities: routes
                .policies()
                .streams()
                .iter()
                .map(|s| (s.name.clone(), s.priority.as_str().to_owned()))
                .collect(),
        },
        store.clone(),
        link_quality.clone(),
        uplink_state.clone(),
        listening_rx,
        status_tx,
    );
    let telemetry_tasks = TaskTracker::new();
    telemetry_tasks.spawn(hub.run(telemetry_cancel.clone()));
    let endpoint_file = config.agent.data_dir.join(ENDPOINT_FILE);
    if let Some(e) = endpoint {
        if let Some(addr) = e.local_addr() {
            tracing::info!(listen = %addr, "metrics, health and status endpoint listening");
            if let Err(err) = std::fs::write(&endpoint_file, format!("{addr}\n")) {
                tracing::warn!(error = %err, path = %endpoint_file.display(), "cannot note the endpoint's address for the CLI");
            }
        }
        telemetry_tasks.spawn(e.run(telemetry_cancel.clone()));
    }
    telemetry_tasks.close();
    let packer: Box<dyn uplink::forward::Packer> = match config.upstream.mode {
        UpstreamMode::Passthrough => Box::new(uplink::PassthroughPacker {
            prefix: config.upstream.topic_prefix.clone(),
        }),
        UpstreamMode::Batch => Box::new(uplink::batch::BatchPacker::new(
            uplink::batch::BatchSettings {
                prefix: config.upstream.topic_prefix.clone(),
                gateway: config.agent.gateway_id.clone(),
                epoch: store.epoch(),
                batch_size: config.upstream.batch_size.get(),
                linger: config.upstream.batch_linger,
                level: config.compression.level,
                dictionary: dict_mode,
                dict_policy: DictPolicy::default(),
                persisted: match store.meta_blocking(Persisted::KEY) {
                    Ok(v) => v.as_deref().and_then(Persisted::decode),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the dictionary kept with the buffer; training afresh");
                        None
                    }
                },
            },
        )?),
    };
    let mut forwarder = uplink::Forwarder::new(
        config.upstream.clone(),
        config.agent.gateway_id.clone(),
        store.clone(),
        routes
            .ids()
            .iter()
            .copied()
            .zip(routes.policies().streams().iter().cloned())
            .collect(),
        routes.policies().clone(),
        packer,
    )
    .with_link_feed(link_feed)
    .with_telemetry(uplink_state.clone());
    let (policies_tx, policies_rx) = tokio::sync::watch::channel(routes.policies());
    let (rate_tx, rate_rx) = tokio::sync::watch::channel(control.max_rate);
    forwarder = forwarder.with_live(uplink::forward::Live {
        policies: policies_rx,
        max_rate: rate_rx,
    });
    if let Some(rx) = reloads {
        telemetry_tasks.reopen();
        telemetry_tasks.spawn(apply_reloads(
            rx,
            started,
            Reloaded {
                routes: routes.clone(),
                store: store.clone(),
                policies: policies_tx,
                max_rate: rate_tx,
            },
            telemetry_cancel.clone(),
        ));
        telemetry_tasks.close();
    }
    if config.upstream.mode == UpstreamMode::Batch {
        // Passthrough stays the plain one-publish-per-message baseline.
        forwarder = forwarder.with_control(control, link_quality);
    }
    let uplink = tokio::spawn(forwarder.run(uplink_cancel.clone()));

    tracing::info!(gateway_id = %config.agent.gateway_id, epoch = store.epoch(), "edgerelay ready");
    listening.send_replace(true);
    notify::notify("READY=1");
    // The writer thread owns the sender of `committed`: if it ever dies, nothing can be
    // acknowledged any more, and the agent must stop (and be restarted) rather than run on.
    let mut writer_alive = store.committed();
    let writer_died = async move { while writer_alive.changed().await.is_ok() {} };
    let failure = tokio::select! {
        _ = shutdown.cancelled() => None,
        _ = writer_died => Some(RunError::Task("the store writer stopped unexpectedly".into())),
    };
    tracing::info!("shutting down: stopping ingest");
    notify::notify("STOPPING=1");

    ingest_cancel.cancel();
    ingest.wait().await;
    uplink_cancel.cancel();
    if let Err(e) = uplink.await {
        tracing::error!(error = %e, "uplink task failed");
    }
    let _ = monitor.await;
    telemetry_cancel.cancel();
    telemetry_tasks.wait().await;
    let _ = std::fs::remove_file(&endpoint_file);
    drop(store);
    tokio::task::spawn_blocking(move || store_thread.close())
        .await
        .map_err(|e| RunError::Task(e.to_string()))?;
    match failure {
        Some(e) => Err(e),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}
