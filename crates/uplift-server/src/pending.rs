//! The device channel's side of enrollment approval: a device whose request
//! waits for an operator keeps its connection, is told it waits
//! (`enrollment_pending`, if it understands it), and carries on the moment
//! the request is decided: accepted, with its ID over the same connection;
//! rejected, with the operator's reason. The decision itself is
//! [`crate::service::enrollment`]'s.

use crate::service::enrollment::{self, Admission};
use crate::state::AppState;
use axum::extract::ws::{Message, WebSocket};
use std::time::Duration;
use uplift_proto::channel::{self, ServerMsg};
use uplift_proto::{DeviceId, DeviceType, ErrorKind, HardwareId, WireError};

/// How often a waiting device is told it still waits (a frame keeps NATs
/// and the agent's read timeout open), and how often the request is looked
/// at again for a decision made on another replica; one made here wakes
/// the device at once.
const LOOK_EVERY: Duration = Duration::from_secs(5);

/// How a wait ended without an ID.
#[derive(Debug)]
pub enum WaitEnd {
    /// The device is told this, and the channel closes.
    Refused(WireError),
    /// The device went away (or the server is stopping): nothing to tell.
    Gone,
}

/// A waiting device's identity, as it enrolled.
#[derive(Debug)]
pub struct Waiting<'a> {
    pub device_type: &'a DeviceType,
    pub hardware_id: &'a HardwareId,
    pub public_key: &'a str,
    /// It takes `enrollment_pending` frames.
    pub told: bool,
}

/// Holds `socket` until the request of `who` is decided; the device's ID
/// and its private addresses once accepted.
pub async fn wait(
    state: &AppState,
    socket: &mut WebSocket,
    who: Waiting<'_>,
    request: i64,
) -> Result<(DeviceId, Vec<String>), WaitEnd> {
    let mut decisions = state.enrollment.decisions();
    let mut shutdown = state.shutdown.clone();
    let mut look = tokio::time::interval(LOOK_EVERY);
    let message = format!(
        "enrollment request {request} waits for an operator to accept this device (hardware ID \
         {}, key {}): `uplift devices accept {request}`",
        who.hardware_id,
        enrollment::key_fingerprint(who.public_key)
    );
    tracing::info!(request, hardware_id = %who.hardware_id, device_type = %who.device_type, "enrollment waits for an operator");
    loop {
        tokio::select! {
            _ = look.tick() => {
                let frame = if who.told {
                    Message::Text(
                        channel::encode(&ServerMsg::EnrollmentPending {
                            message: message.clone(),
                        })
                        .into(),
                    )
                } else {
                    Message::Ping(Vec::new().into())
                };
                if tokio::time::timeout(Duration::from_secs(10), socket.send(frame))
                    .await
                    .map_or(true, |sent| sent.is_err())
                {
                    return Err(WaitEnd::Gone);
                }
            }
            _ = decisions.changed() => {}
            _ = shutdown.changed() => return Err(WaitEnd::Gone),
            frame = socket.recv() => match frame {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Err(WaitEnd::Gone),
                // A waiting device has nothing to say; pongs and the like.
                Some(Ok(_)) => continue,
            },
        }
        let admission = enrollment::admit(
            state,
            who.device_type,
            who.hardware_id,
            who.public_key,
            None,
        )
        .await;
        match admission {
            Ok(Admission::Pending(_)) => continue,
            Ok(Admission::Device { id, addresses }) => return Ok((id, addresses)),
            Ok(Admission::Removed { id, at }) => {
                return Err(WaitEnd::Refused(crate::channel::removed(&id, Some(at))))
            }
            Err(e) if e.kind() == ErrorKind::EnrollmentRejected => {
                return Err(WaitEnd::Refused(WireError::new(e.kind(), e.to_string())))
            }
            // The store failed: looked at again at the next tick.
            Err(e) => tracing::warn!(request, "looking at an enrollment request failed: {e}"),
        }
    }
}
