//! Connect reports (protocol.md §3.1): the device's `Idle` or its result for the previous
//! command, on which the server answers with the next command or an empty body.
//!
//! Only the envelope is decoded. Result keys (`QueryResponses`, `ProfileList`, …) stay in
//! the raw body, which is what gets stored.

use super::ids::{resolve_channel, validate_identifier, Channel};
use super::{parse_dictionary, required, take_string, ProtocolError};

/// The `Status` of a connect report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReportStatus {
    /// Ready for a command; no result attached.
    Idle,
    Acknowledged,
    Error,
    /// The command plist was malformed or unsupported: do not retry it blindly.
    CommandFormatError,
    /// Received but not runnable now (locked, Setup Assistant, Power Nap); not cached.
    NotNow,
}

impl ReportStatus {
    /// Every status a device may report (the `status` label values of the connect metrics).
    pub const ALL: [Self; 5] = [
        Self::Idle,
        Self::Acknowledged,
        Self::Error,
        Self::CommandFormatError,
        Self::NotNow,
    ];

    /// The wire spelling, also a bounded metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "Idle",
            Self::Acknowledged => "Acknowledged",
            Self::Error => "Error",
            Self::CommandFormatError => "CommandFormatError",
            Self::NotNow => "NotNow",
        }
    }

    fn parse(status: String) -> Result<Self, ProtocolError> {
        Self::ALL
            .into_iter()
            .find(|known| known.as_str() == status)
            .ok_or(ProtocolError::UnknownStatus(status))
    }
}

/// A decoded connect report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectReport {
    pub channel: Channel,
    pub status: ReportStatus,
    /// The command this report answers; `None` exactly when the status is `Idle`.
    pub command_uuid: Option<String>,
}

