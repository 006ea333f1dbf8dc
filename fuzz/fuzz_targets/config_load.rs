//! cargo-fuzz entry for `config_load`; the body is in fuzz/src/harness.rs (replayed by
//! tests/tests/fuzz_regressions.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgerelay_fuzz::harness::config_load(data));
