//! The event bus behind `GET /v1/events`: numbered events, a bounded replay buffer for clients
//! that reconnect with `Last-Event-ID`, and a broadcast channel for live delivery.
//!
//! A client too slow to keep up falls more than the channel's capacity behind; it is then
//! disconnected (it can reconnect and resume from the buffer) rather than slowing the others.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::broadcast;

/// Events kept for replay, and the live channel's capacity.
pub const REPLAY: usize = 1024;

/// One event as sent: its sequence number, name (`card.read`…) and JSON data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Numbered {
    pub id: u64,
    pub name: String,
    pub data: String,
}

pub struct Bus {
    inner: Mutex<Inner>,
    live: broadcast::Sender<Numbered>,
}

struct Inner {
    next: u64,
    buffer: VecDeque<Numbered>,
}

/// What a (re)connecting client gets before the live events.
pub enum Backlog {
    /// The events after the client's last one.
    Events(Vec<Numbered>),
    /// The client's last event is older than the buffer: it must re-read the state.
    Resync,
}

impl Default for Bus {
    fn default() -> Self {
        Bus {
            inner: Mutex::new(Inner {
                next: 1,
                buffer: VecDeque::with_capacity(REPLAY),
            }),
            live: broadcast::channel(REPLAY).0,
        }
    }
}

impl Bus {
    /// Numbers and publishes an event.
    pub fn publish(&self, name: &str, data: String) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let event = Numbered {
            id: inner.next,
            name: name.to_string(),
            data,
        };
        inner.next += 1;
        if inner.buffer.len() == REPLAY {
            inner.buffer.pop_front();
        }
        inner.buffer.push_back(event.clone());
        // Sent under the lock, so live order equals buffer order. No receiver is not an error.
        let _ = self.live.send(event);
    }

    /// Subscribes, and says what the client missed since `last_id` (none given: nothing).
    pub fn subscribe(&self, last_id: Option<u64>) -> (Backlog, broadcast::Receiver<Numbered>) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let receiver = self.live.subscribe();
        let backlog = match last_id {
            None => Backlog::Events(Vec::new()),
            Some(last) => {
                let oldest = inner.buffer.front().map_or(inner.next, |e| e.id);
                if last + 1 < oldest {
                    Backlog::Resync
                } else {
                    Backlog::Events(
                        inner
                            .buffer
                            .iter()
                            .filter(|e| e.id > last)
                            .cloned()
                            .collect(),
                    )
                }
            }
        };
        (backlog, receiver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_what_a_client_missed_then_goes_live() {
        let bus = Bus::default();
        for n in 0..5 {
            bus.publish("card.read", n.to_string());
        }
        let (backlog, mut live) = bus.subscribe(Some(3));
        let Backlog::Events(missed) = backlog else {
            panic!("resync")
        };
        assert_eq!(missed.iter().map(|e| e.id).collect::<Vec<_>>(), [4, 5]);
        bus.publish("card.removed", "x".into());
        assert_eq!(live.try_recv().unwrap().id, 6);
    }

    #[test]
    fn a_client_older_than_the_buffer_must_resync() {
        let bus = Bus::default();
        for _ in 0..REPLAY + 10 {
            bus.publish("e", String::new());
        }
        assert!(matches!(bus.subscribe(Some(3)).0, Backlog::Resync));
        assert!(
            matches!(bus.subscribe(Some(20)).0, Backlog::Events(ref e) if e.len() == REPLAY + 10 - 20)
        );
    }
}
