//! Check-in messages (protocol.md §2.3) and the plist answers some of them expect (§2.4).
//!
//! A check-in body is a dictionary with a `MessageType`, the channel identity keys of
//! §2.2, and per-type keys. Unknown message types are rejected (400, as NanoMDM does);
//! unknown extra keys are ignored so that newer OS releases keep checking in.

use plist::{Dictionary, Value};

use super::ids::{resolve_channel, Channel};
use super::{
    flag, parse_dictionary, required, single_entry_plist, take_data, take_dictionary, take_string,
    ProtocolError,
};

/// A decoded check-in: who is speaking and what they say.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkin {
    pub channel: Channel,
    pub message: CheckinMessage,
}

/// The eight check-in message types; there are no others (§2.3).
#[derive(Clone, Debug, PartialEq)]
pub enum CheckinMessage {
    Authenticate(Authenticate),
    TokenUpdate(TokenUpdate),
    CheckOut(CheckOut),
    UserAuthenticate(UserAuthenticate),
    SetBootstrapToken(SetBootstrapToken),
    GetBootstrapToken(GetBootstrapToken),
    GetToken(GetToken),
    DeclarativeManagement(DeclarativeManagement),
}

impl CheckinMessage {
    /// Every `MessageType` (the `message_type` label values of the check-in metrics).
    pub const MESSAGE_TYPES: [&'static str; 8] = [
        Authenticate::MESSAGE_TYPE,
        TokenUpdate::MESSAGE_TYPE,
        CheckOut::MESSAGE_TYPE,
        UserAuthenticate::MESSAGE_TYPE,
        SetBootstrapToken::MESSAGE_TYPE,
        GetBootstrapToken::MESSAGE_TYPE,
        GetToken::MESSAGE_TYPE,
        DeclarativeManagement::MESSAGE_TYPE,
    ];

    /// The `MessageType` this message arrived as; a bounded metrics label.
    pub fn message_type(&self) -> &'static str {
        match self {
            Self::Authenticate(_) => Authenticate::MESSAGE_TYPE,
            Self::TokenUpdate(_) => TokenUpdate::MESSAGE_TYPE,
            Self::CheckOut(_) => CheckOut::MESSAGE_TYPE,
            Self::UserAuthenticate(_) => UserAuthenticate::MESSAGE_TYPE,
            Self::SetBootstrapToken(_) => SetBootstrapToken::MESSAGE_TYPE,
            Self::GetBootstrapToken(_) => GetBootstrapToken::MESSAGE_TYPE,
            Self::GetToken(_) => GetToken::MESSAGE_TYPE,
            Self::DeclarativeManagement(_) => DeclarativeManagement::MESSAGE_TYPE,
        }
    }
}

/// First message of an enrollment, on the device channel only. The device facts are
/// optional: iOS sends them only with AllowQueryDeviceInformation, user enrollments never.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Authenticate {
    pub topic: String,
    pub serial_number: Option<String>,
    pub model: Option<String>,
    pub model_name: Option<String>,
    pub device_name: Option<String>,
    pub os_version: Option<String>,
    pub build_version: Option<String>,
    pub product_name: Option<String>,
    pub imei: Option<String>,
    pub meid: Option<String>,
}

/// New push coordinates for a channel; the first one completes an enrollment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenUpdate {
    pub topic: String,
    /// Raw APNs device token (hex-encoded only when pushing).
    pub token: Vec<u8>,
    /// Echoed in every push; a wrong value is silently dropped by the device.
    pub push_magic: String,
    /// Kept for ClearPasscode (iOS).
    pub unlock_token: Option<Vec<u8>>,
    /// The device (or Shared iPad user) waits in Setup Assistant for DeviceConfigured.
    pub awaiting_configuration: bool,
}

/// The device reports its unenrollment (best effort; may never arrive).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckOut {
    pub topic: Option<String>,
}

/// macOS directory-user authentication: first without a digest response (answer with a
/// [`digest_challenge_response`] or 410), then with one (answer 200 empty).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserAuthenticate {
    pub digest_response: Option<String>,
}

/// Escrow of the macOS Bootstrap Token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetBootstrapToken {
    /// `None` when the token is missing or empty: the stored token must be deleted.
    pub token: Option<Vec<u8>>,
    pub awaiting_configuration: bool,
}

