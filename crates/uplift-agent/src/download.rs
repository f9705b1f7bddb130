//! Filling the inactive slot with a release's chunks, pipelined: the
//! [planner](crate::plan) decides where each chunk comes from; up to
//! `[download] parallel_requests` span requests stream chunks from the
//! server at once, each body split by the manifest's stored sizes, counted
//! against its size limit and deadline, and paced by the bandwidth cap; one
//! blocking writer, fed through a bounded queue, decompresses, hashes and
//! writes every chunk (to every offset that repeats it) and journals the
//! finished set, fsynced, twice a second.
//!
//! Every byte that reaches the slot is hashed against the signed manifest on
//! its way in (fetched, copied from the running slot, or, on resume, read
//! back from the journaled part of the slot), and the signed chunk list
//! covers the image exactly, so the whole image matches its digest without
//! being read again.

use crate::install::{state_err, InstallError, Installer, Retry, CHUNK_ATTEMPTS};
use crate::local::{InstallProgress, LocalState};
use crate::plan::{ChunkSet, Copy, Plan, Span, SpanLimits};
use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use uplift_proto::api::{device_patch_span_path, device_span_path, MAX_SPAN_CHUNKS};
use uplift_proto::pace::Pacer;
use uplift_proto::{ChunkHash, SlotName};
use uplift_release::chunk::{apply_patch, sha256, ChunkDecoder};
use uplift_release::manifest::{ChunkEntry, Manifest, PatchEntry};
use uplift_release::seed::SeedIndex;

/// How often the resume journal is brought up to date (each time costs an fsync).
const JOURNAL_EVERY: Duration = Duration::from_millis(500);
/// Most of the running slot read when indexing it for reusable chunks.
const SEED_LIMIT: u64 = 64 << 30;
/// Stored bytes asked for in one span request: large enough that the round
/// trip is small beside the transfer, small enough that parallel requests
/// share the work evenly and a broken connection repeats little.
const SPAN_BYTES: u64 = 2 << 20;
/// Fetched chunks waiting for the writer, per request in flight.
const QUEUE_PER_REQUEST: usize = 1;

/// Where the chunks of one install came from, for the log.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub journaled: usize,
    pub copied: usize,
    pub fetched: usize,
    pub fetched_bytes: u64,
    /// Chunks made from a patch against chunks of the running slot.
    pub patched: usize,
    pub patch_bytes: u64,
    /// Patches that did not make their chunk (then fetched whole).
    pub patch_fallbacks: usize,
    /// Chunks written from another occurrence of the same chunk.
    pub repeated: usize,
}

/// Live totals the writer keeps for progress reports.
#[derive(Debug, Default)]
pub struct Counters {
    pub done_bytes: AtomicU64,
    pub fetched_bytes: AtomicU64,
}

/// Positional writes into a slot (a partition or a file).
#[derive(Debug, Clone)]
pub struct SlotWriter {
    slot: SlotName,
    path: PathBuf,
    file: Arc<File>,
}

impl SlotWriter {
    fn io(&self) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
        |source| InstallError::SlotIo {
            slot: self.slot,
            path: self.path.clone(),
            source,
        }
    }

    /// Opens the slot as [`crate::slot::open_for_writing`] does: a block
    /// device exclusively and only if the image fits, never resized.
    pub fn open(slot: SlotName, path: &Path, image_size: u64) -> Result<Self, InstallError> {
        let opened = crate::slot::open_for_writing(slot, path, image_size)?;
        Ok(Self {
            slot,
            path: path.to_owned(),
            file: Arc::new(opened.file),
        })
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), InstallError> {
        self.file.write_all_at(data, offset).map_err(self.io())
    }

    fn sync(&self) -> Result<(), InstallError> {
        self.file.sync_data().map_err(self.io())
    }

    /// Everything written, and the file's metadata, on stable storage.
    pub fn sync_all(&self) -> Result<(), InstallError> {
        self.file.sync_all().map_err(self.io())
    }

    /// True if the slot holds this chunk's bytes at `offset`.
    fn holds(&self, entry: &ChunkEntry, offset: u64) -> Result<bool, InstallError> {
        let mut data = vec![0u8; entry.size as usize];
        match self.file.read_exact_at(&mut data, offset) {
            Ok(()) => Ok(sha256(&data) == entry.hash),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(self.io()(e)),
        }
    }
}

