//! One device's private channel: a WebSocket over TLS that first proves who
//! the device is (enrollment or signature over a fresh nonce), then carries
//! pushes from the server and reports from the device until either side goes.

use crate::budget::Kind;
use crate::error::ApiError;
use crate::freshness;
use crate::hub::{OfferDue, Registered, RemovalEpoch, SessionSerial};
use crate::live::Applied;
use crate::service::enrollment::Admission;
use crate::state::AppState;
use crate::store::{DeviceTarget, Timestamp};
use crate::turns::{self, Turn};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, VerifyingKey};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use uplift_proto::api::device_manifest_path;
use uplift_proto::channel::{
    self, AgentMsg, AgentState, Feature, FrameError, Offer, Report, ServerMsg, FEATURES,
    MAX_FRAME_BYTES,
};
use uplift_proto::{DeviceId, DeviceType, ErrorKind, HardwareId, WireError};

const PING_EVERY: Duration = Duration::from_secs(20);
/// What the WebSocket layer reads at once, allocated (and touched) for
/// every channel for its whole life: tungstenite's default is 128 KiB, which
/// is 2.4 GiB at 19 000 idle sessions. A device's frames are a few hundred
/// bytes; a larger one (up to [`MAX_FRAME_BYTES`]) grows the buffer while it
/// is read.
const READ_BUFFER: usize = 4 << 10;
/// Frames go to the socket as they are sent (no write buffering: the
/// server's frames are single small messages), and at most this much may
/// queue behind a slow peer: one frame of the largest size and the pings
/// that may follow it. Past it a send fails and the session ends.
const MAX_WRITE_BUFFER: usize = 2 * MAX_FRAME_BYTES;

/// The WebSocket upgrade of a device channel. The connection's peer
/// address comes from the accept loop ([`crate::serve`]); a router served
/// some other way (tests) has none, and the device's address stays unknown.
pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let address = peer.map(|Extension(ConnectInfo(addr))| addr);
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return ApiError::from(rejection).into_response(),
    };
    // A channel holds a slot of its own budget for its whole life; the HTTP
    // connection's slot is freed once the upgrade hands the socket over.
    let slot = match state.budgets.try_take(Kind::DeviceChannel) {
        Ok(slot) => slot,
        Err(busy) => {
            tracing::warn!("refusing a device channel: {busy}");
            return busy.into_response();
        }
    };
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            let _slot = slot;
            if let Err(e) = session(state, socket, address).await {
                tracing::debug!("device channel ended: {e}");
            }
        })
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("peer refused: {0}")]
    Refused(WireError),
    #[error("socket: {0}")]
    Socket(#[from] axum::Error),
    #[error("peer closed or timed out")]
    Gone,
    #[error("replaced by a newer session of the same device")]
    Replaced,
}

async fn send(socket: &mut WebSocket, msg: &ServerMsg) -> Result<(), SessionError> {
    let frame = channel::encode(msg);
    timeout(
        Duration::from_secs(10),
        socket.send(Message::Text(frame.into())),
    )
    .await
    .map_err(|_| SessionError::Gone)??;
    Ok(())
}

/// Sends an error frame and ends the session with it.
async fn refuse(socket: &mut WebSocket, err: WireError) -> SessionError {
    tracing::info!(kind = %err.kind, "refusing device: {}", err.message);
    let _ = send(socket, &ServerMsg::Error(err.clone())).await;
    let _ = socket.send(Message::Close(None)).await;
    SessionError::Refused(err)
}

