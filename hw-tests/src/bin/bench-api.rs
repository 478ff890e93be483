//! Daemon benchmark: `cardbridge run` (release) with two virtual 4-certificate PIV cards and the
//! CM simulator, measured from outside as a kiosk would see it:
//!
//! - start to ready: from spawning the process to the first answered `GET /v1/health`;
//! - resident memory of the idle daemon (VmRSS, and its peak VmHWM);
//! - `GET /v1/cards` throughput and latency under `wrk` (2 threads, 50 connections, 10 s), with
//!   two 4-certificate cards, then with two 8-certificate cards (the body of four 4-certificate
//!   cards: the rig has two reader slots);
//! - event fan-out: N concurrent `/v1/events` clients, a sync of one card, and how long after the
//!   first client each of the others receives the `card.read`.
//!
//! Run it with `hw-tests/bench-api`; it prints numbers and asserts nothing, because timings on
//! shared machines are for reading, not for failing builds.

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use hw_tests::report::Recorder;
use hw_tests::rig::{cardbridge_bin, insert_card, Rig};
use hw_tests::sim::{matching_record, Fixture, Simulator};
use hw_tests::vcard::CardSpec;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Parser)]
#[command(about = "Benchmark the cardbridge daemon's local API")]
struct Args {
    /// Concurrent event-stream clients.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Syncs (each one `card.read` to every client) measured.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Seconds of `wrk` load on `GET /v1/cards`.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Also append the figures to this file (`hw-tests/report`).
    #[arg(long)]
    record: Option<std::path::PathBuf>,
}

const TOKEN: &str = "bench-token-0123456789abcdef";

