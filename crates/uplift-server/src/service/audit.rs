//! The audit log: every change an operator makes, who made it, to what,
//! when, and how it ended. Written by the service functions that make the
//! changes (so the API, the CLI and the web page are all recorded), read
//! newest first with filters; nothing changes or deletes an entry.

use super::{ServiceError, ServiceResult};
use crate::auth::Principal;
use crate::state::AppState;
use crate::store::control::NewAuditEntry;
use crate::store::Timestamp;
use uplift_proto::auth::{AuditAction, AuditPage, AuditQuery, MAX_AUDIT_PAGE};
use uplift_proto::WireError;

/// Entries in a page when the query does not say.
pub const DEFAULT_AUDIT_PAGE: u32 = 100;

/// Records `action` by `actor` on `target` and how it ended. The change has
/// already happened (or failed), so a log that cannot be written is said in
/// the server's log rather than turned into a failure of the change.
pub async fn record<T>(
    state: &AppState,
    actor: &Principal,
    action: AuditAction,
    target: &str,
    result: &ServiceResult<T>,
) {
    let error = result
        .as_ref()
        .err()
        .map(|e| WireError::new(e.kind(), e.to_string()));
    let entry = NewAuditEntry {
        at: Timestamp::now(),
        actor: &actor.name,
        token_id: actor.token_id,
        role: actor.role,
        action,
        target,
        error: error.as_ref(),
    };
    if let Err(e) = state.store.append_audit(&entry).await {
        tracing::error!(%action, target, actor = %actor.name, "audit log not written: {e}");
    }
}

pub async fn list(state: &AppState, query: AuditQuery) -> ServiceResult<AuditPage> {
    let limit = query.limit.unwrap_or(DEFAULT_AUDIT_PAGE);
    if limit == 0 || limit > MAX_AUDIT_PAGE {
        return Err(ServiceError::PageSize {
            limit,
            max: MAX_AUDIT_PAGE,
        });
    }
    // One more than asked, to know whether there is an older page.
    let mut entries = state.store.audit_entries(&query, limit + 1).await?;
    let next = if entries.len() > limit as usize {
        entries.truncate(limit as usize);
        entries.last().map(|e| e.id)
    } else {
        None
    };
    Ok(AuditPage { entries, next })
}
