//! What a CodaLab server sends: checkin responses (every message type, read args, resources with
//! ints, floats or strings). No panic; a parsed run message yields a checkin entry that
//! serialises.
#![no_main]
use cw::worker::proto::{self, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msgs) = proto::parse_messages(data) {
        for m in msgs.into_iter().flatten() {
            if let Message::Run { bundle, resources } = m {
                let _ = bundle.exclude_patterns();
                let _ = bundle.store();
                let r = cw::worker::record::Run::new(bundle, resources, "/nonexistent".into());
                serde_json::to_vec(&r.checkin_entry("w")).unwrap();
                let _ = r.dep_child_paths();
            }
        }
    }
});
