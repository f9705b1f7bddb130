//! Installing a release into the inactive slot: fetch and verify the signed
//! manifest, check it is for this device, let [`crate::download`] fill the
//! slot with every chunk verified, and only then switch the boot environment
//! to try the new slot for a limited number of boots. The running slot is
//! never written.

use crate::config::AgentConfig;
use crate::download::{Counters, Download};
use crate::local::{LocalState, PendingInstall, SlotContent};
use crate::machine::{check_downgrade, DowngradeRefused, Event, SignedPermit};
use futures_util::StreamExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use uplift_bootenv::BootEnv;
use uplift_proto::api::{device_index_path, device_manifest_path};
use uplift_proto::channel::{Offer, Progress};
use uplift_proto::pace;
use uplift_proto::{ChunkHash, ErrorKind, SlotName, Version, WireError};
use uplift_release::manifest::{ChunkEntry, Manifest, SignedManifest, MAX_MANIFEST_BYTES};

const PROGRESS_EVERY: Duration = Duration::from_millis(300);
/// Attempts per request without progress before the install fails.
pub(crate) const CHUNK_ATTEMPTS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Release(#[from] uplift_release::ReleaseError),
    #[error("manifest is for device type {got}, this device is {expected}; roll out a release built for {expected}")]
    WrongDeviceType { got: String, expected: String },
    #[error("server offered version {offered} but its manifest says {manifest}; the release on the server is inconsistent")]
    VersionMismatch { offered: Version, manifest: Version },
    #[error(transparent)]
    Downgrade(#[from] DowngradeRefused),
    #[error("downloading {what} failed: {detail}")]
    Download { what: String, detail: String },
    /// The server found its own copy damaged; `message` is its words.
    #[error("downloading {what} failed: {message}")]
    StoredChunkDamaged { what: String, message: String },
    #[error("cannot reach the server to download {what}: {detail}; the download resumes when the server is back")]
    Unreachable { what: String, detail: String },
    #[error("{what} sent more than the {limit} bytes declared; refusing endless data")]
    TooLong { what: String, limit: u64 },
    #[error("{what}: only {received} of {expected} bytes arrived in {seconds:.1} s, slower than the {min_rate} bytes/s the agent accepts ([download] min_bytes_per_sec); check the link to the server")]
    TooSlow {
        what: String,
        received: u64,
        expected: u64,
        seconds: f64,
        min_rate: u64,
    },
    /// The slot cannot take the image (too small, missing, in use).
    #[error(transparent)]
    Slot(#[from] crate::slot::SlotError),
    #[error("writing slot {slot} ({path}) failed: {source}")]
    SlotIo {
        slot: SlotName,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image written to slot {slot} has SHA-256 {actual}, the manifest says {expected}; not switching to it")]
    ImageHash {
        slot: SlotName,
        expected: String,
        actual: String,
    },
    #[error("boot environment: {0}")]
    BootEnv(#[from] uplift_bootenv::BootEnvError),
    #[error("boot environment: slot {target} is the committed default but slot {booted} is running; refusing to overwrite the default slot. Commit or repair the boot environment first")]
    DefaultSlotTargeted { target: SlotName, booted: SlotName },
    #[error("{0}; the boot choice is unchanged")]
    Hook(String),
    #[error("install cancelled (a newer offer or a withdrawn rollout replaced it)")]
    Cancelled,
    /// The agent's own records (journal, slots, device ID) failed.
    #[error("agent state: {0:#}")]
    LocalState(#[source] anyhow::Error),
    #[error("agent state: cannot {action} {path}: {source}")]
    StateFile {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "agent state: {path} is corrupt ({source}); delete it to accept the server's next offer"
    )]
    CorruptStateFile {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("agent state: the device has no ID yet")]
    NoDeviceId,
    /// A blocking step (slot I/O, state files, a check) panicked or was
    /// aborted on its thread.
    #[error("agent state: {step} stopped before it finished: {source}")]
    StepStopped {
        step: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("agent state: the journal thread failed: {0}")]
    JournalThread(#[source] std::io::Error),
    #[error("agent state: slot {slot} is not recorded as holding {version} any more; not switching to it")]
    SlotRecordChanged { slot: SlotName, version: Version },
    #[error("agent state: {done} of {total} chunks are in slot {slot} after the download; retrying the install")]
    IncompleteDownload {
        done: usize,
        total: usize,
        slot: SlotName,
    },
}

impl InstallError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            InstallError::Release(e) => e.kind(),
            InstallError::WrongDeviceType { .. } => ErrorKind::WrongDeviceType,
            InstallError::VersionMismatch { .. } => ErrorKind::VersionMismatch,
            InstallError::Downgrade(_) => ErrorKind::DowngradeRefused,
            InstallError::Unreachable { .. } => ErrorKind::ServerUnreachable,
            InstallError::StoredChunkDamaged { .. } => ErrorKind::StoredChunkDamaged,
            InstallError::Download { .. }
            | InstallError::TooLong { .. }
            | InstallError::TooSlow { .. } => ErrorKind::DownloadFailed,
            InstallError::Slot(e) => e.kind(),
            InstallError::SlotIo { .. }
            | InstallError::LocalState(_)
            | InstallError::StateFile { .. }
            | InstallError::CorruptStateFile { .. }
            | InstallError::NoDeviceId
            | InstallError::StepStopped { .. }
            | InstallError::JournalThread(_)
            | InstallError::SlotRecordChanged { .. }
            | InstallError::IncompleteDownload { .. } => ErrorKind::SlotIo,
            InstallError::ImageHash { .. } => ErrorKind::ImageHashMismatch,
            InstallError::BootEnv(_) | InstallError::DefaultSlotTargeted { .. } => {
                ErrorKind::BootEnv
            }
            InstallError::Hook(_) => ErrorKind::HookFailed,
            InstallError::Cancelled => ErrorKind::Internal,
        }
    }

    pub fn to_wire(&self) -> WireError {
        WireError::new(self.kind(), self.to_string())
    }
}

/// What an install needs from the running agent.
#[derive(Debug, Clone)]
pub struct Installer {
    pub config: Arc<AgentConfig>,
    pub http: reqwest::Client,
    /// For presigned object-store URLs the server redirects to
    /// ([`crate::net::direct_client`]).
    pub direct: reqwest::Client,
    /// Where downloads go: the server, or a site cache (`[download] url`).
    pub server_url: reqwest::Url,
    /// With a site cache: the server itself, for while the cache fails.
    pub fallback: Option<Fallback>,
    pub local: LocalState,
    /// The newest download token from the channel (`None` while offline).
    pub token: watch::Receiver<Option<String>>,
    pub guard: InstallGuard,
}

/// How long downloads go to the server after the site cache failed to
/// answer, before the cache is tried again.
pub const CACHE_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The server, for downloads while the site cache in front of it fails:
/// a site whose cache is down still upgrades, through its uplink.
#[derive(Debug, Clone)]
pub struct Fallback {
    pub server_url: reqwest::Url,
    /// Trusts the server's CA (the cache may have another).
    pub http: reqwest::Client,
    cache_failed_at: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Fallback {
    pub fn new(server_url: reqwest::Url, http: reqwest::Client) -> Self {
        Self {
            server_url,
            http,
            cache_failed_at: Arc::default(),
        }
    }

    /// Whether downloads go through the cache at `now`.
    fn cache_usable(&self, now: Instant) -> bool {
        cache_usable(*self.lock(), now)
    }

    fn cache_failed(&self, now: Instant) {
        *self.lock() = Some(now);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.cache_failed_at
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The cache is used unless it failed less than [`CACHE_RETRY_AFTER`] ago.
/// Pure: the time is passed in.
fn cache_usable(failed_at: Option<Instant>, now: Instant) -> bool {
    failed_at.is_none_or(|at| now.saturating_duration_since(at) >= CACHE_RETRY_AFTER)
}

/// Serializes every slot and boot-environment change across install
/// attempts, and stops a cancelled attempt at its next step. Aborting an
/// async task cannot stop a blocking section already running, so each such
/// section holds the lock until it is done and checks the flag first: an
/// old attempt can never switch the boot environment under a newer one.
#[derive(Debug, Clone)]
pub struct InstallGuard {
    lock: Arc<tokio::sync::Mutex<()>>,
    cancelled: Arc<AtomicBool>,
}

impl InstallGuard {
    /// A guard for a new attempt, sharing `lock` with every other attempt.
    pub fn new(lock: Arc<tokio::sync::Mutex<()>>) -> Self {
        Self {
            lock,
            cancelled: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// Like [`Self::blocking`] for a long step that checks the flag itself
    /// between units of work.
    pub(crate) async fn blocking_cancellable<T: Send + 'static>(
        &self,
        step: impl FnOnce(&AtomicBool) -> Result<T, InstallError> + Send + 'static,
    ) -> Result<T, InstallError> {
        let cancelled = self.cancelled.clone();
        self.blocking(move || step(&cancelled)).await
    }

    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        step: impl FnOnce() -> Result<T, InstallError> + Send + 'static,
    ) -> Result<T, InstallError> {
        let held = self.lock.clone().lock_owned().await;
        let cancelled = self.cancelled.clone();
        tokio::task::spawn_blocking(move || {
            let _held = held;
            if cancelled.load(Ordering::SeqCst) {
                return Err(InstallError::Cancelled);
            }
            step()
        })
        .await
        .map_err(|source| InstallError::StepStopped {
            step: "an install step",
            source,
        })?
    }
}

/// Checks a verified manifest against the offer and this device.
pub fn check_manifest(
    manifest: &Manifest,
    offer: &Offer,
    device_type: &uplift_proto::DeviceType,
    running: &Version,
) -> Result<(), InstallError> {
    if manifest.device_type != *device_type {
        return Err(InstallError::WrongDeviceType {
            got: manifest.device_type.to_string(),
            expected: device_type.to_string(),
        });
    }
    if manifest.version != offer.version {
        return Err(InstallError::VersionMismatch {
            offered: offer.version.clone(),
            manifest: manifest.version.clone(),
        });
    }
    check_downgrade(
        running,
        &manifest.version,
        offer.allow_downgrade,
        SignedPermit::MayReplaceUpTo(manifest.may_replace_up_to.as_ref()),
    )?;
    Ok(())
}

impl Installer {
    /// Runs one install to the end and reports the outcome as an event.
    pub async fn run(
        self,
        install: u64,
        offer: Offer,
        booted: SlotName,
        running: Version,
        events: mpsc::Sender<Event>,
    ) {
        let outcome = self
            .install(install, &offer, booted, &running, &events)
            .await;
        let event = match outcome {
            Ok(()) => Event::InstallDone { install },
            Err(InstallError::Cancelled) => return,
            Err(e) => {
                tracing::warn!(version = %offer.version, "install failed: {e}");
                Event::InstallFailed {
                    install,
                    error: e.to_wire(),
                }
            }
        };
        let _ = events.send(event).await;
    }

    async fn hook(
        &self,
        label: &str,
        command: Option<&[String]>,
        env: &[(&str, String)],
    ) -> Result<(), InstallError> {
        let Some(command) = command else {
            return Ok(());
        };
        let limit = Duration::from_secs(self.config.hooks.timeout_secs);
        crate::health::run_command(label, command, env, limit)
            .await
            .map_err(InstallError::Hook)
    }

    async fn current_token(&self) -> Result<String, InstallError> {
        let mut token = self.token.clone();
        let wait = self.config.download.offline_wait_secs;
        let found = tokio::time::timeout(Duration::from_secs(wait), async {
            token
                .wait_for(|t| t.is_some())
                .await
                .ok()
                .and_then(|t| t.clone())
        })
        .await;
        match found {
            Ok(Some(t)) => Ok(t),
            _ => Err(InstallError::Unreachable {
                what: "the release".into(),
                detail: format!("no connection to the server for {wait} s"),
            }),
        }
    }

    /// Sends one GET of `path` with the session token and sorts out the
    /// answer: a response to read, a failure worth another attempt, or one
    /// that is final. Returns when the request was sent, for its deadline.
    pub(crate) async fn request(
        &self,
        path: &str,
        what: &str,
        limit: u64,
    ) -> Result<(reqwest::Response, Instant), Failed> {
        let token = self.current_token().await.map_err(Failed::Fatal)?;
        let fallback = self
            .fallback
            .as_ref()
            .filter(|f| !f.cache_usable(Instant::now()));
        let (base, http) = match fallback {
            Some(f) => (&f.server_url, &f.http),
            None => (&self.server_url, &self.http),
        };
        let via_cache = self.fallback.is_some() && fallback.is_none();
        let url = base.join(path).map_err(|e| {
            Failed::Fatal(InstallError::Download {
                what: what.to_owned(),
                detail: format!("bad path {path:?}: {e}"),
            })
        })?;
        let started = Instant::now();
        let stall = self.config.download.stall_timeout();
        let request = http.get(url).bearer_auth(&token).send();
        let answered = self.answer(request).await;
        // The cache did not answer, or said it could not reach the server
        // (a gateway error is its own word): the server itself, for a while.
        let cache_failed = match &answered {
            Err(Failed::Retry(_)) => true,
            Ok(r) => matches!(
                r.status(),
                reqwest::StatusCode::BAD_GATEWAY | reqwest::StatusCode::GATEWAY_TIMEOUT
            ),
            Err(Failed::Fatal(_)) => false,
        };
        if let (true, true, Some(f)) = (via_cache, cache_failed, &self.fallback) {
            f.cache_failed(Instant::now());
            let said = match &answered {
                Ok(r) => format!("answered {}", r.status()),
                Err(Failed::Retry(r)) => r.detail.clone(),
                Err(Failed::Fatal(e)) => format!("{e}"),
            };
            tracing::warn!(
                cache = %self.server_url,
                "{what}: the site cache failed ({said}); downloading from the server {} for the next {} s",
                f.server_url,
                CACHE_RETRY_AFTER.as_secs()
            );
            if answered.is_ok() {
                return Err(Failed::Retry(Retry::lost(format!("the site cache {said}"))));
            }
        }
        let mut response = answered?;
        if response.status().is_redirection() {
            response = self.follow_direct(response, what).await?;
        }
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status.is_server_error() {
            let said = error_body(response, stall).await;
            return Err(match serde_json::from_str::<WireError>(&said) {
                // Damage on the server's disk lasts until the operator
                // uploads the release again: asking again now is no use,
                // and the operator must see the server's own words.
                Ok(e) if e.kind == ErrorKind::StoredChunkDamaged => {
                    Failed::Fatal(InstallError::StoredChunkDamaged {
                        what: what.to_owned(),
                        message: e.message,
                    })
                }
                // A stale token after a reconnect, or a passing server
                // fault (its object store down, say): retried; if it
                // lasts, its words are kept.
                Ok(e) => {
                    tracing::warn!("{what}: server answered {status}: {e}; asking again");
                    Failed::Retry(Retry::refused(format!("server answered {status}: {e}")))
                }
                Err(_) => {
                    Failed::Retry(Retry::refused(format!("server answered {status}: {said}")))
                }
            });
        }
        if !status.is_success() {
            let body = error_body(response, stall).await;
            return Err(Failed::Fatal(InstallError::Download {
                what: what.to_owned(),
                detail: format!("server answered {status}: {body}"),
            }));
        }
        if response.content_length().is_some_and(|len| len > limit) {
            return Err(Failed::Fatal(InstallError::TooLong {
                what: what.to_owned(),
                limit,
            }));
        }
        Ok((response, started))
    }

    /// The response to `request` within the stall timeout, or a retry.
    async fn answer(
        &self,
        request: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
    ) -> Result<reqwest::Response, Failed> {
        let stall = self.config.download.stall_timeout();
        match tokio::time::timeout(stall, request).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(Failed::Retry(Retry::lost(format!("{e}")))),
            Err(_) => Err(Failed::Retry(Retry::lost(format!(
                "no answer within {} s",
                self.config.download.stall_timeout_secs
            )))),
        }
    }

    /// Follows the server's redirect of a download to its object store
    /// (direct downloads): one hop, to a URL the direct client accepts
    /// (HTTPS, or plain HTTP only if `direct_allow_http`), as a fresh
    /// request that carries no session token: the presigned URL is its
    /// own authorization, and the token is for the server alone. The
    /// answer is marked [`Direct`]. Integrity is unchanged: every byte is
    /// still checked against the signed manifest's hashes.
    async fn follow_direct(
        &self,
        redirect: reqwest::Response,
        what: &str,
    ) -> Result<reqwest::Response, Failed> {
        let status = redirect.status();
        let location = redirect
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| redirect.url().join(l).ok());
        let Some(target) = location else {
            return Err(Failed::Fatal(InstallError::Download {
                what: what.to_owned(),
                detail: format!("the server answered {status} without a usable Location"),
            }));
        };
        if let Err(detail) = direct_url_allowed(&target, self.config.download.direct_allow_http) {
            return Err(Failed::Fatal(InstallError::Download {
                what: what.to_owned(),
                detail,
            }));
        }
        let host = target.host_str().unwrap_or("?").to_owned();
        let mut response = self.answer(self.direct.get(target).send()).await?;
        let status = response.status();
        if status.is_success() {
            response.extensions_mut().insert(Direct);
            return Ok(response);
        }
        let said = error_body(response, self.config.download.stall_timeout()).await;
        // A URL that expired on the way (403), a store that is down (5xx)
        // or an object not there yet: the server hands out a fresh URL, or
        // says why, on the next attempt.
        Err(Failed::Retry(Retry::refused(format!(
            "the object store at {host} answered {status}: {}",
            said.chars().take(200).collect::<String>()
        ))))
    }

    /// GETs `path` whole with the session token, refusing bodies over `limit`.
    pub(crate) async fn fetch(
        &self,
        path: &str,
        what: &str,
        limit: u64,
    ) -> Result<Vec<u8>, InstallError> {
        let mut last = Retry::default();
        for attempt in 0..CHUNK_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(retry_wait(attempt - 1)).await;
            }
            let (response, started) = match self.request(path, what, limit).await {
                Ok(answer) => answer,
                Err(failed) => {
                    last = last.then(failed.or_fail()?);
                    continue;
                }
            };
            let expected = response.content_length().unwrap_or(limit);
            let allowed = self.config.download.deadline_for(expected);
            let deadline = tokio::time::Instant::from_std(started) + allowed;
            let mut body = Vec::with_capacity(limit.min(4 << 20) as usize);
            let mut stream = response.bytes_stream();
            let broken = loop {
                let piece = match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(Some(Ok(piece))) => piece,
                    Ok(Some(Err(e))) => break format!("{e}"),
                    Ok(None) => return Ok(body),
                    Err(_) => {
                        return Err(InstallError::TooSlow {
                            what: what.to_owned(),
                            received: body.len() as u64,
                            expected,
                            seconds: allowed.as_secs_f64(),
                            min_rate: self.config.download.min_bytes_per_sec,
                        });
                    }
                };
                if body.len() as u64 + piece.len() as u64 > limit {
                    return Err(InstallError::TooLong {
                        what: what.to_owned(),
                        limit,
                    });
                }
                body.extend_from_slice(&piece);
            };
            last = last.then(Retry::lost(broken));
        }
        Err(last.give_up(what))
    }

    async fn install(
        &self,
        install: u64,
        offer: &Offer,
        booted: SlotName,
        running: &Version,
        events: &mpsc::Sender<Event>,
    ) -> Result<(), InstallError> {
        let mut manifest = self.verified_manifest(offer, running).await?;
        // One copy of the chunk list for the whole install, shared by the
        // requests and the writer (at 40 bytes a chunk, 10 MiB for 16 GiB).
        let chunks: Arc<[ChunkEntry]> = std::mem::take(&mut manifest.chunks).into();
        let target = booted.other();
        let path = self.config.slots.path(target).to_owned();
        let bootenv = self.config.boot.env.clone();
        // An image the slot cannot hold fails here, before the hook runs
        // and before anything about the slot changes.
        crate::slot::check_capacity_async(target, path.clone(), manifest.image.size).await?;
        let hook_env = [
            ("UPLIFT_VERSION", manifest.version.to_string()),
            ("UPLIFT_SLOT", target.to_string()),
            ("UPLIFT_SLOT_PATH", path.display().to_string()),
        ];
        self.hook(
            "pre-install hook",
            self.config.hooks.pre_install.as_deref(),
            &hook_env,
        )
        .await?;
        let booted_image = self.booted_image(booted).await;
        prepare_slot_for_writing(&self.guard, &bootenv, &self.local, booted, target).await?;

        let counters = Arc::new(Counters::default());
        let download = Download {
            installer: self,
            manifest: &manifest,
            offsets: crate::download::offsets_of(&chunks),
            chunks: chunks.clone(),
            target,
            target_path: path,
            booted_path: self.config.slots.path(booted).to_owned(),
            booted_image: booted_image.clone(),
            offer_cap: offer.max_bytes_per_sec,
            counters: counters.clone(),
        };
        let total = manifest.image.size;
        let report = |counters: &Counters| Progress {
            done_bytes: counters.done_bytes.load(Ordering::Relaxed),
            total_bytes: total,
            fetched_bytes: counters.fetched_bytes.load(Ordering::Relaxed),
        };
        let ticker = async {
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                let progress = report(&counters);
                let _ = events.send(Event::Progress { install, progress }).await;
            }
        };
        let tally = tokio::select! {
            tally = download.run() => tally?,
            () = ticker => unreachable!("the progress ticker never ends"),
        };
        let progress = report(&counters);
        let _ = events.send(Event::Progress { install, progress }).await;
        tracing::info!(
            version = %manifest.version,
            chunks = chunks.len(),
            fetched = tally.fetched,
            fetched_bytes = tally.fetched_bytes,
            patched = tally.patched,
            patch_bytes = tally.patch_bytes,
            patch_fallbacks = tally.patch_fallbacks,
            reused_from_running_slot = tally.copied,
            repeated_in_image = tally.repeated,
            trusted_from_journal = tally.journaled,
            "all chunks in slot {target}, each verified by its hash on the way in"
        );
        let _ = events.send(Event::Verifying { install }).await;
        self.hook(
            "post-install hook",
            self.config.hooks.post_install.as_deref(),
            &hook_env,
        )
        .await?;

        self.record_verified(
            target,
            &manifest,
            &chunks,
            offer.rollout_id,
            booted_image.map(|(id, _)| id),
        )
        .await
    }

    /// The offered release's manifest, signature checked, for this device.
    async fn verified_manifest(
        &self,
        offer: &Offer,
        running: &Version,
    ) -> Result<Manifest, InstallError> {
        let json = self
            // Built from the (validated) version, not taken from the offer:
            // the session token goes with the request, and a path from the
            // wire could point it at another host.
            .fetch(
                &device_manifest_path(&offer.version),
                "manifest",
                MAX_MANIFEST_BYTES as u64,
            )
            .await?;
        let signed = SignedManifest::from_json(&json)?;
        let mut manifest = self.verify_manifest(&signed, offer).await?;
        check_manifest(&manifest, offer, &self.config.device_type, running)?;
        if let Some(reference) = manifest.chunk_index.filter(|_| manifest.needs_index()) {
            // Exactly as long as the signed manifest says, then its digest.
            let index = self
                .fetch(
                    &device_index_path(&offer.version),
                    "chunk index",
                    reference.bytes(),
                )
                .await?;
            manifest.attach_index(&index)?;
        }
        Ok(manifest)
    }

    /// The image the running slot holds (digest and size), if the slot
    /// table knows it; the factory image is not recorded.
    async fn booted_image(&self, booted: SlotName) -> Option<(String, u64)> {
        let local = self.local.clone();
        let slots = tokio::task::spawn_blocking(move || local.slots())
            .await
            .ok()?
            .ok()?;
        let id = slots.get(booted)?.image_sha256.clone();
        let list = self.local.chunk_list(&id)?;
        let size = list.iter().map(|(_, size)| u64::from(*size)).sum();
        Some((id, size))
    }
}

