//! Shared state of a running server, handed to every handler.

use crate::artifacts::ArtifactStore;
use crate::config::Limits;
use crate::hub::Hub;
use crate::store::Store;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Debug)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub artifacts: Arc<dyn ArtifactStore>,
    pub hub: Hub,
    pub stats: Stats,
    pub secrets: Secrets,
    pub limits: Limits,
    /// Flips to true when the server shuts down; sessions close on it.
    pub shutdown: watch::Receiver<bool>,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub bytes_sent: AtomicU64,
    pub chunks_sent: AtomicU64,
}

impl Stats {
    pub fn add_sent(&self, bytes: u64) {
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The admin and enrollment tokens are kept and compared only as digests:
/// comparing two SHA-256 digests leaks nothing useful through timing.
/// (Device session tokens live in the hub's map, looked up by value.)
#[derive(Debug)]
pub struct Secrets {
    admin_token: [u8; 32],
    enrollment_tokens: Vec<[u8; 32]>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Secrets {
    pub fn new(admin_token: &str, enrollment_tokens: &[String]) -> Self {
        Self {
            admin_token: digest(admin_token),
            enrollment_tokens: enrollment_tokens.iter().map(|t| digest(t)).collect(),
        }
    }
    pub fn is_admin(&self, token: &str) -> bool {
        digest(token) == self.admin_token
    }
    pub fn is_enrollment_token(&self, token: &str) -> bool {
        let d = digest(token);
        self.enrollment_tokens.contains(&d)
    }
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("the current UTC time always formats as RFC 3339")
}