/// Decodes a connect body. Every status but `Idle` reports on a command, so its
/// `CommandUUID` is required (and validated like any id that keys storage); on `Idle` a
/// stray `CommandUUID` is ignored.
pub fn decode_connect(body: &[u8]) -> Result<ConnectReport, ProtocolError> {
    let mut dict = parse_dictionary(body)?;
    let status = ReportStatus::parse(required(take_string(&mut dict, "Status")?, "Status")?)?;
    let channel = resolve_channel(&dict)?;
    let command_uuid = match status {
        ReportStatus::Idle => None,
        _ => {
            let command_uuid = required(take_string(&mut dict, "CommandUUID")?, "CommandUUID")?;
            validate_identifier("CommandUUID", &command_uuid)?;
            Some(command_uuid)
        }
    };
    Ok(ConnectReport {
        channel,
        status,
        command_uuid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ids::EnrollmentKind;
    use crate::protocol::test_support::{
        fixture, mangled_variants, plist_body, transcript_request_body,
    };
    use plist::Value;

    const UDID: &str = "66ADE930-5FDF-5EC4-8429-15640684C489";

    fn string(value: &str) -> Value {
        Value::String(value.to_owned())
    }

    #[test]
    fn idle_asks_for_the_next_command_without_a_result() {
        for transcript in [
            "04-connect-idle-empty-queue",
            "06-connect-idle-receives-command",
            "08-connect-idle-after-ack",
        ] {
            let report = decode_connect(&transcript_request_body(transcript)).unwrap();
            assert_eq!(report.channel.id, UDID);
            assert_eq!(report.channel.kind, EnrollmentKind::Device);
            assert_eq!(report.status, ReportStatus::Idle);
            assert_eq!(report.command_uuid, None);
        }
    }

    #[test]
    fn acknowledged_reports_name_the_command_they_answer() {
        let report = decode_connect(&transcript_request_body("07-connect-acknowledged")).unwrap();
        assert_eq!(report.status, ReportStatus::Acknowledged);
        assert_eq!(
            report.command_uuid.as_deref(),
            Some("7A5C2E4E-0000-4000-8000-000000000001")
        );
        let report = decode_connect(&transcript_request_body(
            "23-connect-ack-declarativemanagement-cmd",
        ))
        .unwrap();
        assert_eq!(
            report.command_uuid.as_deref(),
            Some("305b274c-835a-4037-8b64-ef9784da104d")
        );
    }

    #[test]
    fn a_device_information_result_decodes_its_envelope_only() {
        let report = decode_connect(&fixture("nanomdm/DeviceInformation.1.plist")).unwrap();
        assert_eq!(
            report,
            ConnectReport {
                channel: report.channel.clone(),
                status: ReportStatus::Acknowledged,
                command_uuid: Some("76eda240-5488-4989-8339-f2ae160113c4".to_owned()),
            }
        );
        assert_eq!(report.channel.id, UDID);
    }

    #[test]
    fn every_status_but_idle_requires_a_command_uuid() {
        for status in ["Acknowledged", "Error", "CommandFormatError", "NotNow"] {
            let without = plist_body([("Status", string(status)), ("UDID", string(UDID))]);
            assert_eq!(
                decode_connect(&without),
                Err(ProtocolError::MissingKey("CommandUUID")),
                "{status}"
            );
            let with = plist_body([
                ("Status", string(status)),
                ("UDID", string(UDID)),
                ("CommandUUID", string("C-1")),
            ]);
            let report = decode_connect(&with).unwrap();
            assert_eq!(report.status.as_str(), status);
            assert_eq!(report.command_uuid.as_deref(), Some("C-1"));
        }
    }

    #[test]
    fn an_error_report_keeps_its_error_chain_in_the_raw_body() {
        let error_chain = Value::Array(vec![Value::Dictionary(
            [
                ("ErrorCode", Value::Integer(12021.into())),
                ("ErrorDomain", string("MCMDMErrorDomain")),
                ("LocalizedDescription", string("Unknown command")),
            ]
            .into_iter()
            .collect(),
        )]);
        let body = plist_body([
            ("Status", string("Error")),
            ("UDID", string(UDID)),
            ("CommandUUID", string("C-2")),
            ("ErrorChain", error_chain),
        ]);
        let report = decode_connect(&body).unwrap();
        assert_eq!(report.status, ReportStatus::Error);
        assert_eq!(report.command_uuid.as_deref(), Some("C-2"));
    }

    #[test]
    fn a_command_uuid_on_idle_is_ignored() {
        let body = plist_body([
            ("Status", string("Idle")),
            ("UDID", string(UDID)),
            ("CommandUUID", string("C-3")),
        ]);
        assert_eq!(decode_connect(&body).unwrap().command_uuid, None);
    }

    #[test]
    fn a_reported_command_uuid_must_be_a_safe_identifier() {
        let body = plist_body([
            ("Status", string("Acknowledged")),
            ("UDID", string(UDID)),
            ("CommandUUID", string("C 4")),
        ]);
        assert_eq!(
            decode_connect(&body),
            Err(ProtocolError::InvalidIdentifier {
                key: "CommandUUID",
                reason: "contains whitespace"
            })
        );
    }

    #[test]
    fn user_channels_report_on_their_own_queue() {
        let body = plist_body([
            ("Status", string("Idle")),
            ("EnrollmentID", string("ENROLLMENT-1")),
            ("EnrollmentUserID", string("USER-1")),
        ]);
        let report = decode_connect(&body).unwrap();
        assert_eq!(report.channel.kind, EnrollmentKind::UserEnrollment);
        assert_eq!(report.channel.id, "ENROLLMENT-1:USER-1");
    }

    #[test]
    fn an_unknown_status_is_rejected() {
        let body = plist_body([("Status", string("Busy")), ("UDID", string(UDID))]);
        let error = decode_connect(&body).unwrap_err();
        assert_eq!(error, ProtocolError::UnknownStatus("Busy".to_owned()));
        assert_eq!(error.reason(), "unknown_status");
    }

    #[test]
    fn the_status_is_required() {
        let body = plist_body([("UDID", string(UDID))]);
        assert_eq!(
            decode_connect(&body),
            Err(ProtocolError::MissingKey("Status"))
        );
    }

    #[test]
    fn a_report_without_a_channel_is_rejected() {
        let body = plist_body([("Status", string("Idle"))]);
        assert_eq!(
            decode_connect(&body),
            Err(ProtocolError::MissingKey("UDID"))
        );
    }

    #[test]
    fn garbage_is_a_malformed_plist() {
        let body = transcript_request_body("45-neg-connect-garbage-body");
        let error = decode_connect(&body).unwrap_err();
        assert!(
            matches!(error, ProtocolError::MalformedPlist(_)),
            "{error:?}"
        );
    }

    #[test]
    fn mangled_reports_never_panic() {
        let valid = fixture("nanomdm/DeviceInformation.1.plist");
        for variant in mangled_variants(&valid, 3000) {
            let _ = decode_connect(&variant);
        }
    }
}
