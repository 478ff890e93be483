//! The event bus behind `GET /v1/events`: numbered events, a bounded replay buffer for clients
//! that reconnect with `Last-Event-ID`, and a broadcast channel for live delivery.
//!
//! A client too slow to keep up falls more than the channel's capacity behind; it is then
//! disconnected (it can reconnect and resume from the buffer) rather than slowing the others.
//!
//! Also the routes: `POST /v1/events/ticket` (a one-time ticket for a browser's `EventSource`)
//! and `GET /v1/events` itself.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;

use super::{error, gate::query_value, security, serve, Listener, Refusals};

/// Events kept for replay: at most this many, and at most [`REPLAY_BYTES`] of their data, so the
/// buffer's memory has a bound whatever a card puts in its events (a card with two dozen
/// certificates makes events of 10 KiB), and a station reaches it within minutes of starting.
pub const REPLAY: usize = 1024;
pub const REPLAY_BYTES: usize = 256 * 1024;
/// How far a live stream may fall behind before it is cut (it reconnects with `Last-Event-ID`
/// and gets the rest from the replay buffer). The channel's slots hold their events too.
pub const LIVE_CAPACITY: usize = 256;

/// One event as sent: its sequence number, name (`card.read`…) and JSON data. The data is
/// shared by the replay buffer, the live channel's slots and every stream that sends it: one
/// copy per event, not one per holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numbered {
    pub id: u64,
    pub name: String,
    pub data: std::sync::Arc<str>,
}

pub struct Bus {
    inner: Mutex<Inner>,
    live: broadcast::Sender<Numbered>,
}

struct Inner {
    /// This daemon's first event id: ids grow across restarts (see [`first_id`]).
    first: u64,
    next: u64,
    buffer: VecDeque<Numbered>,
    /// The data bytes of the events in `buffer`.
    bytes: usize,
}

/// What a (re)connecting client gets before the live events.
pub enum Backlog {
    /// The events after the client's last one.
    Events(Vec<Numbered>),
    /// The client's last event is older than the buffer: it must re-read the state.
    Resync,
}

/// The first event id of a daemon started at `now`: microseconds since the Unix epoch. A
/// daemon that restarts numbers on from above every id it gave before (unless it gave more than
/// one event a microsecond), so a client that resumes with an id from before the restart is
/// told to resync instead of taking the new events for all it missed. Below 2^53 until the
/// year 2255, so the ids stay exact as JavaScript numbers.
pub fn first_id(now: std::time::SystemTime) -> u64 {
    let micros = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    u64::try_from(micros).unwrap_or(u64::MAX).max(1)
}

impl Bus {
    /// A bus whose first event is numbered `first` (at least 1: 0 means "from the first").
    pub fn starting_at(first: u64) -> Bus {
        let first = first.max(1);
        Bus {
            inner: Mutex::new(Inner {
                first,
                next: first,
                buffer: VecDeque::with_capacity(REPLAY),
                bytes: 0,
            }),
            live: broadcast::channel(LIVE_CAPACITY).0,
        }
    }

