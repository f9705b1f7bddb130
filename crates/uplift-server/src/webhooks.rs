//! Webhook delivery. Every event a webhook's filter takes is queued in the
//! database (the delivery log), then POSTed to the webhook's URL, signed
//! with HMAC-SHA256 under the webhook's secret, and tried again with
//! backoff until the receiver answers 2xx or [`MAX_ATTEMPTS`] have failed.
//! The queue outlives a restart; with several replicas on one database,
//! one sends at a time (a lease), while each queues what it saw.

use crate::events::CAPACITY;
use crate::state::AppState;
use crate::store::control::{Attempt, DueDelivery, NewDelivery, WebhookRecord};
use crate::store::{StoreError, Timestamp};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{broadcast, watch};
use uplift_proto::events::{
    signed_payload, FleetEvent, DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
};
use uplift_proto::pace::backoff;
use uplift_proto::{ErrorKind, WireError};

/// Attempts at one delivery before it is marked failed: with the backoff
/// below, about ten minutes of a receiver being down.
pub const MAX_ATTEMPTS: u32 = 8;
const RETRY_MIN: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// A receiver must answer within this.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Deliveries sent at once, and looked at per tick.
const SEND_CONCURRENCY: usize = 8;
const BATCH: u32 = 64;
const TICK: Duration = Duration::from_millis(500);
pub const LEASE: &str = "webhook-deliverer";
/// Finished deliveries kept in each webhook's log; older ones are forgotten.
pub const KEEP_PER_WEBHOOK: u32 = 10_000;
/// Ticks between prunings of the delivery log (about a minute).
const PRUNE_EVERY: u32 = 120;
const LEASE_TTL: Duration = Duration::from_secs(15);

/// The signature header's value for `body` sent at `timestamp`.
pub fn signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|e| unreachable!("HMAC takes a key of any length: {e}"));
    mac.update(&signed_payload(timestamp, body));
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// When to try a delivery again after its `attempts`-th attempt failed
/// (ms since the epoch), or `None` when that was the last.
pub fn retry_at(attempts: u32, now_ms: i64, draw: f64) -> Option<i64> {
    if attempts >= MAX_ATTEMPTS {
        return None;
    }
    let wait = backoff(attempts.saturating_sub(1), RETRY_MIN, RETRY_MAX, draw);
    Some(now_ms + wait.as_millis() as i64)
}

