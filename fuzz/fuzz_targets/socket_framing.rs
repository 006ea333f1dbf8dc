//! cargo-fuzz entry for `socket_framing`; the body is in fuzz/src/harness.rs (replayed by
//! tests/tests/fuzz_regressions.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgerelay_fuzz::harness::socket_framing(data));
