//! The Uplift upgrade server: always listening, one private TLS channel per
//! device, releases and chunks in its own storage, rollouts pushed to devices
//! the moment they start, and an admin REST API for the CLI (and a web page to come).

pub mod api;
pub mod artifacts;
pub mod channel;
pub mod config;
pub mod error;
pub mod hub;
pub mod serve;
pub mod state;
pub mod store;
pub mod tls;

use anyhow::Context;
use artifacts::LocalArtifacts;
use config::ServerConfig;
use state::{AppState, Secrets, Stats};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use store::SqliteStore;
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

/// A server ready to serve: storage opened, secrets and TLS loaded.
#[derive(Debug)]
pub struct Server {
    state: Arc<AppState>,
    stop_sessions: tokio::sync::watch::Sender<bool>,
    tls: tls::TlsMaterial,
    admin_token_file: Option<PathBuf>,
    enrollment_token_file: Option<PathBuf>,
    options: serve::ServeOptions,
}

impl Server {
    pub async fn open(config: &ServerConfig) -> anyhow::Result<Self> {
        let data = &config.data_dir;
        std::fs::create_dir_all(data)
            .with_context(|| format!("creating data directory {}", data.display()))?;
        let store = SqliteStore::open(&data.join("uplift.db")).await?;
        let artifacts = LocalArtifacts::new(data.join("chunks"));
        let tls = tls::load_or_generate(&data.join("tls"), &config.tls)?;

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
        let state = Arc::new(AppState {
            store: Arc::new(store),
            artifacts: Arc::new(artifacts),
            hub: hub::Hub::default(),
            stats: Stats::default(),
            secrets: Secrets::new(&admin_token, &enrollment_tokens),
            limits: config.limits.clone(),
            shutdown,
        });
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
            options,
        })
    }

    pub fn endpoint(&self, listener: &TcpListener) -> anyhow::Result<Endpoint> {
        let addr = listener.local_addr()?;
        Ok(Endpoint {
            url: format!("https://{addr}"),
            ca_file: self.tls.ca_file.clone(),
            ca_fingerprint: self.tls.ca_fingerprint.clone(),
            admin_token_file: self.admin_token_file.clone(),
            enrollment_token_file: self.enrollment_token_file.clone(),
        })
    }

    /// Serves on an already-bound listener until `shutdown` resolves.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let app = api::router(self.state.clone());
        serve::serve(
            listener,
            self.tls.server_config.clone(),
            app,
            self.options,
            shutdown,
            self.stop_sessions,
        )
        .await;
    }
}