/// The deliveries `events` make for `webhooks` (removed ones take nothing).
pub fn deliveries_for(
    events: &[Arc<FleetEvent>],
    webhooks: &[WebhookRecord],
    created_at: Timestamp,
    now_ms: i64,
) -> Vec<NewDelivery> {
    let mut out = Vec::new();
    for event in events {
        let payload = serde_json::to_string(&**event)
            .unwrap_or_else(|e| unreachable!("an event serializes: {e}"));
        for hook in webhooks {
            if hook.view.removed_at.is_none() && hook.view.filter.matches(&event.about) {
                out.push(NewDelivery {
                    webhook_id: hook.view.id,
                    event: event.about.name(),
                    payload: payload.clone(),
                    created_at,
                    due_ms: now_ms,
                });
            }
        }
    }
    out
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn failed(message: String) -> WireError {
    WireError::new(ErrorKind::WebhookFailed, message)
}

/// One attempt: the receiver's status, and the error if it was not 2xx.
async fn send(client: &reqwest::Client, d: &DueDelivery) -> (Option<u16>, Option<WireError>) {
    let timestamp = OffsetDateTime::now_utc().unix_timestamp().to_string();
    let response = client
        .post(&d.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(
            SIGNATURE_HEADER,
            signature(&d.secret, &timestamp, d.payload.as_bytes()),
        )
        .header(TIMESTAMP_HEADER, &timestamp)
        .header(DELIVERY_HEADER, d.id.to_string())
        .header(EVENT_HEADER, &d.event)
        .body(d.payload.clone())
        .send()
        .await;
    match response {
        Ok(r) if r.status().is_success() => (Some(r.status().as_u16()), None),
        Ok(r) => {
            let status = r.status();
            (
                Some(status.as_u16()),
                Some(failed(format!(
                    "{} answered {status}; it must answer 2xx to take a delivery",
                    d.url
                ))),
            )
        }
        Err(e) => (
            None,
            Some(failed(format!(
                "cannot deliver to {}: {e}; is the receiver up and reachable from the server?",
                d.url
            ))),
        ),
    }
}

async fn queue(state: &AppState, seen: &Seen) -> Result<(), StoreError> {
    let events = seen.take();
    if events.is_empty() {
        return Ok(());
    }
    let queued = async {
        let webhooks = state.store.webhooks().await?;
        seen.any_webhooks.store(
            webhooks.iter().any(|w| w.view.removed_at.is_none()),
            Relaxed,
        );
        let now = OffsetDateTime::now_utc();
        let deliveries = deliveries_for(&events, &webhooks, Timestamp::from(now), unix_ms(now));
        state.store.insert_deliveries(&deliveries).await
    }
    .await;
    if queued.is_err() {
        seen.put_back(events);
    }
    queued
}

async fn send_due(state: &AppState, client: &reqwest::Client) -> Result<(), StoreError> {
    let due = state
        .store
        .due_deliveries(unix_ms(OffsetDateTime::now_utc()), BATCH)
        .await?;
    let results: Vec<(DueDelivery, Option<u16>, Option<WireError>)> =
        futures_util::stream::iter(due)
            .map(|d| async move {
                let (status, error) = send(client, &d).await;
                (d, status, error)
            })
            .buffer_unordered(SEND_CONCURRENCY)
            .collect()
            .await;
    for (d, status, error) in results {
        let now = OffsetDateTime::now_utc();
        let attempts = d.attempts + 1;
        let retry_at_ms = match &error {
            Some(_) => retry_at(attempts, unix_ms(now), rand::random()),
            None => None,
        };
        if let Some(e) = &error {
            tracing::warn!(webhook = d.webhook_id, delivery = d.id, attempts, "{e}");
        }
        state
            .store
            .record_attempt(
                d.id,
                &Attempt {
                    at: Timestamp::from(now),
                    status,
                    error: error.as_ref(),
                    retry_at_ms,
                },
            )
            .await?;
    }
    Ok(())
}

/// Queues and sends deliveries until shutdown.
pub async fn run(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let client = match reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(SEND_TIMEOUT)
        .connect_timeout(SEND_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(
                "webhooks: cannot build an HTTPS client ({e}); no webhook will be delivered"
            );
            return;
        }
    };
    let holder = format!("pid{}-{:016x}", std::process::id(), rand::random::<u64>());
    // Events are taken off the bus by a task that does nothing else: a
    // tick below may wait seconds on the database or on a slow receiver,
    // and the bus holds only CAPACITY events for a subscriber.
    let seen = Arc::new(Seen::default());
    let collector = tokio::spawn(collect(
        state.events.subscribe(),
        seen.clone(),
        shutdown.clone(),
    ));
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut until_prune = 0u32;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            _ = ticks.tick() => {}
        }
        let work = async {
            if let Err(e) = queue(&state, &seen).await {
                tracing::warn!("webhooks: cannot queue deliveries: {e}");
            }
            let now_ms = unix_ms(OffsetDateTime::now_utc());
            match state
                .store
                .try_lease(LEASE, &holder, now_ms, LEASE_TTL.as_millis() as i64)
                .await
            {
                Ok(true) => {
                    if let Err(e) = send_due(&state, &client).await {
                        tracing::warn!("webhooks: {e}");
                    }
                    if until_prune == 0 {
                        until_prune = PRUNE_EVERY;
                        match state.store.prune_deliveries(KEEP_PER_WEBHOOK).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(forgotten = n, "webhooks: delivery log pruned"),
                            Err(e) => tracing::warn!("webhooks: {e}"),
                        }
                    }
                    until_prune -= 1;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!("webhooks: {e}"),
            }
        };
        // A receiver that hangs holds a send for its whole timeout, a batch
        // for several: shutdown does not wait for them. A send cut short
        // is not recorded and goes again (deliveries are at least once).
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            _ = work => {}
        }
    }
    // The collector takes what the bus still holds, then stops.
    let _ = collector.await;
    // What was seen but not yet queued is queued, so a clean stop loses nothing.
    if let Err(e) = queue(&state, &seen).await {
        tracing::warn!("webhooks: cannot queue deliveries at shutdown: {e}");
    }
    let _ = state.store.release_lease(LEASE, &holder).await;
}

/// Events taken off the bus and not yet queued in the database.
#[derive(Debug, Default)]
struct Seen {
    events: std::sync::Mutex<Vec<Arc<FleetEvent>>>,
    /// Some webhook existed when events were last queued: events missed
    /// while none does would have gone nowhere, and are not worth a warning.
    any_webhooks: AtomicBool,
}

impl Seen {
    fn take(&self) -> Vec<Arc<FleetEvent>> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn hold(&self, event: Arc<FleetEvent>) {
        let mut held = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if held.len() < MAX_UNQUEUED {
            held.push(event);
        } else {
            tracing::warn!(
                "webhooks: {MAX_UNQUEUED} events wait for the database already; event {} is not queued",
                event.seq
            );
        }
    }

    /// Puts back events a failed write took, before those seen since.
    fn put_back(&self, mut events: Vec<Arc<FleetEvent>>) {
        let mut held = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.append(&mut held);
        *held = events;
    }
}

/// Events held in memory at most while the database cannot take them; past
/// that the newest are dropped, and said so, rather than the server's
/// memory.
const MAX_UNQUEUED: usize = 200_000;

