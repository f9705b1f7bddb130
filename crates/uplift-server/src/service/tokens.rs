//! API tokens: made with a role and shown once, stored only as a digest,
//! listed without secrets, expired and revoked; and the lookup that turns
//! a presented token into a [`Principal`].

use super::{audit, ServiceError, ServiceResult};
use crate::auth::Principal;
use crate::state::AppState;
use crate::store::control::NewApiToken;
use crate::store::Timestamp;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uplift_proto::auth::{AuditAction, Role, TokenCreate, TokenCreated, TokenView};

/// Made tokens start with this, so a leaked one is recognisable (secret
/// scanners) and the bootstrap token's lookup is skipped for them.
pub const TOKEN_PREFIX: &str = "uplift_";

/// Longest lifetime a token may be given: ten years.
pub const MAX_EXPIRES_IN_SECS: u64 = 10 * 366 * 24 * 3600;
/// The most devices one enrollment token may be limited to: a billion is
/// past any fleet, and stays inside the 32-bit integer the API document
/// states for it (clients in other languages read it as one).
pub const MAX_TOKEN_USES: u32 = 1_000_000_000;

/// The stored form of a secret. A token holds 192 random bits, so there is
/// no dictionary to try and a fast digest serves as well as a slow
/// password hash would; it also lets every request look a token up by it.
pub fn secret_digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `token` works at `now`: not revoked, not expired. An expiry
/// that does not parse counts as expired: fail closed.
pub fn usable(token: &TokenView, now: OffsetDateTime) -> bool {
    if token.revoked_at.is_some() {
        return false;
    }
    match token.expires_at.as_deref() {
        None => true,
        Some(text) => Timestamp::parse_rfc3339(text).is_ok_and(|expires| now < expires.instant()),
    }
}

/// The usable token `secret` is, if it is one of ours.
async fn find(
    state: &AppState,
    secret: &str,
    now: OffsetDateTime,
) -> ServiceResult<Option<TokenView>> {
    if !secret.starts_with(TOKEN_PREFIX) || secret.len() > 128 {
        return Ok(None);
    }
    let found = state
        .store
        .api_token_by_digest(&secret_digest(secret))
        .await?;
    Ok(found.filter(|t| usable(t, now)))
}

/// The usable token with the enrollment role that `secret` is, if it is
/// one (beside the enrollment tokens of the server's configuration).
pub async fn enrollment_token(
    state: &AppState,
    secret: &str,
    now: OffsetDateTime,
) -> ServiceResult<Option<TokenView>> {
    Ok(find(state, secret, now)
        .await?
        .filter(|t| t.role == Role::Enrollment))
}

/// Whether `secret` is a usable token with the enrollment role.
pub async fn may_enroll(
    state: &AppState,
    secret: &str,
    now: OffsetDateTime,
) -> ServiceResult<bool> {
    Ok(enrollment_token(state, secret, now).await?.is_some())
}

/// Counts one use of enrollment token `token` for a new device, or refuses
/// it when it has enrolled as many as it may.
pub async fn use_for_enrollment(state: &AppState, token: &TokenView) -> ServiceResult<()> {
    if state.store.use_api_token(token.id).await? {
        return Ok(());
    }
    Err(ServiceError::TokenUsedUp {
        id: token.id,
        name: token.name.to_string(),
        max_uses: token.max_uses.unwrap_or(0),
    })
}

/// Why `secret` does not enroll a device, in words that say what to do:
/// expired, revoked, an API token of another role, or none of ours.
pub async fn enrollment_refusal(
    state: &AppState,
    secret: &str,
    now: OffsetDateTime,
) -> ServiceResult<String> {
    const FIX: &str = "set enrollment_token in the agent config to one of the server's \
                       enrollment tokens, or one made with `uplift token create --role enrollment`";
    let found = if secret.starts_with(TOKEN_PREFIX) && secret.len() <= 128 {
        state
            .store
            .api_token_by_digest(&secret_digest(secret))
            .await?
    } else {
        None
    };
    Ok(match found {
        None => format!("enrollment token not accepted (it is none of this server's); {FIX}"),
        Some(t) => {
            let which = format!("enrollment token {} ({})", t.id, t.name);
            if let Some(at) = &t.revoked_at {
                format!("{which} was revoked at {at}; {FIX}")
            } else if !usable(&t, now) {
                let at = t.expires_at.as_deref().unwrap_or("-");
                format!("{which} expired at {at}; {FIX}")
            } else if t.role != Role::Enrollment {
                format!(
                    "token {} ({}) has role {}, not enrollment, so it enrolls no device; {FIX}",
                    t.id, t.name, t.role
                )
            } else {
                // Usable with the enrollment role: it was accepted a moment
                // ago and changed since (revoked or expired in between).
                format!("{which} is no longer accepted; {FIX}")
            }
        }
    })
}

