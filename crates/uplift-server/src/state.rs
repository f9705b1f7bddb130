//! Shared state of a running server, handed to every handler.

use crate::artifacts::ArtifactStore;
use crate::budget::Budgets;
use crate::chunks::Chunks;
use crate::config::Limits;
use crate::hub::Hub;
use crate::live::LiveView;
use crate::store::Store;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::watch;
use uplift_proto::pace::Pacer;
use uplift_proto::{ChunkHash, Version};
use uplift_release::manifest::{ChunkEntry, PatchEntry};

#[derive(Debug)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub artifacts: Arc<dyn ArtifactStore>,
    /// Stored chunks, checked before they are trusted.
    pub chunks: Chunks,
    /// Stored patches (`release create --delta-from`), likewise.
    pub patches: Chunks,
    /// Releases' binary chunk indexes, likewise.
    pub indexes: Arc<Chunks>,
    pub hub: Hub,
    /// Every device's newest state; the API reads it, sessions write it.
    pub live: Arc<LiveView>,
    /// Device and rollout events as they happen (the live view publishes
    /// device events here too).
    pub events: Arc<crate::events::EventBus>,
    /// Download turns of rollouts that limit concurrent downloads.
    pub turns: crate::turns::Turns,
    pub budgets: Budgets,
    /// How this replica tells the others what their sessions must act on.
    pub signals: crate::signals::Signals,
    /// Signed manifests and their chunk lists by version: releases are
    /// immutable, and a rollout has every device ask for the same one at
    /// once. Read-locked on the download path, written once per release.
    pub releases: RwLock<HashMap<Version, Arc<ServedRelease>>>,
    /// The cap on all device downloads together, if configured.
    pub egress: Option<Pacer>,
    pub stats: Arc<Stats>,
    pub secrets: Secrets,
    /// Signs and checks device download tokens (no per-session state).
    pub downloads: crate::download_token::DownloadAuth,
    pub limits: Limits,
    /// The enrollment mode, and what wakes devices waiting for approval.
    pub enrollment: crate::service::enrollment::Enrollment,
    /// The pools devices' private addresses come from (`[addresses] pool`).
    pub addresses: crate::addresses::Pools,
    /// Signs each offer's freshness (`[trust] freshness_key`), if configured.
    pub freshness: Option<Arc<crate::freshness::FreshnessSigner>>,
    /// Flips to true when the server shuts down; sessions close on it.
    pub shutdown: watch::Receiver<bool>,
}

/// What devices download of one release: its manifest, then stored
/// objects from one of its two lists, by position.
#[derive(Debug)]
pub struct ServedRelease {
    pub manifest_json: Bytes,
    pub chunks: Arc<[Listed]>,
    pub patches: Arc<[Listed]>,
    /// The digest of its binary chunk index, if it has one.
    pub index: Option<ChunkHash>,
}

/// One stored object of a release as its manifest lists it: a chunk or a patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listed {
    pub hash: ChunkHash,
    pub stored_size: u32,
}

impl From<&ChunkEntry> for Listed {
    fn from(entry: &ChunkEntry) -> Self {
        Self {
            hash: entry.hash,
            stored_size: entry.stored_size,
        }
    }
}

impl From<&PatchEntry> for Listed {
    fn from(patch: &PatchEntry) -> Self {
        Self {
            hash: patch.hash,
            stored_size: patch.stored_size,
        }
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    pub bytes_sent: AtomicU64,
    pub chunks_sent: AtomicU64,
    /// Chunk requests answered with a redirect to the object store.
    pub redirects: AtomicU64,
    pub reports_applied: AtomicU64,
    pub reports_stale: AtomicU64,
    pub device_rows_written: AtomicU64,
    pub write_batches: AtomicU64,
    /// The fleet's size, counted at most once a second.
    pub fleet_size: Arc<crate::service::stats::FleetSize>,
}

impl Stats {
    pub fn add_sent(&self, bytes: u64) {
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The admin and enrollment tokens are kept and compared only as digests:
/// comparing two SHA-256 digests leaks nothing useful through timing.
/// (Device download tokens are signed instead: [`crate::download_token`].)
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
