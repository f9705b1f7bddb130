//! What one server replica tells the others at once: offers made, offers
//! taken back and reboot gates, each carrying what a device's session needs
//! (the target itself, not a hint to go and read it: REVIEW S2), so a
//! rollout started on any replica reaches devices connected to every other
//! without a database read per device. Each replica also relays the
//! events it makes ([`relay_events`]), for the event streams of the others.
//!
//! With PostgreSQL the replicas share, signals travel as `NOTIFY` on one
//! channel and every replica `LISTEN`s (sqlx's `PgListener`); a notification
//! carries at most 8000 bytes, so a large offer is split into several. With
//! SQLite there is one server process, and signals stay in it.
//!
//! Signals are a fast path only: the database stays the truth. A replica
//! loads every target at start, and again whenever its listening connection
//! was lost (notifications sent meanwhile are gone), and then closes the
//! channels of devices removed meanwhile, so a missed signal costs time,
//! never correctness. (A relayed event that is missed is
//! missing from the other replicas' live streams only: device history is
//! stored.)

use crate::state::AppState;
use crate::store::{DeviceTarget, Timestamp};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};
use uplift_proto::events::EventAbout;
use uplift_proto::DeviceId;

/// The PostgreSQL channel every replica listens on.
pub const CHANNEL: &str = "uplift_signals";

/// What PostgreSQL accepts in one notification, less room for the envelope.
const MAX_PAYLOAD: usize = 7_600;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "signal", rename_all = "snake_case")]
pub enum Signal {
    /// These devices were offered `target` (stored already).
    Offered {
        target: DeviceTarget,
        devices: Vec<DeviceId>,
    },
    /// Rollout `rollout_id`'s offer was taken back from these devices.
    TakenBack {
        rollout_id: i64,
        devices: Vec<DeviceId>,
    },
    /// Whether rollout `rollout_id`'s devices must hold their reboot now.
    RebootGate { rollout_id: i64, hold: bool },
    /// These devices were removed (stored already): a replica holding one's
    /// channel closes it, and refuses its download tokens.
    Removed { devices: Vec<DeviceId> },
    /// Events the sender made, for the event streams here.
    Events { events: Vec<RelayedEvent> },
    /// The sender has an event stream open: relay your events for
    /// [`WATCH_LEASE`] more.
    Watching,
}

/// An event as another replica made it: what, and when (RFC 3339).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayedEvent {
    pub about: EventAbout,
    pub at: String,
}

/// A signal as sent: who sent it, so a replica skips its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Envelope {
    from: String,
    #[serde(flatten)]
    signal: Signal,
}

