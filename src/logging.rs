//! The daemon's log: `tracing` to stderr, which systemd hands to the journal. Under systemd
//! (`JOURNAL_STREAM` is set) lines carry no timestamp (the journal adds its own) and no colours;
//! events carry structured fields (`event`, `reader`, `card_id`) that read well in both.

use tracing_subscriber::EnvFilter;

/// Installs the subscriber. The level comes from `RUST_LOG` when set (full filter syntax, e.g.
/// `cardbridge=debug`), else from the configuration's `log_level`, else `info`.
pub fn init(level: Option<&str>) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(level.unwrap_or("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // A second init (tests, or a library user with its own subscriber) keeps the first.
    let _ = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().with_ansi(false).try_init()
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init()
    };
}
