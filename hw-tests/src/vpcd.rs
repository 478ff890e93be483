//! Connects a [`VirtualCard`] to a vpcd reader slot: connecting inserts the card, closing the
//! connection removes it.
//!
//! vpcd's framing: every message in both directions is a 2-byte big-endian length and a payload.
//! A 1-byte payload from vpcd is a control code (0 power off, 1 power on, 2 reset, 4 get ATR);
//! anything longer is a command APDU. vpcd writes the length and the payload separately, so the
//! card sets TCP_NODELAY and re-arms TCP_QUICKACK after every read: without that, a delayed ACK
//! stalls every APDU by about 40 ms.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _, Result};
use socket2::SockRef;

use crate::vcard::{Answer, Truth, VirtualCard};

/// A virtual card sitting in a vpcd slot.
pub struct Inserted {
    pub truth: Truth,
    card: Arc<Mutex<VirtualCard>>,
    stream: Arc<Mutex<Option<TcpStream>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    contacted: Arc<Mutex<Option<SystemTime>>>,
}

impl Inserted {
    /// Connects `card` to the vpcd slot listening on `port` (waiting up to 10 s for vpcd).
    /// With `reconnect`, the card comes back by itself after the connection drops (pcscd
    /// restarting); without, a dropped connection is a removed card.
    pub fn insert(card: VirtualCard, port: u16, reconnect: bool) -> Result<Inserted> {
        let truth = card.truth.clone();
        let card = Arc::new(Mutex::new(card));
        let stream = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let contacted = Arc::new(Mutex::new(None));
        let first = connect(port, &stop, Duration::from_secs(10))?;
        *lock(&stream) = first.try_clone().ok();
        let thread = {
            let (card, stream, stop) = (card.clone(), stream.clone(), stop.clone());
            let contacted = contacted.clone();
            std::thread::Builder::new()
                .name(format!("vcard-{port}"))
                .spawn(move || {
                    let mut conn = Some(first);
                    while let Some(c) = conn.take() {
                        // An I/O error is how a closed connection shows; either way the card is out.
                        let _ = serve(&c, &card, &contacted);
                        if !reconnect || stop.load(Ordering::Relaxed) {
                            break;
                        }
                        conn = connect(port, &stop, Duration::from_secs(3600)).ok();
                        let mut current = lock(&stream);
                        // Removed while reconnecting: `shutdown` found no connection to close,
                        // so this one must not be served (its read would never end).
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        *current = conn.as_ref().and_then(|c| c.try_clone().ok());
                    }
                })?
        };
        Ok(Inserted {
            truth,
            card,
            stream,
            stop,
            thread: Some(thread),
            contacted,
        })
    }

    /// When vpcd first spoke to the card: the moment the reader noticed it. vpcd accepts a
    /// card's connection only when pcscd next polls the slot, so a card pulled before that was
    /// never in the reader as far as pcscd knows.
    pub fn contacted_at(&self) -> Option<SystemTime> {
        *lock(&self.contacted)
    }

    /// APDUs the card has received so far.
    pub fn apdu_count(&self) -> u64 {
        lock(&self.card).apdus
    }

    /// Pulls the card out of the reader.
    pub fn remove(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = lock(&self.stream).take() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Inserted {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn connect(port: u16, stop: &AtomicBool, patience: Duration) -> Result<TcpStream> {
    let until = Instant::now() + patience;
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) if Instant::now() > until || stop.load(Ordering::Relaxed) => {
                return Err(e).with_context(|| format!("cannot connect to vpcd on port {port}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn quickack(stream: &TcpStream) -> std::io::Result<()> {
    SockRef::from(stream).set_quickack(true)
}

/// Answers vpcd until the connection closes.
fn serve(
    stream: &TcpStream,
    card: &Mutex<VirtualCard>,
    contacted: &Mutex<Option<SystemTime>>,
) -> Result<()> {
    let mut reader = stream;
    let mut writer = stream;
    loop {
        let mut len = [0u8; 2];
        reader.read_exact(&mut len)?;
        lock(contacted).get_or_insert_with(SystemTime::now);
        // The kernel leaves quick-ACK mode on its own; re-arm it after every read, so the ACK
        // for the length goes out at once and vpcd's Nagle-delayed payload follows.
        quickack(stream)?;
        let mut payload = vec![0u8; usize::from(u16::from_be_bytes(len))];
        reader.read_exact(&mut payload)?;
        quickack(stream)?;
        let reply = {
            let mut card = lock(card);
            match payload[..] {
                [0] | [1] | [2] => {
                    card.reset();
                    continue;
                }
                [4] => card.atr.clone(),
                [_] => bail!("unknown vpcd control code {payload:?}"),
                _ => {
                    let slow = card.slow_ms();
                    match card.process(&payload) {
                        Answer::Reply(r) => {
                            drop(card);
                            std::thread::sleep(Duration::from_millis(slow));
                            r
                        }
                        Answer::Drop => {
                            stream.shutdown(Shutdown::Both)?;
                            return Ok(());
                        }
                    }
                }
            }
        };
        let mut frame = Vec::with_capacity(reply.len() + 2);
        frame.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        frame.extend_from_slice(&reply);
        writer.write_all(&frame)?;
    }
}