/// Takes every event made here off the bus into `seen` until shutdown,
/// then what the bus still holds.
async fn collect(
    mut events: broadcast::Receiver<Arc<FleetEvent>>,
    seen: Arc<Seen>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let received = tokio::select! {
            biased;
            received = events.recv() => received,
            _ = shutdown.changed() => break,
        };
        match received {
            Ok(event) => seen.hold(event),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                if seen.any_webhooks.load(Relaxed) {
                    tracing::warn!(
                        missed,
                        "webhooks: fell more than {CAPACITY} events behind; {missed} events were not queued"
                    );
                } else {
                    tracing::debug!(
                        missed,
                        "webhooks: none configured; {missed} events passed by"
                    );
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
    while let Ok(event) = events.try_recv() {
        seen.hold(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::stamp::ts;
    use uplift_proto::events::{EventAbout, EventFilter, RolloutEvent, Subject, WebhookView};

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"1700000000.{\"a\":1}");
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(signature("Jefe", "1700000000", b"{\"a\":1}"), expected);
        assert_ne!(signature("Jefe", "1700000001", b"{\"a\":1}"), expected);
        assert_ne!(signature("jefe", "1700000000", b"{\"a\":1}"), expected);
        // The HMAC itself, against RFC 4231's test case 2.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_made_while_a_receiver_hangs_are_all_queued_none_lost_to_the_bus() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(crate::service::testing::state(dir.path()).await);
        // A receiver that takes connections and never answers: each send
        // waits its whole timeout.
        let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", receiver.local_addr().unwrap());
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = receiver.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(socket);
            }
        });
        let hook = state
            .store
            .insert_webhook(&crate::store::control::NewWebhook {
                url: &url,
                secret: "whsec_test",
                filter: &EventFilter::default(),
                created_at: ts("2026-12-05T00:00:00Z"),
                created_by: "test",
            })
            .await
            .unwrap();
        let finished = |rollout_id| EventAbout::Rollout {
            rollout_id,
            event: RolloutEvent::Finished,
        };
        let (stop, stopped) = watch::channel(false);
        let deliverer = tokio::spawn(run(state.clone(), stopped));
        // Probes until the receiver holds a delivery (the first ones may
        // come before the deliverer subscribes).
        let probe = EventAbout::Device {
            device_id: "dev-1".parse().unwrap(),
            event: uplift_proto::api::DeviceEventKind::Withdrawn { rollout_id: 0 },
        };
        while accepted.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            state
                .events
                .publish(probe.clone(), ts("2026-12-05T00:00:00Z"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The deliverer waits on the receiver; the fleet meanwhile makes
        // more events than the bus holds for a subscriber.
        // (From many sessions in the fleet, so a few hundred at a time,
        // not one tight loop that starves every other task.)
        let burst = CAPACITY + 2_000;
        for id in 1..=burst {
            state
                .events
                .publish(finished(id as i64), ts("2026-12-05T00:00:01Z"));
            if id % 250 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        stop.send(true).unwrap();
        deliverer.await.unwrap();
        let queued = state
            .store
            .deliveries(hook.id, None, 2 * burst as u32)
            .await
            .unwrap();
        let finished = queued
            .iter()
            .filter(|d| d.event == "rollout.finished")
            .count();
        assert_eq!(finished, burst, "every event queued once");
    }

    #[test]
    fn retries_back_off_and_stop_after_the_last_attempt() {
        let first = retry_at(1, 0, 0.0).unwrap();
        let second = retry_at(2, 0, 0.0).unwrap();
        assert!(first >= 1_000 && second > first, "{first} {second}");
        assert!(retry_at(MAX_ATTEMPTS - 1, 0, 1.0).unwrap() <= RETRY_MAX.as_millis() as i64);
        assert_eq!(retry_at(MAX_ATTEMPTS, 0, 0.5), None);
    }

    #[test]
    fn each_event_goes_to_each_live_webhook_whose_filter_takes_it() {
        let hook = |id, subject, removed: bool| WebhookRecord {
            view: WebhookView {
                id,
                url: format!("http://127.0.0.1:9/{id}"),
                filter: EventFilter {
                    subject,
                    ..EventFilter::default()
                },
                created_at: "t".into(),
                created_by: "bootstrap-admin".into(),
                removed_at: removed.then(|| "t".into()),
            },
            secret: "s".into(),
        };
        let hooks = [
            hook(1, None, false),
            hook(2, Some(Subject::Device), false),
            hook(3, Some(Subject::Rollout), false),
            hook(4, None, true),
        ];
        let event = Arc::new(FleetEvent {
            seq: 1,
            at: "t".into(),
            about: EventAbout::Rollout {
                rollout_id: 5,
                event: RolloutEvent::Finished,
            },
        });
        let made = deliveries_for(
            std::slice::from_ref(&event),
            &hooks,
            ts("2026-01-01T00:00:00Z"),
            42,
        );
        let to: Vec<i64> = made.iter().map(|d| d.webhook_id).collect();
        assert_eq!(to, [1, 3]);
        assert_eq!(made[0].event, "rollout.finished");
        assert_eq!(made[0].due_ms, 42);
        let body: FleetEvent = serde_json::from_str(&made[0].payload).unwrap();
        assert_eq!(body, *event);
    }
}