/// An `offered` envelope as read on the way in, without the sender. Read
/// as an [`Envelope`], a payload goes through serde's buffering twice (a
/// flattened, internally tagged enum is first read into a generic tree,
/// every device ID a string of its own), which made the offers' parse 7 %
/// of each replica's CPU while a rollout to 100 000 devices went out.
/// This struct reads the same JSON straight into its fields.
#[derive(Deserialize)]
struct OfferedEnvelope {
    signal: OfferedTag,
    target: DeviceTarget,
    devices: Vec<DeviceId>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum OfferedTag {
    Offered,
}

/// Reads a payload another replica sent. Offers, the signal a rollout
/// sends by the hundred, are read straight ([`OfferedEnvelope`]); anything
/// else, or an offer that does not read so, as an [`Envelope`].
fn read_payload(payload: &str) -> Result<Signal, serde_json::Error> {
    if payload.contains(OFFERED_TAG) {
        if let Ok(OfferedEnvelope {
            signal: OfferedTag::Offered,
            target,
            devices,
        }) = serde_json::from_str(payload)
        {
            return Ok(Signal::Offered { target, devices });
        }
    }
    serde_json::from_str::<Envelope>(payload).map(|envelope| envelope.signal)
}

impl Signal {
    /// The signal as payloads of at most [`MAX_PAYLOAD`] bytes each: a
    /// device list is split across as many as it takes.
    fn payloads(&self, from: &str) -> Vec<String> {
        let encode = |signal: Signal| {
            serde_json::to_string(&Envelope {
                from: from.to_owned(),
                signal,
            })
            .unwrap_or_else(|e| unreachable!("signals serialize: {e}"))
        };
        // An ID in a list: its quotes and a comma besides.
        let id_len = |device: &DeviceId| device.as_str().len() + 3;
        match self {
            Signal::Offered { target, devices } => {
                split_into_payloads(devices, id_len, &encode, |devices| Signal::Offered {
                    target: target.clone(),
                    devices,
                })
            }
            Signal::TakenBack {
                rollout_id,
                devices,
            } => split_into_payloads(devices, id_len, &encode, |devices| Signal::TakenBack {
                rollout_id: *rollout_id,
                devices,
            }),
            Signal::Removed { devices } => {
                split_into_payloads(devices, id_len, &encode, |devices| Signal::Removed {
                    devices,
                })
            }
            Signal::RebootGate { .. } | Signal::Watching => vec![encode(self.clone())],
            Signal::Events { events } => split_into_payloads(
                events,
                // The event and a comma.
                |event| serde_json::to_string(event).map_or(0, |e| e.len()) + 1,
                &encode,
                |events| Signal::Events { events },
            ),
        }
    }
}

/// `items` cut into as few signals as keep each encoded one within
/// [`MAX_PAYLOAD`] (NOTIFY's limit), in order; an item too large alone still
/// goes, alone.
fn split_into_payloads<T: Clone>(
    items: &[T],
    item_len: impl Fn(&T) -> usize,
    encode: &dyn Fn(Signal) -> String,
    make: impl Fn(Vec<T>) -> Signal,
) -> Vec<String> {
    let overhead = encode(make(Vec::new())).len();
    let mut out = Vec::new();
    let mut part = Vec::new();
    let mut size = overhead;
    for item in items {
        let len = item_len(item);
        if !part.is_empty() && size + len > MAX_PAYLOAD {
            out.push(encode(make(std::mem::take(&mut part))));
            size = overhead;
        }
        part.push(item.clone());
        size += len;
    }
    if !part.is_empty() {
        out.push(encode(make(part)));
    }
    out
}

/// Where signals go.
#[derive(Debug, Clone)]
enum Route {
    /// One server process: nobody else to tell.
    Alone,
    /// Replicas on one PostgreSQL database.
    Postgres(sqlx::PgPool),
}

/// This replica's end of the signals.
#[derive(Debug, Clone)]
pub struct Signals {
    route: Route,
    /// Names this replica in what it sends.
    origin: String,
    /// Until when another replica has asked for this one's events (it has
    /// an event stream open).
    watched_until: Arc<Mutex<Option<Instant>>>,
}

impl Default for Signals {
    fn default() -> Self {
        Self::alone()
    }
}

impl Signals {
    /// A server that is the only one on its database.
    pub fn alone() -> Self {
        Self {
            route: Route::Alone,
            origin: String::new(),
            watched_until: Arc::default(),
        }
    }

    /// A replica among others on the PostgreSQL database behind `pool`.
    pub fn postgres(pool: sqlx::PgPool) -> Self {
        Self {
            route: Route::Postgres(pool),
            origin: format!("pid{}-{:016x}", std::process::id(), rand::random::<u64>()),
            watched_until: Arc::default(),
        }
    }

    /// This replica's name among the others (empty when alone).
    pub fn replica(&self) -> &str {
        &self.origin
    }

