//! The server's event bus: device and rollout events as they happen, to
//! every subscriber (the server-sent event stream, the webhook queue).
//! Publishing never waits, so a device session can publish; a subscriber
//! that falls more than [`CAPACITY`] events behind is told how many it
//! missed instead of slowing the fleet down. The newest
//! [`RECENT_EVENTS`] are kept too, so a console that opens (or reconnects)
//! is first sent the recent past it asks for.
//!
//! With replicas, each relays the events it makes to the others
//! ([`crate::signals::relay_events`]) while one of them has a stream open:
//! a stream opened on any replica shows the whole fleet's events, while
//! webhooks take only the events made here, so each is delivered once, by
//! the replica that made it.

use crate::store::Timestamp;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, Notify, OwnedSemaphorePermit, Semaphore};
use uplift_proto::events::{EventAbout, EventFilter, FleetEvent, RECENT_EVENTS};

/// Events a subscriber may fall behind by before it misses some.
pub const CAPACITY: usize = 8192;

/// Event streams open at once: each holds a connection for as long as its
/// client listens, so they have a budget of their own, apart from the
/// admin requests'.
pub const MAX_STREAMS: usize = 64;

#[derive(Debug)]
pub struct EventBus {
    /// Every event, made here or relayed: for streams.
    sender: broadcast::Sender<Arc<FleetEvent>>,
    /// The events made here: for webhooks and the relay to other replicas.
    made_here: broadcast::Sender<Arc<FleetEvent>>,
    /// The last sequence number given and the newest events. One lock for
    /// both, also held while sending, so a new stream's backlog and its
    /// subscription neither overlap nor leave a gap.
    past: Mutex<Past>,
    streams: Arc<Semaphore>,
    /// Woken whenever a stream opens: with replicas, the others are asked
    /// at once to relay their events here.
    stream_opened: Notify,
}

#[derive(Debug, Default)]
struct Past {
    seq: u64,
    recent: VecDeque<Arc<FleetEvent>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
            made_here: broadcast::channel(CAPACITY).0,
            past: Mutex::new(Past::default()),
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            stream_opened: Notify::new(),
        }
    }
}

/// The past events a new stream is sent first, oldest first, and how many
/// it asked for (after a `Last-Event-ID`) that are no longer held.
#[derive(Debug, Default)]
pub struct Backlog {
    pub events: Vec<Arc<FleetEvent>>,
    pub missed: u64,
}

/// Which past events a new stream is sent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// The newest this many that the stream's filter takes.
    Newest(usize),
    /// Everything after this sequence number (`Last-Event-ID`).
    After(u64),
}

/// An open event stream's subscription and its place in the budget.
#[derive(Debug)]
pub struct StreamSlot {
    pub receiver: broadcast::Receiver<Arc<FleetEvent>>,
    _permit: OwnedSemaphorePermit,
}

impl EventBus {
    /// Numbers an event made here, stamps it `at` (shown as the store
    /// shows times: RFC 3339, to the microsecond), and hands it to every
    /// subscriber.
    pub fn publish(&self, about: EventAbout, at: Timestamp) {
        let event = self.record(about, &at.to_string());
        let _ = self.made_here.send(event);
    }

    /// Like [`publish`](Self::publish), for an event another replica made
    /// (and delivers to webhooks itself): for streams only.
    pub fn publish_relayed(&self, about: EventAbout, at: &str) {
        self.record(about, at);
    }

    /// Numbers the event, keeps it among the recent, and sends it to the
    /// streams, all under the lock (see `past`).
    fn record(&self, about: EventAbout, at: &str) -> Arc<FleetEvent> {
        let mut past = self.past.lock().unwrap_or_else(|e| e.into_inner());
        past.seq += 1;
        let event = Arc::new(FleetEvent {
            seq: past.seq,
            at: at.to_owned(),
            about,
        });
        if past.recent.len() == RECENT_EVENTS {
            past.recent.pop_front();
        }
        past.recent.push_back(event.clone());
        // No subscriber is not an error: nobody is listening yet.
        let _ = self.sender.send(event.clone());
        event
    }

    /// The events made here from now on (not those relayed from other
    /// replicas).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FleetEvent>> {
        self.made_here.subscribe()
    }

    /// A subscription for a client's stream, or `None` when
    /// [`MAX_STREAMS`] are open.
    pub fn open_stream(&self) -> Option<StreamSlot> {
        self.open_stream_with(None, &EventFilter::default())
            .map(|(slot, _)| slot)
    }

    /// Like [`open_stream`](Self::open_stream), with the past events
    /// `replay` asks for that `filter` takes, oldest first, and how many
    /// events after a `Last-Event-ID` are no longer held. Events published
    /// later arrive on the receiver only.
    pub fn open_stream_with(
        &self,
        replay: Option<Replay>,
        filter: &EventFilter,
    ) -> Option<(StreamSlot, Backlog)> {
        let permit = self.streams.clone().try_acquire_owned().ok()?;
        let past = self.past.lock().unwrap_or_else(|e| e.into_inner());
        let backlog = match replay {
            None => Backlog::default(),
            Some(replay) => past.replay(replay, filter),
        };
        let slot = StreamSlot {
            receiver: self.sender.subscribe(),
            _permit: permit,
        };
        drop(past);
        self.stream_opened.notify_waiters();
        Some((slot, backlog))
    }

    /// Event streams open here now.
    pub fn streams_open(&self) -> usize {
        MAX_STREAMS - self.streams.available_permits()
    }

    /// Resolves when a stream opens after this is called.
    pub async fn stream_opens(&self) {
        self.stream_opened.notified().await;
    }
}

