//! Replays every committed fuzz input on stable: the seed corpora (`fuzz/corpus/<target>/`) and
//! the inputs that once found a defect (`fuzz/regressions/<target>/`), through the same entry
//! points as the cargo-fuzz targets. So the no-panic guarantee, and every fix, holds in each
//! `cargo test`, not only where nightly and libFuzzer are at hand.

#![allow(clippy::unwrap_used)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use cardbridge::fuzz::TARGETS;

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn every_committed_fuzz_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut failures = Vec::new();
    for target in TARGETS {
        let seeds = inputs(&root.join("corpus").join(target.name));
        assert!(!seeds.is_empty(), "{} has no seed corpus", target.name);
        let regressions = inputs(&root.join("regressions").join(target.name));
        for file in seeds.iter().chain(&regressions) {
            let bytes = std::fs::read(file).unwrap();
            if catch_unwind(AssertUnwindSafe(|| (target.run)(&bytes))).is_err() {
                failures.push(file.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "inputs that fail: {failures:#?}");
}

#[test]
fn every_target_has_a_cargo_fuzz_binary() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml"))
            .unwrap();
    for target in TARGETS {
        let file = format!("fuzz_targets/{}.rs", target.name);
        assert!(manifest.contains(&file), "fuzz/Cargo.toml lacks {file}");
        let source = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz")
                .join(&file),
        )
        .unwrap();
        assert!(
            source.contains(&format!("cardbridge::fuzz::{}(", target.name)),
            "{file} calls another entry point"
        );
    }
}
