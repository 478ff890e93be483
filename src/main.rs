//! Command-line entry point: parses arguments and hands over to the library.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use cardbridge::auth::negotiate::CredentialCache;
use cardbridge::card::ReadOptions;
use cardbridge::config::Config;
use cardbridge::scan;

#[derive(Parser)]
#[command(name = "cardbridge", version, about = "Smart-card bridge agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How a client command finds the daemon.
#[derive(clap::Args)]
struct ClientArgs {
    /// The daemon's API, e.g. http://127.0.0.1:8687 (default: the first `api.listen`).
    #[arg(long)]
    url: Option<String>,
    /// File holding the API token (default: $CARDBRIDGE_TOKEN, else <state_dir>/api-token).
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// The daemon's Unix socket (default: `api.unix_socket` when it exists and neither --url
    /// nor --token-file is given). The caller's uid and gid decide its scopes; no token.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["url", "token_file"])]
    socket: Option<PathBuf>,
    /// Configuration file (default /etc/cardbridge/config.toml).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Show the cards in a running daemon's readers.
    Cards {
        /// Print the Card objects as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a running daemon's events as they come (`id name data`, one per line).
    Events {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a one-time sign-in link to the helpdesk console, and open it when a browser can.
    Console {
        /// Only print the link.
        #[arg(long)]
        no_browser: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Ask a running daemon to revoke a card's certificates (SCEPman) or the card (MIM CM).
    Revoke {
        /// The card id (hex), as `cardbridge cards` shows it.
        #[arg(long = "card", value_name = "ID")]
        card_id: String,
        /// `certificates` (through SCEPman) or `card` (a MIM CM request).
        #[arg(long, value_enum)]
        target: cardbridge::revoke::Target,
        /// RFC 5280 reason: keyCompromise, superseded, cessationOfOperation, affiliationChanged, …
        #[arg(long)]
        reason: String,
        /// Only this certificate (SHA-1 thumbprint); repeat for several. Default: all.
        #[arg(long = "thumbprint", value_name = "HEX")]
        thumbprints: Vec<String>,
        /// For `--target card`: the CM request type.
        #[arg(long, value_enum)]
        operation: Option<cardbridge::revoke::CardOperation>,
        /// Who revokes (a UPN), recorded by SCEPman.
        #[arg(long)]
        revoker: Option<String>,
        #[arg(long)]
        comment: Option<String>,
        /// Show the plan without storing or sending anything.
        #[arg(long)]
        dry_run: bool,
        /// Reuse a key to make a retried submission return the first one (default: a new key).
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the revocations a running daemon has stored, with their actions and answers.
    Revocations {
        /// Print them as JSON, every delivery attempt included.
        #[arg(long)]
        json: bool,
        /// Only revocations with this status (queued, in_progress, succeeded, partially_failed,
        /// failed).
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Validate a configuration file: exit 0 when it is valid, 2 with the reason when not.
    CheckConfig {
        /// Configuration file (default /etc/cardbridge/config.toml).
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Also authenticate to every configured server and make one read-only call: exit 0
        /// when every server answered, 1 otherwise.
        #[arg(long)]
        online: bool,
    },
    /// Run the station daemon: read every inserted card, reconcile it, serve the local API.
    Run {
        /// Configuration file (default /etc/cardbridge/config.toml; absent: safe defaults).
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Read every card present now, print what was found, and exit.
    Scan {
        /// Print a JSON array of Card objects instead of a table.
        #[arg(long)]
        json: bool,
        /// Read only this reader (exact name, else a case-insensitive part of it).
        #[arg(long, value_name = "NAME")]
        reader: Option<String>,
        /// Give up on a card that has not finished answering after this many seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
        card_timeout: f64,
        /// Also compare every card with the MIM CM server of the configuration.
        #[arg(long)]
        reconcile: bool,
        /// Configuration file (default /etc/cardbridge/config.toml).
        #[arg(long, value_name = "PATH", requires = "reconcile")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Revoke {
            card_id,
            target,
            reason,
            thumbprints,
            operation,
            revoker,
            comment,
            dry_run,
            idempotency_key,
            client,
        } => {
            let submission = cardbridge::revoke::Submission {
                card_id,
                target,
                thumbprints: (!thumbprints.is_empty()).then_some(thumbprints),
                reason,
                operation,
                revoker,
                comment,
                dry_run,
            };
            with_target(client, |target, out| {
                cardbridge::client::revoke(target, &submission, idempotency_key, out)
            })
        }
        Command::Revocations {
            json,
            status,
            client,
        } => with_target(client, |target, out| {
            cardbridge::client::revocations(target, json, status.as_deref(), out)
        }),
        Command::Cards { json, client } => with_target(client, |target, out| {
            cardbridge::client::cards(target, json, out)
        }),
        Command::Events { client } => with_target(client, cardbridge::client::events),
        Command::Console { no_browser, client } => with_target(client, |target, out| {
            cardbridge::client::console(target, !no_browser, out)
        }),
        Command::CheckConfig { config, online } => check_config(config, online),
        Command::Run { config } => run(config),
        Command::Scan {
            json,
            reader,
            card_timeout,
            reconcile,
            config,
        } => scan(
            json,
            reader.as_deref(),
            card_timeout,
            reconcile.then_some(config),
        ),
    }
}

/// The one place a command loads its configuration: `--config PATH` must exist, the default
/// path may be absent (all defaults). The error is printed here; its exit code is 2.
fn load_config(config: Option<PathBuf>) -> Result<(Config, PathBuf), ExitCode> {
    let explicit = config.is_some();
    let path = config.unwrap_or_else(|| PathBuf::from(cardbridge::config::DEFAULT_PATH));
    match Config::load(&path, explicit) {
        Ok(config) => Ok((config, path)),
        Err(e) => {
            eprintln!("cardbridge: {e}");
            Err(ExitCode::from(2))
        }
    }
}

/// Sets the process's Kerberos environment for commands that talk to servers; before any
/// thread starts.
fn prepare_kerberos(config: &Config, cache: CredentialCache<'_>) -> Result<(), ExitCode> {
    cardbridge::auth::negotiate::prepare_process(config, cache).map_err(|e| {
        eprintln!("cardbridge: {e}");
        ExitCode::from(2)
    })
}

/// `run`: the daemon, its Kerberos tickets in the state directory.
fn run(config: Option<PathBuf>) -> ExitCode {
    let config = match load_config(config) {
        Ok((config, _)) => config,
        Err(code) => return code,
    };
    if let Err(code) = prepare_kerberos(&config, CredentialCache::StateDir(&config.state_dir())) {
        return code;
    }
    match cardbridge::daemon::run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cardbridge: {e}");
            ExitCode::from(1)
        }
    }
}

/// `scan`: `reconcile` carries the `--config` of `--reconcile`, when given.
fn scan(
    json: bool,
    reader: Option<&str>,
    card_timeout: f64,
    reconcile: Option<Option<PathBuf>>,
) -> ExitCode {
    let Ok(timeout) = Duration::try_from_secs_f64(card_timeout) else {
        eprintln!("cardbridge: --card-timeout must be a positive number of seconds");
        return ExitCode::from(2);
    };
    let config = match reconcile.map(load_config) {
        None => None,
        Some(Ok((config, _))) => {
            if let Err(code) = prepare_kerberos(&config, CredentialCache::Memory) {
                return code;
            }
            Some(config)
        }
        Some(Err(code)) => return code,
    };
    let options = ReadOptions {
        timeout,
        ..ReadOptions::default()
    };
    run_scan(json, reader, &options, config.as_ref())
}

/// `check-config [--online]`: the file parses and every server section can be built (its
/// secrets readable and private); with `--online`, every server answers an authenticated call.
fn check_config(config: Option<PathBuf>, online: bool) -> ExitCode {
    // Always explicit: checking a file that is not there is an error, at the default path too.
    let path = config.unwrap_or_else(|| PathBuf::from(cardbridge::config::DEFAULT_PATH));
    let (config, path) = match load_config(Some(path)) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let servers = [
        config
            .cm
            .as_ref()
            .map(cardbridge::cm::CmClient::new)
            .map(|r| r.map(drop)),
        config
            .scepman
            .as_ref()
            .map(cardbridge::scepman::ScepmanClient::new)
            .map(|r| r.map(drop)),
    ];
    if let Some(Err(e)) = servers.into_iter().flatten().find(Result::is_err) {
        eprintln!("cardbridge: invalid configuration {}: {e}", path.display());
        return ExitCode::from(2);
    }
    println!("{}: valid", path.display());
    if let Some(warning) = config.metrics.exposure() {
        println!("warning: {warning}");
    }
    if !online {
        return ExitCode::SUCCESS;
    }
    if let Err(code) = prepare_kerberos(&config, CredentialCache::Memory) {
        return code;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cardbridge: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let mut out = std::io::stdout().lock();
    match runtime.block_on(cardbridge::check::online(&config, &mut out)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("cardbridge: cannot write the output: {e}");
            ExitCode::from(1)
        }
    }
}

/// Resolves the daemon's address and token, then runs a client command.
fn with_target(
    args: ClientArgs,
    command: impl FnOnce(
        &cardbridge::client::Target,
        &mut dyn Write,
    ) -> Result<(), cardbridge::client::ClientError>,
) -> ExitCode {
    let config = match load_config(args.config) {
        Ok((config, _)) => config,
        Err(code) => return code,
    };
    let result =
        cardbridge::client::Target::resolve(&config, args.url, args.token_file, args.socket)
            .and_then(|target| command(&target, &mut std::io::stdout().lock()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cardbridge: {e}");
            ExitCode::from(1)
        }
    }
}

fn run_scan(
    json: bool,
    reader: Option<&str>,
    options: &ReadOptions,
    config: Option<&Config>,
) -> ExitCode {
    let result = match scan::scan(reader, options) {
        Ok(result) => result,
        Err(e) => {
            eprintln!("cardbridge: {e}");
            return ExitCode::from(1);
        }
    };
    if result.cards.is_empty() {
        if result.empty_readers.is_empty() {
            eprintln!("cardbridge: no smart card readers found");
        } else {
            eprintln!(
                "cardbridge: no card in any of {} readers",
                result.empty_readers.len()
            );
        }
    }
    let mut out = std::io::stdout().lock();
    let written = match config {
        Some(config) => match scan::reconcile_all(result.cards, config) {
            Ok(cards) if json => write_json(&mut out, &cards),
            Ok(cards) => scan::print_table(&cards, &result.empty_readers, &mut out),
            Err(e) => {
                eprintln!("cardbridge: {e}");
                return ExitCode::from(1);
            }
        },
        None if json => write_json(&mut out, &result.cards),
        None => {
            let cards: Vec<_> = result
                .cards
                .into_iter()
                .map(|card| scan::Reconciled {
                    card,
                    reconciliation: None,
                })
                .collect();
            scan::print_table(&cards, &result.empty_readers, &mut out)
        }
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cardbridge: cannot write the output: {e}");
            ExitCode::from(1)
        }
    }
}

fn write_json<T: serde::Serialize>(out: &mut impl Write, value: &T) -> std::io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value).map_err(std::io::Error::from)?;
    writeln!(out)
}
