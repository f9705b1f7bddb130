//! The chunk planner: for every chunk of a release, where its bytes come
//! from. Pure, so each rule is unit-tested without a slot or a server:
//! - a chunk the resume journal records as durably written is left alone;
//! - a chunk the running slot holds is copied from it (and re-hashed then);
//! - a chunk the release has a patch for, whose base chunks the running slot
//!   all holds, is fetched as that patch (smaller) and applied;
//! - every other chunk is fetched once, however often the image repeats it
//!   (filesystem images repeat zero-filled chunks a lot), and written to
//!   every offset that needs it;
//! - fetched chunks (or patches) that are neighbours in the manifest's list
//!   go out as one span request, bounded in count and bytes, so one round
//!   trip carries many.
//!
//! [`ChunkSet`] is the resume journal's record of finished chunks, which
//! parallel downloads complete out of order.

use std::collections::HashMap;
use uplift_proto::ChunkHash;
use uplift_release::manifest::{ChunkEntry, PatchEntry};

/// The chunk indices of a release that are done, in any order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSet {
    bits: Vec<u64>,
    count: usize,
    len: usize,
}

impl ChunkSet {
    pub fn new(count: usize) -> Self {
        Self {
            bits: vec![0; count.div_ceil(64)],
            count,
            len: 0,
        }
    }

    /// Rebuilds a set from journaled half-open `[start, end)` ranges;
    /// anything outside `0..count` is ignored (a journal of another release
    /// never gets this far, but a damaged one must not panic).
    pub fn from_ranges(count: usize, ranges: &[[u64; 2]]) -> Self {
        let mut set = Self::new(count);
        for &[start, end] in ranges {
            let end = end.min(count as u64);
            for index in start..end {
                set.insert(index as usize);
            }
        }
        set
    }

    pub fn contains(&self, index: usize) -> bool {
        index < self.count && self.bits[index / 64] & (1 << (index % 64)) != 0
    }

    pub fn insert(&mut self, index: usize) {
        if index < self.count && !self.contains(index) {
            self.bits[index / 64] |= 1 << (index % 64);
            self.len += 1;
        }
    }

    pub fn remove(&mut self, index: usize) {
        if self.contains(index) {
            self.bits[index / 64] &= !(1 << (index % 64));
            self.len -= 1;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_complete(&self) -> bool {
        self.len == self.count
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.count).filter(|&i| self.contains(i))
    }

    /// The set as sorted, disjoint half-open ranges: compact in the journal
    /// even for a 16 GiB image, since downloads finish roughly in order.
    pub fn ranges(&self) -> Vec<[u64; 2]> {
        let mut out: Vec<[u64; 2]> = Vec::new();
        for index in self.iter() {
            let index = index as u64;
            match out.last_mut() {
                Some(last) if last[1] == index => last[1] = index + 1,
                _ => out.push([index, index + 1]),
            }
        }
        out
    }
}

/// A run of neighbouring chunks fetched in one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub first: usize,
    pub count: usize,
}

/// A chunk the running slot holds, copied from `from` there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub hash: ChunkHash,
    pub from: u64,
    /// Every index of the new image that takes these bytes.
    pub to: Vec<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub copies: Vec<Copy>,
    /// Fetch requests, in manifest order.
    pub spans: Vec<Span>,
    /// Patch fetch requests, over the manifest's patch list.
    pub patch_spans: Vec<Span>,
    /// For each fetched patch, the chunk index it makes.
    pub patch_targets: HashMap<usize, usize>,
    /// For each fetched index, every index (itself included) that takes its bytes.
    pub targets: HashMap<usize, Vec<usize>>,
    /// Chunks left alone because the journal has them.
    pub journaled: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct SpanLimits {
    pub max_chunks: usize,
    /// Stored (compressed) bytes per request; a span always takes at least
    /// one chunk.
    pub max_bytes: u64,
}

impl Plan {
    pub fn fetched_chunks(&self) -> usize {
        self.spans.iter().map(|s| s.count).sum()
    }

