//! The replicator's RESP reader (replicator/src/wire.rs) on arbitrary bytes from its
//! peer: it must never panic, never claim a frame longer than its input, and refuse
//! (not wait for) a frame over its size and depth limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator::wire;

fuzz_target!(|data: &[u8]| {
    let _ = wire::first_error(data);
    if let Ok(Some(end)) = wire::frame_end(data, 0) {
        assert!(end <= data.len(), "frame end {end} past the input's {}", data.len());
        let frame = &data[..end];
        let mut out = Vec::new();
        if let Ok((parts, _args)) = wire::xread_to_entries(frame, &mut out) {
            assert!(parts.iter().all(|p| p.entries > 0));
        }
        for n in [0, 1, 4] {
            let _ = wire::copy_outcomes(frame, n);
        }
    }
});