/// Marks a response that came from the object store (a followed redirect)
/// rather than from the server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Direct;

/// Whether a presigned URL may be fetched: HTTPS always, plain HTTP only
/// when configured, nothing else.
pub(crate) fn direct_url_allowed(url: &reqwest::Url, allow_http: bool) -> Result<(), String> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if allow_http => Ok(()),
        "http" => Err(format!(
            "the server redirected to {}://{}, plain HTTP; refused (set [download] direct_allow_http \
             only for an object store on a trusted network)",
            url.scheme(),
            url.host_str().unwrap_or("?")
        )),
        other => Err(format!("the server redirected to a {other}: URL; only https is followed")),
    }
}

/// A failed request attempt: worth another try, or final.
#[derive(Debug)]
pub(crate) enum Failed {
    Retry(Retry),
    Fatal(InstallError),
}

impl Failed {
    /// The retry to note, or the final error to return.
    pub(crate) fn or_fail(self) -> Result<Retry, InstallError> {
        match self {
            Failed::Retry(retry) => Ok(retry),
            Failed::Fatal(e) => Err(e),
        }
    }
}

/// Why the last attempt failed, for the error after the last one.
#[derive(Debug, Default)]
pub(crate) struct Retry {
    detail: String,
    /// For want of a connection, rather than the server answering with an error.
    unreachable: bool,
}