async fn session(
    state: Arc<AppState>,
    mut socket: WebSocket,
    address: Option<SocketAddr>,
) -> Result<(), SessionError> {
    let nonce: [u8; 32] = rand::random();
    send(
        &mut socket,
        &ServerMsg::Challenge {
            nonce: hex::encode(nonce),
        },
    )
    .await?;
    let auth_timeout = state.limits.auth_timeout();
    let first = match timeout(auth_timeout, next_text(&mut socket)).await {
        Ok(Ok(Some(text))) => text,
        Ok(Err(err)) => return Err(refuse(&mut socket, err).await),
        Ok(Ok(None)) => return Err(SessionError::Gone),
        Err(_) => {
            let err = WireError::new(
                ErrorKind::Unauthorized,
                format!(
                    "no enroll or authenticate frame within {} s of the challenge; closing the channel, \
                     connect again and answer the challenge at once",
                    auth_timeout.as_secs()
                ),
            );
            return Err(refuse(&mut socket, err).await);
        }
    };
    let hello = match decode_agent_msg(&first) {
        Ok(msg) => msg,
        Err(err) => return Err(refuse(&mut socket, err).await),
    };
    let peer = Peer::of(&hello);
    // The handshake's steps (key check, enrollment, an approval's wait)
    // run boxed: inline, the largest of them set the size of every
    // session's future for its whole life, idle included (5 176 bytes
    // with them inline, from `-Zprint-type-sizes`; the loop an idle
    // session waits in needs about 3 000).
    let checked = match Box::pin(check_key(&state, &nonce, hello)).await {
        Ok(KeyCheck::Known(checked)) => checked,
        // Approval mode: the connection is held until an operator decides.
        Ok(KeyCheck::Pending(p, removals)) => {
            let who = crate::pending::Waiting {
                device_type: &p.device_type,
                hardware_id: &p.hardware_id,
                public_key: &p.public_key,
                told: p.told,
            };
            match Box::pin(crate::pending::wait(&state, &mut socket, who, p.request)).await {
                Ok((device_id, held)) => Checked {
                    device_id,
                    enrolled: true,
                    held,
                    removals,
                },
                Err(crate::pending::WaitEnd::Refused(err)) => {
                    return Err(refuse(&mut socket, err).await)
                }
                Err(crate::pending::WaitEnd::Gone) => return Err(SessionError::Gone),
            }
        }
        Err(err) => return Err(refuse(&mut socket, err).await),
    };
    let device_id = checked.device_id.clone();

    // A signed token any replica accepts until it expires; renewed over
    // this channel (see `serve_device`).
    let token = state
        .downloads
        .issue(&device_id, crate::download_token::unix_now());
    // Its private addresses: those it holds, any a pool still owes it
    // assigned now (no database work when it has them all).
    let private_addresses = if state.addresses.is_empty() && checked.held.is_empty() {
        Vec::new()
    } else {
        crate::addresses::ensure(&state, &device_id, &checked.held).await
    };
    let (registered, mut target_changed) = match admit(&state, &checked).await {
        Ok(admitted) => admitted,
        Err(err) => return Err(refuse(&mut socket, err).await),
    };
    let Registered {
        serial, offer_due, ..
    } = registered;
    // From here on, whatever an older session of this device still has in
    // flight is not heard (see crate::live).
    state.live.claim_from(
        &device_id,
        serial,
        Timestamp::now(),
        address.map(shown_address),
    );
    let result = async {
        send(
            &mut socket,
            &ServerMsg::Welcome {
                device_id: device_id.clone(),
                session_token: token.text,
                enrolled: checked.enrolled,
                features: FEATURES.to_vec(),
                private_addresses,
            },
        )
        .await?;
        let offer = offer_now(&state, &device_id, peer);
        send(
            &mut socket,
            &freshness::seal(&state, &device_id, offer).await,
        )
        .await?;
        serve_device(
            &state,
            &device_id,
            Session {
                serial,
                peer,
                token_expires_at: token.expires_at,
            },
            &mut socket,
            &mut target_changed,
            &offer_due,
        )
        .await
    }
    .await;
    state.hub.unregister(&device_id, serial);
    if state.live.ended(&device_id, serial, Timestamp::now()) {
        // Offline devices hold no download turn; a newer session keeps its own.
        pass_turns(&state, state.turns.leave(&device_id));
    }
    result
}

/// A peer address as operators read it: `IP:port`, an IPv4 client of a
/// dual-stack listener as plain IPv4 (not `[::ffff:10.0.0.7]`), IPv6 in
/// brackets.
fn shown_address(addr: SocketAddr) -> String {
    SocketAddr::new(addr.ip().to_canonical(), addr.port()).to_string()
}

/// What the agent at the other end understands, from its hello.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// It can be told to hold its reboot ([`Feature::HoldReboot`]).
    pub holds_reboots: bool,
    /// It takes `download_token` frames ([`Feature::TokenRenewal`]).
    pub renews_tokens: bool,
}

/// One authenticated session as its loop keeps it.
#[derive(Debug, Clone, Copy)]
struct Session {
    serial: SessionSerial,
    peer: Peer,
    /// When the device's newest download token expires (Unix seconds).
    token_expires_at: u64,
}

/// What a session does about its device's download token at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Renewal {
    /// Valid for long enough yet.
    NotDue,
    /// Send a fresh one.
    Send,
    /// The agent cannot take a fresh one on this channel: close it, and
    /// the agent's reconnect brings one in its welcome, before the old one
    /// expires (half its life is left).
    Reconnect,
}