/// Chunks the running slot holds, by hash: read only; the running slot is
/// never written.
#[derive(Debug, Clone, Default)]
pub struct Seed {
    file: Option<Arc<File>>,
    index: Arc<SeedIndex>,
    /// How the index was made, for the log.
    pub source: &'static str,
}

impl Seed {
    /// The index of the running slot: the saved chunk list of the release it
    /// holds when there is one (no read of the slot at all), otherwise the
    /// slot re-chunked (a factory image, or a list lost).
    pub async fn of_running_slot(
        path: &Path,
        image_size: Option<u64>,
        list: Option<Vec<(ChunkHash, u32)>>,
        wanted: WantedSizes,
    ) -> Seed {
        let path = path.to_owned();
        let built = tokio::task::spawn_blocking(move || -> std::io::Result<Seed> {
            let file = File::open(&path)?;
            let listed = list.filter(|list| {
                // The list must describe what the slot can hold.
                let total: u64 = list.iter().map(|(_, size)| u64::from(*size)).sum();
                image_size == Some(total)
                    && crate::slot::capacity_of(&file).is_ok_and(|capacity| capacity >= total)
            });
            let (index, source) = match listed {
                Some(list) => (
                    SeedIndex::from_list(list),
                    "the saved chunk list of the running release",
                ),
                None => (
                    uplift_release::seed::index_file_sized(
                        &file,
                        SEED_LIMIT,
                        std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
                        |size| wanted.admits(size),
                    )?,
                    "the running slot, re-chunked",
                ),
            };
            Ok(Seed {
                file: Some(Arc::new(file)),
                index: Arc::new(index),
                source,
            })
        })
        .await;
        match built {
            Ok(Ok(seed)) => seed,
            // Without a seed everything is downloaded: slower, still correct.
            Ok(Err(e)) => {
                tracing::warn!("cannot index the running slot for reuse: {e}");
                Seed::default()
            }
            Err(e) => {
                tracing::warn!("cannot index the running slot for reuse: {e}");
                Seed::default()
            }
        }
    }

    fn offset_of(&self, entry: &ChunkEntry) -> Option<u64> {
        self.index
            .get(&entry.hash)
            .filter(|c| c.size == entry.size)
            .map(|c| c.offset)
    }

    /// The chunk's bytes at `from` in the running slot, if they hash right.
    fn read(&self, entry: &ChunkEntry, from: u64) -> Option<Vec<u8>> {
        let mut data = vec![0u8; entry.size as usize];
        self.file.as_ref()?.read_exact_at(&mut data, from).ok()?;
        (sha256(&data) == entry.hash).then_some(data)
    }

    /// True if the index lists every base chunk of `patch`.
    fn holds_base(&self, patch: &PatchEntry) -> bool {
        self.file.is_some() && patch.base.iter().all(|h| self.index.contains_key(h))
    }

    /// The base of `patch`, each chunk read from the running slot and
    /// checked; `None` if one is not there after all.
    fn read_base(&self, patch: &PatchEntry) -> Option<Vec<u8>> {
        let mut base = Vec::new();
        for hash in &patch.base {
            let at = self.index.get(hash)?;
            let entry = ChunkEntry {
                hash: *hash,
                size: at.size,
                stored_size: 0,
            };
            base.extend_from_slice(&self.read(&entry, at.offset)?);
        }
        Some(base)
    }
}

/// Which chunk sizes are worth hashing when the running slot is re-chunked:
/// those of the release's chunks, unless patches may need base chunks of
/// other sizes (the manifest names bases by hash only), then every size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WantedSizes {
    All,
    /// Sorted, without repeats.
    Only(Vec<u32>),
}

impl WantedSizes {
    pub fn for_release(chunks: &[ChunkEntry], patches: &[PatchEntry]) -> Self {
        if !patches.is_empty() {
            return Self::All;
        }
        let mut sizes: Vec<u32> = chunks.iter().map(|c| c.size).collect();
        sizes.sort_unstable();
        sizes.dedup();
        Self::Only(sizes)
    }

