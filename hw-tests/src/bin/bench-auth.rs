//! Authentication benchmark: what Negotiate and OAuth add to a reconciliation, measured side by
//! side in one run against simulators that differ only in how they authenticate. A real MIT KDC
//! issues the tickets; the PIV card is read from a vpcd reader once, then reconciled N times
//! against each server, round-robin so that the machine's load falls on all of them alike.
//!
//! Run it with `hw-tests/bench-auth` (release build). It prints numbers and asserts nothing.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use hw_tests::kdc::{Kdc, CM_SPN};
use hw_tests::report::Recorder;
use hw_tests::rig::{insert_card, Rig};
use hw_tests::sim::{matching_record, Fixture, Simulator};
use hw_tests::sim_auth::{NegotiateStyle, OAuthApp, SimAuth};
use hw_tests::vcard::CardSpec;

#[derive(Parser)]
#[command(about = "What Negotiate and OAuth add to a reconciliation")]
struct Args {
    /// Reconciliations per server (after one to warm up).
    #[arg(long, default_value_t = 300)]
    runs: usize,
    /// Also append the figures to this file (`hw-tests/report`).
    #[arg(long)]
    record: Option<std::path::PathBuf>,
}

struct Case {
    name: &'static str,
    sim: Simulator,
    reconciler: cardbridge::reconcile::Reconciler,
    millis: Vec<f64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let kdc = Kdc::start("bench")?;
    kdc.add_principal(CM_SPN, None)?;
    kdc.add_principal("bench-station", None)?;
    let (service, client) = (kdc.dir.join("http.keytab"), kdc.dir.join("client.keytab"));
    kdc.keytab(CM_SPN, &service)?;
    kdc.keytab("bench-station", &client)?;
    // One process is both the acceptor and the client here; set before any GSSAPI call.
    for (k, v) in kdc.env() {
        std::env::set_var(k, v);
    }
    std::env::set_var("KRB5_KTNAME", format!("FILE:{}", service.display()));
    std::env::set_var("KRB5_CLIENT_KTNAME", format!("FILE:{}", client.display()));
    std::env::set_var("KRB5CCNAME", "MEMORY:bench-auth");

    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let inserted = insert_card(CardSpec::piv_four_certs(), &slot)?;
    let card = cardbridge::scan::scan(Some(&slot.reader), &Default::default())
        .context("read the card")?
        .cards
        .into_iter()
        .next()
        .context("no card read")?;
    let secret_dir = kdc.dir.join("oauth");
    std::fs::create_dir_all(&secret_dir)?;
    let secret = secret_dir.join("secret");
    std::fs::write(&secret, "bench-secret")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;

    let fixture = || Fixture {
        smartcards: vec![matching_record(&inserted.truth, false)],
        ..Fixture::default()
    };
    let per_connection = NegotiateStyle {
        per_connection: true,
        ..NegotiateStyle::default()
    };
    let oauth = OAuthApp {
        client_id: "bench".into(),
        client_secret: Some("bench-secret".into()),
        assertion_public_key: None,
        token_lifetime: Duration::from_secs(3600),
        roles: vec!["Manage.All".into()],
    };
    let setups: [(&'static str, SimAuth, String); 4] = [
        ("none", SimAuth::None, String::new()),
        (
            "negotiate, once per connection",
            SimAuth::Negotiate(per_connection),
            format!("auth = \"negotiate\"\nspn = \"{CM_SPN}\"\n"),
        ),
        (
            "negotiate, every request",
            SimAuth::Negotiate(NegotiateStyle::default()),
            format!("auth = \"negotiate\"\nspn = \"{CM_SPN}\"\n"),
        ),
        ("oauth (cached token)", SimAuth::OAuth(oauth), String::new()),
    ];
    let mut cases = Vec::new();
    for (name, auth, section) in setups {
        let sim = Simulator::start(fixture(), 0)?;
        let oauth_section = match auth {
            SimAuth::OAuth(_) => format!(
                "auth = \"oauth\"\ntoken_url = \"{}\"\nclient_id = \"bench\"\nscope = \"api://scepman/.default\"\nclient_secret_file = \"{}\"\n",
                sim.entra_token_url(),
                secret.display()
            ),
            _ => section,
        };
        sim.set_auth(auth)?;
        let text = format!(
            "[cm]\nbase_url = \"{}\"\nretries = 0\n{oauth_section}",
            sim.cm_base_url()
        );
        let config = cardbridge::config::Config::parse(&text).map_err(anyhow::Error::msg)?;
        let reconciler = cardbridge::reconcile::Reconciler::configured(&config, None)?;
        cases.push(Case {
            name,
            sim,
            reconciler,
            millis: Vec::with_capacity(args.runs),
        });
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        for case in &mut cases {
            let first = case
                .reconciler
                .reconcile(&card, false, &Default::default())
                .await;
            if first.reason.is_some() || first.server_card.is_none() {
                bail!(
                    "{}: the first reconciliation failed: {:?}",
                    case.name,
                    first.reason
                );
            }
            case.sim.clear_log();
        }
        for _ in 0..args.runs {
            for case in &mut cases {
                let started = Instant::now();
                let r = case
                    .reconciler
                    .reconcile(&card, false, &Default::default())
                    .await;
                case.millis.push(started.elapsed().as_secs_f64() * 1000.0);
                if r.server_card.is_none() {
                    bail!("{}: a reconciliation failed: {:?}", case.name, r.reason);
                }
            }
        }
        Ok(())
    })?;

    let baseline = median(&mut cases[0].millis.clone());
    println!(
        "{} reconciliations of the 4-certificate PIV card per server, after one each to warm up",
        args.runs
    );
    let record = Recorder::new(args.record.clone());
    for case in &mut cases {
        let med = median(&mut case.millis);
        if case.name != "none" {
            record.record(
                &format!("{} overhead per reconciliation (median)", case.name),
                med - baseline,
                "ms",
            )?;
        }
        let p95 = quantile(&case.millis, 0.95);
        let log = case.sim.log();
        let connections: std::collections::HashSet<_> = log.iter().map(|l| l.client).collect();
        let stats = case.sim.auth_stats();
        println!(
            "{:<32} median {med:>6.2} ms  p95 {p95:>6.2} ms  {:>+6.2} ms over none   requests {:>5}  connections {:>3}  kerberos exchanges {:>5}  tokens {}",
            case.name,
            med - baseline,
            log.len(),
            connections.len(),
            stats.kerberos_exchanges,
            stats.tokens_issued,
        );
    }
    drop(inserted);
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    quantile(values, 0.5)
}

/// `values` sorted.
fn quantile(values: &[f64], q: f64) -> f64 {
    values[((values.len() - 1) as f64 * q).round() as usize]
}