/// The pure rule, time passed in.
fn renewal(state: &AppState, session: &Session, now: u64) -> Renewal {
    if !state.downloads.renewal_due(session.token_expires_at, now) {
        Renewal::NotDue
    } else if session.peer.renews_tokens {
        Renewal::Send
    } else {
        Renewal::Reconnect
    }
}

impl Peer {
    fn of(hello: &AgentMsg) -> Self {
        let features: &[Feature] = match hello {
            AgentMsg::Enroll { features, .. } | AgentMsg::Authenticate { features, .. } => features,
            AgentMsg::Report(_) => &[],
        };
        Peer {
            holds_reboots: features.contains(&Feature::HoldReboot),
            renews_tokens: features.contains(&Feature::TokenRenewal),
        }
    }
}

/// Reads the next text frame; pings and pongs are handled by the socket.
async fn next_text(socket: &mut WebSocket) -> Result<Option<String>, WireError> {
    loop {
        match socket.recv().await {
            None | Some(Ok(Message::Close(_))) => return Ok(None),
            Some(Ok(Message::Text(text))) => return Ok(Some(text.as_str().to_owned())),
            Some(Ok(Message::Binary(_))) => {
                return Err(WireError::new(
                    ErrorKind::MalformedFrame,
                    "binary frames are not part of the protocol",
                ))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Err(e)) => return classify_socket_error(&e).map_or(Ok(None), Err),
        }
    }
}

/// Decodes a device's frame. A frame of a type the server knows whose fields
/// are invalid (a name holding '/', a missing field) is a bad request naming
/// the field; a frame of no known type is malformed.
fn decode_agent_msg(frame: &str) -> Result<AgentMsg, WireError> {
    let value: serde_json::Value = channel::decode(frame).map_err(|e| e.to_wire())?;
    // The `type`s that `AgentMsg` has.
    let known = match value.get("type").and_then(|t| t.as_str()) {
        Some(t @ ("enroll" | "authenticate" | "report")) => Some(t.to_owned()),
        _ => None,
    };
    serde_json::from_value(value).map_err(|e| match known {
        Some(t) => WireError::new(ErrorKind::BadRequest, format!("{t} frame refused: {e}")),
        None => FrameError::UnknownMessage(e.to_string()).to_wire(),
    })
}

/// A socket error is the peer's fault only when it broke the protocol (an
/// oversized or malformed frame); a dropped connection is just a device gone.
/// Read by its type: axum wraps the error tungstenite returned.
fn classify_socket_error(e: &axum::Error) -> Option<WireError> {
    let ws = std::error::Error::source(e)?.downcast_ref::<tungstenite::Error>()?;
    classify_ws_error(ws)
}

/// The rule, by tungstenite's error.
fn classify_ws_error(e: &tungstenite::Error) -> Option<WireError> {
    use tungstenite::error::ProtocolError;
    use tungstenite::Error as Ws;
    match e {
        Ws::Capacity(_) => Some(WireError::new(
            ErrorKind::FrameTooLarge,
            format!("frame exceeds the limit of {MAX_FRAME_BYTES} bytes: {e}"),
        )),
        // The device went away without a close frame: it broke nothing.
        Ws::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        Ws::Protocol(_) | Ws::Utf8(_) => Some(WireError::new(
            ErrorKind::MalformedFrame,
            format!("unreadable frame: {e}"),
        )),
        // The connection itself failed or ended (or the server's own write
        // queue overflowed behind a slow peer): the device is gone, or will
        // reconnect; nothing to tell it.
        Ws::ConnectionClosed
        | Ws::AlreadyClosed
        | Ws::Io(_)
        | Ws::Tls(_)
        | Ws::WriteBufferFull(_)
        | Ws::AttackAttempt
        | Ws::Url(_)
        | Ws::Http(_)
        | Ws::HttpFormat(_) => None,
    }
}

/// A device whose key the server checked, not yet registered in the hub.
struct Checked {
    device_id: DeviceId,
    /// It enrolled on this channel (or enrolled again with the same key).
    enrolled: bool,
    /// The private addresses its record holds.
    held: Vec<String>,
    /// The removals the hub knew of before the key was checked.
    removals: RemovalEpoch,
}

/// What the key check of a device's first frame comes to.
enum KeyCheck {
    Known(Checked),
    /// Its enrollment waits for an operator (approval mode); the removals
    /// known before the check go with it, as for a known device.
    Pending(PendingHello, RemovalEpoch),
}