    fn watched_until(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.watched_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Another replica asked for events at `now`.
    fn watched_at(&self, now: Instant) {
        *self.watched_until() = Some(now + WATCH_LEASE);
    }

    /// Whether another replica wants this one's events at `now`.
    fn watched(&self, now: Instant) -> bool {
        relay_wanted(*self.watched_until(), now)
    }

    /// Tells the other replicas; a failure is logged, not returned: what
    /// was signalled is stored already, and a replica that missed it learns
    /// it from the database when it next reloads.
    pub async fn send(&self, signal: Signal) {
        let Route::Postgres(pool) = &self.route else {
            return;
        };
        // Every part in one statement, so one transaction: one round trip
        // (an offer to 10 000 devices is about 40 parts), and the other
        // replicas get all of them, in order, or none.
        let payloads = signal.payloads(&self.origin);
        let sent = sqlx::query(
            "SELECT pg_notify($1, p.payload) FROM unnest($2::text[]) WITH ORDINALITY AS p(payload, n) ORDER BY p.n",
        )
        .bind(CHANNEL)
        .bind(&payloads)
        .execute(pool)
        .await;
        if let Err(e) = sent {
            tracing::warn!(
                "telling the other replicas ({} bytes): {e}; they catch up from the database when they next reload",
                payloads.iter().map(String::len).sum::<usize>()
            );
        }
    }
}

/// What a replica does with a signal from another: its live view takes the
/// change (without recording history: the sender did), and the sessions of
/// devices connected here are told.
pub fn apply(state: &AppState, signal: Signal) {
    let touched = match signal {
        Signal::Offered { target, devices } => {
            state.live.follow_targets(&devices, &target);
            devices
        }
        Signal::TakenBack {
            rollout_id,
            devices,
        } => {
            state.live.follow_withdrawal(&devices, rollout_id);
            devices
        }
        Signal::RebootGate { rollout_id, hold } => state.live.hold_reboots(rollout_id, hold),
        Signal::Removed { devices } => {
            let now = Timestamp::now();
            for device in &devices {
                forget_removed(state, device, None, now);
            }
            return;
        }
        Signal::Events { events } => {
            for event in events {
                state.events.publish_relayed(event.about, &event.at);
            }
            Vec::new()
        }
        Signal::Watching => {
            state.signals.watched_at(Instant::now());
            return;
        }
    };
    state.hub.notify_targets_changed(&touched);
}

/// What this replica lets go of a removed device: its channel here (closed,
/// telling it why), its live state, its download tokens. `by` records the
/// removal in its history (the replica that removed it passes it).
pub fn forget_removed(state: &AppState, device: &DeviceId, by: Option<&str>, now: Timestamp) {
    state.downloads.forget(device);
    state.live.forget(device, by, now);
    if state.hub.close_removed(device) {
        tracing::info!(device = %device, "closed the channel of a removed device");
    }
    // A download turn it held passes on.
    crate::channel::pass_turns(state, state.turns.leave(device));
}

/// Listens for the other replicas' signals until shutdown. Each time the
/// listening connection is (re)established, every target is reloaded from
/// the database: signals sent while it was down are lost.
pub async fn follow(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let Route::Postgres(pool) = &state.signals.route else {
        return;
    };
    let own = format!("\"from\":{}", serde_json::json!(state.signals.origin));
    let mut backoff = 0u32;
    loop {
        let listened = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
            // Reconnects are handled here, where the reload follows them.
            listener.ignore_pool_close_event(true);
            listener.listen(CHANNEL).await?;
            reload_targets(&state).await;
            close_removed_meanwhile(&state).await;
            tracing::info!("listening for the other replicas' signals");
            loop {
                let Some(notification) = listener.try_recv().await? else {
                    return Ok::<(), sqlx::Error>(());
                };
                backoff = 0;
                let payload = notification.payload();
                if payload.contains(&own) {
                    continue;
                }
                if !worth_reading(payload, state.events.streams_open()) {
                    continue;
                }
                match read_payload(payload) {
                    Ok(signal) => apply(&state, signal),
                    Err(e) => tracing::warn!(
                        "a signal from another replica was not understood ({e}); is every replica the same version?"
                    ),
                }
            }
        };
        tokio::select! {
            ended = listened => match ended {
                Ok(()) => tracing::warn!("the replicas' signal connection closed; reconnecting"),
                Err(e) => tracing::warn!("the replicas' signal connection failed: {e}; reconnecting"),
            },
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let wait = uplift_proto::pace::backoff(
            backoff,
            std::time::Duration::from_millis(200),
            std::time::Duration::from_secs(10),
            rand::random(),
        );
        backoff = backoff.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// How long events made here are gathered before they are relayed: one
/// notification statement per quarter second, however busy the fleet.
const RELAY_EVERY: Duration = Duration::from_millis(250);

/// How long a replica relays its events after another asked for them.
pub const WATCH_LEASE: Duration = Duration::from_secs(15);

/// How often a replica with an event stream open asks again (and at once
/// when a stream opens).
const WATCH_RENEW: Duration = Duration::from_secs(5);

/// How a relay of events starts in a signal's payload (see [`Envelope`]).
const EVENTS_TAG: &str = "\"signal\":\"events\"";

/// How an offer is tagged in a signal's payload.
const OFFERED_TAG: &str = "\"signal\":\"offered\"";

/// The pure rule: whether another replica's signal needs reading here.
/// Relayed events are for the event streams open here; with none, they are
/// not even parsed (a rollout to 100 000 devices makes 200 000 of them).
fn worth_reading(payload: &str, streams_open: usize) -> bool {
    streams_open > 0 || !payload.contains(EVENTS_TAG)
}

/// The pure rule: relay while a lease asked for by another replica runs.
fn relay_wanted(watched_until: Option<Instant>, now: Instant) -> bool {
    watched_until.is_some_and(|until| now < until)
}

/// The pure rule: ask the others for their events when a stream is open
/// here and they were not asked within [`WATCH_RENEW`] (or a stream has
/// just opened, `opened`).
fn watch_due(streams_open: usize, opened: bool, asked: Option<Instant>, now: Instant) -> bool {
    streams_open > 0 && (opened || asked.is_none_or(|at| now >= at + WATCH_RENEW))
}

/// Relays the events made here to the other replicas until shutdown, while
/// one of them has an event stream open, so a stream opened on any replica
/// shows the whole fleet; and asks the others for theirs while a stream is
/// open here. With no stream open anywhere, events stay where they were
/// made: a rollout to 100 000 devices makes 200 000 device events, each
/// otherwise serialized, sent through PostgreSQL and parsed by every other
/// replica for nobody. Webhooks are not relayed: the replica that made an
/// event delivers it.
pub async fn relay_events(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    if matches!(state.signals.route, Route::Alone) {
        return;
    }
    let mut made_here = state.events.subscribe();
    // Gathered whether or not anybody listens, and dropped at the tick if
    // nobody does: a stream that has just opened elsewhere gets the
    // quarter second before its request arrived.
    let mut gathered: Vec<RelayedEvent> = Vec::new();
    let mut tick = tokio::time::interval(RELAY_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut asked: Option<Instant> = None;
    loop {
        // Whether to ask the others for their events is decided at the
        // tick and when a stream opens, not after every event made here.
        let mut may_ask = false;
        let mut opened = false;
        tokio::select! {
            received = made_here.recv() => match received {
                Ok(event) => gathered.push(RelayedEvent {
                    about: event.about.clone(),
                    at: event.at.clone(),
                }),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    if state.signals.watched(Instant::now()) {
                        tracing::warn!(
                            missed,
                            "relaying events to the other replicas fell behind; their event streams miss {missed} events"
                        );
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = state.events.stream_opens() => (may_ask, opened) = (true, true),
            _ = tick.tick() => {
                may_ask = true;
                let events = std::mem::take(&mut gathered);
                if !events.is_empty() && state.signals.watched(Instant::now()) {
                    state.signals.send(Signal::Events { events }).await;
                }
            }
            _ = shutdown.changed() => break,
        }
        let now = Instant::now();
        if may_ask && watch_due(state.events.streams_open(), opened, asked, now) {
            asked = Some(now);
            state.signals.send(Signal::Watching).await;
        }
    }
    if !gathered.is_empty() && state.signals.watched(Instant::now()) {
        state
            .signals
            .send(Signal::Events { events: gathered })
            .await;
    }
}

/// Closes the channels here of devices removed while this replica was not
/// listening (their `removed` signal is lost): every device connected here
/// is looked up in the database, in one query.
async fn close_removed_meanwhile(state: &AppState) {
    let here = state.hub.online_ids();
    match state.store.unknown_devices(&here).await {
        Ok(removed) => {
            let now = Timestamp::now();
            for device in &removed {
                forget_removed(state, device, None, now);
            }
        }
        Err(e) => tracing::warn!(
            "looking up the devices connected here after a lost signal connection: {e}; a device removed meanwhile keeps its channel until it reconnects"
        ),
    }
}

/// Loads every device's target from the database into the live view and
/// tells the sessions here whose target changed.
async fn reload_targets(state: &AppState) {
    match state.store.device_targets().await {
        Ok(targets) => {
            let changed = state.live.replace_targets(targets);
            state.hub.notify_targets_changed(&changed);
        }
        Err(e) => tracing::warn!("reloading device targets after a lost signal connection: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::stamp::ts;

    fn target(rollout_id: i64) -> DeviceTarget {
        DeviceTarget {
            rollout_id,
            version: "2.0".parse().unwrap(),
            allow_downgrade: false,
            limits: Default::default(),
            hold_reboot: true,
        }
    }

    #[tokio::test]
    async fn another_replicas_offer_and_take_back_reach_the_live_view_without_a_second_history() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::service::testing::state(dir.path()).await;
        let devices: Vec<DeviceId> = vec!["dev-1".parse().unwrap(), "dev-2".parse().unwrap()];
        apply(
            &state,
            Signal::Offered {
                target: target(7),
                devices: devices.clone(),
            },
        );
        assert_eq!(state.live.target(&devices[1]), Some(target(7)));
        assert_eq!(state.live.pending_events(), 0, "the sender records history");
        // An older rollout's offer does not replace a newer one's.
        apply(
            &state,
            Signal::Offered {
                target: target(6),
                devices: devices[..1].to_vec(),
            },
        );
        assert_eq!(state.live.target(&devices[0]), Some(target(7)));
        apply(
            &state,
            Signal::RebootGate {
                rollout_id: 7,
                hold: false,
            },
        );
        assert!(!state.live.target(&devices[0]).unwrap().hold_reboot);
        apply(
            &state,
            Signal::TakenBack {
                rollout_id: 7,
                devices: devices[..1].to_vec(),
            },
        );
        assert_eq!(state.live.target(&devices[0]), None);
        assert!(state.live.target(&devices[1]).is_some());
        // A reload from the database (empty here) is the truth.
        assert_eq!(
            state.live.replace_targets(Vec::new()),
            vec![devices[1].clone()]
        );
        assert_eq!(state.live.target(&devices[1]), None);
        assert_eq!(state.live.pending_events(), 0);
    }

    #[tokio::test]
    async fn another_replicas_removal_closes_the_channel_here_and_forgets_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::service::testing::state(dir.path()).await;
        let device: DeviceId = "dev-1".parse().unwrap();
        let (tx, rx) = watch::channel(0);
        state.hub.register(device.clone(), tx);
        state.downloads.remember(&device);
        apply(
            &state,
            Signal::Offered {
                target: target(7),
                devices: vec![device.clone()],
            },
        );
        let envelope: Envelope = serde_json::from_str(
            &Signal::Removed {
                devices: vec![device.clone()],
            }
            .payloads("pid2-00")[0],
        )
        .unwrap();
        apply(&state, envelope.signal);
        assert!(!state.hub.is_online(&device), "its channel here is closed");
        assert!(crate::hub::removed(&rx), "telling the session why");
        assert!(
            !state.downloads.knows(&device),
            "its tokens are checked again"
        );
        assert_eq!(state.live.target(&device), None, "nothing is offered to it");
        assert_eq!(state.live.pending_events(), 0, "the sender records history");
    }

    #[tokio::test]
    async fn a_removal_missed_while_the_signal_connection_was_down_closes_the_channel_on_reconnect()
    {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::service::testing::state(dir.path()).await;
        let mut watches = Vec::new();
        for id in ["dev-kept", "dev-removed"] {
            let device: DeviceId = id.parse().unwrap();
            state
                .store
                .insert_device(&crate::store::NewDevice {
                    id: device.clone(),
                    device_type: "gw".parse().unwrap(),
                    hardware_id: format!("hw-{id}").parse().unwrap(),
                    public_key: format!("key-{id}"),
                    enrolled_at: ts("2026-01-01T00:00:00Z"),
                })
                .await
                .unwrap();
            let (tx, rx) = watch::channel(0);
            state.hub.register(device.clone(), tx);
            watches.push((device, rx));
        }
        // Removed on another replica; its signal never came.
        state
            .store
            .remove_device(&watches[1].0, ts("2026-01-02T00:00:00Z"))
            .await
            .unwrap();
        assert!(state.hub.is_online(&watches[1].0));

        close_removed_meanwhile(&state).await;
        assert!(
            !state.hub.is_online(&watches[1].0),
            "its channel here is closed"
        );
        assert!(
            crate::hub::removed(&watches[1].1),
            "telling the session why"
        );
        assert!(state.hub.is_online(&watches[0].0), "the others keep theirs");
        assert!(!crate::hub::removed(&watches[0].1));
    }

    #[test]
    fn a_large_offer_is_split_into_notifications_postgres_accepts_and_nothing_is_lost() {
        let devices: Vec<DeviceId> = (0..5_000)
            .map(|i| format!("device-with-a-long-name-{i:08}").parse().unwrap())
            .collect();
        let signal = Signal::Offered {
            target: target(7),
            devices: devices.clone(),
        };
        let payloads = signal.payloads("pid1-00");
        assert!(payloads.len() > 1);
        let mut back = Vec::new();
        for payload in &payloads {
            assert!(payload.len() < 8000, "{} bytes", payload.len());
            let envelope: Envelope = serde_json::from_str(payload).unwrap();
            assert_eq!(envelope.from, "pid1-00");
            let Signal::Offered { target: t, devices } = read_payload(payload).unwrap() else {
                panic!("an offer stays an offer")
            };
            assert_eq!(t, target(7));
            back.extend(devices);
        }
        assert_eq!(back, devices, "every device once, in order");
        let gate = Signal::RebootGate {
            rollout_id: 7,
            hold: false,
        };
        assert_eq!(gate.payloads("x").len(), 1);
        assert!(Signal::TakenBack {
            rollout_id: 7,
            devices: Vec::new()
        }
        .payloads("x")
        .is_empty());
    }

    #[tokio::test]
    async fn another_replicas_events_reach_the_streams_here_in_order_split_as_postgres_needs() {
        use uplift_proto::api::DeviceEventKind;
        let events: Vec<RelayedEvent> = (0..500)
            .map(|i| RelayedEvent {
                about: EventAbout::Device {
                    device_id: format!("dev-{i:04}").parse().unwrap(),
                    event: DeviceEventKind::Error {
                        version: None,
                        error: uplift_proto::WireError::new(
                            uplift_proto::ErrorKind::SlotIo,
                            "a message long enough to fill notifications: ".repeat(3),
                        ),
                    },
                },
                at: format!("2026-12-05T10:00:{:02}Z", i % 60),
            })
            .collect();
        let payloads = Signal::Events {
            events: events.clone(),
        }
        .payloads("pid1-00");
        assert!(payloads.len() > 1);
        assert!(payloads.iter().all(|p| p.len() < 8000));

        let dir = tempfile::tempdir().unwrap();
        let state = crate::service::testing::state(dir.path()).await;
        let mut made_here = state.events.subscribe();
        let (mut stream, _) = state
            .events
            .open_stream_with(None, &Default::default())
            .unwrap();
        for payload in &payloads {
            let envelope: Envelope = serde_json::from_str(payload).unwrap();
            apply(&state, envelope.signal);
        }
        for sent in &events {
            let got = stream.receiver.try_recv().unwrap();
            assert_eq!((&got.about, &got.at), (&sent.about, &sent.at));
        }
        assert!(
            made_here.try_recv().is_err(),
            "another replica's events are its own to deliver to webhooks"
        );
        assert_eq!(state.live.pending_events(), 0, "nor are they history here");
    }

    /// One signal of each kind but relayed events, naming `devices`.
    fn every_kind_but_events(devices: Vec<DeviceId>) -> Vec<Signal> {
        vec![
            Signal::Offered {
                target: target(1),
                devices: devices.clone(),
            },
            Signal::TakenBack {
                rollout_id: 1,
                devices: devices.clone(),
            },
            Signal::RebootGate {
                rollout_id: 1,
                hold: true,
            },
            Signal::Removed { devices },
            Signal::Watching,
        ]
    }

    #[test]
    fn every_signal_reads_back_as_sent_offers_by_their_own_path_too() {
        let devices: Vec<DeviceId> = vec!["offered".parse().unwrap(), "dev-2".parse().unwrap()];
        // An event whose text quotes an offer's tag is still an event.
        let quoting_an_offer = Signal::Events {
            events: vec![RelayedEvent {
                about: EventAbout::Device {
                    device_id: "dev-1".parse().unwrap(),
                    event: uplift_proto::api::DeviceEventKind::Error {
                        version: None,
                        error: uplift_proto::WireError::new(
                            uplift_proto::ErrorKind::SlotIo,
                            r#"{"signal":"offered","target":{},"devices":[]}"#,
                        ),
                    },
                },
                at: "2026-12-05T10:00:00Z".into(),
            }],
        };
        let mut signals = every_kind_but_events(devices);
        signals.push(quoting_an_offer);
        for signal in signals {
            for payload in signal.payloads("pid1-00") {
                assert_eq!(read_payload(&payload).unwrap(), signal, "{payload}");
            }
        }
        assert!(read_payload(r#"{"from":"x","signal":"offered","devices":[]}"#).is_err());
    }

    #[test]
    fn relayed_events_are_read_only_where_a_stream_is_open_and_other_signals_always() {
        let events = Signal::Events {
            events: vec![RelayedEvent {
                about: EventAbout::Rollout {
                    rollout_id: 1,
                    event: uplift_proto::events::RolloutEvent::Finished,
                },
                at: "2026-12-05T10:00:00Z".into(),
            }],
        };
        for payload in events.payloads("pid1-00") {
            assert!(!worth_reading(&payload, 0), "{payload}");
            assert!(worth_reading(&payload, 1), "{payload}");
        }
        for signal in every_kind_but_events(vec!["events".parse().unwrap()]) {
            for payload in signal.payloads("pid1-00") {
                assert!(worth_reading(&payload, 0), "{payload}");
            }
        }
    }

    #[test]
    fn a_replica_relays_while_another_watches_and_asks_while_it_watches() {
        let t0 = Instant::now();
        assert!(!relay_wanted(None, t0), "nobody asked");
        assert!(relay_wanted(Some(t0 + WATCH_LEASE), t0 + WATCH_LEASE / 2));
        assert!(!relay_wanted(Some(t0 + WATCH_LEASE), t0 + WATCH_LEASE));

        assert!(!watch_due(0, true, None, t0), "no stream here");
        assert!(watch_due(1, false, None, t0), "never asked");
        assert!(!watch_due(1, false, Some(t0), t0 + WATCH_RENEW / 2));
        assert!(
            watch_due(1, true, Some(t0), t0 + WATCH_RENEW / 2),
            "a stream opened"
        );
        assert!(watch_due(1, false, Some(t0), t0 + WATCH_RENEW));
        assert!(
            WATCH_RENEW * 2 < WATCH_LEASE,
            "a lease outlives a missed renewal"
        );
    }

    #[tokio::test]
    async fn another_replicas_request_for_events_starts_the_lease_here() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::service::testing::state(dir.path()).await;
        assert!(!state.signals.watched(Instant::now()));
        apply(&state, Signal::Watching);
        assert!(state.signals.watched(Instant::now()));
        assert!(!state.signals.watched(Instant::now() + WATCH_LEASE));
    }
}