    pub fn admits(&self, size: u32) -> bool {
        match self {
            Self::All => true,
            Self::Only(sizes) => sizes.binary_search(&size).is_ok(),
        }
    }
}

/// The two lists of a release a device fetches from by position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Chunks,
    Patches,
}

/// A chunk or a patch as it came off the wire, not yet checked.
#[derive(Debug)]
struct Fetched {
    wire: Wire,
    /// Index into the manifest's list `wire`.
    index: usize,
    stored: Bytes,
}

/// Syncs the slot and journals on a thread of its own, so that the writer
/// goes on filling the page cache while the disk catches up: in the profile
/// of a 1 GiB install the writer sat in `fdatasync` at every checkpoint and
/// both cores were a third idle. A snapshot names only chunks written
/// before it was taken, and its sync starts after that, so the journal
/// never claims a chunk the slot does not durably hold.
#[derive(Debug)]
struct Journaler {
    /// Room for one snapshot: the first is taken at once (even before the
    /// thread waits for it), and while a sync runs at most one newer one
    /// waits; the writer skips a checkpoint rather than queue more.
    progress: SyncSender<InstallProgress>,
    thread: std::thread::JoinHandle<Result<(), InstallError>>,
}

impl Journaler {
    fn start(slot: SlotWriter, local: LocalState) -> Result<Self, InstallError> {
        let (progress, snapshots) = std::sync::mpsc::sync_channel::<InstallProgress>(1);
        let thread = std::thread::Builder::new()
            .name("uplift-journal".to_owned())
            .spawn(move || {
                for snapshot in snapshots {
                    slot.sync()?;
                    local
                        .save_install_progress(Some(&snapshot))
                        .map_err(state_err)?;
                }
                Ok(())
            })
            .map_err(InstallError::JournalThread)?;
        Ok(Self { progress, thread })
    }

    /// Waits for the snapshot in hand to be journaled; its error if any.
    fn finish(self) -> Result<(), InstallError> {
        drop(self.progress);
        self.thread
            .join()
            .map_err(|_| InstallError::JournalThread(std::io::Error::other("it panicked")))?
    }
}

/// The blocking side: writes checked chunks into the slot and keeps the
/// journal of finished ones.
#[derive(Debug)]
struct SlotFill {
    slot: SlotWriter,
    chunks: Arc<[ChunkEntry]>,
    patches: Arc<[PatchEntry]>,
    offsets: Arc<[u64]>,
    done: ChunkSet,
    local: LocalState,
    image_sha256: String,
    journaled_at: Instant,
    dirty: bool,
    journaler: Option<Journaler>,
    counters: Arc<Counters>,
    tally: Tally,
    decoder: ChunkDecoder,
}

impl SlotFill {
    fn mark(&mut self, index: usize) {
        if !self.done.contains(index) {
            self.done.insert(index);
            self.counters
                .done_bytes
                .fetch_add(u64::from(self.chunks[index].size), Ordering::Relaxed);
            self.dirty = true;
        }
    }

    fn write_to(&mut self, data: &[u8], targets: &[usize]) -> Result<(), InstallError> {
        for &index in targets {
            self.slot.write_at(data, self.offsets[index])?;
            self.mark(index);
        }
        self.tally.repeated += targets.len().saturating_sub(1);
        Ok(())
    }

    /// Copies a chunk from the running slot; false if the bytes there are
    /// not the chunk (then it is fetched instead).
    fn copy(&mut self, seed: &Seed, copy: &Copy) -> Result<bool, InstallError> {
        let entry = self.chunks[copy.to[0]];
        let Some(data) = seed.read(&entry, copy.from) else {
            return Ok(false);
        };
        self.write_to(&data, &copy.to)?;
        self.tally.copied += 1;
        Ok(true)
    }

    /// Checks a fetched chunk against its manifest entry and writes it.
    fn put(&mut self, fetched: &Fetched, targets: &[usize]) -> Result<(), InstallError> {
        let entry = self.chunks[fetched.index];
        let data = self.decoder.decode(&entry, &fetched.stored)?;
        self.write_to(&data, targets)?;
        self.tally.fetched += 1;
        self.count_fetched(fetched);
        Ok(())
    }

