//! The published roots of trust: what the server keeps of them and serves
//! to devices. A trait of its own beside [`super::Store`], like
//! [`super::ControlStore`]: roots are about trust, not about the fleet.

use super::{StoreResult, Timestamp};
use async_trait::async_trait;

/// One published root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootRecord {
    pub version: u64,
    /// The signed envelope, exactly as published.
    pub signed_json: String,
    pub published_at: Timestamp,
    /// Who published it, as the audit log names callers.
    pub published_by: String,
}

#[async_trait]
pub trait RootStore: Send + Sync {
    /// Stores a root; a version already stored is a
    /// [`super::StoreError::Conflict`] (two publishers racing, or a
    /// repeated publish).
    async fn insert_root(&self, root: &RootRecord) -> StoreResult<()>;
    /// The roots after version `after`, oldest first, at most `limit`.
    async fn roots_after(&self, after: u64, limit: u32) -> StoreResult<Vec<RootRecord>>;
    /// The newest root, if any was published.
    async fn latest_root(&self) -> StoreResult<Option<RootRecord>>;
}

/// The conflict a repeated version is.
pub(crate) fn version_taken(version: u64) -> super::StoreError {
    super::StoreError::Conflict(format!(
        "root version {version} is already published; roots are immutable: build version \
         {} with `uplift root next`",
        version + 1
    ))
}
