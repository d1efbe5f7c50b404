//! SC-Signature verification on arbitrary header values and bodies: never panics, and a body signed
//! with a configured token always verifies while any other header never does.
#![no_main]

use bytes::Bytes;
use carhook_shared::signature::{sign, ManagementTokens};
use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let (header, body) = data.split_at(split);
    let tokens = match ManagementTokens::from_csv("fuzz-current,fuzz-previous") {
        Ok(t) => t,
        Err(_) => return,
    };
    let body = Bytes::copy_from_slice(body);
    let right = sign(&SecretString::from("fuzz-previous".to_string()), &body);
    let current = sign(&SecretString::from("fuzz-current".to_string()), &body);
    if header != right.as_bytes() && header != current.as_bytes() {
        assert!(tokens.verify(Some(header), body.clone()).is_err());
    }
    let ok = tokens.verify(Some(right.as_bytes()), body).map(|v| v.token_index());
    assert_eq!(ok, Ok(1));
});
