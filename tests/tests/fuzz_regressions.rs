//! Replays every committed fuzz input — the seeds in fuzz/corpus/<target>/seed-* and
//! the past crashers in fuzz/regressions/<target>/ — through the same harness the
//! fuzzers run (fuzz/src/harness.rs), on stable Rust, in the ordinary test run. A
//! crasher fixed once stays fixed.

#[path = "../../fuzz/src/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::path::{Path, PathBuf};

fn inputs(dir: &Path, seeds_only: bool) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            !seeds_only
                || p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("seed-"))
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_committed_fuzz_input_replays_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut replayed = 0;
    for (target, run) in harness::TARGETS {
        let seeds = inputs(&root.join("corpus").join(target), true);
        assert!(
            !seeds.is_empty(),
            "fuzz/corpus/{target} has no committed seed-* input"
        );
        let crashers = inputs(&root.join("regressions").join(target), false);
        for file in seeds.iter().chain(&crashers) {
            let data = std::fs::read(file).expect("read a fuzz input");
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(
                outcome.is_ok(),
                "{target}: {} panics (replay it with `cargo +nightly fuzz run {target} {}`)",
                file.display(),
                file.display()
            );
            replayed += 1;
        }
    }
    assert!(replayed >= harness::TARGETS.len());
    eprintln!("replayed {replayed} fuzz inputs");
}
