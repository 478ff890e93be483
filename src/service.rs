//! The daemon as a systemd service (`Type=notify`): readiness, status lines and the watchdog,
//! over `$NOTIFY_SOCKET` (nothing is sent when it is not set, e.g. in a terminal).
//!
//! - `READY=1` once the API listeners are bound (the supervisor starts after that) and the PC/SC
//!   monitor has either connected to pcscd or entered its "waiting for pcscd" state.
//! - `STATUS=` whenever the one-line summary changes: "2 readers, 1 card", "waiting for pcscd",
//!   "…; CM unreachable".
//! - `WATCHDOG=1` at half the `WatchdogSec=` interval, but only while the monitor thread beats
//!   (a monitor stuck in a driver call stops the pings, and systemd restarts the service) and
//!   every API server is still running.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::pcsc::monitor::{Health, MonitorState};
use crate::reconcile::State;
use crate::station::Station;

/// What the supervisor looks at: the station, the last reconciliations, and whether the daemon
/// is stopping. (Not the API's state: supervision does not depend on the HTTP layer.)
pub struct Watched {
    pub station: Arc<std::sync::Mutex<Station>>,
    pub reconciliations: crate::engine::Cache,
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// A monitor that has not beaten for this long is stuck (it beats at least every 250 ms).
const STUCK_AFTER: Duration = Duration::from_secs(3);

/// How often the status is looked at when no watchdog asks for more.
const TICK: Duration = Duration::from_secs(1);

/// The one-line summary for `STATUS=`.
pub fn status_line(watched: &Watched, monitor: MonitorState) -> String {
    let (readers, cards) = watched
        .station
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .counts();
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    let mut line = match monitor {
        MonitorState::Starting => "starting".to_string(),
        MonitorState::WaitingForPcscd => "waiting for pcscd".to_string(),
        MonitorState::Connected => {
            format!("{}, {}", plural(readers, "reader"), plural(cards, "card"))
        }
    };
    let unreachable = watched
        .reconciliations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .any(|r| r.state == State::ServerUnavailable);
    if unreachable {
        line.push_str("; CM unreachable");
    }
    line
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// Runs until the daemon stops: readiness, status and watchdog pings.
pub async fn supervise(health: Arc<Health>, watched: Watched, api_alive: Arc<AtomicBool>) {
    let mut usec = 0;
    let watchdog =
        sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec));
    let tick = watchdog.map_or(TICK, |w| (w / 2).min(TICK));
    let mut interval = tokio::time::interval(tick);
    let mut stopping = watched.stopping.clone();
    let stopped = async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stopped);
    let (mut ready, mut last_status, mut pinging) = (false, String::new(), true);
    loop {
        tokio::select! {
            _ = &mut stopped => {
                notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
                return;
            }
            _ = interval.tick() => {}
        }
        let state = health.state();
        if !ready && state != MonitorState::Starting {
            ready = true;
            notify(&[NotifyState::Ready]);
            tracing::info!(
                event = "ready",
                "ready: the API listens and the PC/SC monitor runs"
            );
        }
        let status = status_line(&watched, state);
        if status != last_status {
            notify(&[NotifyState::Status(&status)]);
            tracing::info!(event = "status", "{status}");
            last_status = status;
        }
        if watchdog.is_none() || !ready {
            continue;
        }
        let monitor_alive = health.since_last_beat() < STUCK_AFTER;
        let api_up = api_alive.load(Ordering::Relaxed);
        if monitor_alive && api_up {
            notify(&[NotifyState::Watchdog]);
            pinging = true;
        } else if pinging {
            pinging = false;
            tracing::error!(
                monitor_alive,
                api_up,
                "not alive: watchdog pings stopped, systemd will restart the service"
            );
        }
    }
}