impl Past {
    fn replay(&self, replay: Replay, filter: &EventFilter) -> Backlog {
        let taken = |e: &&Arc<FleetEvent>| filter.matches(&e.about);
        match replay {
            Replay::Newest(n) => {
                let mut newest: Vec<_> = self
                    .recent
                    .iter()
                    .rev()
                    .filter(taken)
                    .take(n)
                    .cloned()
                    .collect();
                newest.reverse();
                Backlog {
                    events: newest,
                    missed: 0,
                }
            }
            // A sequence number from the future is from an earlier server
            // process (they start at 1): all we hold is new to the client.
            Replay::After(last) if last > self.seq => Backlog {
                events: self.recent.iter().filter(taken).cloned().collect(),
                missed: 0,
            },
            Replay::After(last) => {
                let oldest = self.recent.front().map_or(self.seq + 1, |e| e.seq);
                let missed = oldest.saturating_sub(last + 1);
                let events = self.recent.iter().filter(|e| e.seq > last).filter(taken);
                Backlog {
                    events: events.cloned().collect(),
                    missed,
                }
            }
        }
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
        bus.publish(finished(0), Timestamp::now()); // before anyone listens: dropped
        let mut fast = bus.subscribe();
        let mut slow = bus.subscribe();
        for id in 1..=(CAPACITY as i64 + 5) {
            bus.publish(finished(id), Timestamp::now());
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
    fn a_relayed_event_reaches_streams_but_not_what_delivers_webhooks() {
        let bus = EventBus::default();
        let mut made_here = bus.subscribe();
        let (mut stream, _) = bus.open_stream_with(None, &EventFilter::default()).unwrap();
        bus.publish_relayed(finished(1), "t1");
        bus.publish(finished(2), Timestamp::now());
        assert_eq!(stream.receiver.try_recv().unwrap().about, finished(1));
        assert_eq!(stream.receiver.try_recv().unwrap().about, finished(2));
        let here = made_here.try_recv().unwrap();
        assert_eq!((here.about.clone(), here.seq), (finished(2), 2));
        assert!(
            made_here.try_recv().is_err(),
            "another replica's event is not ours to deliver"
        );
    }

    #[test]
    fn a_new_stream_gets_the_recent_past_then_only_new_events() {
        let bus = EventBus::default();
        for id in 1..=(RECENT_EVENTS as i64 + 10) {
            bus.publish(finished(id), Timestamp::now());
        }
        let all = EventFilter::default();
        let open = |replay| bus.open_stream_with(Some(replay), &all).unwrap();
        let newest = |n| {
            let backlog = open(Replay::Newest(n)).1;
            (backlog.events, backlog.missed)
        };
        let (events, missed) = newest(3);
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        let last = RECENT_EVENTS as u64 + 10;
        assert_eq!((seqs, missed), (vec![last - 2, last - 1, last], 0));
        assert_eq!(newest(5000).0.len(), RECENT_EVENTS, "only so many are held");

        // Reconnecting after event `last - 1`: just the one it missed.
        let (mut slot, Backlog { events, missed }) = open(Replay::After(last - 1));
        assert_eq!((events.len(), events[0].seq, missed), (1, last, 0));
        bus.publish(finished(-1), Timestamp::now());
        assert_eq!(slot.receiver.try_recv().unwrap().seq, last + 1);
        assert!(slot.receiver.try_recv().is_err(), "no event twice");

        // Too long away: told how many are gone.
        let Backlog { events, missed } = open(Replay::After(1)).1;
        assert_eq!(events.len(), RECENT_EVENTS);
        assert_eq!(missed, last + 1 - RECENT_EVENTS as u64 - 1);
        // An id from before a server restart: everything held is new.
        let Backlog { events, missed } = open(Replay::After(u64::MAX - 1)).1;
        assert_eq!((events.len(), missed), (RECENT_EVENTS, 0));
        drop(slot);

        // The newest few of those a filter takes, however far back.
        let one = EventFilter {
            rollout: Some(500),
            ..EventFilter::default()
        };
        bus.publish(finished(6), Timestamp::now());
        let events = bus
            .open_stream_with(Some(Replay::Newest(3)), &one)
            .unwrap()
            .1
            .events;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].about, finished(500));
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