/// The device asks for its escrowed Bootstrap Token ([`bootstrap_token_response`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GetBootstrapToken {
    pub awaiting_configuration: bool,
}

/// The device asks for a service token such as `com.apple.maid` or
/// `com.apple.watch.pairing` ([`token_data_response`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GetToken {
    pub service_type: String,
    /// `TokenParameters`, empty when absent; its keys depend on the service type.
    pub parameters: Dictionary,
}

/// A DDM synchronisation request; answered with raw JSON (protocol.md §5).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeclarativeManagement {
    /// `tokens`, `declaration-items`, `declaration/<type>/<id>` or `status`.
    pub endpoint: String,
    /// The JSON status report on `Endpoint=status`.
    pub data: Option<Vec<u8>>,
}

impl Authenticate {
    pub const MESSAGE_TYPE: &'static str = "Authenticate";

    fn take_from(dict: &mut Dictionary) -> Result<Self, ProtocolError> {
        Ok(Self {
            topic: required(take_string(dict, "Topic")?, "Topic")?,
            serial_number: take_string(dict, "SerialNumber")?,
            model: take_string(dict, "Model")?,
            model_name: take_string(dict, "ModelName")?,
            device_name: take_string(dict, "DeviceName")?,
            os_version: take_string(dict, "OSVersion")?,
            build_version: take_string(dict, "BuildVersion")?,
            product_name: take_string(dict, "ProductName")?,
            imei: take_string(dict, "IMEI")?,
            meid: take_string(dict, "MEID")?,
        })
    }
}

impl TokenUpdate {
    pub const MESSAGE_TYPE: &'static str = "TokenUpdate";

    fn take_from(dict: &mut Dictionary) -> Result<Self, ProtocolError> {
        Ok(Self {
            topic: required(take_string(dict, "Topic")?, "Topic")?,
            token: required(take_data(dict, "Token")?, "Token")?,
            push_magic: required(take_string(dict, "PushMagic")?, "PushMagic")?,
            unlock_token: take_data(dict, "UnlockToken")?,
            awaiting_configuration: flag(dict, "AwaitingConfiguration")?,
        })
    }
}

impl CheckOut {
    pub const MESSAGE_TYPE: &'static str = "CheckOut";

    fn take_from(dict: &mut Dictionary) -> Result<Self, ProtocolError> {
        Ok(Self {
            topic: take_string(dict, "Topic")?,
        })
    }
}

impl UserAuthenticate {
    pub const MESSAGE_TYPE: &'static str = "UserAuthenticate";

    fn take_from(dict: &mut Dictionary) -> Result<Self, ProtocolError> {
        Ok(Self {
            digest_response: take_string(dict, "DigestResponse")?,
        })
    }
}

impl SetBootstrapToken {
    pub const MESSAGE_TYPE: &'static str = "SetBootstrapToken";

    fn take_from(dict: &mut Dictionary) -> Result<Self, ProtocolError> {
        Ok(Self {
            token: take_data(dict, "BootstrapToken")?.filter(|token| !token.is_empty()),
            awaiting_configuration: flag(dict, "AwaitingConfiguration")?,
        })
    }
}

impl GetBootstrapToken {
    pub const MESSAGE_TYPE: &'static str = "GetBootstrapToken";

    fn take_from(dict: &mut Dictionary) -> Result<Self, ProtocolError> {
        Ok(Self {
            awaiting_configuration: flag(dict, "AwaitingConfiguration")?,
        })
    }
}

impl GetToken {
    pub const MESSAGE_TYPE: &'static str = "GetToken";

    fn take_from(dict: &mut Dictionary) -> Result<Self, ProtocolError> {
        Ok(Self {
            service_type: required(take_string(dict, "TokenServiceType")?, "TokenServiceType")?,
            parameters: take_dictionary(dict, "TokenParameters")?.unwrap_or_default(),
        })
    }
}

impl DeclarativeManagement {
    pub const MESSAGE_TYPE: &'static str = "DeclarativeManagement";

    fn take_from(dict: &mut Dictionary) -> Result<Self, ProtocolError> {
        Ok(Self {
            endpoint: required(take_string(dict, "Endpoint")?, "Endpoint")?,
            data: take_data(dict, "Data")?,
        })
    }
}

type MessageDecoder = fn(&mut Dictionary) -> Result<CheckinMessage, ProtocolError>;

