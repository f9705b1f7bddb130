//! Enrollment: what becomes of a device that proved its key and presented
//! a valid enrollment token. In `[enrollment] mode = "tokens"` (the
//! default) it is enrolled at once. In `mode = "approval"` its request goes
//! into a pending list and the device waits, connected (see
//! [`crate::pending`]), until an operator accepts it (it gets its ID and
//! carries on over the same connection) or rejects it (it is told why and
//! stops). A rejected key stays rejected: its device is refused at once on
//! every later attempt and never comes back into the pending list, unless an
//! operator accepts the rejected request (which is how a mistake is undone).

use super::{audit, ServiceError, ServiceResult};
use crate::auth::Principal;
use crate::config::EnrollmentMode;
use crate::state::AppState;
use crate::store::control::{EnrollmentDecision, EnrollmentRecord, NewEnrollmentRequest};
use crate::store::{NewDevice, Timestamp};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use uplift_proto::auth::{AuditAction, TokenView};
use uplift_proto::enrollment::{EnrollmentRequestView, EnrollmentState, MAX_REASON_CHARS};
use uplift_proto::{DeviceId, DeviceType, HardwareId};

/// The server's enrollment mode, and the signal that wakes this replica's
/// waiting devices when an operator decides (other replicas' decisions are
/// found by [`crate::pending`]'s periodic look).
#[derive(Debug)]
pub struct Enrollment {
    pub mode: EnrollmentMode,
    decided: watch::Sender<u64>,
}

impl Enrollment {
    pub fn new(mode: EnrollmentMode) -> Self {
        Self {
            mode,
            decided: watch::channel(0).0,
        }
    }

    /// Changes whenever an operator decides on this replica.
    pub fn decisions(&self) -> watch::Receiver<u64> {
        self.decided.subscribe()
    }