    /// Numbers and publishes an event.
    pub fn publish(&self, name: &str, data: String) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let event = Numbered {
            id: inner.next,
            name: name.to_string(),
            data: data.into(),
        };
        inner.next += 1;
        inner.bytes += event.data.len();
        inner.buffer.push_back(event.clone());
        while inner.buffer.len() > REPLAY || inner.bytes > REPLAY_BYTES {
            match inner.buffer.pop_front() {
                Some(old) => inner.bytes -= old.data.len(),
                None => break,
            }
        }
        // Sent under the lock, so live order equals buffer order. No receiver is not an error.
        let _ = self.live.send(event);
    }

    /// Subscribes, and says what the client missed since `last_id` (none given: nothing; 0:
    /// every event since the daemon started, while the buffer holds them all). An id older than
    /// the buffer, or one this daemon never gave (from before a restart whose clock was set
    /// back), asks for a resync.
    pub fn subscribe(&self, last_id: Option<u64>) -> (Backlog, broadcast::Receiver<Numbered>) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let receiver = self.live.subscribe();
        let backlog = match last_id {
            None => Backlog::Events(Vec::new()),
            Some(last) => {
                let last = if last == 0 { inner.first - 1 } else { last };
                let oldest = inner.buffer.front().map_or(inner.next, |e| e.id);
                if last.saturating_add(1) < oldest || last >= inner.next {
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

fn sse(event: &Numbered) -> SseEvent {
    SseEvent::default()
        .id(event.id.to_string())
        .event(event.name.clone())
        .data(&*event.data)
}

/// `POST /v1/events/ticket`: a one-time ticket for `GET /v1/events?ticket=…`, for browser
/// `EventSource`, which cannot send the Authorization header. The page asks with its token
/// (`fetch`, preflighted like any call), then opens the stream with the ticket within 30 s; the
/// stream is checked as if the token came with it (Host, Origin, scope).
#[utoipa::path(post, path = "/v1/events/ticket", responses(Refusals, (status = 201, description = "A ticket: {\"ticket\", \"expires_in_s\"}"), (status = 400, description = "The caller has no bearer token (the Unix socket needs no ticket)"), (status = 429, description = "Too many failed authentications or outstanding tickets")))]
pub(super) async fn event_ticket(
    State(l): State<Listener>,
    Extension(caller): Extension<security::Identity>,
    headers: HeaderMap,
) -> Response {
    if security::bearer(&headers).is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "no_token",
            "tickets are issued to callers with a bearer token",
        );
    }
    match l.shared.clients.issue_ticket(&caller) {
        Ok(ticket) => (
            StatusCode::CREATED,
            Json(json!({
                "ticket": ticket,
                "expires_in_s": security::TICKET_LIFETIME.as_secs(),
            })),
        )
            .into_response(),
        Err(e) => {
            let (status, code) = match e {
                security::TicketError::TooMany => {
                    (StatusCode::TOO_MANY_REQUESTS, "too_many_tickets")
                }
                security::TicketError::NoRandomness => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "no_randomness")
                }
            };
            error(status, code, &e.to_string())
        }
    }
}

