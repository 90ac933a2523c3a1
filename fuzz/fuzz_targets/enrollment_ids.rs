//! Enrollment ids: the identity keys of a check-in or connect message (`UDID`,
//! `EnrollmentID`, `UserID`, `EnrollmentUserID`, `UserShortName`, `UserLongName`) resolved
//! into the id that keys queues, pushes and certificate bindings.
//!
//! Input: up to six fields separated by 0xFF (never part of UTF-8), one per key in the
//! order above. A field's first byte says what the message carries for that key: `-`
//! nothing, `#` an integer (a mistyped key), anything else the string that follows it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchard::protocol::resolve_channel;
use orchard_fuzz::assert_channel_is_well_formed;
use plist::{Dictionary, Value};

const KEYS: [&str; 6] = [
    "UDID",
    "EnrollmentID",
    "UserID",
    "EnrollmentUserID",
    "UserShortName",
    "UserLongName",
];

fn message(data: &[u8]) -> Dictionary {
    let mut dict = Dictionary::new();
    for (key, field) in KEYS.iter().zip(data.split(|&byte| byte == 0xff)) {
        let value = match field.split_first() {
            None | Some((b'-', _)) => continue,
            Some((b'#', digits)) => Value::Integer((digits.len() as u64).into()),
            Some((_, text)) => Value::String(String::from_utf8_lossy(text).into_owned()),
        };
        dict.insert((*key).to_owned(), value);
    }
    dict
}

fuzz_target!(|data: &[u8]| {
    let dict = message(data);
    let Ok(channel) = resolve_channel(&dict) else {
        return;
    };
    assert_channel_is_well_formed(&channel);
    let device_key = if dict.contains_key("UDID") {
        "UDID"
    } else {
        "EnrollmentID"
    };
    assert_eq!(
        dict.get(device_key).and_then(Value::as_string),
        Some(channel.device_id.as_str())
    );
    assert_eq!(resolve_channel(&dict), Ok(channel));
});
