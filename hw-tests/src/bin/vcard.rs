//! `vcard`: run a virtual card in a vpcd reader slot until Ctrl-C (or until vpcd goes away).
//!
//! Example: `vcard --port 35963 --applet piv --truth /tmp/truth.json`. The truth file holds the
//! ATR, card id and every certificate's DER and thumbprint, for comparing with what a reader
//! reports.

use anyhow::Result;
use clap::Parser;
use hw_tests::vcard::{idprime, Applet, CardSpec, Faults, VirtualCard};
use hw_tests::vpcd::Inserted;

#[derive(Parser)]
#[command(about = "A virtual PIV, GIDS or IDPrime smart card for the vpcd reader")]
struct Args {
    /// vpcd slot port (35963 is the first slot of Debian's default vpcd reader).
    #[arg(long, default_value_t = 35963)]
    port: u16,
    #[arg(long, value_enum, default_value_t = Applet::Piv)]
    applet: Applet,
    /// PIV: certificates in slots 9A, 9C (gzip) and 9D, plus this many retired slots.
    #[arg(long, default_value_t = 1)]
    retired: u8,
    /// PIV: leave out the key-history object (readers must then probe all retired slots).
    #[arg(long)]
    no_key_history: bool,
    /// PIV: do not answer Yubico's GET VERSION / GET SERIAL.
    #[arg(long)]
    no_yubikey: bool,
    /// Do not offer extended-length APDUs (answers are chained with 61xx).
    #[arg(long)]
    short_apdus: bool,
    /// GIDS: number of containers.
    #[arg(long, default_value_t = 2)]
    containers: u8,
    /// IDPrime: the model, 840 (three certificates) or 940 (six, one stored plain, a token
    /// label).
    #[arg(long, default_value = "840", value_parser = ["840", "940"])]
    model: String,
    /// Wait this many milliseconds before every answer.
    #[arg(long, default_value_t = 0)]
    slow_ms: u64,
    /// Slot 9A holds random bytes instead of a certificate.
    #[arg(long)]
    garbage_certificate: bool,
    /// Write the card's truth (JSON) to this file.
    #[arg(long)]
    truth: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut spec = match args.applet {
        Applet::Piv => CardSpec::piv_four_certs(),
        Applet::Gids => CardSpec::gids_two_containers(),
        Applet::Idprime if args.model == "940" => CardSpec::idprime(idprime::Spec::idp940()),
        Applet::Idprime => CardSpec::idprime(idprime::Spec::md840()),
    };
    spec.retired = args.retired;
    spec.key_history = !args.no_key_history;
    if args.no_yubikey {
        spec.yubikey_serial = None;
    }
    spec.extended_length = !args.short_apdus && args.applet == Applet::Piv;
    spec.gids_containers = args.containers;
    spec.faults = Faults {
        slow_ms: args.slow_ms,
        garbage_certificate: args.garbage_certificate,
        ..Faults::default()
    };
    let card = VirtualCard::new(spec)?;
    let json = serde_json::to_string_pretty(&card.truth)?;
    match &args.truth {
        Some(path) => std::fs::write(path, json)?,
        None => println!("{json}"),
    }
    let _inserted = Inserted::insert(card, args.port, true)?;
    eprintln!(
        "vcard: inserted into the vpcd slot on port {}; Ctrl-C removes it",
        args.port
    );
    loop {
        std::thread::park();
    }
}