#[utoipa::path(get, path = "/v1/events", params(("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event", maximum = 9223372036854775807_u64), ("last_event_id" = Option<u64>, Query, description = "Resume after this event, for a browser EventSource reopened with a new ticket (the header wins)", maximum = 9223372036854775807_u64), ("ticket" = Option<String>, Query, description = "A one-time ticket from POST /v1/events/ticket, instead of the Authorization header")), responses(Refusals, (status = 400, description = "Last-Event-ID is not an event id"), (status = 200, description = "Server-Sent Events", content_type = "text/event-stream"), (status = 401, description = "Missing or unknown token or ticket"), (status = 429, description = "Too many failed authentications, or too many event streams of this client")))]
pub(super) async fn events(
    State(l): State<Listener>,
    parts: axum::http::request::Parts,
) -> Response {
    let (headers, uri) = (&parts.headers, &parts.uri);
    // The stream counts against its client's cap and keeps its connection from being closed as
    // idle (requests through the router alone, in unit tests, have no connection).
    let guard = match (
        parts.extensions.get::<serve::Connection>(),
        parts.extensions.get::<security::Identity>(),
    ) {
        (Some(connection), Some(caller)) => match connection.open_stream(&caller.account) {
            Some(guard) => Some(guard),
            None => {
                return error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_streams",
                    "this client has too many event streams open",
                )
            }
        },
        _ => None,
    };
    let given = headers
        .get("last-event-id")
        .map(|v| v.to_str().ok())
        .or_else(|| query_value(uri.query(), "last_event_id").map(Some));
    let last = match given.map(|v| {
        v.and_then(|v| v.trim().parse::<i64>().ok())
            .and_then(|id| u64::try_from(id).ok())
    }) {
        None => None,
        Some(Some(id)) => Some(id),
        Some(None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_last_event_id",
                "Last-Event-ID must be an event id (a number)",
            )
        }
    };
    let (backlog, live) = l.shared.bus.subscribe(last);
    let first: Vec<SseEvent> = match backlog {
        Backlog::Events(missed) => missed.iter().map(sse).collect(),
        Backlog::Resync => vec![SseEvent::default().event("resync").data("{}")],
    };
    // A lagging client gets an error from the channel: its stream ends there, it reconnects
    // with Last-Event-ID, and nobody else waited for it.
    let live = BroadcastStream::new(live)
        .take_while(Result::is_ok)
        .filter_map(|e| e.ok().map(|e| sse(&e)));
    let stream = tokio_stream::iter(first).chain(live).map(move |e| {
        let _held = &guard;
        Ok::<_, std::convert::Infallible>(e)
    });
    let stream = futures_util::StreamExt::take_until(stream, l.shared.stopped());
    Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("keep-alive"),
        )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_what_a_client_missed_then_goes_live() {
        let bus = Bus::starting_at(1);
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
        let bus = Bus::starting_at(1);
        for _ in 0..REPLAY + 10 {
            bus.publish("e", String::new());
        }
        assert!(matches!(bus.subscribe(Some(3)).0, Backlog::Resync));
        assert!(
            matches!(bus.subscribe(Some(20)).0, Backlog::Events(ref e) if e.len() == REPLAY + 10 - 20)
        );
    }

    #[test]
    fn a_client_from_before_a_restart_must_resync() {
        let before = Bus::starting_at(first_id(std::time::UNIX_EPOCH + Duration::from_secs(100)));
        before.publish("card.read", String::new());
        let last = before.inner.lock().unwrap().next - 1;
        let after = Bus::starting_at(first_id(std::time::UNIX_EPOCH + Duration::from_secs(160)));
        after.publish("reader.added", String::new());
        assert!(matches!(after.subscribe(Some(last)).0, Backlog::Resync));
        // A clock set back between the two: the id is one this daemon never gave.
        let set_back = Bus::starting_at(first_id(std::time::UNIX_EPOCH + Duration::from_secs(40)));
        set_back.publish("reader.added", String::new());
        assert!(matches!(set_back.subscribe(Some(last)).0, Backlog::Resync));
    }

    #[test]
    fn zero_asks_for_every_event_since_the_start_while_they_are_kept() {
        let bus = Bus::starting_at(1_000);
        bus.publish("reader.added", String::new());
        bus.publish("card.inserted", String::new());
        let Backlog::Events(all) = bus.subscribe(Some(0)).0 else {
            panic!("resync")
        };
        assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), [1_000, 1_001]);
        for _ in 0..REPLAY {
            bus.publish("e", String::new());
        }
        assert!(matches!(bus.subscribe(Some(0)).0, Backlog::Resync));
    }

    #[test]
    fn the_buffer_keeps_at_most_its_bytes_of_events() {
        let bus = Bus::starting_at(1);
        let big = "x".repeat(10 * 1024);
        for _ in 0..100 {
            bus.publish("card.read", big.clone());
        }
        // 25 events of 10 KiB fit in 256 KiB: 76 to 100.
        let Backlog::Events(kept) = bus.subscribe(Some(80)).0 else {
            panic!("event 80 is within the last 256 KiB");
        };
        assert_eq!(kept.len(), 20);
        assert!(matches!(bus.subscribe(Some(70)).0, Backlog::Resync));
        let inner = bus.inner.lock().unwrap();
        assert_eq!(inner.buffer.len(), REPLAY_BYTES / big.len());
        assert_eq!(inner.bytes, inner.buffer.len() * big.len());
    }
}
