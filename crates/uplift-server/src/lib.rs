//! The Uplift upgrade server: always listening, one private TLS channel per
//! device, releases and chunks in its own storage, rollouts pushed to devices
//! the moment they start, and an admin REST API for the CLI and the web console ([`web`]).

pub mod addresses;
pub mod api;
pub mod artifacts;
pub mod auth;
pub mod budget;
pub mod channel;
pub mod chunks;
pub mod config;
pub mod download_token;
pub mod error;
pub mod events;
pub mod freshness;
pub mod history;
pub mod hub;
pub mod live;
pub mod pending;
pub mod presence;
pub mod rollout;
pub mod s3;
pub mod serve;
pub mod service;
pub mod signals;
pub mod state;
pub mod store;
pub mod tls;
pub mod turns;
pub mod web;
pub mod webhooks;
pub mod writer;

use anyhow::Context;
use config::ServerConfig;
use state::{AppState, Secrets, Stats};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use store::{PgStore, SqliteStore};
use tokio::net::TcpListener;
use uplift_proto::api::ServerEndpoint as Endpoint;

/// Reads a secret from `path`, or creates it with fresh randomness.
fn load_or_create_token(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        Ok(_) => anyhow::bail!(
            "{} is empty; delete it to generate a new token",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = hex::encode(rand::random::<[u8; 24]>());
            tls::write_private(path, &format!("{token}\n"))?;
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The configured database, opened.
#[derive(Debug)]
pub struct OpenedStore {
    pub store: Arc<dyn store::Store>,
    /// PostgreSQL's pool, when that is the backend: what replicas share
    /// beside the store (their signals).
    pub postgres: Option<sqlx::PgPool>,
}

/// Opens the configured database: SQLite in the data directory, or
/// PostgreSQL; either is brought up to date by its migrations.
pub async fn open_store(config: &ServerConfig) -> anyhow::Result<OpenedStore> {
    Ok(match config.database() {
        config::Database::Sqlite(path) => OpenedStore {
            store: Arc::new(SqliteStore::open(&path).await?),
            postgres: None,
        },
        config::Database::Postgres {
            url,
            max_connections,
        } => {
            let store = PgStore::connect(&url, max_connections).await?;
            OpenedStore {
                postgres: Some(store.pool().clone()),
                store: Arc::new(store),
            }
        }
    })
}

/// `uplift-server check`: scrubs the chunks of every release stored in the
/// configured data directory; reads only.
pub async fn check_data_dir(config: &ServerConfig) -> anyhow::Result<chunks::ScrubReport> {
    if let config::Database::Sqlite(db) = config.database() {
        anyhow::ensure!(
            db.is_file(),
            "{} holds no uplift.db; give the data directory of a server (--data-dir)",
            config.data_dir.display()
        );
    }
    let store = open_store(config).await?.store;
    let stores = artifacts::Stores::open(&config.artifacts, &config.data_dir)?;
    let indexes = chunks::Chunks::indexes(stores.indexes, store.clone());
    Ok(chunks::scrub(
        store.as_ref(),
        stores.chunks.as_ref(),
        stores.patches.as_ref(),
        &indexes,
    )
    .await?)
}

/// Raises the soft open-file limit to the hard one and warns when the
/// connection budgets could still run out of descriptors (accept would fail
/// with EMFILE instead of the clear `server_busy`).
fn check_open_file_limit(limits: &config::Limits) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    // Descriptors for the database, chunk files being served and the listener.
    let reserve = limits.max_download_requests as u64 + 64;
    let wanted = (limits.max_connections + limits.max_device_channels) as u64 + reserve;
    if wanted > soft {
        tracing::warn!(
            "[limits] max_connections ({}) + max_device_channels ({}) + {reserve} for files exceed the open-file \
             limit of {soft}; lower them, or raise the limit (LimitNOFILE= in the systemd unit)",
            limits.max_connections,
            limits.max_device_channels,
        );
    }
}

/// A server ready to serve: storage opened, secrets and TLS loaded.
#[derive(Debug)]
pub struct Server {
    state: Arc<AppState>,
    stop_sessions: tokio::sync::watch::Sender<bool>,
    tls: tls::TlsMaterial,
    admin_token_file: Option<PathBuf>,
    enrollment_token_file: Option<PathBuf>,
    token_keys_file: PathBuf,
    options: serve::ServeOptions,
}

impl Server {
    pub async fn open(config: &ServerConfig) -> anyhow::Result<Self> {
        let data = &config.data_dir;
        std::fs::create_dir_all(data)
            .with_context(|| format!("creating data directory {}", data.display()))?;
        let OpenedStore { store, postgres } = open_store(config).await?;
        let artifacts::Stores {
            chunks: artifacts,
            patches: patch_files,
            indexes: index_files,
        } = artifacts::Stores::open(&config.artifacts, data)?;
        let tls = tls::load_or_generate(&data.join("tls"), &config.tls)?;
        let token_keys_file = config.download_tokens.keys_file(data);
        let token_keys = download_token::load_or_create(&token_keys_file)?;

        let (admin_token, admin_token_file) = match &config.admin_token {
            Some(t) => (t.clone(), None),
            None => {
                let path = data.join("admin-token");
                (load_or_create_token(&path)?, Some(path))
            }
        };
        let (enrollment_tokens, enrollment_token_file) = if config.enrollment_tokens.is_empty() {
            let path = data.join("enrollment-token");
            (vec![load_or_create_token(&path)?], Some(path))
        } else {
            (config.enrollment_tokens.clone(), None)
        };
        let (stop_sessions, shutdown) = tokio::sync::watch::channel(false);
        let events = Arc::new(events::EventBus::default());
        let live = live::LiveView::with_events(events.clone());
        live.load_targets(store.device_targets().await?);
        check_open_file_limit(&config.limits);
        let indexes = Arc::new(chunks::Chunks::indexes(index_files, store.clone()));
        let state = Arc::new(AppState {
            chunks: chunks::Chunks::new(artifacts.clone(), store.clone(), indexes.clone()),
            indexes,
            patches: chunks::Chunks::patches(patch_files, store.clone()),
            store,
            artifacts,
            hub: hub::Hub::default(),
            live: Arc::new(live),
            events,
            turns: Default::default(),
            budgets: budget::Budgets::new(&config.limits),
            signals: match postgres {
                Some(pool) => signals::Signals::postgres(pool),
                None => signals::Signals::alone(),
            },
            releases: Default::default(),
            egress: config
                .limits
                .max_egress_bytes_per_sec
                .map(uplift_proto::pace::Pacer::new),
            stats: Arc::new(Stats::default()),
            secrets: Secrets::new(&admin_token, &enrollment_tokens),
            downloads: download_token::DownloadAuth::new(
                token_keys,
                config.download_tokens.lifetime_secs,
            ),
            limits: config.limits.clone(),
            enrollment: service::enrollment::Enrollment::new(config.enrollment.mode),
            addresses: addresses::Pools::parse(&config.addresses.pool)?,
            freshness: config
                .trust
                .freshness_key
                .as_deref()
                .map(|path| {
                    freshness::FreshnessSigner::open(path, config.trust.freshness_ttl_secs)
                        .map(Arc::new)
                })
                .transpose()?,
            shutdown,
        });
        if let Some(signer) = &state.freshness {
            tracing::info!(key_id = %signer.key_id(), "offers carry freshness signed by the online key");
        }
        freshness::check_against_newest_root(&state).await;
        let options = serve::ServeOptions {
            max_connections: config.limits.max_connections,
            handshake_timeout: config.limits.handshake_timeout(),
        };
        Ok(Self {
            state,
            stop_sessions,
            tls,
            admin_token_file,
            enrollment_token_file,
            token_keys_file,
            options,
        })
    }

    pub fn endpoint(
        &self,
        listener: &TcpListener,
        admin: Option<&TcpListener>,
    ) -> anyhow::Result<Endpoint> {
        let addr = listener.local_addr()?;
        Ok(Endpoint {
            url: format!("https://{addr}"),
            admin_url: admin
                .map(|l| l.local_addr().map(|a| format!("https://{a}")))
                .transpose()?,
            ca_file: self.tls.ca_file.clone(),
            ca_fingerprint: self.tls.ca_fingerprint.clone(),
            admin_token_file: self.admin_token_file.clone(),
            enrollment_token_file: self.enrollment_token_file.clone(),
        })
    }

    /// Serves on an already-bound listener until `shutdown` resolves, then
    /// closes every channel and writes the last device states.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        self.run_split(listener, None, shutdown).await;
    }

    /// Like [`Server::run`]; with `admin`, the admin API is served there
    /// only, and `listener` carries device traffic alone.
    pub async fn run_split(
        self,
        listener: TcpListener,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) {
        let (stop_writer, writer_stop) = tokio::sync::watch::channel(false);
        let writer = tokio::spawn(
            writer::Writer {
                live: self.state.live.clone(),
                store: self.state.store.clone(),
                stats: self.state.stats.clone(),
                retention: writer::Retention::from(&self.state.limits),
            }
            .run(writer_stop),
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let scheduler = tokio::spawn(rollout::scheduler::run(self.state.clone(), stop_rx.clone()));
        let deliverer = tokio::spawn(webhooks::run(self.state.clone(), stop_rx.clone()));
        let follower = tokio::spawn(signals::follow(self.state.clone(), stop_rx.clone()));
        let presence = tokio::spawn(presence::run(self.state.clone(), stop_rx.clone()));
        let relay = tokio::spawn(signals::relay_events(self.state.clone(), stop_rx.clone()));
        let key_file = tokio::spawn(download_token::follow_key_file(
            self.state.clone(),
            self.token_keys_file.clone(),
            stop_rx.clone(),
        ));
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let trigger = async {
            shutdown.await;
            tracing::info!("shutting down: closing device channels");
            let _ = self.stop_sessions.send(true);
            let _ = stop_tx.send(true);
        };
        let tls = self.tls.server_config.clone();
        let (device_app, admin_app) = match &admin {
            Some(_) => (
                api::device_router(self.state.clone()),
                Some(api::admin_router(self.state.clone())),
            ),
            None => (api::router(self.state.clone()), None),
        };
        let devices = serve::serve(
            listener,
            tls.clone(),
            device_app,
            self.options.clone(),
            stopped(stop_rx.clone()),
        );
        let admin = async {
            if let (Some(listener), Some(app)) = (admin, admin_app) {
                serve::serve(listener, tls, app, self.options.clone(), stopped(stop_rx)).await;
            }
        };
        tokio::join!(trigger, devices, admin);
        let _ = scheduler.await;
        let _ = deliverer.await;
        let _ = follower.await;
        let _ = presence.await;
        let _ = relay.await;
        let _ = key_file.await;
        self.state
            .budgets
            .channels_closed(Duration::from_secs(5))
            .await;
        let _ = stop_writer.send(true);
        let _ = writer.await;
    }
}
