//! The receiver's routing parse on arbitrary bytes: never panics, never fails.
#![no_main]

use carhook_shared::envelope::Routing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let r = Routing::sniff(data);
    if let Some(k) = r.key() {
        assert!(!k.is_empty());
    }
});
