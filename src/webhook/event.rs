//! The events, in the shapes NanoMDM's webhook sends (its `service/webhook/event.json`,
//! MicroMDM's format): `topic`, `event_id`, `created_at`, and a `checkin_event` or an
//! `acknowledge_event` with the enrollment's ids, the raw request body in base64, and
//! (`mdm.TokenUpdate` only) the `token_update_tally`. Fields are written in the order and
//! with the escaping of Go's `encoding/json`, absent ones omitted as NanoMDM omits them, so
//! a receiver written for NanoMDM reads them unchanged. Pure: no I/O.

use base64::Engine;
use ring::hmac;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::protocol::checkin::CheckinMessage;
use crate::protocol::ids::{Channel, EnrollmentKind};

/// NanoMDM's header for the body's signature.
pub const HMAC_HEADER: &str = "X-Hmac-Signature";

/// NanoMDM's Content-Type for every event.
pub const CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// The event's topic: which check-in message, or `mdm.Connect` for a command report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topic {
    Authenticate,
    TokenUpdate,
    CheckOut,
    UserAuthenticate,
    SetBootstrapToken,
    GetBootstrapToken,
    GetToken,
    DeclarativeManagement,
    Connect,
}

impl Topic {
    pub fn of_checkin(message: &CheckinMessage) -> Topic {
        match message {
            CheckinMessage::Authenticate(_) => Topic::Authenticate,
            CheckinMessage::TokenUpdate(_) => Topic::TokenUpdate,
            CheckinMessage::CheckOut(_) => Topic::CheckOut,
            CheckinMessage::UserAuthenticate(_) => Topic::UserAuthenticate,
            CheckinMessage::SetBootstrapToken(_) => Topic::SetBootstrapToken,
            CheckinMessage::GetBootstrapToken(_) => Topic::GetBootstrapToken,
            CheckinMessage::GetToken(_) => Topic::GetToken,
            CheckinMessage::DeclarativeManagement(_) => Topic::DeclarativeManagement,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Topic::Authenticate => "mdm.Authenticate",
            Topic::TokenUpdate => "mdm.TokenUpdate",
            Topic::CheckOut => "mdm.CheckOut",
            Topic::UserAuthenticate => "mdm.UserAuthenticate",
            Topic::SetBootstrapToken => "mdm.SetBootstrapToken",
            Topic::GetBootstrapToken => "mdm.GetBootstrapToken",
            Topic::GetToken => "mdm.GetToken",
            Topic::DeclarativeManagement => "mdm.DeclarativeManagement",
            Topic::Connect => "mdm.Connect",
        }
    }
}

/// Whom an event is about, as NanoMDM names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// The enrollment id (NanoMDM's `ids.id`).
    pub id: String,
    /// The device channel's id, for a user channel (`ids.parent_id`).
    pub parent_id: Option<String>,
    pub kind: EnrollmentKind,
    /// The message's `UDID`, when the channel is keyed by one.
    pub udid: Option<String>,
    /// The message's `EnrollmentID` (User Enrollment).
    pub enrollment_id: Option<String>,
}

impl Subject {
    pub fn of(channel: &Channel) -> Subject {
        let keyed_by_enrollment_id = matches!(
            channel.kind,
            EnrollmentKind::UserEnrollmentDevice | EnrollmentKind::UserEnrollment
        );
        let device_key = Some(channel.device_id.clone());
        Subject {
            id: channel.id.clone(),
            parent_id: (!channel.is_device_channel()).then(|| channel.device_id.clone()),
            kind: channel.kind,
            udid: if keyed_by_enrollment_id {
                None
            } else {
                device_key.clone()
            },
            enrollment_id: if keyed_by_enrollment_id {
                device_key
            } else {
                None
            },
        }
    }
}

/// What a command report event adds: the report's status and command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acknowledgement {
    pub status: String,
    pub command_uuid: Option<String>,
}

/// An event before its id and time are given: made when a device message arrives, and
/// rendered when the change it reports is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draft {
    pub topic: Topic,
    pub subject: Subject,
    /// The exact request body.
    pub raw: bytes::Bytes,
    /// `Some` for `mdm.Connect`.
    pub acknowledgement: Option<Acknowledgement>,
    /// TokenUpdates since the enrollment began, this one included (`mdm.TokenUpdate`).
    pub token_update_tally: Option<u64>,
}