    fn count_fetched(&mut self, fetched: &Fetched) {
        self.tally.fetched_bytes += fetched.stored.len() as u64;
        self.counters
            .fetched_bytes
            .fetch_add(fetched.stored.len() as u64, Ordering::Relaxed);
    }

    /// Applies a fetched patch to its base from the running slot and writes
    /// the chunk it makes, checked against the manifest. A patch that does
    /// not make its chunk writes nothing: the chunk stays missing and is
    /// fetched whole after this round.
    fn put_patch(
        &mut self,
        seed: &Seed,
        fetched: &Fetched,
        chunk_index: usize,
        targets: &[usize],
    ) -> Result<(), InstallError> {
        self.count_fetched(fetched);
        let patch = &self.patches[fetched.index];
        let chunk = self.chunks[chunk_index];
        let made = match seed.read_base(patch) {
            Some(base) => apply_patch(patch, &chunk, &fetched.stored, &base),
            None => Err(uplift_release::ReleaseError::PatchDoesNotApply {
                chunk: chunk.hash,
                reason: "a base chunk is no longer in the running slot".to_owned(),
            }),
        };
        match made {
            Ok(data) => {
                self.write_to(&data, targets)?;
                self.tally.patched += 1;
                self.tally.patch_bytes += fetched.stored.len() as u64;
            }
            Err(e) => {
                tracing::warn!("{e}");
                self.tally.patch_fallbacks += 1;
            }
        }
        Ok(())
    }

    /// What the journal should say now.
    fn progress(&self) -> InstallProgress {
        InstallProgress {
            slot: self.slot.slot,
            image_sha256: self.image_sha256.clone(),
            verified_bytes: self.counters.done_bytes.load(Ordering::Relaxed),
            done: self.done.ranges(),
        }
    }

    /// Journals the finished chunks, but only once they are durably in the
    /// slot. Every [`JOURNAL_EVERY`] the [`Journaler`] gets a snapshot, if
    /// it is not still syncing the last one; `force` (the end of a round,
    /// however it ends) waits for it and then syncs and journals here.
    fn checkpoint(&mut self, force: bool) -> Result<(), InstallError> {
        if force {
            if let Some(journaler) = self.journaler.take() {
                journaler.finish()?;
            }
            if self.dirty {
                self.slot.sync()?;
                self.local
                    .save_install_progress(Some(&self.progress()))
                    .map_err(state_err)?;
                self.dirty = false;
            }
            return Ok(());
        }
        if !self.dirty || self.journaled_at.elapsed() < JOURNAL_EVERY {
            return Ok(());
        }
        let progress = self.progress();
        let journaler = match self.journaler.take() {
            Some(journaler) => journaler,
            None => Journaler::start(self.slot.clone(), self.local.clone())?,
        };
        match journaler.progress.try_send(progress) {
            Ok(()) => {
                self.journaled_at = Instant::now();
                self.dirty = false;
            }
            // A snapshot already waits: try again after the next chunk.
            Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(_)) => {
                journaler.finish()?;
                return Err(InstallError::JournalThread(std::io::Error::other(
                    "it stopped without an error",
                )));
            }
        }
        self.journaler = Some(journaler);
        Ok(())
    }

    /// Copies, then writes fetched chunks as they come, until the queue
    /// closes; the journal is brought up to date however it ends.
    fn run(
        &mut self,
        seed: &Seed,
        copies: &[Copy],
        targets: &HashMap<usize, Vec<usize>>,
        patch_targets: &HashMap<usize, usize>,
        queue: &mut mpsc::Receiver<Fetched>,
        cancelled: &AtomicBool,
    ) -> Result<(), InstallError> {
        let result = (|| {
            for copy in copies {
                if cancelled.load(Ordering::SeqCst) {
                    return Err(InstallError::Cancelled);
                }
                self.copy(seed, copy)?;
                self.checkpoint(false)?;
            }
            while let Some(fetched) = queue.blocking_recv() {
                if cancelled.load(Ordering::SeqCst) {
                    return Err(InstallError::Cancelled);
                }
                let chunk = match fetched.wire {
                    Wire::Chunks => fetched.index,
                    Wire::Patches => patch_targets[&fetched.index],
                };
                let to = targets
                    .get(&chunk)
                    .map(Vec::as_slice)
                    .unwrap_or(std::slice::from_ref(&chunk));
                match fetched.wire {
                    Wire::Chunks => self.put(&fetched, to)?,
                    Wire::Patches => self.put_patch(seed, &fetched, chunk, to)?,
                }
                self.checkpoint(false)?;
            }
            Ok(())
        })();
        // Whatever went wrong, what is done stays done for the next attempt.
        let saved = self.checkpoint(true);
        result.and(saved)
    }
}

