//! `Mdm-Signature`: a detached CMS SignedData (BER or DER) over the request body.
//!
//! Input: the first byte picks the form. Even: the rest is the header value as sent.
//! Odd: the rest is the CMS message itself, base64-encoded into the header value, so that
//! mutations reach the BER/CMS decoders instead of breaking the base64.
#![no_main]

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use orchard::identity::{parse_client_cert_header, verify_mdm_signature};

/// The body the seed signatures sign (docs/FUZZING.md, "Seeds").
const BODY: &[u8] = include_bytes!("../seeds/signed-body.plist");

fuzz_target!(|data: &[u8]| {
    let Some((&form, rest)) = data.split_first() else {
        return;
    };
    let header = if form % 2 == 0 {
        match std::str::from_utf8(rest) {
            Ok(text) => text.to_owned(),
            Err(_) => return,
        }
    } else {
        STANDARD.encode(rest)
    };
    let Ok(signer) = verify_mdm_signature(&header, BODY) else {
        return;
    };
    // The signer is a certificate the chain check can read.
    let as_header = format!(":{}:", STANDARD.encode(&signer));
    assert_eq!(parse_client_cert_header(&as_header).ok(), Some(signer));
});
