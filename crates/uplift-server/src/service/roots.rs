//! Publishing roots of trust and serving the chain to devices. The server
//! never holds a root key, so it cannot make a root; it checks what it can
//! before storing one (well formed, the next version, signed by a threshold
//! of the previous root's root keys and of its own), so an operator's
//! mistake is refused at publish time rather than by every device. The
//! agents check the chain again themselves (`TrustedRoot::update_chain`):
//! the server's word is not what they trust.

use super::{audit, ServiceError, ServiceResult};
use crate::auth::Principal;
use crate::state::AppState;
use crate::store::{RootRecord, Timestamp};
use time::OffsetDateTime;
use uplift_proto::auth::AuditAction;
use uplift_proto::trust::{RootView, MAX_ROOTS_PER_ANSWER};
use uplift_release::keys::ReleasePublicKey;
use uplift_release::root::{SignedRoot, TrustedRoot};
use uplift_release::ReleaseError;

/// Checks and stores `body` (a signed root, as `uplift root` writes it) as
/// the next published root; audited.
pub async fn publish(state: &AppState, actor: &Principal, body: &[u8]) -> ServiceResult<RootView> {
    let result = take_in(state, actor, body).await;
    let target = match &result {
        Ok(view) => format!("root {}", view.version),
        Err(_) => SignedRoot::from_json(body)
            .and_then(|r| r.parse_unverified())
            .map_or_else(
                |_| "root (unreadable)".to_owned(),
                |r| format!("root {}", r.version),
            ),
    };
    audit::record(state, actor, AuditAction::RootPublish, &target, &result).await;
    result
}

async fn take_in(state: &AppState, actor: &Principal, body: &[u8]) -> ServiceResult<RootView> {
    let signed = SignedRoot::from_json(body).map_err(refused)?;
    let previous = state.store.latest_root().await?;
    let trusted = accept(previous.as_ref(), &signed, OffsetDateTime::now_utc()).map_err(refused)?;
    let record = RootRecord {
        version: trusted.root().version,
        signed_json: String::from_utf8_lossy(&signed.to_json()).into_owned(),
        published_at: Timestamp::now(),
        published_by: actor.name.clone(),
    };
    state.store.insert_root(&record).await?;
    tracing::info!(version = record.version, by = %actor.name, "root of trust published");
    crate::freshness::check_against_newest_root(state).await;
    view(&record)
}

/// Whether `next` may follow `previous` (the newest published root, if
/// any) at `now`. The first root published is checked as a device checks
/// the root it ships with: signed by a threshold of its own root keys. A
/// root already expired is refused too: devices would take it as their
/// newest and then refuse every release until a newer one came. Pure.
pub fn accept(
    previous: Option<&RootRecord>,
    next: &SignedRoot,
    now: OffsetDateTime,
) -> Result<TrustedRoot, ReleaseError> {
    let trusted = match previous {
        None => TrustedRoot::initial(next)?,
        Some(previous) => {
            let previous =
                TrustedRoot::initial(&SignedRoot::from_json(previous.signed_json.as_bytes())?)?;
            previous.update(next)?
        }
    };
    trusted.check_current(now)?;
    Ok(trusted)
}

fn refused(source: ReleaseError) -> ServiceError {
    ServiceError::RootRefused { source }
}

/// Every published root, oldest first.
pub async fn list(state: &AppState) -> ServiceResult<Vec<RootView>> {
    state
        .store
        .roots_after(0, u32::MAX)
        .await?
        .iter()
        .map(view)
        .collect()
}

/// What a device is sent: the roots after `after`, oldest first, as a JSON
/// array of the signed envelopes as published (at most
/// [`MAX_ROOTS_PER_ANSWER`]; the device asks again from the last).
pub async fn chain_after(state: &AppState, after: u64) -> ServiceResult<Vec<u8>> {
    let roots = state
        .store
        .roots_after(after, MAX_ROOTS_PER_ANSWER as u32)
        .await?;
    let mut out = b"[".to_vec();
    for (i, root) in roots.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(root.signed_json.trim_end().as_bytes());
    }
    out.push(b']');
    Ok(out)
}