impl Draft {
    pub fn checkin(message: &CheckinMessage, channel: &Channel, raw: bytes::Bytes) -> Draft {
        Draft {
            topic: Topic::of_checkin(message),
            subject: Subject::of(channel),
            raw,
            acknowledgement: None,
            token_update_tally: None,
        }
    }

    pub fn connect(
        channel: &Channel,
        status: &str,
        command_uuid: Option<&str>,
        raw: bytes::Bytes,
    ) -> Draft {
        Draft {
            topic: Topic::Connect,
            subject: Subject::of(channel),
            raw,
            acknowledgement: Some(Acknowledgement {
                status: status.to_string(),
                command_uuid: command_uuid.map(str::to_string),
            }),
            token_update_tally: None,
        }
    }

    /// The JSON body, byte for byte what NanoMDM would send for the same message.
    pub fn render(&self, event_id: &str, created_at: OffsetDateTime) -> Vec<u8> {
        let raw_payload = base64::engine::general_purpose::STANDARD.encode(&self.raw);
        let ids = Ids {
            id: &self.subject.id,
            parent_id: self.subject.parent_id.as_deref(),
            kind: self.subject.kind.as_str(),
        };
        let udid = self.subject.udid.as_deref();
        let enrollment_id = self.subject.enrollment_id.as_deref();
        let (acknowledge_event, checkin_event) = match &self.acknowledgement {
            Some(ack) => (
                Some(AcknowledgeEvent {
                    command_uuid: ack.command_uuid.as_deref().filter(|u| !u.is_empty()),
                    enrollment_id,
                    ids,
                    raw_payload,
                    status: &ack.status,
                    udid,
                }),
                None,
            ),
            None => (
                None,
                Some(CheckinEvent {
                    enrollment_id,
                    ids,
                    raw_payload,
                    token_update_tally: self.token_update_tally,
                    udid,
                }),
            ),
        };
        let event = EventJson {
            acknowledge_event,
            checkin_event,
            created_at: go_time(created_at),
            event_id,
            topic: self.topic.as_str(),
        };
        let json = serde_json::to_string(&event).unwrap_or_default();
        go_html_escape(&json).into_bytes()
    }
}

/// `X-Hmac-Signature`: the base64 HMAC-SHA256 of the body under the shared key.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    base64::engine::general_purpose::STANDARD.encode(hmac::sign(&key, body).as_ref())
}

// The shapes below follow NanoMDM's `EventJson`, `CheckinEvent`, `AcknowledgeEvent` and
// `IDs`, field for field and in their order (Go writes struct fields in declaration
// order). `url_params` is never written: Orchard's device URLs carry no query.

#[derive(Serialize)]
struct EventJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    acknowledge_event: Option<AcknowledgeEvent<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    checkin_event: Option<CheckinEvent<'a>>,
    created_at: String,
    event_id: &'a str,
    topic: &'a str,
}

#[derive(Serialize)]
struct CheckinEvent<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    enrollment_id: Option<&'a str>,
    ids: Ids<'a>,
    raw_payload: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_update_tally: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    udid: Option<&'a str>,
}

#[derive(Serialize)]
struct AcknowledgeEvent<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    command_uuid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    enrollment_id: Option<&'a str>,
    ids: Ids<'a>,
    raw_payload: String,
    status: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    udid: Option<&'a str>,
}

#[derive(Serialize)]
struct Ids<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'a str,
}