/// Checks the key of a device's first frame (enrolling it if that is what
/// it asks), noting first the removals known so far (see [`admit`]).
async fn check_key(state: &AppState, nonce: &[u8], hello: AgentMsg) -> Result<KeyCheck, WireError> {
    let removals = state.hub.removal_epoch();
    Ok(match authenticate(state, nonce, hello).await? {
        Hello::Known(device_id, enrolled, held) => KeyCheck::Known(Checked {
            device_id,
            enrolled,
            held,
            removals,
        }),
        Hello::Pending(pending) => KeyCheck::Pending(pending, removals),
    })
}

/// Registers a checked device's session in the hub, unless the device was
/// removed since its key was checked: the session's serial and its push
/// channel, or the removed device's refusal.
///
/// Why the second look: a removal stored after the key check and told to
/// the hub before the registration would close nothing and leave the
/// session live with a revoked key. The hub says whether any removal was
/// told in between (rarely: removals are an operator's act); only then is
/// the database asked again, after registering, so a removal stored later
/// than that read is told to the hub later too and finds the session.
async fn admit(
    state: &AppState,
    checked: &Checked,
) -> Result<(Registered, watch::Receiver<u64>), WireError> {
    let device = &checked.device_id;
    let (tx, target_changed) = watch::channel(0u64);
    let registered = state
        .hub
        .register_since(device.clone(), tx, checked.removals);
    let serial = registered.serial;
    if registered.removed_since {
        let stored = match state.store.device(device).await {
            Ok(stored) => stored,
            Err(e) => {
                state.hub.unregister(device, serial);
                return Err(WireError::new(e.kind(), e.to_string()));
            }
        };
        if let Some(at) = stored.as_ref().and_then(|d| d.removed_at) {
            state.hub.unregister(device, serial);
            return Err(removed(device, Some(at)));
        }
    }
    Ok((registered, target_changed))
}

/// What a device's first frame comes to.
enum Hello {
    /// Its ID, whether it enrolled just now, and the private addresses it holds.
    Known(DeviceId, bool, Vec<String>),
    /// Its enrollment waits for an operator (approval mode).
    Pending(PendingHello),
}

struct PendingHello {
    device_type: DeviceType,
    hardware_id: HardwareId,
    public_key: String,
    request: i64,
    /// It takes `enrollment_pending` frames.
    told: bool,
}

async fn authenticate(state: &AppState, nonce: &[u8], hello: AgentMsg) -> Result<Hello, WireError> {
    match hello {
        AgentMsg::Enroll {
            device_type,
            hardware_id,
            token,
            public_key,
            signature,
            features,
        } => {
            // A configured token, or one made with `uplift token create`
            // (whose uses are counted, for a new device, by admit()).
            let configured = state.secrets.is_enrollment_token(&token);
            let made = if configured {
                None
            } else {
                crate::service::tokens::enrollment_token(
                    state,
                    &token,
                    time::OffsetDateTime::now_utc(),
                )
                .await
                .map_err(|e| WireError::new(e.kind(), e.to_string()))?
            };
            if !configured && made.is_none() {
                let why = crate::service::tokens::enrollment_refusal(
                    state,
                    &token,
                    time::OffsetDateTime::now_utc(),
                )
                .await
                .map_err(|e| WireError::new(e.kind(), e.to_string()))?;
                return Err(WireError::new(ErrorKind::EnrollmentRefused, why));
            }
            let key = parse_public_key(&public_key)?;
            verify(&key, &channel::auth_message(nonce, &public_key), &signature)?;
            let admission = crate::service::enrollment::admit(
                state,
                &device_type,
                &hardware_id,
                &public_key,
                made.as_ref(),
            )
            .await
            .map_err(|e| WireError::new(e.kind(), e.to_string()))?;
            match admission {
                Admission::Device { id, addresses } => Ok(Hello::Known(id, true, addresses)),
                Admission::Removed { id, at } => Err(removed(&id, Some(at))),
                Admission::Pending(record) => Ok(Hello::Pending(PendingHello {
                    device_type,
                    hardware_id,
                    public_key,
                    request: record.view.id,
                    told: features.contains(&Feature::EnrollmentApproval),
                })),
            }
        }
        AgentMsg::Authenticate {
            device_id,
            signature,
            ..
        } => {
            let device = state
                .store
                .device(&device_id)
                .await
                .map_err(|e| WireError::new(e.kind(), e.to_string()))?
                .ok_or_else(|| {
                    WireError::new(
                        ErrorKind::UnknownDevice,
                        format!(
                            "device {device_id} is not enrolled on this server; remove the agent's state to enroll again"
                        ),
                    )
                })?;
            let key = parse_public_key(&device.public_key)?;
            // Its key is revoked: refused whether or not the signature holds
            // (it says nothing more), so the agent learns why at once.
            if let Some(at) = device.removed_at {
                return Err(removed(&device_id, Some(at)));
            }
            verify(
                &key,
                &channel::auth_message(nonce, device_id.as_str()),
                &signature,
            )
            .map_err(|_| {
                WireError::new(
                    ErrorKind::BadDeviceSignature,
                    format!("signature does not match the key enrolled for device {device_id}"),
                )
            })?;
            Ok(Hello::Known(device_id, false, device.private_addresses))
        }
        AgentMsg::Report(_) => Err(WireError::new(
            ErrorKind::UnexpectedMessage,
            "a device must enroll or authenticate before reporting",
        )),
    }
}