impl Retry {
    pub(crate) fn lost(detail: String) -> Self {
        Self {
            detail,
            unreachable: true,
        }
    }

    fn refused(detail: String) -> Self {
        Self {
            detail,
            unreachable: false,
        }
    }

    /// This failure followed by `next` of the same request: the server's
    /// own answer (an error status, a missing chunk) says more than a
    /// connection lost after it, and is what the operator must see.
    pub(crate) fn then(self, next: Retry) -> Retry {
        let answered = !self.unreachable && !self.detail.is_empty();
        if answered && next.unreachable {
            self
        } else {
            next
        }
    }

    pub(crate) fn give_up(self, what: &str) -> InstallError {
        let detail = format!("gave up after {CHUNK_ATTEMPTS} attempts: {}", self.detail);
        if self.unreachable {
            InstallError::Unreachable {
                what: what.to_owned(),
                detail,
            }
        } else {
            InstallError::Download {
                what: what.to_owned(),
                detail,
            }
        }
    }
}

/// Wait before retry `retry` (0 for the first) of one request.
pub(crate) fn retry_wait(retry: u32) -> Duration {
    use rand::Rng;
    let draw: f64 = rand::thread_rng().gen();
    pace::backoff(
        retry,
        Duration::from_millis(500),
        Duration::from_secs(4),
        draw,
    )
}

