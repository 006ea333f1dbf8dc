//! Fuzz the batch decoder (central side): every batch is untrusted input. With and
//! without a known dictionary, so the dictionary path is reached too.
#![no_main]

use edgerelay::wire::{decode, Dictionary};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dict = Dictionary::new(br#"{"temp":sensors/t1sensors/t2dev-1dev-2"#.repeat(8));
    let lookup = |id: u64| (id == dict.id).then(|| dict.clone());
    if let Ok(batch) = decode(data, &lookup) {
        for r in &batch.records {
            let _ = edgerelay::wire::record_json(&batch.header, r);
        }
    }
});