/// One install's download: the release's chunks into slot `target`.
#[derive(Debug)]
pub struct Download<'a> {
    pub installer: &'a Installer,
    /// The release's signed manifest, its chunk list moved to `chunks`.
    pub manifest: &'a Manifest,
    pub chunks: Arc<[ChunkEntry]>,
    /// Where each chunk starts in the image ([`offsets_of`] the chunks).
    pub offsets: Arc<[u64]>,
    pub target: SlotName,
    pub target_path: PathBuf,
    pub booted_path: PathBuf,
    /// The running slot's release, as the slot table records it.
    pub booted_image: Option<(String, u64)>,
    /// The rollout's cap from the offer.
    pub offer_cap: Option<u64>,
    pub counters: Arc<Counters>,
}

/// The effective bandwidth cap: the device's and the rollout's, the lower.
pub fn effective_cap(device: Option<u64>, rollout: Option<u64>) -> Option<u64> {
    match (device, rollout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Download<'_> {
    pub async fn run(self) -> Result<Tally, InstallError> {
        let chunks = self.chunks.clone();
        let offsets = self.offsets.clone();
        let mut fill = self.open_slot(chunks.clone(), offsets).await?;
        let list = self
            .booted_image
            .as_ref()
            .and_then(|(id, _)| self.installer.local.chunk_list(id));
        let seed = Seed::of_running_slot(
            &self.booted_path,
            self.booted_image.as_ref().map(|(_, size)| *size),
            list,
            WantedSizes::for_release(&chunks, &self.manifest.patches),
        )
        .await;
        let limits = SpanLimits {
            max_chunks: MAX_SPAN_CHUNKS as usize,
            max_bytes: SPAN_BYTES,
        };
        let cap = effective_cap(
            self.installer.config.download.max_bytes_per_sec,
            self.offer_cap,
        );
        let pacer = cap.map(|rate| Arc::new(Pacer::new(rate)));
        let patches = &self.manifest.patches;
        let first = crate::plan::plan(
            &chunks,
            patches,
            &fill.done,
            |e| seed.offset_of(e),
            |p| seed.holds_base(p),
            limits,
        );
        fill.tally.journaled = first.journaled;
        tracing::info!(
            chunks = chunks.len(),
            journaled = first.journaled,
            to_copy = first.copies.len(),
            to_fetch = first.fetched_chunks(),
            fetch_bytes = first.fetched_bytes(&chunks),
            to_patch = first.patched_chunks(),
            patch_bytes = first.patch_bytes(patches),
            requests = first.spans.len() + first.patch_spans.len(),
            cap_bytes_per_sec = cap,
            "planned the download into slot {} (reuse index: {})",
            self.target,
            if seed.source.is_empty() {
                "none"
            } else {
                seed.source
            }
        );
        fill = self.round(fill, &seed, first, pacer.clone()).await?;
        if !fill.done.is_complete() {
            // Chunks the running slot should have had but did not, and
            // patches that did not apply: fetched whole.
            let rest = crate::plan::plan(&chunks, &[], &fill.done, |_| None, |_| false, limits);
            tracing::info!(
                to_fetch = rest.fetched_chunks(),
                "chunks the running slot did not hold after all are fetched whole"
            );
            fill = self.round(fill, &seed, rest, pacer).await?;
        }
        if !fill.done.is_complete() {
            return Err(InstallError::IncompleteDownload {
                done: fill.done.len(),
                total: chunks.len(),
                slot: self.target,
            });
        }
        let slot = fill.slot.clone();
        self.installer
            .guard
            .blocking(move || slot.sync_all())
            .await?;
        Ok(fill.tally)
    }

    /// Opens the slot and takes over the journal of an interrupted install
    /// of the same image, re-checking each journaled chunk in the slot.
    async fn open_slot(
        &self,
        chunks: Arc<[ChunkEntry]>,
        offsets: Arc<[u64]>,
    ) -> Result<SlotFill, InstallError> {
        let (target, path, size) = (
            self.target,
            self.target_path.clone(),
            self.manifest.image.size,
        );
        let local = self.installer.local.clone();
        let image_sha256 = self.manifest.image.sha256.to_hex();
        let counters = self.counters.clone();
        let patches: Arc<[PatchEntry]> = self.manifest.patches.clone().into();
        self.installer
            .guard
            .blocking(move || {
                let slot = SlotWriter::open(target, &path, size)?;
                let journal = local
                    .install_progress()
                    .map_err(state_err)?
                    .filter(|p| p.slot == target && p.image_sha256 == image_sha256);
                let mut done = ChunkSet::new(chunks.len());
                if let Some(progress) = journal {
                    let ranges = progress.done_chunks(chunks.iter().map(|c| u64::from(c.size)));
                    let journaled = ChunkSet::from_ranges(chunks.len(), &ranges);
                    for index in journaled.iter() {
                        // Durable when journaled; read back here so that every
                        // byte of the image is hashed within this install.
                        if slot.holds(&chunks[index], offsets[index])? {
                            done.insert(index);
                        }
                    }
                    // Each request writes its span front to back, so chunks
                    // written after the last journal entry continue a
                    // journaled run: probe each gap up to its first miss.
                    for [_, end] in ranges {
                        let mut index = end as usize;
                        while index < chunks.len()
                            && !journaled.contains(index)
                            && slot.holds(&chunks[index], offsets[index])?
                        {
                            done.insert(index);
                            index += 1;
                        }
                    }
                }
                let done_bytes = done.iter().map(|i| u64::from(chunks[i].size)).sum();
                counters.done_bytes.store(done_bytes, Ordering::Relaxed);
                Ok(SlotFill {
                    slot,
                    chunks,
                    patches,
                    offsets,
                    done,
                    local,
                    image_sha256,
                    journaled_at: Instant::now(),
                    dirty: false,
                    journaler: None,
                    counters,
                    tally: Tally::default(),
                    decoder: ChunkDecoder::new(),
                })
            })
            .await
    }

    /// Copies and fetches one plan's chunks: the writer on a blocking thread,
    /// the requests on the runtime, a bounded queue between them.
    async fn round(
        &self,
        mut fill: SlotFill,
        seed: &Seed,
        plan: Plan,
        pacer: Option<Arc<Pacer>>,
    ) -> Result<SlotFill, InstallError> {
        let parallel = self.installer.config.download.parallel_requests.max(1);
        let (tx, mut rx) = mpsc::channel(parallel * QUEUE_PER_REQUEST);
        let seed = seed.clone();
        let Plan {
            copies,
            spans,
            patch_spans,
            patch_targets,
            targets,
            ..
        } = plan;
        let writer = self.installer.guard.blocking_cancellable(move |cancelled| {
            let result = fill.run(&seed, &copies, &targets, &patch_targets, &mut rx, cancelled);
            Ok((fill, result))
        });
        // Patches first: they are small, and a chunk whose patch fails is
        // then fetched whole in the next round. The stream owns the queue's
        // sender: once it is done (or failed) and dropped, the queue closes
        // and the writer knows there is nothing more.
        let requests = patch_spans
            .into_iter()
            .map(|span| (Wire::Patches, span))
            .chain(spans.into_iter().map(|span| (Wire::Chunks, span)));
        let fetches = futures_util::stream::iter(requests)
            .map(move |(wire, span)| {
                let fetch = self.fetch_span(wire, span, tx.clone(), pacer.clone());
                async move {
                    match (wire, fetch.await) {
                        // Patches only save bytes: one that cannot be had
                        // leaves its chunks to be fetched whole.
                        (Wire::Patches, Err(e)) if !matches!(e, InstallError::Cancelled) => {
                            tracing::warn!("{e}; fetching those chunks whole instead");
                            Ok(())
                        }
                        (_, result) => result,
                    }
                }
            })
            .buffer_unordered(parallel)
            .try_collect::<()>();
        let (written, fetched) = tokio::join!(writer, fetches);
        let (fill, written) = written?;
        // The writer's error explains a fetch that stopped because it quit.
        written?;
        fetched?;
        Ok(fill)
    }

    /// Streams one span of chunks (or patches) into the queue, resuming
    /// after the last whole one when a connection breaks.
    async fn fetch_span(
        &self,
        wire: Wire,
        span: Span,
        queue: mpsc::Sender<Fetched>,
        pacer: Option<Arc<Pacer>>,
    ) -> Result<(), InstallError> {
        let sizes: Vec<u32> = match wire {
            Wire::Chunks => self.chunks[span.first..span.first + span.count]
                .iter()
                .map(|c| c.stored_size)
                .collect(),
            Wire::Patches => self.manifest.patches[span.first..span.first + span.count]
                .iter()
                .map(|p| p.stored_size)
                .collect(),
        };
        // Indexed by list position, like the manifest's list.
        let stored_size = |index: usize| sizes[index - span.first];
        let describe = |first: usize, end: usize| self.describe(wire, first, end);
        let version = &self.manifest.version;
        let end = span.first + span.count;
        let mut next = span.first;
        let mut failures = 0u32;
        let mut last = Retry::default();
        'requests: while next < end {
            if failures >= CHUNK_ATTEMPTS {
                return Err(last.give_up(&describe(next, end)));
            }
            if failures > 0 {
                tokio::time::sleep(crate::install::retry_wait(failures - 1)).await;
            }
            failures += 1;
            let what = describe(next, end);
            let expected: u64 = (next..end).map(|i| u64::from(stored_size(i))).sum();
            let path = match wire {
                Wire::Chunks => device_span_path(version, next as u64, (end - next) as u64),
                Wire::Patches => device_patch_span_path(version, next as u64, (end - next) as u64),
            };
            let (response, started) = match self.installer.request(&path, &what, expected).await {
                Ok(answer) => answer,
                Err(retry) => {
                    last = last.then(retry.or_fail()?);
                    continue;
                }
            };
            // From the object store (direct downloads), the answer is the
            // span's first object alone: each is stored under its own name.
            // The rest is asked for again, no failure.
            let answer_end = if response
                .extensions()
                .get::<crate::install::Direct>()
                .is_some()
            {
                next + 1
            } else {
                end
            };
            let expected: u64 = (next..answer_end).map(|i| u64::from(stored_size(i))).sum();
            if let Some(len) = response.content_length().filter(|&len| len != expected) {
                return Err(InstallError::Download {
                    what,
                    detail: format!(
                        "the server announced {len} bytes, the manifest's stored sizes add up to {expected}; \
                         the release on the server is inconsistent"
                    ),
                });
            }
            let download = &self.installer.config.download;
            // Each chunk must arrive within the stall timeout plus its size
            // at the slowest rate accepted, counted from the end of the one
            // before (or from the request): the same bound as one request
            // per chunk, whatever the span's length.
            let mut allowed = download.deadline_for(u64::from(stored_size(next)));
            let mut deadline = tokio::time::Instant::from_std(started) + allowed;
            let mut received = 0u64;
            let mut chunk = BytesMut::with_capacity(stored_size(next) as usize);
            let mut body = response.bytes_stream();
            let broken = loop {
                let piece = match tokio::time::timeout_at(deadline, body.next()).await {
                    Ok(Some(Ok(piece))) => piece,
                    Ok(Some(Err(e))) => break format!("{e}"),
                    Ok(None) if next < answer_end => {
                        break format!("the body ended after {received} of {expected} bytes")
                    }
                    Ok(None) if next < end => continue 'requests,
                    Ok(None) => return Ok(()),
                    Err(_) => {
                        // Slow retrieval: the server answers, but too slowly
                        // to ever finish. Not a lost connection, so it does
                        // not renew the retry budget the way an outage does.
                        return Err(InstallError::TooSlow {
                            what: describe(next, next + 1),
                            received: chunk.len() as u64,
                            expected: u64::from(stored_size(next)),
                            seconds: allowed.as_secs_f64(),
                            min_rate: download.min_bytes_per_sec,
                        });
                    }
                };
                received += piece.len() as u64;
                if received > expected {
                    return Err(InstallError::TooLong {
                        what,
                        limit: expected,
                    });
                }
                if let Some(pacer) = &pacer {
                    // Time spent holding back for the cap is not the server's slowness.
                    let wait = pacer.take(piece.len() as u64);
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                        deadline += wait;
                    }
                }
                let mut piece: Bytes = piece;
                while !piece.is_empty() {
                    let want = stored_size(next) as usize - chunk.len();
                    chunk.extend_from_slice(&piece.split_to(want.min(piece.len())));
                    if chunk.len() == stored_size(next) as usize {
                        let stored = chunk.split().freeze();
                        if queue
                            .send(Fetched {
                                wire,
                                index: next,
                                stored,
                            })
                            .await
                            .is_err()
                        {
                            // The writer stopped; it says why.
                            return Err(InstallError::Cancelled);
                        }
                        next += 1;
                        if next < end {
                            allowed = download.deadline_for(u64::from(stored_size(next)));
                            deadline = tokio::time::Instant::now() + allowed;
                        }
                        // Progress renews the budget: a link that breaks
                        // now and then still finishes.
                        failures = 0;
                        last = Retry::default();
                        if next < end {
                            chunk.reserve(stored_size(next) as usize);
                        }
                    }
                }
            };
            last = last.then(Retry::lost(broken));
        }
        Ok(())
    }
}