    pub fn fetched_bytes(&self, chunks: &[ChunkEntry]) -> u64 {
        self.spans
            .iter()
            .flat_map(|s| &chunks[s.first..s.first + s.count])
            .map(|c| u64::from(c.stored_size))
            .sum()
    }

    pub fn patched_chunks(&self) -> usize {
        self.patch_spans.iter().map(|s| s.count).sum()
    }

    pub fn patch_bytes(&self, patches: &[PatchEntry]) -> u64 {
        self.patch_spans
            .iter()
            .flat_map(|s| &patches[s.first..s.first + s.count])
            .map(|p| u64::from(p.stored_size))
            .sum()
    }
}

/// Decides where each chunk not in `done` comes from. `reusable` says where
/// the running slot holds a chunk (by hash and size), if it does;
/// `applicable` whether it holds every base of a patch.
pub fn plan(
    chunks: &[ChunkEntry],
    patches: &[PatchEntry],
    done: &ChunkSet,
    reusable: impl Fn(&ChunkEntry) -> Option<u64>,
    applicable: impl Fn(&PatchEntry) -> bool,
    limits: SpanLimits,
) -> Plan {
    let patch_of: HashMap<ChunkHash, usize> = patches
        .iter()
        .enumerate()
        .filter(|(_, p)| applicable(p))
        .map(|(at, p)| (p.chunk, at))
        .collect();
    let mut patched = Vec::new();
    let mut plan = Plan::default();
    // Hash -> where its bytes come from: a copy (index into `copies`) or a
    // fetch (the first index that needs it).
    enum From {
        Copy(usize),
        Fetch(usize),
    }
    let mut sources: HashMap<ChunkHash, From> = HashMap::new();
    let mut fetch = Vec::new();
    for (index, entry) in chunks.iter().enumerate() {
        if done.contains(index) {
            plan.journaled += 1;
            continue;
        }
        match sources.get(&entry.hash) {
            Some(From::Copy(at)) => plan.copies[*at].to.push(index),
            Some(From::Fetch(leader)) => plan
                .targets
                .get_mut(leader)
                .expect("every fetch leader has targets")
                .push(index),
            None => match reusable(entry) {
                Some(from) => {
                    sources.insert(entry.hash, From::Copy(plan.copies.len()));
                    plan.copies.push(Copy {
                        hash: entry.hash,
                        from,
                        to: vec![index],
                    });
                }
                None => {
                    sources.insert(entry.hash, From::Fetch(index));
                    plan.targets.insert(index, vec![index]);
                    match patch_of.get(&entry.hash) {
                        Some(&patch) => {
                            plan.patch_targets.insert(patch, index);
                            patched.push(patch);
                        }
                        None => fetch.push(index),
                    }
                }
            },
        }
    }
    plan.spans = spans_of(|i| chunks[i].stored_size, &fetch, limits);
    // Patches are listed in chunk order, so they were met in list order.
    plan.patch_spans = spans_of(|i| patches[i].stored_size, &patched, limits);
    plan
}