    fn announce(&self) {
        self.decided.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// `SHA256:` and the hex digest of the key's 32 bytes (of the text if it is
/// not base64, which the channel refuses before it gets here). The agent
/// logs the same while it waits, so the operator can match the two.
pub fn key_fingerprint(public_key: &str) -> String {
    let bytes = B64
        .decode(public_key)
        .unwrap_or_else(|_| public_key.as_bytes().to_vec());
    format!("SHA256:{}", hex::encode(Sha256::digest(bytes)))
}

/// What a device that proved its key gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Its ID: enrolled now, or before (a device that lost its ID gets the
    /// same one back), with the private addresses it holds.
    Device {
        id: DeviceId,
        addresses: Vec<String>,
    },
    /// Its key belongs to a device an operator removed.
    Removed { id: DeviceId, at: Timestamp },
    /// It waits for an operator.
    Pending(EnrollmentRecord),
}

/// Admits a device that proved it holds `public_key` and presented a valid
/// enrollment token: one of the configuration's, or `token` (made with
/// `uplift token create`), of which one use is counted when a new device
/// is stored or a new request made (refused if it is used up). Asked again
/// while it waits, it answers as the request now stands (no second request
/// is made for one key, and no second use counted).
pub async fn admit(
    state: &AppState,
    device_type: &DeviceType,
    hardware_id: &HardwareId,
    public_key: &str,
    token: Option<&TokenView>,
) -> ServiceResult<Admission> {
    // The device proved it holds this key: if the key is already enrolled
    // the device lost its ID (crash before saving it) and gets it back.
    if let Some(existing) = state.store.device_by_public_key(public_key).await? {
        return Ok(match existing.removed_at {
            Some(at) => Admission::Removed {
                id: existing.id,
                at,
            },
            None => Admission::Device {
                id: existing.id,
                addresses: existing.private_addresses,
            },
        });
    }
    match state.enrollment.mode {
        EnrollmentMode::Tokens => {
            if let Some(token) = token {
                super::tokens::use_for_enrollment(state, token).await?;
            }
            let id = new_device_id();
            store_device(state, &id, device_type, hardware_id, public_key).await?;
            Ok(Admission::Device {
                id,
                addresses: Vec::new(),
            })
        }
        EnrollmentMode::Approval => {
            if let Some(token) = token {
                if state
                    .store
                    .enrollment_request_by_key(public_key)
                    .await?
                    .is_none()
                {
                    super::tokens::use_for_enrollment(state, token).await?;
                }
            }
            let record = state
                .store
                .request_enrollment(&NewEnrollmentRequest {
                    public_key,
                    key_fingerprint: &key_fingerprint(public_key),
                    device_type,
                    hardware_id,
                    requested_at: Timestamp::now(),
                })
                .await?;
            match (record.view.state, &record.view.device_id) {
                (EnrollmentState::Pending, _) => Ok(Admission::Pending(record)),
                (EnrollmentState::Rejected, _) => Err(rejected(&record.view)),
                // Accepted, but the device row is not there: the accepting
                // server stopped between its two steps. The decision
                // stands; the device is stored now, under the ID given.
                (EnrollmentState::Accepted, Some(id)) => {
                    let (request, id) = (record.view.clone(), id.clone());
                    store_device(
                        state,
                        &id,
                        &request.device_type,
                        &request.hardware_id,
                        &record.public_key,
                    )
                    .await?;
                    Ok(Admission::Device {
                        id,
                        addresses: Vec::new(),
                    })
                }
                (EnrollmentState::Accepted, None) => {
                    Err(ServiceError::Store(crate::store::StoreError::Corrupt {
                        what: "enrollment request",
                        detail: format!("request {} is accepted without an ID", record.view.id),
                    }))
                }
            }
        }
    }
}

/// The refusal of a rejected request, with the operator's reason.
fn rejected(request: &EnrollmentRequestView) -> ServiceError {
    ServiceError::EnrollmentRejected {
        id: request.id,
        at: request.decided_at.clone().unwrap_or_default(),
        reason: request.reason.clone(),
    }
}

fn new_device_id() -> DeviceId {
    format!("dev-{}", hex::encode(rand::random::<[u8; 8]>()))
        .parse()
        .expect("generated device ids are valid")
}

async fn store_device(
    state: &AppState,
    id: &DeviceId,
    device_type: &DeviceType,
    hardware_id: &HardwareId,
    public_key: &str,
) -> ServiceResult<()> {
    state
        .store
        .insert_device(&NewDevice {
            id: id.clone(),
            device_type: device_type.clone(),
            hardware_id: hardware_id.clone(),
            public_key: public_key.to_owned(),
            enrolled_at: Timestamp::now(),
        })
        .await?;
    state.stats.fleet_size.changed();
    tracing::info!(device = %id, %device_type, %hardware_id, "device enrolled");
    // A new device has no tags yet: it joins the rollouts of its whole type.
    super::rollouts::join_dynamic(state, id, device_type, &[]).await;
    Ok(())
}

/// Enrollment requests in `state` (every one if `None`), oldest first.
pub async fn list(
    state: &AppState,
    only: Option<EnrollmentState>,
) -> ServiceResult<Vec<EnrollmentRequestView>> {
    Ok(state
        .store
        .enrollment_requests(only)
        .await?
        .into_iter()
        .map(|r| r.view)
        .collect())
}

/// Accepts request `id` (pending, or rejected before): the device is
/// stored with a new ID, and if it waits on this replica it carries on at
/// once.
pub async fn accept(
    state: &AppState,
    actor: &Principal,
    id: i64,
) -> ServiceResult<EnrollmentRequestView> {
    let result = async {
        let device_id = new_device_id();
        // Decided first, in one statement that only one operator can win;
        // then the device is stored (see admit() for a stop in between).
        let record = decide(
            state,
            actor,
            id,
            &EnrollmentDecision::Accept {
                device_id: &device_id,
            },
        )
        .await?;
        let view = &record.view;
        store_device(
            state,
            &device_id,
            &view.device_type,
            &view.hardware_id,
            &record.public_key,
        )
        .await?;
        Ok(record.view)
    }
    .await;
    audit::record(
        state,
        actor,
        AuditAction::EnrollmentAccept,
        &target(id, &result),
        &result,
    )
    .await;
    state.enrollment.announce();
    result
}

/// Rejects pending request `id`; the device is told `reason`.
pub async fn reject(
    state: &AppState,
    actor: &Principal,
    id: i64,
    reason: Option<String>,
) -> ServiceResult<EnrollmentRequestView> {
    let result = async {
        let reason = reason
            .map(|r| r.trim().to_owned())
            .filter(|r| !r.is_empty());
        if let Some(r) = &reason {
            let chars = r.chars().count();
            if chars > MAX_REASON_CHARS || r.chars().any(char::is_control) {
                return Err(ServiceError::BadReason { chars });
            }
        }
        let decision = EnrollmentDecision::Reject {
            reason: reason.as_deref(),
        };
        Ok(decide(state, actor, id, &decision).await?.view)
    }
    .await;
    audit::record(
        state,
        actor,
        AuditAction::EnrollmentReject,
        &target(id, &result),
        &result,
    )
    .await;
    state.enrollment.announce();
    result
}

async fn decide(
    state: &AppState,
    actor: &Principal,
    id: i64,
    decision: &EnrollmentDecision<'_>,
) -> ServiceResult<EnrollmentRecord> {
    let now = Timestamp::now();
    match state
        .store
        .decide_enrollment(id, decision, &actor.name, now)
        .await?
    {
        None => Err(ServiceError::EnrollmentNotFound { id }),
        Some((record, true)) => {
            tracing::info!(request = id, state = record.view.state.as_str(), by = %actor.name, hardware_id = %record.view.hardware_id, "enrollment decided");
            Ok(record)
        }
        Some((record, false)) => Err(ServiceError::EnrollmentDecided {
            id,
            state: record.view.state,
        }),
    }
}

fn target(id: i64, result: &ServiceResult<EnrollmentRequestView>) -> String {
    match result {
        Ok(view) => format!("enrollment {id} ({})", view.hardware_id),
        Err(_) => format!("enrollment {id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::testing;

    #[test]
    fn a_fingerprint_is_the_sha256_of_the_keys_bytes() {
        let key = B64.encode([7u8; 32]);
        assert_eq!(
            key_fingerprint(&key),
            format!("SHA256:{}", hex::encode(Sha256::digest([7u8; 32])))
        );
    }

    #[tokio::test]
    async fn approval_holds_a_new_key_until_accepted_and_a_rejected_key_stays_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = testing::state(dir.path()).await;
        state.enrollment = Enrollment::new(EnrollmentMode::Approval);
        let admin = Principal::bootstrap_admin();
        let (gw, hw): (DeviceType, HardwareId) = ("gw".parse().unwrap(), "hw-1".parse().unwrap());
        let key = B64.encode([1u8; 32]);

        let Admission::Pending(first) = admit(&state, &gw, &hw, &key, None).await.unwrap() else {
            panic!("a new key waits")
        };
        let Admission::Pending(again) = admit(&state, &gw, &hw, &key, None).await.unwrap() else {
            panic!("and still waits when asked again")
        };
        assert_eq!(first.view.id, again.view.id, "one request per key");
        assert_eq!(
            list(&state, Some(EnrollmentState::Pending))
                .await
                .unwrap()
                .len(),
            1
        );

        let accepted = accept(&state, &admin, first.view.id).await.unwrap();
        let id = accepted
            .device_id
            .clone()
            .expect("an accepted request has an ID");
        assert_eq!(
            admit(&state, &gw, &hw, &key, None).await.unwrap(),
            Admission::Device {
                id,
                addresses: Vec::new()
            }
        );
        assert!(matches!(
            reject(&state, &admin, first.view.id, None).await,
            Err(ServiceError::EnrollmentDecided {
                state: EnrollmentState::Accepted,
                ..
            })
        ));

        let other = B64.encode([2u8; 32]);
        let Admission::Pending(request) = admit(&state, &gw, &hw, &other, None).await.unwrap()
        else {
            panic!("a new key waits")
        };
        reject(&state, &admin, request.view.id, Some("not ours".into()))
            .await
            .unwrap();
        let refused = admit(&state, &gw, &hw, &other, None).await.unwrap_err();
        assert_eq!(refused.kind(), uplift_proto::ErrorKind::EnrollmentRejected);
        assert!(refused.to_string().contains("not ours"), "{refused}");
        assert!(list(&state, Some(EnrollmentState::Pending))
            .await
            .unwrap()
            .is_empty());
    }
}