/// Decodes a check-in body. The `MessageType` is examined first (§2.1) so that an
/// unknown type is reported as such, whatever else the body holds.
pub fn decode_checkin(body: &[u8]) -> Result<Checkin, ProtocolError> {
    let mut dict = parse_dictionary(body)?;
    let message_type = required(take_string(&mut dict, "MessageType")?, "MessageType")?;
    let decode: MessageDecoder = match message_type.as_str() {
        Authenticate::MESSAGE_TYPE => {
            |d| Authenticate::take_from(d).map(CheckinMessage::Authenticate)
        }
        TokenUpdate::MESSAGE_TYPE => |d| TokenUpdate::take_from(d).map(CheckinMessage::TokenUpdate),
        CheckOut::MESSAGE_TYPE => |d| CheckOut::take_from(d).map(CheckinMessage::CheckOut),
        UserAuthenticate::MESSAGE_TYPE => {
            |d| UserAuthenticate::take_from(d).map(CheckinMessage::UserAuthenticate)
        }
        SetBootstrapToken::MESSAGE_TYPE => {
            |d| SetBootstrapToken::take_from(d).map(CheckinMessage::SetBootstrapToken)
        }
        GetBootstrapToken::MESSAGE_TYPE => {
            |d| GetBootstrapToken::take_from(d).map(CheckinMessage::GetBootstrapToken)
        }
        GetToken::MESSAGE_TYPE => |d| GetToken::take_from(d).map(CheckinMessage::GetToken),
        DeclarativeManagement::MESSAGE_TYPE => {
            |d| DeclarativeManagement::take_from(d).map(CheckinMessage::DeclarativeManagement)
        }
        _ => return Err(ProtocolError::UnknownMessageType(message_type)),
    };
    let channel = resolve_channel(&dict)?;
    let message = decode(&mut dict)?;
    if matches!(message, CheckinMessage::Authenticate(_)) && !channel.is_device_channel() {
        return Err(ProtocolError::NotDeviceChannel);
    }
    Ok(Checkin { channel, message })
}

/// First answer to a [`UserAuthenticate`]; an empty challenge accepts the user without
/// authentication.
pub fn digest_challenge_response(challenge: &str) -> Vec<u8> {
    single_entry_plist("DigestChallenge", Value::String(challenge.to_owned()))
}

/// Answer to a [`GetBootstrapToken`] when a token is escrowed.
pub fn bootstrap_token_response(token: &[u8]) -> Vec<u8> {
    single_entry_plist("BootstrapToken", Value::Data(token.to_vec()))
}