/// Merges sorted list indices into span requests within `limits`.
fn spans_of(stored_size: impl Fn(usize) -> u32, fetch: &[usize], limits: SpanLimits) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    let mut bytes = 0u64;
    for &index in fetch {
        let size = u64::from(stored_size(index));
        match spans.last_mut() {
            Some(span)
                if span.first + span.count == index
                    && span.count < limits.max_chunks
                    && bytes + size <= limits.max_bytes =>
            {
                span.count += 1;
                bytes += size;
            }
            _ => {
                spans.push(Span {
                    first: index,
                    count: 1,
                });
                bytes = size;
            }
        }
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8, stored: u32) -> ChunkEntry {
        ChunkEntry {
            hash: ChunkHash::from_bytes([n; 32]),
            size: 4096,
            stored_size: stored,
        }
    }

    const WIDE: SpanLimits = SpanLimits {
        max_chunks: 256,
        max_bytes: 1 << 30,
    };

    #[test]
    fn a_device_with_nothing_fetches_everything_in_one_span() {
        let chunks: Vec<_> = (0..10).map(|n| entry(n, 100)).collect();
        let plan = plan(&chunks, &[], &ChunkSet::new(10), |_| None, |_| true, WIDE);
        assert_eq!(
            plan.spans,
            vec![Span {
                first: 0,
                count: 10
            }]
        );
        assert!(plan.copies.is_empty());
        assert_eq!(plan.fetched_bytes(&chunks), 1000);
    }

    #[test]
    fn spans_respect_the_chunk_and_byte_limits() {
        let chunks: Vec<_> = (0..10).map(|n| entry(n, 100)).collect();
        let few = SpanLimits {
            max_chunks: 4,
            max_bytes: 1 << 30,
        };
        let counts: Vec<_> = plan(&chunks, &[], &ChunkSet::new(10), |_| None, |_| true, few)
            .spans
            .iter()
            .map(|s| s.count)
            .collect();
        assert_eq!(counts, [4, 4, 2]);
        let small = SpanLimits {
            max_chunks: 256,
            max_bytes: 250,
        };
        let counts: Vec<_> = plan(&chunks, &[], &ChunkSet::new(10), |_| None, |_| true, small)
            .spans
            .iter()
            .map(|s| s.count)
            .collect();
        assert_eq!(counts, [2, 2, 2, 2, 2]);
        // A chunk larger than the byte limit still goes, alone.
        let big = [entry(1, 1000), entry(2, 1000)];
        let spans = plan(&big, &[], &ChunkSet::new(2), |_| None, |_| true, small).spans;
        assert_eq!(spans.len(), 2);
    }

    #[test]
    fn chunks_the_running_slot_holds_are_copied_and_split_the_spans() {
        let chunks: Vec<_> = (0..6).map(|n| entry(n, 100)).collect();
        let plan = plan(
            &chunks,
            &[],
            &ChunkSet::new(6),
            |e| (e.hash == chunks[2].hash).then_some(8192),
            |_| true,
            WIDE,
        );
        assert_eq!(
            plan.copies,
            vec![Copy {
                hash: chunks[2].hash,
                from: 8192,
                to: vec![2]
            }]
        );
        assert_eq!(
            plan.spans,
            vec![Span { first: 0, count: 2 }, Span { first: 3, count: 3 }]
        );
    }

    #[test]
    fn a_repeated_chunk_is_fetched_once_and_written_everywhere() {
        let zero = entry(0, 20);
        let chunks = vec![entry(1, 100), zero, entry(2, 100), zero, zero];
        let plan = plan(&chunks, &[], &ChunkSet::new(5), |_| None, |_| true, WIDE);
        assert_eq!(plan.fetched_chunks(), 3);
        assert_eq!(plan.targets[&1], vec![1, 3, 4]);
        assert_eq!(
            plan.spans,
            vec![Span { first: 0, count: 3 }],
            "the repeats are holes the span does not need"
        );
        // A repeated chunk the running slot has is read there once.
        let plan = super::plan(
            &chunks,
            &[],
            &ChunkSet::new(5),
            |e| (e.hash == zero.hash).then_some(0),
            |_| true,
            WIDE,
        );
        assert_eq!(plan.copies.len(), 1);
        assert_eq!(plan.copies[0].to, vec![1, 3, 4]);
    }

    #[test]
    fn after_an_out_of_order_kill_only_the_unfinished_chunks_are_fetched() {
        let chunks: Vec<_> = (0..12).map(|n| entry(n, 100)).collect();
        // Four parallel spans were in flight; some finished, some did not.
        let done = ChunkSet::from_ranges(12, &[[0, 3], [6, 9], [11, 12]]);
        let plan = plan(&chunks, &[], &done, |_| None, |_| true, WIDE);
        assert_eq!(plan.journaled, 7);
        assert_eq!(
            plan.spans,
            vec![Span { first: 3, count: 3 }, Span { first: 9, count: 2 }]
        );
        for span in &plan.spans {
            for index in span.first..span.first + span.count {
                assert!(!done.contains(index), "chunk {index} fetched again");
            }
        }
    }

    #[test]
    fn a_complete_journal_leaves_nothing_to_do() {
        let chunks: Vec<_> = (0..3).map(|n| entry(n, 100)).collect();
        let done = ChunkSet::from_ranges(3, &[[0, 3]]);
        let plan = plan(&chunks, &[], &done, |_| Some(0), |_| true, WIDE);
        assert!(plan.spans.is_empty() && plan.copies.is_empty());
        assert_eq!(plan.journaled, 3);
    }

    fn patch(chunk: &ChunkEntry, base: u8, stored: u32) -> PatchEntry {
        PatchEntry {
            chunk: chunk.hash,
            base: vec![ChunkHash::from_bytes([base; 32])],
            hash: ChunkHash::from_bytes([base ^ 0xFF; 32]),
            stored_size: stored,
        }
    }

    #[test]
    fn a_chunk_with_an_applicable_patch_is_fetched_as_the_patch() {
        let chunks: Vec<_> = (0..6).map(|n| entry(n, 100)).collect();
        // Patches for chunks 1, 2 and 4; the device lacks the base of 4's.
        let patches = vec![
            patch(&chunks[1], 101, 10),
            patch(&chunks[2], 102, 10),
            patch(&chunks[4], 104, 10),
        ];
        let held = |p: &PatchEntry| p.base[0] != ChunkHash::from_bytes([104; 32]);
        let plan = plan(&chunks, &patches, &ChunkSet::new(6), |_| None, held, WIDE);
        assert_eq!(plan.patch_spans, vec![Span { first: 0, count: 2 }]);
        assert_eq!(plan.patch_targets[&0], 1);
        assert_eq!(plan.patch_targets[&1], 2);
        assert_eq!(
            plan.spans,
            vec![Span { first: 0, count: 1 }, Span { first: 3, count: 3 }],
            "chunk 4 comes whole: its patch's base is not on the device"
        );
        assert_eq!(plan.patch_bytes(&patches), 20);
        assert_eq!(plan.fetched_bytes(&chunks), 400);
    }

    #[test]
    fn a_copied_or_journaled_chunk_needs_no_patch() {
        let chunks: Vec<_> = (0..3).map(|n| entry(n, 100)).collect();
        let patches = vec![patch(&chunks[0], 1, 10), patch(&chunks[2], 3, 10)];
        let done = ChunkSet::from_ranges(3, &[[0, 1]]);
        let plan = plan(
            &chunks,
            &patches,
            &done,
            |e| (e.hash == chunks[2].hash).then_some(0),
            |_| true,
            WIDE,
        );
        assert!(plan.patch_spans.is_empty());
        assert_eq!(plan.copies.len(), 1);
        assert_eq!(plan.spans, vec![Span { first: 1, count: 1 }]);
    }

    #[test]
    fn chunk_sets_round_trip_through_ranges() {
        let mut set = ChunkSet::new(200);
        for i in [0, 1, 2, 5, 64, 65, 199, 100, 63] {
            set.insert(i);
        }
        set.insert(5);
        assert_eq!(set.len(), 9);
        let ranges = set.ranges();
        assert_eq!(
            ranges,
            vec![[0, 3], [5, 6], [63, 66], [100, 101], [199, 200]]
        );
        assert_eq!(ChunkSet::from_ranges(200, &ranges), set);
        set.remove(64);
        assert!(!set.contains(64) && set.len() == 8);
        // A journal naming chunks past the end does not panic.
        let odd = ChunkSet::from_ranges(10, &[[8, 50], [u64::MAX - 1, u64::MAX]]);
        assert_eq!(odd.ranges(), vec![[8, 10]]);
        assert!(!ChunkSet::new(3).is_complete());
        assert!(ChunkSet::from_ranges(3, &[[0, 3]]).is_complete());
    }
}