/// The daemon under test; stopped with SIGTERM when dropped.
struct Daemon {
    child: Child,
    port: u16,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.clients == 0 || args.rounds == 0 {
        bail!("--clients and --rounds must be at least 1");
    }
    let rig = Rig::get();
    let _shared = rig.shared();
    let slots = [rig.slot(), rig.slot()];
    let mut cards = Vec::new();
    for slot in &slots {
        cards.push(insert_card(CardSpec::piv_four_certs(), slot)?);
    }
    let sim = Simulator::start(
        Fixture {
            smartcards: cards
                .iter()
                .map(|c| matching_record(&c.truth, false))
                .collect(),
            ..Fixture::default()
        },
        0,
    )?;
    let dir = std::env::temp_dir().join(format!("cardbridge-bench-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let port = hw_tests::rig::free_port()?;
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[api]\nlisten = [\"127.0.0.1:{port}\"]\n[[api.clients]]\nname = \"bench\"\n\
             token_sha256 = \"{}\"\nscopes = [\"read\", \"sync\"]\n[cm]\nbase_url = \"{}\"\n",
            dir.join("state").display(),
            hex::encode(Sha256::digest(TOKEN)),
            sim.cm_base_url()
        ),
    )?;

    let started = Instant::now();
    let child = Command::new(cardbridge_bin())
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start cardbridge run")?;
    let daemon = Daemon { child, port };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    let ready = runtime.block_on(async {
        loop {
            let answer = http
                .get(format!("{url}/v1/health"))
                .bearer_auth(TOKEN)
                .send()
                .await;
            if answer.is_ok_and(|a| a.status().is_success()) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("cardbridge run did not answer within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })?;
    println!(
        "start to ready (spawn -> first answered /v1/health): {:.1} ms",
        ready.as_secs_f64() * 1000.0
    );
    let record = Recorder::new(args.record.clone());
    record.record(
        "start → ready (spawn to first answered /v1/health)",
        ready.as_secs_f64() * 1000.0,
        "ms",
    )?;

    let listed = runtime.block_on(wait_cards(&http, &url, "both cards", |list| {
        list.iter().filter(|c| c["card_id"].is_string()).count() == cards.len()
    }))?;
    let card_ids: Vec<String> = listed
        .iter()
        .filter_map(|c| c["card_id"].as_str().map(str::to_string))
        .collect();

    std::thread::sleep(Duration::from_secs(1));
    println!(
        "idle daemon with {} cards: {}",
        card_ids.len(),
        memory(daemon.child.id())?
    );
    record.record(
        "idle RSS, 2 cards read and reconciled",
        resident_kib(daemon.child.id())? as f64 / 1024.0,
        "MiB",
    )?;

    let (per_second, p99) = throughput(&daemon, args.seconds, "2 cards x 4 certificates")?;
    record.record(
        "GET /v1/cards, 2 cards (wrk, 50 connections)",
        per_second,
        "requests/s",
    )?;
    record.record("GET /v1/cards, p99 latency", p99, "ms")?;
    let (p50, p99, worst) = runtime.block_on(fan_out(&daemon, &http, &card_ids[0], &args))?;
    let clients = args.clients;
    record.record(
        &format!("SSE fan-out to {clients} clients, p50 after the first"),
        p50,
        "ms",
    )?;
    record.record(
        &format!("SSE fan-out to {clients} clients, p99 after the first"),
        p99,
        "ms",
    )?;
    record.record(
        &format!("SSE fan-out to {clients} clients, last client, worst round"),
        worst,
        "ms",
    )?;
    println!("after the fan-out: {}", memory(daemon.child.id())?);

    // The rig has two reader slots; two cards of 8 certificates give /v1/cards the body (and
    // the work) of four cards of 4.
    for card in cards.drain(..) {
        card.remove();
    }
    for slot in &slots {
        let mut heavy = CardSpec::piv_four_certs();
        heavy.slots.push((0x9E, hw_tests::vcard::Compress::None));
        heavy.retired = 4;
        cards.push(insert_card(heavy, slot)?);
    }
    runtime.block_on(wait_cards(&http, &url, "the 8-certificate cards", |list| {
        list.iter()
            .map(|c| c["certificates"].as_array().map_or(0, Vec::len))
            .sum::<usize>()
            == 16
    }))?;
    let (per_second, _) = throughput(
        &daemon,
        args.seconds,
        "2 cards x 8 certificates (the body of 4 cards x 4)",
    )?;
    record.record(
        "GET /v1/cards, 2 cards × 8 certificates (the body of 4 cards × 4)",
        per_second,
        "requests/s",
    )?;

    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Polls `GET /v1/cards` until `done` accepts the list (at most 10 s); returns the list.
async fn wait_cards(
    http: &reqwest::Client,
    url: &str,
    what: &str,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Result<Vec<serde_json::Value>> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let list: Vec<serde_json::Value> = http
            .get(format!("{url}/v1/cards"))
            .bearer_auth(TOKEN)
            .send()
            .await?
            .json()
            .await?;
        if done(&list) {
            return Ok(list);
        }
        if Instant::now() > until {
            bail!("the daemon did not read {what}: {list:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The process's resident memory now and at its peak (VmRSS, VmHWM from /proc).
fn memory(pid: u32) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or("?".to_string(), |v| v.trim().to_string())
    };
    Ok(format!(
        "VmRSS {}, VmHWM {}",
        field("VmRSS:"),
        field("VmHWM:")
    ))
}

/// The process's resident memory in KiB.
fn resident_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// A latency as wrk prints it (`812.00us`, `3.21ms`, `1.02s`), in milliseconds.
fn wrk_ms(text: &str) -> Option<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else {
        (text.strip_suffix('s')?, 1000.0)
    };
    Some(number.parse::<f64>().ok()? * factor)
}

/// `wrk` on `GET /v1/cards`; prints its summary lines and returns requests per second and the
/// p99 latency in milliseconds.
fn throughput(daemon: &Daemon, seconds: u64, cards: &str) -> Result<(f64, f64)> {
    let out = Command::new("wrk")
        .args(["-t2", "-c50", &format!("-d{seconds}s"), "--latency", "-H"])
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .arg(format!("http://127.0.0.1:{}/v1/cards", daemon.port))
        .output()
        .context("run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    println!("GET /v1/cards with {cards}, wrk -t2 -c50 -d{seconds}s:");
    let (mut per_second, mut p99) = (None, None);
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with("Requests/sec")
            || l.starts_with("50%")
            || l.starts_with("99%")
            || l.contains("requests in")
            || l.starts_with("Non-2xx")
        {
            println!("  {l}");
        }
        let last = l.split_whitespace().last().unwrap_or_default();
        if l.starts_with("Requests/sec") {
            per_second = last.parse::<f64>().ok();
        } else if l.starts_with("99%") {
            p99 = wrk_ms(last);
        }
    }
    Ok((
        per_second.context("wrk printed no Requests/sec")?,
        p99.context("wrk printed no 99% latency")?,
    ))
}

/// Opens `args.clients` event streams, syncs `card_id` `args.rounds` times, and reports when
/// each client saw each round's `card.read` relative to the first client that did. Returns the
/// p50 and p99 of those offsets and the worst round's last client, in milliseconds.
async fn fan_out(
    daemon: &Daemon,
    http: &reqwest::Client,
    card_id: &str,
    args: &Args,
) -> Result<(f64, f64, f64)> {
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let (open_tx, mut opened) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.clients {
        let (seen_tx, open_tx, port) = (seen_tx.clone(), open_tx.clone(), daemon.port);
        tasks.spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            stream
                .write_all(
                    format!(
                        "GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await?;
            let mut lines = BufReader::new(stream).lines();
            let status = lines.next_line().await?.unwrap_or_default();
            if !status.contains(" 200 ") {
                bail!("event stream refused: {status}");
            }
            let _ = open_tx.send(());
            let mut round = 0;
            while let Some(line) = lines.next_line().await? {
                if line == "event: card.read" {
                    let _ = seen_tx.send((round, Instant::now()));
                    round += 1;
                }
            }
            Ok(())
        });
    }
    drop(seen_tx);
    for _ in 0..args.clients {
        if tokio::time::timeout(Duration::from_secs(30), opened.recv())
            .await
            .ok()
            .flatten()
            .is_none()
        {
            bail!("not every event stream opened within 30 s");
        }
    }
    // Let the last streams' headers settle before the first event.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut spreads = Vec::new();
    let mut all_offsets = Vec::new();
    for round in 0..args.rounds {
        let synced = http
            .post(format!(
                "http://127.0.0.1:{}/v1/cards/{card_id}/sync",
                daemon.port
            ))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await?;
        if synced.status() != reqwest::StatusCode::ACCEPTED {
            bail!("sync refused: {}", synced.status());
        }
        let mut times = Vec::with_capacity(args.clients);
        while times.len() < args.clients {
            match tokio::time::timeout(Duration::from_secs(10), seen.recv()).await {
                Ok(Some((r, at))) if r == round => times.push(at),
                Ok(Some(_)) => {}
                _ => bail!(
                    "round {round}: only {} of {} clients got card.read",
                    times.len(),
                    args.clients
                ),
            }
        }
        let first = times.iter().copied().min().unwrap_or_else(Instant::now);
        let mut offsets: Vec<f64> = times
            .iter()
            .map(|t| t.duration_since(first).as_secs_f64() * 1000.0)
            .collect();
        offsets.sort_by(f64::total_cmp);
        spreads.push(offsets.last().copied().unwrap_or_default());
        all_offsets.extend(offsets);
    }
    all_offsets.sort_by(f64::total_cmp);
    spreads.sort_by(f64::total_cmp);
    let pick = |v: &[f64], q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!(
        "event fan-out, {} clients x {} syncs: card.read after the first client: p50 {:.1} ms, p99 {:.1} ms; last client per round: median {:.1} ms, worst {:.1} ms",
        args.clients,
        args.rounds,
        pick(&all_offsets, 0.5),
        pick(&all_offsets, 0.99),
        pick(&spreads, 0.5),
        pick(&spreads, 1.0)
    );
    std::io::stdout().flush()?;
    tasks.abort_all();
    Ok((
        pick(&all_offsets, 0.5),
        pick(&all_offsets, 0.99),
        pick(&spreads, 1.0),
    ))
}