pub(crate) fn state_err(e: anyhow::Error) -> InstallError {
    InstallError::LocalState(e)
}

/// Before the first byte goes into `target`: it must not be the slot the
/// bootloader would boot, and any stale record or trial of it is withdrawn.
async fn prepare_slot_for_writing(
    guard: &InstallGuard,
    bootenv: &BootEnv,
    local: &LocalState,
    booted: SlotName,
    target: SlotName,
) -> Result<(), InstallError> {
    let bootenv = bootenv.clone();
    let local = local.clone();
    guard
        .blocking(move || {
            let (env, state) = bootenv.load_state()?;
            if state.default_slot == target {
                return Err(InstallError::DefaultSlotTargeted { target, booted });
            }
            // Boot environment first: once no trial points at the slot, a crash
            // at any later point leaves nothing that could boot it.
            if state.trial.as_ref().is_some_and(|t| t.slot == target) {
                bootenv.store_state(env, &state.withdraw_trial())?;
                let mut journal = local.journal().map_err(state_err)?;
                journal.pending = None;
                local.save_journal(&journal).map_err(state_err)?;
            }
            // Nor may a verified slot awaiting its reboot stay recorded while
            // it is overwritten.
            let mut journal = local.journal().map_err(state_err)?;
            if journal
                .awaiting_reboot
                .as_ref()
                .is_some_and(|w| w.slot == target)
            {
                journal.awaiting_reboot = None;
                local.save_journal(&journal).map_err(state_err)?;
            }
            let mut slots = local.slots().map_err(state_err)?;
            slots.set(target, None);
            local.save_slots(&slots).map_err(state_err)?;
            Ok(())
        })
        .await
}

