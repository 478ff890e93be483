//! A load driver's view of a running daemon, shared by the chaos, soak and simulated-year runs:
//! one HTTP/1.1 request per connection with a bearer token, the event stream read frame by
//! frame, and the process sampled from `/proc`. Errors are returned, never panicked on: a run
//! counts them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;

use crate::chaos::Received;

/// The environment the service unit gives the daemon (its `Environment=` lines, one
/// `NAME=value` each), so that the load drivers measure the daemon as a station runs it.
pub fn unit_environment() -> Vec<(&'static str, &'static str)> {
    const UNIT: &str = include_str!("../../service/cardbridge.service");
    UNIT.lines()
        .filter_map(|line| line.strip_prefix("Environment=")?.split_once('='))
        .collect()
}

/// One request (`Connection: close`) with `token`; returns the status and the body.
pub fn http(
    port: u16,
    token: &str,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Authorization: Bearer {token}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in extra {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    s.write_all(request.as_bytes())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A revocation's status as `GET /v1/revocations/{id}` gives it; `None` without an answer.
pub fn revocation_status(port: u16, token: &str, id: u64) -> Option<String> {
    let path = format!("/v1/revocations/{id}");
    let (_, body) = http(port, token, "GET", &path, &[], "").ok()?;
    let answer = serde_json::from_str::<Value>(&body).ok()?;
    answer["status"].as_str().map(str::to_string)
}

/// Opens `/v1/events`; `after` resumes after that event id.
pub fn open_stream(port: u16, token: &str, after: Option<u64>) -> Result<BufReader<TcpStream>> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let resume = after
        .map(|id| format!("Last-Event-ID: {id}\r\n"))
        .unwrap_or_default();
    write!(
        &s,
        "GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n{resume}\r\n"
    )?;
    let mut reader = BufReader::new(s);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    if !status.contains(" 200 ") {
        bail!("the event stream answered {}", status.trim());
    }
    Ok(reader)
}

/// Reads SSE frames until the stream ends, `keep_going` says no or `until` passes; hands each
/// event to `each`. A read timeout is only a quiet moment.
pub fn read_frames(
    stream: &mut BufReader<TcpStream>,
    keep_going: &dyn Fn() -> bool,
    until: Option<Instant>,
    mut each: impl FnMut(Received),
) {
    let (mut id, mut name, mut data) = (0, String::new(), String::new());
    let mut line = String::new();
    while keep_going() && until.is_none_or(|u| Instant::now() < u) {
        match stream.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return,
        }
        let l = line.trim_end();
        if let Some(v) = l.strip_prefix("id:") {
            id = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("event:") {
            name = v.trim().to_string();
        } else if let Some(v) = l.strip_prefix("data:") {
            data.push_str(v.trim());
        } else if l.is_empty() && !name.is_empty() {
            let data_value = serde_json::from_str(&data).unwrap_or(Value::Null);
            each(Received {
                id,
                name: std::mem::take(&mut name),
                data: data_value,
            });
            data.clear();
        }
        line.clear();
    }
}

/// A process as `/proc` shows it, and the size of its state directory.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub rss_kib: u64,
    pub fds: usize,
    pub threads: u64,
    pub state_kib: u64,
}

/// Samples process `pid` and the files directly in `state`.
pub fn sample(pid: u32, state: &Path) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    let bytes: u64 = std::fs::read_dir(state)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    Sample {
        rss_kib: field("VmRSS:"),
        fds,
        threads: field("Threads:"),
        state_kib: bytes / 1024,
    }
}

/// The least-squares slope of `points`, if there are two distinct x.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}
