//! Command envelopes (protocol.md §3.2): `{CommandUUID, Command: {RequestType, …}}`.
//!
//! Raw commands arrive from the API already enveloped; they are checked once on the way
//! in, so that every queued command can be keyed by its UUID and be sent as stored.

use plist::{Dictionary, Value};

use super::ids::validate_identifier;
use super::{
    encode_plist, parse_dictionary, required, take_dictionary, take_string, ProtocolError,
};

/// What the queue needs to know about a raw command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandInfo {
    pub command_uuid: String,
    pub request_type: String,
}

/// Validates an API-supplied raw command plist: a dictionary with a `CommandUUID` that
/// is a safe identifier (it keys results and appears in URLs) and a `Command` dictionary
/// with a non-empty `RequestType`.
pub fn inspect_command(raw: &[u8]) -> Result<CommandInfo, ProtocolError> {
    let mut envelope = parse_dictionary(raw)?;
    let command_uuid = required(take_string(&mut envelope, "CommandUUID")?, "CommandUUID")?;
    validate_identifier("CommandUUID", &command_uuid)?;
    let mut command = required(take_dictionary(&mut envelope, "Command")?, "Command")?;
    let request_type = required(take_string(&mut command, "RequestType")?, "RequestType")?;
    if request_type.is_empty() {
        return Err(ProtocolError::InvalidIdentifier {
            key: "RequestType",
            reason: "is empty",
        });
    }
    Ok(CommandInfo {
        command_uuid,
        request_type,
    })
}

/// Envelopes a command (a dictionary holding at least `RequestType`) for sending.
pub fn build_command(command_uuid: &str, command: Dictionary) -> Vec<u8> {
    let envelope = Dictionary::from_iter([
        ("CommandUUID", Value::String(command_uuid.to_owned())),
        ("Command", Value::Dictionary(command)),
    ]);
    encode_plist(&Value::Dictionary(envelope))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::test_support::{
        mangled_variants, plist_body, transcript_request_body, transcript_response_body,
    };

    fn string(value: &str) -> Value {
        Value::String(value.to_owned())
    }

    fn command(request_type: Value) -> Value {
        Value::Dictionary(Dictionary::from_iter([("RequestType", request_type)]))
    }

    #[test]
    fn an_enqueued_profile_list_command_is_accepted() {
        let raw = transcript_request_body("05-api-enqueue-profilelist");
        assert_eq!(
            inspect_command(&raw),
            Ok(CommandInfo {
                command_uuid: "7A5C2E4E-0000-4000-8000-000000000001".to_owned(),
                request_type: "ProfileList".to_owned(),
            })
        );
    }

    #[test]
    fn commands_sent_to_devices_inspect_back() {
        let sent = transcript_response_body("22-connect-idle-receives-declarativemanagement-cmd");
        assert_eq!(
            inspect_command(&sent),
            Ok(CommandInfo {
                command_uuid: "305b274c-835a-4037-8b64-ef9784da104d".to_owned(),
                request_type: "DeclarativeManagement".to_owned(),
            })
        );
        let sent = transcript_response_body("06-connect-idle-receives-command");
        assert_eq!(inspect_command(&sent).unwrap().request_type, "ProfileList");
    }

    #[test]
    fn a_built_command_carries_its_uuid_and_payload() {
        let payload = Dictionary::from_iter([
            ("RequestType", string("DeviceInformation")),
            ("Queries", Value::Array(vec![string("SerialNumber")])),
        ]);
        let body = build_command("CMD-1", payload.clone());
        assert!(body.starts_with(b"<?xml"));
        let decoded = Value::from_reader_xml(&body[..]).unwrap();
        let expected = Dictionary::from_iter([
            ("CommandUUID", string("CMD-1")),
            ("Command", Value::Dictionary(payload)),
        ]);
        assert_eq!(decoded, Value::Dictionary(expected));
        assert_eq!(
            inspect_command(&body),
            Ok(CommandInfo {
                command_uuid: "CMD-1".to_owned(),
                request_type: "DeviceInformation".to_owned(),
            })
        );
    }

    #[test]
    fn the_command_uuid_is_required_and_must_be_a_safe_identifier() {
        let missing = plist_body([("Command", command(string("ProfileList")))]);
        assert_eq!(
            inspect_command(&missing),
            Err(ProtocolError::MissingKey("CommandUUID"))
        );
        let integer = plist_body([
            ("CommandUUID", Value::Integer(1.into())),
            ("Command", command(string("ProfileList"))),
        ]);
        assert_eq!(
            inspect_command(&integer),
            Err(ProtocolError::WrongType {
                key: "CommandUUID",
                expected: "string"
            })
        );
        for (uuid, reason) in [
            ("", "is empty"),
            ("a,b", "contains one of the reserved characters , / ? # %"),
            ("a b", "contains whitespace"),
        ] {
            let body = plist_body([
                ("CommandUUID", string(uuid)),
                ("Command", command(string("ProfileList"))),
            ]);
            assert_eq!(
                inspect_command(&body),
                Err(ProtocolError::InvalidIdentifier {
                    key: "CommandUUID",
                    reason
                })
            );
        }
        let too_long = plist_body([
            ("CommandUUID", string(&"A".repeat(256))),
            ("Command", command(string("ProfileList"))),
        ]);
        assert_eq!(
            inspect_command(&too_long).unwrap_err().reason(),
            "invalid_identifier"
        );
    }

    #[test]
    fn the_command_must_be_a_dictionary_with_a_request_type() {
        let missing = plist_body([("CommandUUID", string("C-1"))]);
        assert_eq!(
            inspect_command(&missing),
            Err(ProtocolError::MissingKey("Command"))
        );
        let not_a_dictionary = plist_body([
            ("CommandUUID", string("C-1")),
            ("Command", string("ProfileList")),
        ]);
        assert_eq!(
            inspect_command(&not_a_dictionary),
            Err(ProtocolError::WrongType {
                key: "Command",
                expected: "dictionary"
            })
        );
        let without_request_type = plist_body([
            ("CommandUUID", string("C-1")),
            ("Command", Value::Dictionary(Dictionary::new())),
        ]);
        assert_eq!(
            inspect_command(&without_request_type),
            Err(ProtocolError::MissingKey("RequestType"))
        );
        let empty_request_type = plist_body([
            ("CommandUUID", string("C-1")),
            ("Command", command(string(""))),
        ]);
        assert_eq!(
            inspect_command(&empty_request_type),
            Err(ProtocolError::InvalidIdentifier {
                key: "RequestType",
                reason: "is empty"
            })
        );
        let integer_request_type = plist_body([
            ("CommandUUID", string("C-1")),
            ("Command", command(Value::Integer(3.into()))),
        ]);
        assert_eq!(
            inspect_command(&integer_request_type),
            Err(ProtocolError::WrongType {
                key: "RequestType",
                expected: "string"
            })
        );
    }

    #[test]
    fn garbage_and_non_dictionaries_are_rejected() {
        assert!(matches!(
            inspect_command(b"not a plist"),
            Err(ProtocolError::MalformedPlist(_))
        ));
        let array = encode_plist(&Value::Array(Vec::new()));
        assert_eq!(inspect_command(&array), Err(ProtocolError::NotADictionary));
    }

    #[test]
    fn mangled_commands_never_panic() {
        let valid = transcript_request_body("05-api-enqueue-profilelist");
        for variant in mangled_variants(&valid, 3000) {
            let _ = inspect_command(&variant);
        }
    }
}