impl Installer {
    /// The end of an install: the slot holds the release, every chunk
    /// verified. Recorded (the chunk list, `slots.json`, and the journal's
    /// `awaiting_reboot`) so that a restart knows it without reading the
    /// slot; the boot environment is not touched: switching is the state
    /// machine's decision ([`start_trial`]), at once or on the server's go.
    async fn record_verified(
        &self,
        target: SlotName,
        manifest: &Manifest,
        chunks: &[ChunkEntry],
        rollout_id: i64,
        running_image: Option<String>,
    ) -> Result<(), InstallError> {
        let local = self.local.clone();
        let content = SlotContent {
            version: manifest.version.clone(),
            image_sha256: manifest.image.sha256.to_hex(),
        };
        let verified = PendingInstall {
            slot: target,
            version: manifest.version.clone(),
            rollout_id,
        };
        let chunk_list: Vec<(ChunkHash, u32)> = chunks.iter().map(|c| (c.hash, c.size)).collect();
        self.guard
            .blocking(move || {
                // The next install's index of reusable chunks, saved before the
                // slot is recorded as holding the release: a list without a
                // slot is dropped later, a slot without its list is re-chunked.
                let keep: Vec<&str> = running_image.iter().map(String::as_str).collect();
                if let Err(e) = local.save_chunk_list(&content.image_sha256, &chunk_list, &keep) {
                    tracing::warn!("cannot keep the chunk list of the new release: {e:#}");
                }
                let mut slots = local.slots().map_err(state_err)?;
                slots.set(target, Some(content));
                local.save_slots(&slots).map_err(state_err)?;
                let mut journal = local.journal().map_err(state_err)?;
                journal.awaiting_reboot = Some(verified);
                local.save_journal(&journal).map_err(state_err)
                // The resume point stays until the switch: a slot withdrawn
                // before its reboot and offered again is re-checked chunk by
                // chunk from the slot, not downloaded.
            })
            .await
    }
}