/// The principal `token` stands for, or `None` if it is no token, or one
/// revoked or expired.
pub async fn authenticate(
    state: &AppState,
    token: &str,
    now: OffsetDateTime,
) -> ServiceResult<Option<Principal>> {
    if state.secrets.is_admin(token) {
        return Ok(Some(Principal::bootstrap_admin()));
    }
    Ok(find(state, token, now)
        .await?
        .map(|t| Principal::of_token(t.id, t.name.as_str(), t.role)))
}

/// Makes a token; its secret is in the answer and nowhere else.
pub async fn create(
    state: &AppState,
    actor: &Principal,
    request: TokenCreate,
) -> ServiceResult<TokenCreated> {
    let result = create_unaudited(state, actor, &request).await;
    let target = match &result {
        Ok(created) => format!("token {} ({})", created.token.id, created.token.name),
        Err(_) => format!("token ({})", request.name),
    };
    audit::record(state, actor, AuditAction::TokenCreate, &target, &result).await;
    result
}

async fn create_unaudited(
    state: &AppState,
    actor: &Principal,
    request: &TokenCreate,
) -> ServiceResult<TokenCreated> {
    let now = OffsetDateTime::now_utc();
    let expires_at = match request.expires_in_secs {
        Some(secs) if secs.get() > MAX_EXPIRES_IN_SECS => {
            return Err(ServiceError::ExpiryTooFar { secs: secs.get() })
        }
        Some(secs) => Some(Timestamp::from(
            now + time::Duration::seconds(secs.get() as i64),
        )),
        None => None,
    };
    if let Some(max_uses) = request.max_uses.filter(|n| n.get() > MAX_TOKEN_USES) {
        return Err(ServiceError::TooManyUses {
            max_uses: max_uses.get(),
        });
    }
    let secret = format!("{TOKEN_PREFIX}{}", hex::encode(rand::random::<[u8; 24]>()));
    let token = state
        .store
        .insert_api_token(&NewApiToken {
            name: &request.name,
            role: request.role,
            secret_sha256: &secret_digest(&secret),
            created_at: Timestamp::from(now),
            created_by: &actor.name,
            expires_at,
            max_uses: request.max_uses.map(|n| n.get()),
        })
        .await?;
    tracing::info!(token = token.id, name = %token.name, role = %token.role, by = %actor.name, "API token created");
    Ok(TokenCreated { token, secret })
}

pub async fn list(state: &AppState) -> ServiceResult<Vec<TokenView>> {
    Ok(state.store.list_api_tokens().await?)
}