/// The refusal of a removed device's key.
pub(crate) fn removed(device: &DeviceId, at: Option<Timestamp>) -> WireError {
    let at = at.map(|at| format!(" at {at}")).unwrap_or_default();
    WireError::new(
        ErrorKind::DeviceRemoved,
        format!(
            "device {device} was removed from the fleet by an operator{at}; its key is revoked. \
             To bring this board back, delete the agent's state directory (its key and device ID) \
             and start the agent again: it enrolls with the fleet token as a new device"
        ),
    )
}

fn parse_public_key(text: &str) -> Result<VerifyingKey, WireError> {
    let bad = || {
        WireError::new(
            ErrorKind::BadRequest,
            "public_key must be a base64 ed25519 public key (32 bytes)",
        )
    };
    let bytes: [u8; 32] = B64
        .decode(text)
        .map_err(|_| bad())?
        .try_into()
        .map_err(|_| bad())?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| bad())
}

fn verify(key: &VerifyingKey, message: &[u8], signature_b64: &str) -> Result<(), WireError> {
    let bad = || {
        WireError::new(
            ErrorKind::BadDeviceSignature,
            "device signature over the server's nonce is invalid",
        )
    };
    let bytes: [u8; 64] = B64
        .decode(signature_b64)
        .map_err(|_| bad())?
        .try_into()
        .map_err(|_| bad())?;
    key.verify_strict(message, &Signature::from_bytes(&bytes))
        .map_err(|_| bad())
}

/// The frame that tells a device what to run.
fn offer_for(target: Option<DeviceTarget>) -> ServerMsg {
    match target {
        Some(target) => ServerMsg::Offer(Offer {
            rollout_id: target.rollout_id,
            manifest_path: device_manifest_path(&target.version),
            version: target.version,
            allow_downgrade: target.allow_downgrade,
            max_bytes_per_sec: target.limits.max_bytes_per_sec.map(|n| n.get()),
            hold_reboot: target.hold_reboot,
            // Signed on the way out ([`freshness::seal`]): it needs the
            // manifest's digest, which is read from the store.
            freshness: None,
        }),
        None => ServerMsg::NoUpdate,
    }
}

/// What to tell a device now: its target's offer, or nothing yet while it
/// waits for a download turn (see [`crate::turns`]). An agent that cannot
/// hold its reboot is not offered a release whose reboot is held: it would
/// reboot at once, so for it the reboot window governs the download too.
pub fn offer_now(state: &AppState, device: &DeviceId, peer: Peer) -> ServerMsg {
    let (target, report) = state
        .live
        .get(device)
        .map_or((None, None), |live| (live.target, live.report));
    let target = target.filter(|t| peer.holds_reboots || !t.hold_reboot);
    let limited = target
        .as_ref()
        .and_then(|t| Some((t, t.limits.max_downloading?)));
    match limited {
        Some((target, limit)) if turns::needs_turn(report.as_deref(), &target.version) => {
            let (turn, passed) = state
                .turns
                .ask(device, target.rollout_id, limit.get() as usize);
            pass_turns(state, passed);
            if turn == Turn::Wait {
                tracing::debug!(device = %device, rollout = target.rollout_id, "waiting for a download turn");
                return ServerMsg::NoUpdate;
            }
        }
        // Nothing to download under a limit: no turn held anywhere.
        _ => pass_turns(state, state.turns.leave(device)),
    }
    offer_for(target)
}