impl Download<'_> {
    /// Names chunks (or patches) `first..end` of the release for messages.
    fn describe(&self, wire: Wire, first: usize, end: usize) -> String {
        let version = &self.manifest.version;
        if wire == Wire::Patches {
            let patch = &self.manifest.patches[first];
            return if end - first == 1 {
                format!("patch {} for chunk {}", patch.hash, patch.chunk)
            } else {
                format!(
                    "patches {first}..{end} of {version} (first for chunk {})",
                    patch.chunk
                )
            };
        }
        let (offset, hash) = (self.offsets[first], self.chunks[first].hash);
        if end - first == 1 {
            format!("chunk {hash} at offset {offset}")
        } else {
            format!("chunks {first}..{end} of {version} (from offset {offset}, first {hash})")
        }
    }
}

/// Where each chunk of `chunks` starts in the image.
pub fn offsets_of(chunks: &[ChunkEntry]) -> Arc<[u64]> {
    chunks
        .iter()
        .scan(0u64, |offset, chunk| {
            let at = *offset;
            *offset += u64::from(chunk.size);
            Some(at)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(size: u32) -> ChunkEntry {
        ChunkEntry {
            hash: uplift_release::chunk::sha256(&size.to_le_bytes()),
            size,
            stored_size: size,
        }
    }

    #[test]
    fn only_the_releases_chunk_sizes_are_wanted_unless_patches_need_bases() {
        let chunks = [chunk(300), chunk(100), chunk(300)];
        let wanted = WantedSizes::for_release(&chunks, &[]);
        assert_eq!(wanted, WantedSizes::Only(vec![100, 300]));
        assert!(wanted.admits(100) && wanted.admits(300) && !wanted.admits(200));
        let patch = PatchEntry {
            chunk: chunks[0].hash,
            base: vec![uplift_release::chunk::sha256(b"old")],
            hash: uplift_release::chunk::sha256(b"patch"),
            stored_size: 10,
        };
        assert_eq!(
            WantedSizes::for_release(&chunks, &[patch]),
            WantedSizes::All
        );
    }

    #[test]
    fn the_lower_of_the_device_and_rollout_caps_wins() {
        assert_eq!(effective_cap(None, None), None);
        assert_eq!(effective_cap(Some(5), None), Some(5));
        assert_eq!(effective_cap(None, Some(7)), Some(7));
        assert_eq!(effective_cap(Some(5), Some(7)), Some(5));
        assert_eq!(effective_cap(Some(9), Some(7)), Some(7));
    }
}
