//! The event decoder (eventlog's envelope and stream ids) on arbitrary stream entry
//! bytes, as the node's projector, handlers and the replicator's rejoin read them: it
//! must never panic; what it accepts re-encodes to an envelope it accepts again (with
//! the same identity: floats in the payload may print differently, so the payload is
//! not compared).
#![no_main]

use eventlog::envelope::{Envelope, StreamId, FIELD_EVENT, FIELD_TYPE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::from_fields([(FIELD_TYPE, &b"T"[..]), (FIELD_EVENT, data)]) {
        let fields = env.to_fields();
        let again = Envelope::from_fields(fields.iter().map(|(k, v)| (*k, v.as_bytes())))
            .expect("a decoded envelope re-encodes to one that decodes");
        assert_eq!(
            (&again.event_id, &again.aggregate_id, again.sequence, again.epoch),
            (&env.event_id, &env.aggregate_id, env.sequence, env.epoch)
        );
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(id) = StreamId::parse(s) {
            assert_eq!(StreamId::parse(&id.to_string()), Some(id));
        }
    }
});
