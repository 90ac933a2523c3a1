//! Apple MDM wire codecs (protocol.md §2 and §3): check-in messages, connect reports and
//! command envelopes.
//!
//! Everything here is pure: bytes in, typed values out (and back). Each body is parsed
//! exactly once into a [`plist::Dictionary`]; decoders then *move* the values they keep
//! out of that dictionary instead of cloning them, because these codecs sit on the path
//! of every device request.

pub mod checkin;
pub mod command;
pub mod connect;
pub mod ids;

pub use checkin::{decode_checkin, Checkin, CheckinMessage};
pub use command::{build_command, inspect_command, CommandInfo};
pub use connect::{decode_connect, ConnectReport, ReportStatus};
pub use ids::{resolve_channel, Channel, EnrollmentKind};

use plist::stream::{Event, XmlReader};
use plist::{Dictionary, Value};

/// The deepest nesting of arrays and dictionaries a message may have. Real messages and
/// commands nest a handful of levels; a parsed value is dropped (and walked) recursively,
/// so without a bound a body of nested `<array>`s overflows the stack and aborts the
/// server.
pub const MAX_PLIST_DEPTH: usize = 64;

/// Why a device message or an API-supplied command was rejected.
///
/// Every variant maps to a 400 answer: none of them may become a 401, which would make
/// the device unenroll (protocol.md §2.6).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("body is not a valid XML property list: {0}")]
    MalformedPlist(String),
    #[error("property list root is not a dictionary")]
    NotADictionary,
    #[error("required key `{0}` is missing")]
    MissingKey(&'static str),
    #[error("key `{key}` must be a {expected}")]
    WrongType {
        key: &'static str,
        expected: &'static str,
    },
    #[error("unknown check-in MessageType `{0}`")]
    UnknownMessageType(String),
    #[error("unknown connect Status `{0}`")]
    UnknownStatus(String),
    #[error("identifier `{key}` {reason}")]
    InvalidIdentifier {
        key: &'static str,
        reason: &'static str,
    },
    #[error("Authenticate is only valid on a device channel")]
    NotDeviceChannel,
}

impl ProtocolError {
    /// A bounded, snake_case label for metrics: the variant without its payload, so that
    /// device-controlled text never becomes a label value.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MalformedPlist(_) => "malformed_plist",
            Self::NotADictionary => "not_a_dictionary",
            Self::MissingKey(_) => "missing_key",
            Self::WrongType { .. } => "wrong_type",
            Self::UnknownMessageType(_) => "unknown_message_type",
            Self::UnknownStatus(_) => "unknown_status",
            Self::InvalidIdentifier { .. } => "invalid_identifier",
            Self::NotDeviceChannel => "not_device_channel",
        }
    }
}

/// Serializes a value as an XML property list, the only encoding devices are sent.
pub fn encode_plist(value: &Value) -> Vec<u8> {
    write_xml(value).unwrap_or_else(|_| {
        // Writing into memory cannot fail on I/O; the one remaining error is a `Uid`,
        // a binary-plist-only type. XML spells a UID as a `{CF$UID: n}` dictionary, and
        // a tree without UIDs always encodes.
        write_xml(&spell_uids_as_dictionaries(value)).unwrap_or_default()
    })
}

fn write_xml(value: &Value) -> Result<Vec<u8>, plist::Error> {
    let mut xml = Vec::with_capacity(512);
    value.to_writer_xml(&mut xml)?;
    Ok(xml)
}

