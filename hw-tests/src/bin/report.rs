//! Prints the figures `hw-tests/report` collected from the benchmarks as one Markdown table,
//! headed by the date, the machine and the command, for the README's Performance section.
//!
//!   report FILE

use anyhow::{Context as _, Result};

fn main() -> Result<()> {
    let path = std::env::args_os()
        .nth(1)
        .context("usage: report FILE (the figures the benchmarks recorded)")?;
    let figures = hw_tests::report::read(std::path::Path::new(&path))?;
    print!("{}", hw_tests::report::table(&figures));
    Ok(())
}
