//! The processor's event parse on arbitrary bytes: never panics; errors always name a class.
#![no_main]

use carhook_shared::event::Event;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = Event::parse(data) {
        assert!(!e.class().is_empty());
        assert!(!e.to_string().is_empty());
    }
});