fn spell_uids_as_dictionaries(value: &Value) -> Value {
    match value {
        Value::Uid(uid) => Value::Dictionary(Dictionary::from_iter([(
            "CF$UID".to_owned(),
            Value::Integer(uid.get().into()),
        )])),
        Value::Array(items) => Value::Array(items.iter().map(spell_uids_as_dictionaries).collect()),
        Value::Dictionary(entries) => Value::Dictionary(
            entries
                .iter()
                .map(|(key, item)| (key.clone(), spell_uids_as_dictionaries(item)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Encodes a one-key dictionary: the shape of every plist answer to a check-in (§2.4).
fn single_entry_plist(key: &str, value: Value) -> Vec<u8> {
    encode_plist(&Value::Dictionary(Dictionary::from_iter([(
        key.to_owned(),
        value,
    )])))
}

/// Parses a message body, which must be an XML plist whose root is a dictionary nested
/// at most [`MAX_PLIST_DEPTH`] levels deep.
fn parse_dictionary(body: &[u8]) -> Result<Dictionary, ProtocolError> {
    let mut depth = 0usize;
    let mut too_deep = false;
    // The stream ends at the first collection that opens too deep: the value is never
    // built, and the parser's own error (a premature end) is replaced by the real reason.
    let events = XmlReader::new(body).take_while(|event| {
        match event {
            Ok(Event::StartArray(_) | Event::StartDictionary(_)) => depth += 1,
            Ok(Event::EndCollection) => depth = depth.saturating_sub(1),
            _ => {}
        }
        too_deep = depth > MAX_PLIST_DEPTH;
        !too_deep
    });
    let parsed = Value::from_events(events);
    if too_deep {
        return Err(ProtocolError::MalformedPlist(format!(
            "nested deeper than {MAX_PLIST_DEPTH} levels"
        )));
    }
    parsed
        .map_err(|error| ProtocolError::MalformedPlist(error.to_string()))?
        .into_dictionary()
        .ok_or(ProtocolError::NotADictionary)
}

/// Reads an optional string without taking it, for keys that are copied rather than moved
/// (channel identifiers are resolved from a shared borrow of the message).
fn borrow_string<'a>(
    dict: &'a Dictionary,
    key: &'static str,
) -> Result<Option<&'a str>, ProtocolError> {
    dict.get(key)
        .map(|value| value.as_string().ok_or(wrong_type(key, "string")))
        .transpose()
}

/// Moves an optional value of one plist type out of the message.
fn take_typed<T>(
    dict: &mut Dictionary,
    key: &'static str,
    expected: &'static str,
    convert: impl FnOnce(Value) -> Option<T>,
) -> Result<Option<T>, ProtocolError> {
    dict.remove(key)
        .map(|value| convert(value).ok_or(wrong_type(key, expected)))
        .transpose()
}

fn take_string(dict: &mut Dictionary, key: &'static str) -> Result<Option<String>, ProtocolError> {
    take_typed(dict, key, "string", Value::into_string)
}

fn take_data(dict: &mut Dictionary, key: &'static str) -> Result<Option<Vec<u8>>, ProtocolError> {
    take_typed(dict, key, "data", Value::into_data)
}

fn take_dictionary(
    dict: &mut Dictionary,
    key: &'static str,
) -> Result<Option<Dictionary>, ProtocolError> {
    take_typed(dict, key, "dictionary", Value::into_dictionary)
}

/// Reads a boolean flag that devices omit when false (e.g. `AwaitingConfiguration`).
fn flag(dict: &Dictionary, key: &'static str) -> Result<bool, ProtocolError> {
    dict.get(key).map_or(Ok(false), |value| {
        value.as_boolean().ok_or(wrong_type(key, "boolean"))
    })
}

fn required<T>(value: Option<T>, key: &'static str) -> Result<T, ProtocolError> {
    value.ok_or(ProtocolError::MissingKey(key))
}

fn wrong_type(key: &'static str, expected: &'static str) -> ProtocolError {
    ProtocolError::WrongType { key, expected }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Access to the recorded device traffic in `tests/fixtures/`.

    use plist::{Dictionary, Value};

    pub fn fixture(relative_path: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/{relative_path}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|error| panic!("reading {path}: {error}"))
    }

    /// The request body of a NanoHUB transcript: the `Content-Length` bytes after the
    /// blank line that ends the request headers.
    pub fn transcript_request_body(name: &str) -> Vec<u8> {
        transcript_body(name, "REQUEST")
    }

    /// The response body of a NanoHUB transcript, framed like the request body.
    pub fn transcript_response_body(name: &str) -> Vec<u8> {
        transcript_body(name, "RESPONSE")
    }

    fn transcript_body(name: &str, section: &str) -> Vec<u8> {
        let transcript = fixture(&format!("nanohub-transcripts/{name}.txt"));
        let text = String::from_utf8(transcript).expect("transcripts are UTF-8");
        let banner = format!(" {section} ====");
        let section_start = text
            .find(&banner)
            .and_then(|at| text[at..].find('\n').map(|newline| at + newline + 1))
            .unwrap_or_else(|| panic!("{name}: no {section} section"));
        let (headers, rest) = text[section_start..]
            .split_once("\n\n")
            .unwrap_or_else(|| panic!("{name}: {section} has no body"));
        let length: usize = headers
            .lines()
            .find_map(|line| line.strip_prefix("Content-Length: "))
            .unwrap_or_else(|| panic!("{name}: {section} has no Content-Length"))
            .parse()
            .expect("numeric Content-Length");
        rest.as_bytes()[..length].to_vec()
    }

    /// Builds an XML plist body from key/value pairs, for messages without a recording.
    pub fn plist_body<const N: usize>(entries: [(&str, Value); N]) -> Vec<u8> {
        let dict: Dictionary = entries
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect();
        super::encode_plist(&Value::Dictionary(dict))
    }

    /// Deterministic byte mutations of a valid body: every truncation, random byte flips,
    /// random splices and pure noise. Decoders must reject them without panicking.
    pub fn mangled_variants(valid: &[u8], count: usize) -> Vec<Vec<u8>> {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0x5EED);
        let mut variants: Vec<Vec<u8>> = (0..valid.len()).map(|n| valid[..n].to_vec()).collect();
        while variants.len() < count {
            let mut variant = valid.to_vec();
            match rng.gen_range(0..3) {
                0 => {
                    for _ in 0..rng.gen_range(1..8) {
                        let at = rng.gen_range(0..variant.len());
                        variant[at] = rng.gen();
                    }
                }
                1 => {
                    let from = rng.gen_range(0..variant.len());
                    let to = rng.gen_range(from..=variant.len());
                    let at = rng.gen_range(0..variant.len());
                    let splice = variant[from..to].to_vec();
                    variant.splice(at..at, splice);
                }
                _ => {
                    variant = (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect();
                }
            }
            variants.push(variant);
        }
        variants
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_a_malformed_plist() {
        let body = test_support::transcript_request_body("44-neg-checkin-garbage-body");
        assert_eq!(body, b"not a plist");
        let error = parse_dictionary(&body).unwrap_err();
        assert!(
            matches!(error, ProtocolError::MalformedPlist(_)),
            "{error:?}"
        );
        assert_eq!(error.reason(), "malformed_plist");
    }

    #[test]
    fn an_empty_body_is_a_malformed_plist() {
        assert!(matches!(
            parse_dictionary(b""),
            Err(ProtocolError::MalformedPlist(_))
        ));
    }

    /// `<dict><key>k</key><array>…<array/>…</array></dict>` with `levels` levels in all.
    fn nested_plist(levels: usize) -> Vec<u8> {
        let arrays = levels - 1;
        let mut body = b"<?xml version=\"1.0\"?><plist><dict><key>k</key>".to_vec();
        body.extend(b"<array>".repeat(arrays));
        body.extend(b"</array>".repeat(arrays));
        body.extend(b"</dict></plist>");
        body
    }

    #[test]
    fn nesting_up_to_the_bound_is_accepted() {
        let dict = parse_dictionary(&nested_plist(MAX_PLIST_DEPTH)).unwrap();
        assert!(dict.get("k").and_then(Value::as_array).is_some());
    }

    #[test]
    fn nesting_beyond_the_bound_is_a_malformed_plist() {
        let error = parse_dictionary(&nested_plist(MAX_PLIST_DEPTH + 1)).unwrap_err();
        assert_eq!(
            error,
            ProtocolError::MalformedPlist("nested deeper than 64 levels".into())
        );
    }

    /// A 900 KB body (under the 1 MiB body limit) of 60,000 nested arrays overflowed the
    /// stack when the parsed value was dropped (found by fuzzing, `fuzz/`). It is refused
    /// after reading the first levels, on a thread with a small stack.
    #[test]
    fn a_body_of_deeply_nested_arrays_is_refused_without_overflowing_the_stack() {
        let body = nested_plist(60_000);
        let error = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || parse_dictionary(&body).unwrap_err())
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(error.reason(), "malformed_plist");
    }

    #[test]
    fn a_plist_whose_root_is_not_a_dictionary_is_rejected() {
        let body = encode_plist(&Value::Array(vec![Value::String("UDID".into())]));
        assert_eq!(parse_dictionary(&body), Err(ProtocolError::NotADictionary));
    }

    #[test]
    fn every_error_has_its_own_metrics_label() {
        let errors = [
            ProtocolError::MalformedPlist("x".into()),
            ProtocolError::NotADictionary,
            ProtocolError::MissingKey("UDID"),
            wrong_type("UDID", "string"),
            ProtocolError::UnknownMessageType("x".into()),
            ProtocolError::UnknownStatus("x".into()),
            ProtocolError::InvalidIdentifier {
                key: "UDID",
                reason: "is empty",
            },
            ProtocolError::NotDeviceChannel,
        ];
        let labels: Vec<_> = errors.iter().map(ProtocolError::reason).collect();
        assert_eq!(
            labels,
            [
                "malformed_plist",
                "not_a_dictionary",
                "missing_key",
                "wrong_type",
                "unknown_message_type",
                "unknown_status",
                "invalid_identifier",
                "not_device_channel",
            ]
        );
    }

    #[test]
    fn encoded_plists_are_xml_and_read_back_identically() {
        let value = Value::Dictionary(Dictionary::from_iter([
            ("Name".to_owned(), Value::String("Fruit".into())),
            ("Blob".to_owned(), Value::Data(vec![0, 1, 2, 255])),
            ("Flag".to_owned(), Value::Boolean(true)),
        ]));
        let xml = encode_plist(&value);
        assert!(xml.starts_with(b"<?xml"));
        assert_eq!(Value::from_reader_xml(&xml[..]).unwrap(), value);
    }

    #[test]
    fn uids_are_spelled_as_cf_uid_dictionaries_in_xml() {
        let value = Value::Array(vec![Value::Uid(plist::Uid::new(7))]);
        let decoded = Value::from_reader_xml(&encode_plist(&value)[..]).unwrap();
        let expected = Value::Array(vec![Value::Dictionary(Dictionary::from_iter([(
            "CF$UID".to_owned(),
            Value::Integer(7.into()),
        )]))]);
        assert_eq!(decoded, expected);
    }

    #[test]
    fn transcript_bodies_are_framed_by_content_length() {
        let body = test_support::transcript_request_body("07-connect-acknowledged");
        assert_eq!(body.len(), 423);
        assert!(body.starts_with(b"<?xml"));
        assert!(body.ends_with(b"</plist>\n"));
    }
}