/// Keeps download turns true to a report: a turn ends when the download
/// does; a device downloading without one (retrying after a failure) gets
/// one if free, or is told to wait (the frame returned).
fn turns_after_report(state: &AppState, device: &DeviceId, report: &Report) -> Option<ServerMsg> {
    let target = state.live.target(device)?;
    let limit = target.limits.max_downloading?;
    if state.turns.holds(device, target.rollout_id) {
        if turns::ends_turn(report, &target.version) {
            pass_turns(state, state.turns.leave(device));
        }
        return None;
    }
    let downloading = matches!(
        report.state,
        AgentState::Downloading | AgentState::Verifying
    ) && report.target_version.as_ref() == Some(&target.version);
    if !downloading {
        return None;
    }
    let (turn, passed) = state
        .turns
        .ask(device, target.rollout_id, limit.get() as usize);
    pass_turns(state, passed);
    (turn == Turn::Wait).then_some(ServerMsg::NoUpdate)
}

/// Tells the devices a turn passed to; a device that went offline in the
/// meantime passes it on at once.
pub(crate) fn pass_turns(state: &AppState, passed: impl IntoIterator<Item = DeviceId>) {
    for first in passed {
        let mut next = Some(first);
        while let Some(device) = next {
            if state.hub.notify_target_changed(&device) {
                break;
            }
            next = state.turns.leave(&device);
        }
    }
}