/// A time as Go's `time.Time` marshals it: RFC 3339 with the fraction of a second
/// trimmed of trailing zeros (none when whole), UTC as `Z`.
fn go_time(at: OffsetDateTime) -> String {
    at.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// Go's `encoding/json` escapes `<`, `>`, `&`, U+2028 and U+2029 inside strings. In JSON
/// text those characters occur only inside strings, so replacing them everywhere is exact.
fn go_html_escape(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::checkin::decode_checkin;
    use crate::protocol::connect::decode_connect;

    /// NanoMDM's own test vectors (`service/webhook/testdata`): the event its webhook
    /// sends for a message, with the event id `test_event_id` at Go's zero time.
    fn nanomdm_testdata(name: &str) -> (String, Vec<u8>) {
        let path = format!(
            "{}/tests/fixtures/nanomdm/webhook/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let expected = std::fs::read_to_string(&path).expect("NanoMDM webhook testdata");
        let expected = expected.trim().to_string();
        let event: serde_json::Value = serde_json::from_str(&expected).unwrap();
        let inner = event
            .get("checkin_event")
            .or_else(|| event.get("acknowledge_event"))
            .unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(inner["raw_payload"].as_str().unwrap())
            .unwrap();
        (expected, raw)
    }

    fn go_zero_time() -> OffsetDateTime {
        time::macros::datetime!(0001-01-01 00:00:00 UTC)
    }

    #[test]
    fn an_authenticate_event_is_byte_for_byte_nanomdms() {
        let (expected, raw) = nanomdm_testdata("Authenticate.2.json");
        let checkin = decode_checkin(&raw).unwrap();
        let draft = Draft::checkin(&checkin.message, &checkin.channel, raw.into());
        let body = draft.render("test_event_id", go_zero_time());
        assert_eq!(String::from_utf8(body).unwrap(), expected);
    }

    #[test]
    fn a_command_report_event_is_byte_for_byte_nanomdms() {
        let (expected, raw) = nanomdm_testdata("DeviceInformation.1.json");
        let report = decode_connect(&raw).unwrap();
        let draft = Draft::connect(
            &report.channel,
            report.status.as_str(),
            report.command_uuid.as_deref(),
            raw.into(),
        );
        let body = draft.render("test_event_id", go_zero_time());
        assert_eq!(String::from_utf8(body).unwrap(), expected);
    }

    #[test]
    fn times_are_written_as_go_writes_them() {
        let at = time::macros::datetime!(2024-05-01 12:34:56.120 UTC);
        assert_eq!(go_time(at), "2024-05-01T12:34:56.12Z");
        let whole = time::macros::datetime!(2024-05-01 12:34:56 +02:00);
        assert_eq!(go_time(whole), "2024-05-01T10:34:56Z");
    }

    #[test]
    fn characters_go_escapes_are_escaped() {
        assert_eq!(
            go_html_escape(r#"{"a":"<b>&\u{2028}"}"#),
            r#"{"a":"\u003cb\u003e\u0026\u{2028}"}"#
        );
        assert_eq!(
            go_html_escape("{\"a\":\"\u{2029}\"}"),
            "{\"a\":\"\\u2029\"}"
        );
    }

    #[test]
    fn a_user_channel_names_its_device_as_parent() {
        let channel = Channel {
            id: "UDID-1:USER-1".into(),
            device_id: "UDID-1".into(),
            kind: EnrollmentKind::User,
            user_id: Some("USER-1".into()),
            user_short_name: None,
            user_long_name: None,
        };
        let subject = Subject::of(&channel);
        assert_eq!(subject.parent_id.as_deref(), Some("UDID-1"));
        assert_eq!(subject.udid.as_deref(), Some("UDID-1"));
        assert_eq!(subject.enrollment_id, None);
    }

    #[test]
    fn a_user_enrollment_is_keyed_by_its_enrollment_id() {
        let channel = Channel {
            id: "ENR-1".into(),
            device_id: "ENR-1".into(),
            kind: EnrollmentKind::UserEnrollmentDevice,
            user_id: None,
            user_short_name: None,
            user_long_name: None,
        };
        let subject = Subject::of(&channel);
        assert_eq!(subject.enrollment_id.as_deref(), Some("ENR-1"));
        assert_eq!((subject.udid, subject.parent_id), (None, None));
    }

    #[test]
    fn the_token_update_tally_is_written_only_when_known() {
        let channel = Channel {
            id: "UDID-1".into(),
            device_id: "UDID-1".into(),
            kind: EnrollmentKind::Device,
            user_id: None,
            user_short_name: None,
            user_long_name: None,
        };
        let mut draft = Draft {
            topic: Topic::TokenUpdate,
            subject: Subject::of(&channel),
            raw: bytes::Bytes::from_static(b"<plist/>"),
            acknowledgement: None,
            token_update_tally: None,
        };
        let without = String::from_utf8(draft.render("e", go_zero_time())).unwrap();
        assert!(!without.contains("token_update_tally"));
        draft.token_update_tally = Some(2);
        let with = String::from_utf8(draft.render("e", go_zero_time())).unwrap();
        assert!(with.contains(r#""token_update_tally":2,"udid":"UDID-1""#));
    }

    #[test]
    fn the_signature_is_base64_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        let sig = signature(b"Jefe", b"what do ya want for nothing?");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(sig)
            .unwrap();
        assert_eq!(
            hex::encode(bytes),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