fn view(record: &RootRecord) -> ServiceResult<RootView> {
    let corrupt = |e: ReleaseError| {
        ServiceError::Store(crate::store::StoreError::Corrupt {
            what: "root",
            detail: format!("version {}: {e}", record.version),
        })
    };
    let signed = SignedRoot::from_json(record.signed_json.as_bytes()).map_err(corrupt)?;
    let root = signed.parse_unverified().map_err(corrupt)?;
    let ids = |keys: &[ReleasePublicKey]| keys.iter().map(ReleasePublicKey::key_id).collect();
    Ok(RootView {
        version: root.version,
        expires_at: root.expires_at.clone(),
        root_keys: ids(&root.root.keys),
        root_threshold: root.root.threshold,
        release_keys: ids(&root.release.keys),
        release_threshold: root.release.threshold,
        freshness_keys: root
            .freshness
            .as_ref()
            .map(|r| ids(&r.keys))
            .unwrap_or_default(),
        signed_by: signed.signatures.iter().map(|s| s.key_id.clone()).collect(),
        published_at: record.published_at.to_string(),
        published_by: record.published_by.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::stamp::ts;
    use uplift_release::keys::ReleaseSigningKey;
    use uplift_release::root::{Role, Root, ROOT_FORMAT};

    fn key(n: u8) -> ReleaseSigningKey {
        ReleaseSigningKey::from_seed([n; 32])
    }

    fn root(version: u64, root_keys: &[u8]) -> Root {
        Root {
            format: ROOT_FORMAT,
            version,
            expires_at: "2030-01-01T00:00:00Z".into(),
            root: Role {
                keys: root_keys.iter().map(|n| key(*n).public_key()).collect(),
                threshold: 2,
            },
            release: Role::one(key(9).public_key()),
            freshness: None,
        }
    }

    fn signed(root: &Root, by: &[u8]) -> SignedRoot {
        let keys: Vec<_> = by.iter().map(|n| key(*n)).collect();
        root.sign(&keys.iter().collect::<Vec<_>>()).unwrap()
    }

    fn record(root: &SignedRoot) -> RootRecord {
        RootRecord {
            version: root.parse_unverified().unwrap().version,
            signed_json: String::from_utf8(root.to_json()).unwrap(),
            published_at: ts("2026-01-01T00:00:00Z"),
            published_by: "test".into(),
        }
    }

    fn now() -> OffsetDateTime {
        time::macros::datetime!(2027-01-01 00:00 UTC)
    }

    #[test]
    fn a_root_already_expired_is_not_published() {
        let v1 = signed(&root(1, &[1, 2, 3]), &[1, 2]);
        let published = record(&v1);
        let v2 = signed(&root(2, &[1, 2, 3]), &[1, 2]);
        let after_expiry = time::macros::datetime!(2030-01-01 00:00 UTC);
        assert!(matches!(
            accept(Some(&published), &v2, after_expiry),
            Err(ReleaseError::RootExpired { version: 2, .. })
        ));
        assert!(matches!(
            accept(None, &v1, after_expiry),
            Err(ReleaseError::RootExpired { version: 1, .. })
        ));
        assert!(accept(Some(&published), &v2, now()).is_ok());
    }

    #[test]
    fn a_root_is_published_only_as_the_next_version_signed_by_old_and_new_root_keys() {
        let v1 = signed(&root(1, &[1, 2, 3]), &[1, 2]);
        assert!(accept(None, &v1, now()).is_ok());
        // Below its own threshold, the first root is refused.
        let lone = signed(&root(1, &[1, 2, 3]), &[1]);
        assert!(matches!(
            accept(None, &lone, now()),
            Err(ReleaseError::RootThreshold { .. })
        ));
        let published = record(&v1);
        // Signed by two new keys only: not by the old root's threshold.
        let v2 = signed(&root(2, &[4, 5, 6]), &[4, 5]);
        assert!(matches!(
            accept(Some(&published), &v2, now()),
            Err(ReleaseError::RootThreshold { .. })
        ));
        let v2 = signed(&root(2, &[2, 3, 4]), &[2, 3, 4]);
        assert!(accept(Some(&published), &v2, now()).is_ok());
        // Skipping a version, or repeating one, is refused.
        let v3 = signed(&root(3, &[2, 3, 4]), &[2, 3]);
        assert!(matches!(
            accept(Some(&published), &v3, now()),
            Err(ReleaseError::RootVersion { .. })
        ));
        assert!(matches!(
            accept(Some(&published), &v1, now()),
            Err(ReleaseError::RootVersion { .. })
        ));
    }
}