async fn serve_device(
    state: &AppState,
    device: &DeviceId,
    mut session: Session,
    socket: &mut WebSocket,
    target_changed: &mut watch::Receiver<u64>,
    offer_due: &OfferDue,
) -> Result<(), SessionError> {
    use std::sync::atomic::Ordering::Relaxed;
    let Session { serial, peer, .. } = session;
    let idle_limit = state.limits.channel_idle_timeout();
    let mut shutdown = state.shutdown.clone();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            // Replacement and shutdown first: a replaced session must stop
            // at once, not after draining its socket's backlog.
            biased;
            changed = target_changed.changed() => match changed {
                // Pushes coalesce and none is lost: the newest target, from memory.
                Ok(()) if crate::hub::removed(target_changed) => {
                    return Err(refuse(socket, removed(device, None)).await)
                }
                Ok(()) => {
                    let offer = offer_now(state, device, peer);
                    send(socket, &freshness::seal(state, device, offer).await).await?;
                    offer_due.paid();
                }
                // Removed (an operator decommissioned it) ...
                Err(_) if crate::hub::removed(target_changed) => {
                    return Err(refuse(socket, removed(device, None)).await)
                }
                // ... or the device opened a newer channel, which replaced this one.
                Err(_) => return Err(SessionError::Replaced),
            },
            _ = shutdown.changed() => {
                let _ = socket.send(Message::Close(None)).await;
                return Ok(());
            }
            incoming = socket.recv() => {
                last_heard = Instant::now();
                let text = match incoming {
                    None | Some(Ok(Message::Close(_))) => return Err(SessionError::Gone),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Binary(_))) => {
                        return Err(refuse(socket, WireError::new(ErrorKind::MalformedFrame, "binary frames are not part of the protocol")).await)
                    }
                    Some(Err(e)) => match classify_socket_error(&e) {
                        Some(err) => return Err(refuse(socket, err).await),
                        None => return Err(SessionError::Gone),
                    },
                };
                match decode_agent_msg(text.as_str()) {
                    Ok(AgentMsg::Report(report)) => {
                        tracing::debug!(device = %device, state = report.state.as_str(), "report");
                        match state.live.apply(device, serial, &report, Timestamp::now()) {
                            Applied::Applied => {
                                state.stats.reports_applied.fetch_add(1, Relaxed);
                                if let Some(wait) = turns_after_report(state, device, &report) {
                                    send(socket, &wait).await?;
                                }
                            }
                            Applied::Stale => {
                                state.stats.reports_stale.fetch_add(1, Relaxed);
                                return Err(SessionError::Replaced);
                            }
                        }
                    }
                    Ok(AgentMsg::Enroll { .. } | AgentMsg::Authenticate { .. }) => {
                        return Err(refuse(socket, WireError::new(ErrorKind::UnexpectedMessage, "already authenticated on this channel")).await)
                    }
                    Err(err) => return Err(refuse(socket, err).await),
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > idle_limit {
                    tracing::info!(device = %device, "closing silent device channel");
                    return Err(SessionError::Gone);
                }
                // The ping's tick, not a timer of its own: no extra timer per session.
                let now = crate::download_token::unix_now();
                match renewal(state, &session, now) {
                    Renewal::NotDue => {}
                    Renewal::Send => {
                        let token = state.downloads.issue(device, now);
                        session.token_expires_at = token.expires_at;
                        send(socket, &ServerMsg::DownloadToken {
                            token: token.text,
                            expires_in_secs: token.expires_at.saturating_sub(now),
                        }).await?;
                    }
                    Renewal::Reconnect => {
                        tracing::info!(device = %device, "closing the channel of an agent that cannot renew its download token; it reconnects for a fresh one");
                        let _ = socket.send(Message::Close(None)).await;
                        return Ok(());
                    }
                }
                timeout(Duration::from_secs(10), socket.send(Message::Ping(Default::default())))
                    .await
                    .map_err(|_| SessionError::Gone)??;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::testing;
    use crate::store::stamp::ts;
    use crate::store::NewDevice;

    #[tokio::test]
    async fn a_held_reboot_is_offered_only_to_agents_that_can_hold_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        let device: DeviceId = "dev-1".parse().unwrap();
        let target = |hold_reboot| DeviceTarget {
            rollout_id: 4,
            version: "1.1".parse().unwrap(),
            allow_downgrade: false,
            limits: Default::default(),
            hold_reboot,
        };
        let new = Peer {
            holds_reboots: true,
            renews_tokens: true,
        };
        let old = Peer {
            holds_reboots: false,
            renews_tokens: false,
        };
        state.live.set_targets(
            std::slice::from_ref(&device),
            &target(true),
            ts("2026-01-01T00:00:00Z"),
        );
        assert!(matches!(
            offer_now(&state, &device, new),
            ServerMsg::Offer(Offer {
                hold_reboot: true,
                ..
            })
        ));
        assert_eq!(
            offer_now(&state, &device, old),
            ServerMsg::NoUpdate,
            "an older agent would reboot at once: it waits for the window"
        );
        state.live.hold_reboots(4, false);
        for peer in [new, old] {
            assert!(matches!(
                offer_now(&state, &device, peer),
                ServerMsg::Offer(Offer {
                    hold_reboot: false,
                    ..
                })
            ));
        }
    }

    /// A device enrolled with a real key, and its answer to `nonce`.
    async fn keyed_device(state: &AppState, id: &str, nonce: &[u8]) -> (DeviceId, AgentMsg) {
        let key = ed25519_dalek::SigningKey::from_bytes(&[id.len() as u8; 32]);
        let device: DeviceId = id.parse().unwrap();
        state
            .store
            .insert_device(&NewDevice {
                id: device.clone(),
                device_type: "gateway".parse().unwrap(),
                hardware_id: format!("hw-{id}").parse().unwrap(),
                public_key: B64.encode(key.verifying_key().as_bytes()),
                enrolled_at: Timestamp::now(),
            })
            .await
            .unwrap();
        use ed25519_dalek::Signer;
        let signature = key.sign(&channel::auth_message(nonce, id));
        let hello = AgentMsg::Authenticate {
            device_id: device.clone(),
            signature: B64.encode(signature.to_bytes()),
            features: FEATURES.to_vec(),
        };
        (device, hello)
    }

    async fn remove(state: &AppState, device: &DeviceId) {
        crate::service::devices::remove(state, &crate::auth::Principal::bootstrap_admin(), device)
            .await
            .unwrap();
    }

    fn known(check: KeyCheck) -> Checked {
        match check {
            KeyCheck::Known(checked) => checked,
            KeyCheck::Pending(..) => panic!("an enrolled device's key check is not pending"),
        }
    }

    /// The race an operator's removal and a connecting device run, each
    /// order of its steps played out one after the other.
    #[tokio::test]
    async fn a_device_removed_while_it_connects_never_keeps_a_session() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        let nonce = [7u8; 32];

        // The key is checked, the removal runs whole, then the session
        // would register: it is refused, as the removed device it is.
        let (a, hello) = keyed_device(&state, "dev-a", &nonce).await;
        let checked = known(check_key(&state, &nonce, hello).await.unwrap());
        remove(&state, &a).await;
        let refused = admit(&state, &checked).await.unwrap_err();
        assert_eq!(refused.kind, ErrorKind::DeviceRemoved, "{refused:?}");
        assert!(!state.hub.is_online(&a), "no session is left behind");
        assert!(state.hub.online_ids().is_empty());

        // Registered first, removed after: the removal closes the session
        // and the session learns why.
        let (b, hello) = keyed_device(&state, "dev-bb", &nonce).await;
        let checked = known(check_key(&state, &nonce, hello).await.unwrap());
        let (_, target_changed) = admit(&state, &checked).await.unwrap();
        assert!(state.hub.is_online(&b));
        remove(&state, &b).await;
        assert!(!state.hub.is_online(&b));
        assert!(crate::hub::removed(&target_changed));

        // Another device's removal in between: the second look finds this
        // one still in the fleet, and its session stands.
        let (c, hello) = keyed_device(&state, "dev-ccc", &nonce).await;
        let (d, _) = keyed_device(&state, "dev-dddd", &nonce).await;
        let checked = known(check_key(&state, &nonce, hello).await.unwrap());
        remove(&state, &d).await;
        let (_, target_changed) = admit(&state, &checked).await.unwrap();
        assert!(state.hub.is_online(&c));
        assert!(!crate::hub::removed(&target_changed));

        // And a removed device's key is refused at the check itself.
        let again = AgentMsg::Authenticate {
            device_id: a.clone(),
            signature: String::new(),
            features: Vec::new(),
        };
        let refused = check_key(&state, &nonce, again).await.err().unwrap();
        assert_eq!(refused.kind, ErrorKind::DeviceRemoved);
    }

    #[test]
    fn socket_errors_are_told_apart_by_type() {
        use tungstenite::error::{CapacityError, ProtocolError};
        use tungstenite::Error as Ws;
        let kind = |e: Ws| classify_socket_error(&axum::Error::new(e)).map(|w| w.kind);
        assert_eq!(
            kind(Ws::Capacity(CapacityError::MessageTooLong {
                size: MAX_FRAME_BYTES + 1,
                max_size: MAX_FRAME_BYTES,
            })),
            Some(ErrorKind::FrameTooLarge)
        );
        for malformed in [
            Ws::Protocol(ProtocolError::UnmaskedFrameFromClient),
            Ws::Protocol(ProtocolError::InvalidOpcode(13)),
            Ws::Utf8("invalid utf-8 sequence".into()),
        ] {
            assert_eq!(kind(malformed), Some(ErrorKind::MalformedFrame));
        }
        for gone in [
            Ws::Protocol(ProtocolError::ResetWithoutClosingHandshake),
            Ws::ConnectionClosed,
            Ws::AlreadyClosed,
            Ws::Io(std::io::ErrorKind::ConnectionReset.into()),
            Ws::Io(std::io::ErrorKind::UnexpectedEof.into()),
        ] {
            assert_eq!(kind(gone), None);
        }
        // Whatever else axum might hand over is no frame of the peer's.
        assert_eq!(
            classify_socket_error(&axum::Error::new(std::io::Error::other("x"))),
            None
        );
    }

    #[test]
    fn an_address_is_shown_as_ip_and_port_ipv4_as_ipv4() {
        let shown = |text: &str| shown_address(text.parse().unwrap());
        assert_eq!(shown("127.0.0.1:4000"), "127.0.0.1:4000");
        assert_eq!(shown("[::ffff:10.0.0.7]:51234"), "10.0.0.7:51234");
        assert_eq!(shown("[2001:db8::1]:443"), "[2001:db8::1]:443");
    }

    #[test]
    fn an_agent_says_what_it_understands_in_its_hello() {
        let hello = |features| AgentMsg::Authenticate {
            device_id: "dev-1".parse().unwrap(),
            signature: String::new(),
            features,
        };
        assert!(Peer::of(&hello(vec![Feature::HoldReboot])).holds_reboots);
        assert!(!Peer::of(&hello(vec![])).holds_reboots, "an older agent");
        assert!(!Peer::of(&hello(vec![Feature::Unknown])).holds_reboots);
        assert!(Peer::of(&hello(vec![Feature::TokenRenewal])).renews_tokens);
        assert!(!Peer::of(&hello(vec![Feature::HoldReboot])).renews_tokens);
    }

    #[tokio::test]
    async fn a_token_is_renewed_on_the_channel_or_an_older_agent_reconnects_for_one() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        let lifetime = state.downloads.lifetime_secs;
        let peer = |renews_tokens| Peer {
            holds_reboots: true,
            renews_tokens,
        };
        let session = |renews| Session {
            serial: SessionSerial::from_raw(1),
            peer: peer(renews),
            token_expires_at: 1_000 + lifetime,
        };
        for renews in [true, false] {
            assert_eq!(renewal(&state, &session(renews), 1_000), Renewal::NotDue);
            assert_eq!(
                renewal(&state, &session(renews), 1_000 + lifetime / 2 - 1),
                Renewal::NotDue
            );
        }
        let half = 1_000 + lifetime / 2;
        assert_eq!(renewal(&state, &session(true), half), Renewal::Send);
        assert_eq!(renewal(&state, &session(false), half), Renewal::Reconnect);
    }
}
