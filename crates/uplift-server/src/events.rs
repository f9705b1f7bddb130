//! The server's event bus: device and rollout events as they happen, to
//! every subscriber (the server-sent event stream, the webhook queue).
//! Publishing never waits, so a device session can publish; a subscriber
//! that falls more than [`CAPACITY`] events behind is told how many it
//! missed instead of slowing the fleet down.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{broadcast, OwnedSemaphorePermit, Semaphore};
use uplift_proto::events::{EventAbout, FleetEvent};

/// Events a subscriber may fall behind by before it misses some.
pub const CAPACITY: usize = 8192;

/// Event streams open at once: each holds a connection for as long as its
/// client listens, so they have a budget of their own, apart from the
/// admin requests'.
pub const MAX_STREAMS: usize = 64;

#[derive(Debug)]
pub struct EventBus {
    sender: broadcast::Sender<Arc<FleetEvent>>,
    seq: AtomicU64,
    streams: Arc<Semaphore>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
            seq: AtomicU64::new(0),
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
        }
    }
}

/// An open event stream's subscription and its place in the budget.
#[derive(Debug)]
pub struct StreamSlot {
    pub receiver: broadcast::Receiver<Arc<FleetEvent>>,
    _permit: OwnedSemaphorePermit,
}

impl EventBus {
    /// Numbers the event, stamps it `at`, and hands it to every subscriber.
    pub fn publish(&self, about: EventAbout, at: &str) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        // No subscriber is not an error: nobody is listening yet.
        let _ = self.sender.send(Arc::new(FleetEvent {
            seq,
            at: at.to_owned(),
            about,
        }));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FleetEvent>> {
        self.sender.subscribe()
    }

    /// A subscription for a client's stream, or `None` when
    /// [`MAX_STREAMS`] are open.
    pub fn open_stream(&self) -> Option<StreamSlot> {
        let permit = self.streams.clone().try_acquire_owned().ok()?;
        Some(StreamSlot {
            receiver: self.subscribe(),
            _permit: permit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uplift_proto::events::RolloutEvent;

    fn finished(rollout_id: i64) -> EventAbout {
        EventAbout::Rollout {
            rollout_id,
            event: RolloutEvent::Finished,
        }
    }

    #[tokio::test]
    async fn subscribers_get_events_in_order_and_a_slow_one_hears_what_it_missed() {
        let bus = EventBus::default();
        bus.publish(finished(0), "t0"); // before anyone listens: dropped
        let mut fast = bus.subscribe();
        let mut slow = bus.subscribe();
        for id in 1..=(CAPACITY as i64 + 5) {
            bus.publish(finished(id), "t");
            let event = fast.recv().await.unwrap();
            assert_eq!(event.seq, id as u64 + 1);
            assert_eq!(event.about, finished(id));
        }
        match slow.recv().await {
            Err(broadcast::error::RecvError::Lagged(missed)) => assert_eq!(missed, 5),
            other => panic!("expected a lag, got {other:?}"),
        }
        assert_eq!(slow.recv().await.unwrap().about, finished(6));
    }

    #[test]
    fn streams_beyond_the_budget_are_refused_until_one_closes() {
        let bus = EventBus::default();
        let open: Vec<StreamSlot> = (0..MAX_STREAMS)
            .map(|_| bus.open_stream().unwrap())
            .collect();
        assert!(bus.open_stream().is_none());
        drop(open);
        assert!(bus.open_stream().is_some());
    }
}