/// The commit point of an install, in crash-safe order: the journal says
/// what is pending first, then one atomic boot environment write puts the
/// verified slot on trial, then the slot no longer awaits its reboot. A
/// crash before the switch leaves the old slot booting and the verified
/// slot still awaiting the go; one after it reboots into the trial.
pub async fn start_trial(
    guard: &InstallGuard,
    bootenv: &BootEnv,
    local: &LocalState,
    pending: PendingInstall,
    tries: u32,
) -> Result<(), InstallError> {
    let bootenv = bootenv.clone();
    let local = local.clone();
    guard
        .blocking(move || {
            // Only a slot recorded as holding the verified release is tried.
            let slots = local.slots().map_err(state_err)?;
            if slots
                .get(pending.slot)
                .is_none_or(|c| c.version != pending.version)
            {
                return Err(InstallError::SlotRecordChanged {
                    slot: pending.slot,
                    version: pending.version,
                });
            }
            let slot = pending.slot;
            let mut journal = local.journal().map_err(state_err)?;
            journal.pending = Some(pending);
            local.save_journal(&journal).map_err(state_err)?;
            bootenv.update(|state| state.start_trial(slot, tries))?;
            // After the switch the install has succeeded; a stale record here
            // (a crash or write error) is harmless: at start a trial of the
            // slot wins over it, and the next install re-checks every
            // journaled chunk in the slot by its hash.
            journal.awaiting_reboot = None;
            if let Err(e) = local.save_journal(&journal) {
                tracing::warn!("cannot clear the slot's wait for its reboot: {e:#}");
            }
            if let Err(e) = local.save_install_progress(None) {
                tracing::warn!("cannot clear the resume point: {e:#}");
            }
            Ok(())
        })
        .await
}

/// Forgets the verified slot awaiting its reboot (withdrawn by the
/// server). The boot environment never pointed at it; the slot's bytes and
/// its resume point stay, so the same release offered again is re-checked
/// from the slot rather than downloaded.
pub async fn withdraw_verified(
    guard: &InstallGuard,
    local: &LocalState,
) -> Result<(), InstallError> {
    let local = local.clone();
    guard
        .blocking(move || {
            let mut journal = local.journal().map_err(state_err)?;
            if journal.awaiting_reboot.take().is_some() {
                local.save_journal(&journal).map_err(state_err)?;
            }
            Ok(())
        })
        .await
}