/// Revokes token `id` at once: its next request is refused. Revoking a
/// revoked token changes nothing and succeeds.
pub async fn revoke(state: &AppState, actor: &Principal, id: i64) -> ServiceResult<TokenView> {
    let result = async {
        state
            .store
            .revoke_api_token(id, Timestamp::now())
            .await?
            .ok_or(ServiceError::TokenNotFound { id })
    }
    .await;
    let target = match &result {
        Ok(token) => format!("token {} ({})", token.id, token.name),
        Err(_) => format!("token {id}"),
    };
    audit::record(state, actor, AuditAction::TokenRevoke, &target, &result).await;
    if result.is_ok() {
        tracing::info!(token = id, by = %actor.name, "API token revoked");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::testing;
    use std::num::NonZeroU64;

    fn request(name: &str, role: Role, expires_in_secs: Option<u64>) -> TokenCreate {
        TokenCreate {
            name: name.parse().unwrap(),
            role,
            expires_in_secs: expires_in_secs.and_then(NonZeroU64::new),
            max_uses: None,
        }
    }

    #[tokio::test]
    async fn a_made_token_works_with_its_role_until_revoked_and_its_secret_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        let admin = Principal::bootstrap_admin();
        let made = create(&state, &admin, request("ci", Role::ReleaseManager, None))
            .await
            .unwrap();
        assert!(made.secret.starts_with(TOKEN_PREFIX));
        assert_eq!(made.token.created_by, "bootstrap-admin");
        let now = OffsetDateTime::now_utc();
        let principal = authenticate(&state, &made.secret, now).await.unwrap();
        assert_eq!(
            principal,
            Some(Principal::of_token(
                made.token.id,
                "ci",
                Role::ReleaseManager
            ))
        );
        // Only the digest is in the database file.
        let db = std::fs::read(dir.path().join("uplift.db")).unwrap();
        let wal = std::fs::read(dir.path().join("uplift.db-wal")).unwrap_or_default();
        for bytes in [&db, &wal] {
            assert!(!bytes
                .windows(made.secret.len())
                .any(|w| w == made.secret.as_bytes()));
        }

        let revoked = revoke(&state, &admin, made.token.id).await.unwrap();
        assert!(revoked.revoked_at.is_some());
        assert_eq!(authenticate(&state, &made.secret, now).await.unwrap(), None);
        // Again: nothing changes, still a success.
        assert_eq!(
            revoke(&state, &admin, made.token.id).await.unwrap(),
            revoked
        );
        assert!(matches!(
            revoke(&state, &admin, 999).await,
            Err(ServiceError::TokenNotFound { id: 999 })
        ));
    }

    #[tokio::test]
    async fn an_expired_token_is_refused_and_wrong_tokens_are_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        let admin = Principal::bootstrap_admin();
        let made = create(&state, &admin, request("temp", Role::Viewer, Some(60)))
            .await
            .unwrap();
        let now = OffsetDateTime::now_utc();
        assert!(authenticate(&state, &made.secret, now)
            .await
            .unwrap()
            .is_some());
        let later = now + time::Duration::seconds(61);
        assert_eq!(
            authenticate(&state, &made.secret, later).await.unwrap(),
            None
        );
        let refusal = enrollment_refusal(&state, &made.secret, later)
            .await
            .unwrap();
        assert!(
            refusal.contains(&format!(
                "enrollment token {} (temp) expired at",
                made.token.id
            )),
            "{refusal}"
        );
        let refusal = enrollment_refusal(&state, &made.secret, now).await.unwrap();
        assert!(
            refusal.contains("has role viewer, not enrollment"),
            "{refusal}"
        );
        revoke(&state, &admin, made.token.id).await.unwrap();
        let refusal = enrollment_refusal(&state, &made.secret, now).await.unwrap();
        assert!(refusal.contains("was revoked at"), "{refusal}");
        let refusal = enrollment_refusal(&state, "uplift_00", now).await.unwrap();
        assert!(refusal.contains("none of this server's"), "{refusal}");
        for wrong in [
            "",
            "uplift_",
            "uplift_00",
            "admin2",
            &made.secret[..made.secret.len() - 1],
        ] {
            assert_eq!(
                authenticate(&state, wrong, now).await.unwrap(),
                None,
                "{wrong:?}"
            );
        }
        // The test state's bootstrap token is "admin".
        assert_eq!(
            authenticate(&state, "admin", now).await.unwrap(),
            Some(Principal::bootstrap_admin())
        );
        let too_far = create(
            &state,
            &admin,
            request("forever", Role::Admin, Some(MAX_EXPIRES_IN_SECS + 1)),
        )
        .await;
        assert!(matches!(too_far, Err(ServiceError::ExpiryTooFar { .. })));
        let mut too_many = request("fleet", Role::Enrollment, None);
        too_many.max_uses = std::num::NonZeroU32::new(MAX_TOKEN_USES + 1);
        let refused = create(&state, &admin, too_many).await.unwrap_err();
        assert!(
            matches!(refused, ServiceError::TooManyUses { max_uses } if max_uses == MAX_TOKEN_USES + 1),
            "{refused:?}"
        );
        assert_eq!(refused.kind(), uplift_proto::ErrorKind::BadRequest);
    }

    #[tokio::test]
    async fn only_a_live_enrollment_token_enrolls_and_it_reads_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        let admin = Principal::bootstrap_admin();
        let line = create(&state, &admin, request("line-2", Role::Enrollment, None))
            .await
            .unwrap();
        let viewer = create(&state, &admin, request("dash", Role::Viewer, None))
            .await
            .unwrap();
        let now = OffsetDateTime::now_utc();
        assert!(may_enroll(&state, &line.secret, now).await.unwrap());
        assert!(!may_enroll(&state, &viewer.secret, now).await.unwrap());
        assert!(!may_enroll(&state, "admin", now).await.unwrap());
        let as_caller = authenticate(&state, &line.secret, now)
            .await
            .unwrap()
            .unwrap();
        assert!(crate::auth::check(&as_caller, uplift_proto::auth::Permission::Read).is_err());
        revoke(&state, &admin, line.token.id).await.unwrap();
        assert!(!may_enroll(&state, &line.secret, now).await.unwrap());
    }

    #[test]
    fn an_expiry_that_does_not_parse_fails_closed() {
        let token = TokenView {
            id: 1,
            name: "x".parse().unwrap(),
            role: Role::Admin,
            created_at: "2026-01-01T00:00:00Z".into(),
            created_by: "bootstrap-admin".into(),
            expires_at: Some("someday".into()),
            revoked_at: None,
            max_uses: None,
            uses: 0,
        };
        assert!(!usable(&token, OffsetDateTime::now_utc()));
    }
}