/// Answer to a [`GetToken`]; string tokens are sent as their UTF-8 bytes.
pub fn token_data_response(data: &[u8]) -> Vec<u8> {
    single_entry_plist("TokenData", Value::Data(data.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ids::{EnrollmentKind, SHARED_IPAD_USER_ID};
    use crate::protocol::test_support::{
        fixture, mangled_variants, plist_body, transcript_request_body,
    };

    const MAC_UDID: &str = "66ADE930-5FDF-5EC4-8429-15640684C489";
    const IPAD_UDID: &str = "663b07bb783e9ade1dae4fbb92ea12afc0ce5b69";
    const TOPIC: &str = "com.apple.mgmt.External.e0bd1eac-1f17-4c8e-8a63-dd17d3dd35d9";

    fn string(value: &str) -> Value {
        Value::String(value.to_owned())
    }

    fn decode_message(body: &[u8]) -> CheckinMessage {
        decode_checkin(body).expect("valid check-in").message
    }

    #[test]
    fn authenticate_from_an_ipad_carries_its_device_facts() {
        let checkin = decode_checkin(&fixture("nanomdm/Authenticate.1.plist")).unwrap();
        assert_eq!(checkin.channel.id, IPAD_UDID);
        assert_eq!(checkin.channel.kind, EnrollmentKind::Device);
        assert_eq!(
            checkin.message,
            CheckinMessage::Authenticate(Authenticate {
                topic: TOPIC.to_owned(),
                serial_number: Some("F5JM992LF193".to_owned()),
                os_version: Some("9.3.5".to_owned()),
                build_version: Some("13G36".to_owned()),
                product_name: Some("iPad2,5".to_owned()),
                ..Authenticate::default()
            })
        );
    }

    #[test]
    fn authenticate_from_a_mac_carries_model_and_device_name() {
        let expected = CheckinMessage::Authenticate(Authenticate {
            topic: TOPIC.to_owned(),
            serial_number: Some("C02MT66KFLHH".to_owned()),
            model: Some("iMac14,2".to_owned()),
            model_name: Some("iMac".to_owned()),
            device_name: Some("Fruit".to_owned()),
            os_version: Some("10.12.6".to_owned()),
            build_version: Some("16G2136".to_owned()),
            product_name: Some("iMac14,2".to_owned()),
            imei: None,
            meid: None,
        });
        let from_fixture = decode_checkin(&fixture("nanomdm/Authenticate.2.plist")).unwrap();
        assert_eq!(from_fixture.channel.id, MAC_UDID);
        assert_eq!(from_fixture.message, expected);
        let from_transcript = decode_message(&transcript_request_body("02-authenticate"));
        assert_eq!(from_transcript, expected);
        assert_eq!(expected.message_type(), "Authenticate");
    }

    #[test]
    fn authenticate_requires_a_topic() {
        let body = plist_body([
            ("MessageType", string("Authenticate")),
            ("UDID", string(MAC_UDID)),
        ]);
        assert_eq!(
            decode_checkin(&body),
            Err(ProtocolError::MissingKey("Topic"))
        );
    }

    #[test]
    fn authenticate_on_a_user_channel_is_refused() {
        let body = plist_body([
            ("MessageType", string("Authenticate")),
            ("Topic", string(TOPIC)),
            ("UDID", string(MAC_UDID)),
            ("UserID", string("A1B2C3D4")),
        ]);
        let error = decode_checkin(&body).unwrap_err();
        assert_eq!(error, ProtocolError::NotDeviceChannel);
        assert_eq!(error.reason(), "not_device_channel");
    }

    #[test]
    fn authenticate_from_a_user_enrollment_uses_the_enrollment_id() {
        let body = plist_body([
            ("MessageType", string("Authenticate")),
            ("Topic", string(TOPIC)),
            ("EnrollmentID", string("ENROLLMENT-1")),
        ]);
        let checkin = decode_checkin(&body).unwrap();
        assert_eq!(checkin.channel.kind, EnrollmentKind::UserEnrollmentDevice);
        assert_eq!(checkin.channel.id, "ENROLLMENT-1");
    }

    #[test]
    fn token_update_with_an_unlock_token() {
        let CheckinMessage::TokenUpdate(update) =
            decode_message(&fixture("nanomdm/TokenUpdate.1.plist"))
        else {
            panic!("expected a TokenUpdate");
        };
        assert_eq!(update.topic, TOPIC);
        assert_eq!(
            hex::encode(&update.token),
            "47e8eec062c2f729ec1703c1b3e18f1971d85f00be76445d34080baa701b5f51"
        );
        assert_eq!(update.push_magic, "CEFDF0BD-E342-4A27-8742-E930EA116B0A");
        let unlock_token = update.unlock_token.expect("unlock token present");
        assert!(unlock_token.starts_with(b"DATA"));
        assert!(!update.awaiting_configuration);
    }

    #[test]
    fn token_update_without_an_unlock_token() {
        let expected = CheckinMessage::TokenUpdate(TokenUpdate {
            topic: TOPIC.to_owned(),
            token: hex::decode("1ba7c90066c50f77689a24f3a425caf68a300f729e88e460a9416022d5d642cc")
                .unwrap(),
            push_magic: "888CEB39-BFFA-40F6-89FA-B60752EB63C2".to_owned(),
            unlock_token: None,
            awaiting_configuration: false,
        });
        assert_eq!(
            decode_message(&fixture("nanomdm/TokenUpdate.2.plist")),
            expected
        );
        assert_eq!(
            decode_message(&transcript_request_body("03-tokenupdate")),
            expected
        );
        assert_eq!(expected.message_type(), "TokenUpdate");
    }

    fn token_update_entries() -> Vec<(&'static str, Value)> {
        vec![
            ("MessageType", string("TokenUpdate")),
            ("Topic", string(TOPIC)),
            ("UDID", string(MAC_UDID)),
            ("Token", Value::Data(vec![1, 2, 3])),
            ("PushMagic", string("MAGIC")),
        ]
    }

    fn body_of(entries: Vec<(&'static str, Value)>) -> Vec<u8> {
        let dict: Dictionary = entries.into_iter().collect();
        super::super::encode_plist(&Value::Dictionary(dict))
    }

    #[test]
    fn token_update_requires_topic_token_and_push_magic() {
        for key in ["Topic", "Token", "PushMagic"] {
            let entries = token_update_entries()
                .into_iter()
                .filter(|(name, _)| *name != key)
                .collect();
            assert_eq!(
                decode_checkin(&body_of(entries)),
                Err(ProtocolError::MissingKey(key))
            );
        }
    }

    #[test]
    fn a_token_sent_as_a_string_is_a_type_error() {
        let mut entries = token_update_entries();
        entries.push(("Token", string("AQID")));
        assert_eq!(
            decode_checkin(&body_of(entries)),
            Err(ProtocolError::WrongType {
                key: "Token",
                expected: "data"
            })
        );
    }

    #[test]
    fn awaiting_configuration_must_be_a_boolean() {
        let mut entries = token_update_entries();
        entries.push(("AwaitingConfiguration", string("true")));
        let error = decode_checkin(&body_of(entries)).unwrap_err();
        assert_eq!(
            error,
            ProtocolError::WrongType {
                key: "AwaitingConfiguration",
                expected: "boolean"
            }
        );
        assert_eq!(error.reason(), "wrong_type");
    }

    #[test]
    fn a_shared_ipad_user_token_update_waits_for_user_configured() {
        let mut entries = token_update_entries();
        entries.extend([
            ("UserID", string(SHARED_IPAD_USER_ID)),
            ("UserShortName", string("student@school.example")),
            ("AwaitingConfiguration", Value::Boolean(true)),
        ]);
        let checkin = decode_checkin(&body_of(entries)).unwrap();
        assert_eq!(checkin.channel.kind, EnrollmentKind::SharedIpad);
        assert_eq!(
            checkin.channel.id,
            format!("{MAC_UDID}:student@school.example")
        );
        let CheckinMessage::TokenUpdate(update) = checkin.message else {
            panic!("expected a TokenUpdate");
        };
        assert!(update.awaiting_configuration);
    }

    #[test]
    fn check_out_with_and_without_a_topic() {
        let with_topic = plist_body([
            ("MessageType", string("CheckOut")),
            ("Topic", string(TOPIC)),
            ("UDID", string(MAC_UDID)),
        ]);
        let message = decode_message(&with_topic);
        assert_eq!(
            message,
            CheckinMessage::CheckOut(CheckOut {
                topic: Some(TOPIC.to_owned())
            })
        );
        assert_eq!(message.message_type(), "CheckOut");
        let without_topic = plist_body([
            ("MessageType", string("CheckOut")),
            ("UDID", string(MAC_UDID)),
        ]);
        assert_eq!(
            decode_message(&without_topic),
            CheckinMessage::CheckOut(CheckOut { topic: None })
        );
    }

    #[test]
    fn user_authenticate_first_asks_for_a_challenge_then_answers_it() {
        let first = plist_body([
            ("MessageType", string("UserAuthenticate")),
            ("UDID", string(MAC_UDID)),
            ("UserID", string("A1B2C3D4")),
            ("UserShortName", string("alice")),
        ]);
        let checkin = decode_checkin(&first).unwrap();
        assert_eq!(checkin.channel.kind, EnrollmentKind::User);
        assert_eq!(
            checkin.message,
            CheckinMessage::UserAuthenticate(UserAuthenticate {
                digest_response: None
            })
        );
        assert_eq!(checkin.message.message_type(), "UserAuthenticate");

        let second = plist_body([
            ("MessageType", string("UserAuthenticate")),
            ("UDID", string(MAC_UDID)),
            ("UserID", string("A1B2C3D4")),
            (
                "DigestResponse",
                string("username=\"alice\", response=\"abc\""),
            ),
        ]);
        assert_eq!(
            decode_message(&second),
            CheckinMessage::UserAuthenticate(UserAuthenticate {
                digest_response: Some("username=\"alice\", response=\"abc\"".to_owned())
            })
        );
    }

    #[test]
    fn set_bootstrap_token_escrows_a_token() {
        let body = plist_body([
            ("MessageType", string("SetBootstrapToken")),
            ("UDID", string(MAC_UDID)),
            ("BootstrapToken", Value::Data(b"bootstrap".to_vec())),
            ("AwaitingConfiguration", Value::Boolean(true)),
        ]);
        let message = decode_message(&body);
        assert_eq!(
            message,
            CheckinMessage::SetBootstrapToken(SetBootstrapToken {
                token: Some(b"bootstrap".to_vec()),
                awaiting_configuration: true,
            })
        );
        assert_eq!(message.message_type(), "SetBootstrapToken");
    }

    #[test]
    fn set_bootstrap_token_without_a_token_deletes_it() {
        let missing = plist_body([
            ("MessageType", string("SetBootstrapToken")),
            ("UDID", string(MAC_UDID)),
        ]);
        let empty = plist_body([
            ("MessageType", string("SetBootstrapToken")),
            ("UDID", string(MAC_UDID)),
            ("BootstrapToken", Value::Data(Vec::new())),
        ]);
        for body in [missing, empty] {
            assert_eq!(
                decode_message(&body),
                CheckinMessage::SetBootstrapToken(SetBootstrapToken {
                    token: None,
                    awaiting_configuration: false,
                })
            );
        }
    }

    #[test]
    fn get_bootstrap_token_reports_whether_setup_is_paused() {
        let body = plist_body([
            ("MessageType", string("GetBootstrapToken")),
            ("UDID", string(MAC_UDID)),
            ("AwaitingConfiguration", Value::Boolean(true)),
        ]);
        let message = decode_message(&body);
        assert_eq!(
            message,
            CheckinMessage::GetBootstrapToken(GetBootstrapToken {
                awaiting_configuration: true
            })
        );
        assert_eq!(message.message_type(), "GetBootstrapToken");
    }

    #[test]
    fn get_token_carries_its_service_type_and_parameters() {
        let parameters: Dictionary = [
            ("SecurityToken", string("SEC")),
            ("PhoneUDID", string("PHONE")),
            ("WatchUDID", string("WATCH")),
        ]
        .into_iter()
        .collect();
        let body = plist_body([
            ("MessageType", string("GetToken")),
            ("UDID", string(MAC_UDID)),
            ("TokenServiceType", string("com.apple.watch.pairing")),
            ("TokenParameters", Value::Dictionary(parameters.clone())),
        ]);
        let message = decode_message(&body);
        assert_eq!(
            message,
            CheckinMessage::GetToken(GetToken {
                service_type: "com.apple.watch.pairing".to_owned(),
                parameters,
            })
        );
        assert_eq!(message.message_type(), "GetToken");
    }

    #[test]
    fn get_token_parameters_are_optional_but_the_service_type_is_not() {
        let without_parameters = plist_body([
            ("MessageType", string("GetToken")),
            ("UDID", string(MAC_UDID)),
            ("TokenServiceType", string("com.apple.maid")),
        ]);
        assert_eq!(
            decode_message(&without_parameters),
            CheckinMessage::GetToken(GetToken {
                service_type: "com.apple.maid".to_owned(),
                parameters: Dictionary::new(),
            })
        );
        let without_service_type = plist_body([
            ("MessageType", string("GetToken")),
            ("UDID", string(MAC_UDID)),
        ]);
        assert_eq!(
            decode_checkin(&without_service_type),
            Err(ProtocolError::MissingKey("TokenServiceType"))
        );
        let parameters_as_array = plist_body([
            ("MessageType", string("GetToken")),
            ("UDID", string(MAC_UDID)),
            ("TokenServiceType", string("com.apple.maid")),
            ("TokenParameters", Value::Array(Vec::new())),
        ]);
        assert_eq!(
            decode_checkin(&parameters_as_array),
            Err(ProtocolError::WrongType {
                key: "TokenParameters",
                expected: "dictionary"
            })
        );
    }

    #[test]
    fn declarative_management_sync_requests_name_their_endpoint() {
        let recorded = [
            ("10-ddm-tokens-before-any-set", "tokens"),
            (
                "11-ddm-declaration-items-before-any-set",
                "declaration-items",
            ),
            (
                "26-ddm-declaration-configuration",
                "declaration/configuration/com.example.test",
            ),
            (
                "27-ddm-declaration-activation",
                "declaration/activation/com.example.act",
            ),
            ("29-ddm-unknown-endpoint", "bogus-endpoint"),
        ];
        for (transcript, endpoint) in recorded {
            let checkin = decode_checkin(&transcript_request_body(transcript)).unwrap();
            assert_eq!(checkin.channel.id, MAC_UDID);
            assert_eq!(
                checkin.message,
                CheckinMessage::DeclarativeManagement(DeclarativeManagement {
                    endpoint: endpoint.to_owned(),
                    data: None,
                }),
                "{transcript}"
            );
            assert_eq!(checkin.message.message_type(), "DeclarativeManagement");
        }
    }

    #[test]
    fn declarative_management_status_carries_the_json_report() {
        let message = decode_message(&transcript_request_body("30-ddm-status-report"));
        let CheckinMessage::DeclarativeManagement(request) = message else {
            panic!("expected a DeclarativeManagement check-in");
        };
        assert_eq!(request.endpoint, "status");
        let report = request.data.expect("status data");
        assert_eq!(
            report,
            fixture("nanohub-transcripts/30-ddm-status-report.Data-decoded.json")
        );
    }

    #[test]
    fn declarative_management_requires_an_endpoint() {
        let body = plist_body([
            ("MessageType", string("DeclarativeManagement")),
            ("UDID", string(MAC_UDID)),
        ]);
        assert_eq!(
            decode_checkin(&body),
            Err(ProtocolError::MissingKey("Endpoint"))
        );
    }

    #[test]
    fn an_unknown_message_type_is_reported_before_anything_else() {
        let body = plist_body([("MessageType", string("Bogus"))]);
        let error = decode_checkin(&body).unwrap_err();
        assert_eq!(error, ProtocolError::UnknownMessageType("Bogus".to_owned()));
        assert_eq!(error.reason(), "unknown_message_type");
    }

    #[test]
    fn the_message_type_must_be_a_present_string() {
        let missing = plist_body([("UDID", string(MAC_UDID))]);
        assert_eq!(
            decode_checkin(&missing),
            Err(ProtocolError::MissingKey("MessageType"))
        );
        let integer = plist_body([("MessageType", Value::Integer(1.into()))]);
        assert_eq!(
            decode_checkin(&integer),
            Err(ProtocolError::WrongType {
                key: "MessageType",
                expected: "string"
            })
        );
    }

    #[test]
    fn a_check_in_without_a_channel_is_rejected() {
        let body = plist_body([("MessageType", string("CheckOut"))]);
        let error = decode_checkin(&body).unwrap_err();
        assert_eq!(error, ProtocolError::MissingKey("UDID"));
        assert_eq!(error.reason(), "missing_key");
    }

    #[test]
    fn a_check_in_with_an_unsafe_udid_is_rejected() {
        let body = plist_body([
            ("MessageType", string("CheckOut")),
            ("UDID", string("../etc")),
        ]);
        let error = decode_checkin(&body).unwrap_err();
        assert_eq!(error.reason(), "invalid_identifier");
    }

    #[test]
    fn garbage_is_a_malformed_plist() {
        let body = transcript_request_body("44-neg-checkin-garbage-body");
        assert!(matches!(
            decode_checkin(&body),
            Err(ProtocolError::MalformedPlist(_))
        ));
    }

    #[test]
    fn a_check_in_whose_root_is_not_a_dictionary_is_rejected() {
        let body = super::super::encode_plist(&string("Authenticate"));
        assert_eq!(decode_checkin(&body), Err(ProtocolError::NotADictionary));
    }

    #[test]
    fn responses_are_one_key_xml_plists() {
        let read = |body: Vec<u8>| Value::from_reader_xml(&body[..]).unwrap();
        let one = |key: &str, value: Value| Value::Dictionary([(key, value)].into_iter().collect());
        assert_eq!(
            read(digest_challenge_response("nonce")),
            one("DigestChallenge", string("nonce"))
        );
        assert_eq!(
            read(digest_challenge_response("")),
            one("DigestChallenge", string(""))
        );
        assert_eq!(
            read(bootstrap_token_response(b"token")),
            one("BootstrapToken", Value::Data(b"token".to_vec()))
        );
        assert_eq!(
            read(token_data_response(b"maid")),
            one("TokenData", Value::Data(b"maid".to_vec()))
        );
    }

    #[test]
    fn mangled_check_ins_never_panic() {
        for name in [
            "Authenticate.1",
            "Authenticate.2",
            "TokenUpdate.1",
            "TokenUpdate.2",
        ] {
            let valid = fixture(&format!("nanomdm/{name}.plist"));
            for variant in mangled_variants(&valid, 3000) {
                let _ = decode_checkin(&variant);
            }
        }
    }
}