/// The start of an error body, read within `limit`: a hostile server must
/// not make the device buffer or wait without bound.
async fn error_body(response: reqwest::Response, limit: Duration) -> String {
    const MAX: usize = 1024;
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    let _ = tokio::time::timeout(limit, async {
        while let Some(Ok(piece)) = stream.next().await {
            body.extend_from_slice(&piece[..piece.len().min(MAX - body.len())]);
            if body.len() >= MAX {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&body).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use uplift_release::manifest::{ChunkEntry, Compression, ImageInfo};

    #[test]
    fn a_missing_chunk_is_reported_as_the_server_said_even_if_a_later_attempt_lost_the_link() {
        let last = Retry::refused("server answered 404 Not Found: no chunk ab12".into())
            .then(Retry::lost("no answer within 10 s".into()));
        let failed = last.give_up("chunk 5");
        assert_eq!(failed.kind(), ErrorKind::DownloadFailed);
        assert!(failed.to_string().contains("404"), "{failed}");
        // Only lost links: the server was not reachable.
        let lost = Retry::lost("reset".into()).then(Retry::lost("no answer".into()));
        assert_eq!(lost.give_up("chunk 5").kind(), ErrorKind::ServerUnreachable);
        // An answer after a lost link is the newest word.
        let answered =
            Retry::lost("reset".into()).then(Retry::refused("server answered 503".into()));
        assert_eq!(
            answered.give_up("chunk 5").kind(),
            ErrorKind::DownloadFailed
        );
    }

    #[test]
    fn a_state_error_keeps_its_cause_for_the_log_and_says_it_on_the_wire() {
        let failed = state_err(
            anyhow::Error::new(std::io::Error::other("no space left on device"))
                .context("writing /var/lib/uplift/journal.json"),
        );
        let cause = std::error::Error::source(&failed).expect("the cause is kept");
        assert!(cause.to_string().contains("journal.json"), "{cause}");
        let wire = failed.to_wire();
        assert_eq!(wire.kind, ErrorKind::SlotIo, "retried like slot I/O");
        assert!(
            wire.message.contains("journal.json") && wire.message.contains("no space left"),
            "{}",
            wire.message
        );
    }

    #[test]
    fn a_failed_site_cache_is_passed_by_for_a_while_then_tried_again() {
        let start = Instant::now();
        assert!(cache_usable(None, start), "never failed");
        let failed = Some(start);
        assert!(!cache_usable(failed, start));
        assert!(!cache_usable(
            failed,
            start + CACHE_RETRY_AFTER - Duration::from_secs(1)
        ));
        assert!(cache_usable(failed, start + CACHE_RETRY_AFTER));
    }

    fn manifest(version: &str, device_type: &str) -> Manifest {
        Manifest {
            format: 1,
            version: version.parse().unwrap(),
            device_type: device_type.parse().unwrap(),
            created_at: "2026-01-01T00:00:00Z".into(),
            expires_at: "2027-01-01T00:00:00Z".into(),
            image: ImageInfo {
                size: 4,
                sha256: ChunkHash::from_bytes([1; 32]),
            },
            compression: Compression::Zstd,
            chunks: vec![ChunkEntry {
                hash: ChunkHash::from_bytes([1; 32]),
                size: 4,
                stored_size: 13,
            }],
            chunk_index: None,
            patches: Vec::new(),
            may_replace_up_to: None,
        }
    }

    fn offer(version: &str, allow_downgrade: bool) -> Offer {
        let version: Version = version.parse().unwrap();
        Offer {
            rollout_id: 1,
            manifest_path: uplift_proto::api::device_manifest_path(&version),
            version,
            allow_downgrade,
            max_bytes_per_sec: None,
            hold_reboot: false,
            freshness: None,
        }
    }

    fn check(m: &Manifest, o: &Offer, running: &str) -> Result<(), ErrorKind> {
        let device_type = "gateway".parse().unwrap();
        check_manifest(m, o, &device_type, &running.parse().unwrap()).map_err(|e| e.kind())
    }

    #[test]
    fn a_manifest_for_the_offered_version_and_this_device_type_passes() {
        assert_eq!(
            check(&manifest("1.1", "gateway"), &offer("1.1", false), "1.0"),
            Ok(())
        );
    }

    #[test]
    fn a_manifest_for_another_device_type_is_refused() {
        assert_eq!(
            check(&manifest("1.1", "kiosk"), &offer("1.1", false), "1.0"),
            Err(ErrorKind::WrongDeviceType)
        );
    }

    #[test]
    fn mix_and_match_a_manifest_of_another_version_than_offered_is_refused() {
        // A server that offers 1.1 but serves the (validly signed) 1.0
        // manifest must not get 1.0 installed under 1.1's name.
        assert_eq!(
            check(&manifest("1.0", "gateway"), &offer("1.1", false), "0.9"),
            Err(ErrorKind::VersionMismatch)
        );
    }

    #[test]
    fn an_older_release_needs_the_rollouts_and_the_release_keys_word() {
        let mut signed = manifest("0.9", "gateway");
        signed.may_replace_up_to = Some("1.0".parse().unwrap());
        assert_eq!(
            check(&signed, &offer("0.9", false), "1.0"),
            Err(ErrorKind::DowngradeRefused)
        );
        assert_eq!(check(&signed, &offer("0.9", true), "1.0"), Ok(()));
        // The server allows it, the release key does not.
        assert_eq!(
            check(&manifest("0.9", "gateway"), &offer("0.9", true), "1.0"),
            Err(ErrorKind::DowngradeRefused)
        );
        assert_eq!(
            check(&signed, &offer("0.9", true), "1.1"),
            Err(ErrorKind::DowngradeRefused),
            "signed to replace up to 1.0 only"
        );
    }

    #[test]
    fn the_offer_and_the_manifest_refuse_a_downgrade_in_the_same_words() {
        let (mut machine, _) = crate::machine::Machine::start(crate::machine::BootFacts {
            booted: SlotName::A,
            boot: uplift_bootenv::state::BootState::new(SlotName::A),
            slots: Default::default(),
            journal: Default::default(),
            factory_version: "1.0".parse().unwrap(),
        });
        machine.handle(Event::Offer(offer("0.9", false)));
        let device_type = "gateway".parse().unwrap();
        let at_install = check_manifest(
            &manifest("0.9", "gateway"),
            &offer("0.9", false),
            &device_type,
            &"1.0".parse().unwrap(),
        )
        .unwrap_err()
        .to_wire();
        assert_eq!(machine.report().error, Some(at_install));
    }

    /// An installer whose server is `url`, with a session token at hand.
    fn installer_for(url: &str, state: &Path) -> (Installer, watch::Sender<Option<String>>) {
        installer_allowing(url, state, false)
    }

    fn installer_allowing(
        url: &str,
        state: &Path,
        allow_http: bool,
    ) -> (Installer, watch::Sender<Option<String>>) {
        let config: AgentConfig = toml::from_str(&format!(
            r#"
            server_url = "{url}"
            server_ca = "/nonexistent/ca.pem"
            enrollment_token = "unused-enrollment-token"
            device_type = "gw"
            state_dir = "{state}"
            trusted_release_keys = []
            factory_version = "1.0"
            [slots]
            a = "/nonexistent/a"
            b = "/nonexistent/b"
            [boot]
            env_file = "/nonexistent/grubenv"
            [download]
            stall_timeout_secs = 5
            direct_allow_http = {allow_http}
            "#,
            state = state.display()
        ))
        .unwrap();
        let (token_tx, token) = watch::channel(Some("session-token".to_owned()));
        let installer = Installer {
            config: Arc::new(config),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            direct: reqwest::Client::new(),
            server_url: url.parse().unwrap(),
            fallback: None,
            local: LocalState::open(state).unwrap(),
            token,
            guard: InstallGuard::new(Arc::new(tokio::sync::Mutex::new(()))),
        };
        (installer, token_tx)
    }

    /// A server on loopback answering every request with `head`, then
    /// `filler`, over and over until the client hangs up if `endless`;
    /// returns its URL and a count of the requests it got.
    async fn canned_server(
        head: String,
        filler: Vec<u8>,
        endless: bool,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let (head, filler) = (head.clone(), filler.clone());
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = socket.read(&mut request).await;
                    let _ = socket.write_all(head.as_bytes()).await;
                    while socket.write_all(&filler).await.is_ok() && endless {}
                });
            }
        });
        (url, requests)
    }

    #[tokio::test]
    async fn a_chunk_the_server_found_damaged_fails_at_once_in_the_servers_words() {
        let state = tempfile::tempdir().unwrap();
        let body = serde_json::to_vec(&WireError::new(
            ErrorKind::StoredChunkDamaged,
            "chunk x is damaged on the server's disk; repair it with `uplift release upload`",
        ))
        .unwrap();
        let head = format!(
            "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let (url, requests) = canned_server(head, body, false).await;
        let (installer, _token) = installer_for(&url, state.path());
        let err = installer
            .fetch("/v1/device/chunks/x", "chunk x", 1 << 20)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::StoredChunkDamaged, "{err}");
        assert!(err.to_string().contains("uplift release upload"), "{err}");
        assert_eq!(
            requests.load(Ordering::SeqCst),
            1,
            "not asked again within the attempt"
        );
    }

    #[tokio::test]
    async fn a_download_that_never_ends_is_refused_at_its_limit() {
        let state = tempfile::tempdir().unwrap();
        let head = "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_owned();
        let (url, _) = canned_server(head, vec![0x5a; 64 * 1024], true).await;
        let (installer, _token) = installer_for(&url, state.path());
        let err = installer
            .fetch("/v1/device/chunks/x", "chunk x", 256 * 1024)
            .await
            .unwrap_err();
        assert!(
            matches!(err, InstallError::TooLong { limit: 262144, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("endless data"), "{err}");
    }

    #[tokio::test]
    async fn a_download_declared_longer_than_its_limit_is_refused_before_reading() {
        let state = tempfile::tempdir().unwrap();
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 99999999999\r\n\r\n".to_owned();
        let (url, _) = canned_server(head, vec![0x5a; 64 * 1024], true).await;
        let (installer, _token) = installer_for(&url, state.path());
        let err = installer
            .fetch("/v1/device/manifest", "the manifest", 1024)
            .await
            .unwrap_err();
        assert!(
            matches!(err, InstallError::TooLong { limit: 1024, .. }),
            "{err}"
        );
    }

    /// A server on loopback answering every request with `answer`, keeping
    /// each request's head (lower-cased) for the test to inspect.
    async fn recording_server(answer: String) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = heads.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (answer, kept) = (answer.clone(), kept.clone());
                tokio::spawn(async move {
                    let mut request = vec![0u8; 8192];
                    let n = socket.read(&mut request).await.unwrap_or(0);
                    kept.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&request[..n]).to_lowercase());
                    let _ = socket.write_all(answer.as_bytes()).await;
                });
            }
        });
        (url, heads)
    }

    #[tokio::test]
    async fn a_redirect_to_the_object_store_is_followed_without_the_session_token() {
        let state = tempfile::tempdir().unwrap();
        let (store, store_log) = recording_server(
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nchunk".to_owned(),
        )
        .await;
        let (server, server_heads) = recording_server(format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: {store}/bucket/chunks/ab/x.zst?X-Amz-Signature=s\r\n\
             content-length: 0\r\nconnection: close\r\n\r\n"
        ))
        .await;
        let (installer, _token) = installer_allowing(&server, state.path(), true);
        let (response, _) = installer
            .request("/v1/device/chunks/x", "chunk x", 1 << 20)
            .await
            .map_err(|e| format!("{e:?}"))
            .unwrap();
        assert!(response.extensions().get::<Direct>().is_some());
        assert_eq!(response.bytes().await.unwrap().as_ref(), b"chunk");
        let server_heads = server_heads.lock().unwrap().clone();
        assert!(server_heads[0].contains("authorization: bearer session-token"));
        let store_heads = store_log.lock().unwrap().clone();
        assert_eq!(store_heads.len(), 1);
        assert!(
            store_heads[0].starts_with("get /bucket/chunks/ab/x.zst?x-amz-signature=s "),
            "{}",
            store_heads[0]
        );
        assert!(
            !store_heads[0].contains("authorization") && !store_heads[0].contains("session-token"),
            "the session token went to the object store: {}",
            store_heads[0]
        );

        // Plain HTTP is refused unless configured, and the store never asked.
        let (installer, _token) = installer_for(&server, state.path());
        let err = installer
            .fetch("/v1/device/chunks/x", "chunk x", 1 << 20)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("direct_allow_http"), "{err}");
        assert_eq!(store_log.lock().unwrap().len(), 1);
    }

    #[test]
    fn only_https_presigned_urls_are_followed_unless_http_is_allowed() {
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        assert!(direct_url_allowed(&url("https://s3.example/b/k?sig"), false).is_ok());
        assert!(direct_url_allowed(&url("http://127.0.0.1:9000/b/k"), false).is_err());
        assert!(direct_url_allowed(&url("http://127.0.0.1:9000/b/k"), true).is_ok());
        assert!(direct_url_allowed(&url("file:///etc/passwd"), true).is_err());
    }
}
