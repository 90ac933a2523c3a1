//! Channel identity (protocol.md §2.2): which enrollment a message speaks for.
//!
//! Devices name themselves with up to four keys; Orchard collapses them into one stable
//! enrollment id, spelled as NanoMDM spells it so that ids carry over from a NanoMDM
//! deployment. The id keys command queues, pushes and certificate bindings for the
//! lifetime of an enrollment, and it appears in API URL paths and comma-separated id
//! lists, so its parts are validated before anything is keyed by them.

use plist::Dictionary;
use serde::{Deserialize, Serialize};

use super::{borrow_string, ProtocolError};

/// The `UserID` a Shared iPad sends for a user channel: the user is named by
/// `UserShortName` (the Managed Apple Account) instead.
pub const SHARED_IPAD_USER_ID: &str = "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF";

/// The longest identifier accepted, in bytes.
pub const MAX_IDENTIFIER_LEN: usize = 255;

/// Characters that would break an id inside a URL path or a comma-separated id list.
const RESERVED_CHARACTERS: [char; 5] = [',', '/', '?', '#', '%'];

/// The kind of channel an enrollment id names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EnrollmentKind {
    /// Device channel of a device enrollment (`UDID`).
    #[default]
    Device,
    /// macOS user channel (`UDID` + `UserID`).
    User,
    /// Device channel of a User Enrollment (`EnrollmentID`).
    UserEnrollmentDevice,
    /// User channel of a User Enrollment (`EnrollmentID` + `EnrollmentUserID`).
    UserEnrollment,
    /// Shared iPad user channel (`UDID` + all-F `UserID` + `UserShortName`).
    SharedIpad,
}

impl EnrollmentKind {
    /// NanoMDM's name for the kind, as shown in its API and stored in its databases.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Device => "Device",
            Self::User => "User",
            Self::UserEnrollmentDevice => "User Enrollment (Device)",
            Self::UserEnrollment => "User Enrollment",
            Self::SharedIpad => "Shared iPad",
        }
    }
}

/// The enrollment a message belongs to, resolved from its identity keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Channel {
    /// Enrollment id: `UDID`, `EnrollmentID`, or `<device id>:<user key>` for users.
    pub id: String,
    /// The device's own channel id (`UDID` or `EnrollmentID`); equals `id` on a device
    /// channel. User channels are authorised through this device's certificate binding.
    pub device_id: String,
    pub kind: EnrollmentKind,
    /// `UserID`, or `EnrollmentUserID` for a User Enrollment; `None` on device channels.
    pub user_id: Option<String>,
    pub user_short_name: Option<String>,
    pub user_long_name: Option<String>,
}

impl Channel {
    pub fn is_device_channel(&self) -> bool {
        matches!(
            self.kind,
            EnrollmentKind::Device | EnrollmentKind::UserEnrollmentDevice
        )
    }
}

/// Resolves the channel a check-in or connect message speaks for.
///
/// `UDID` wins over `EnrollmentID` when a message carries both, as in NanoMDM.
pub fn resolve_channel(dict: &Dictionary) -> Result<Channel, ProtocolError> {
    let user_short_name = borrow_string(dict, "UserShortName")?;
    let user_long_name = borrow_string(dict, "UserLongName")?.map(str::to_owned);

    if let Some(udid) = device_identifier(dict, "UDID")? {
        return match identifier(dict, "UserID")? {
            None => Ok(device_channel(udid, EnrollmentKind::Device)),
            Some(SHARED_IPAD_USER_ID) => {
                let short_name =
                    user_short_name.ok_or(ProtocolError::MissingKey("UserShortName"))?;
                validate_identifier("UserShortName", short_name)?;
                Ok(Channel {
                    id: format!("{udid}:{short_name}"),
                    device_id: udid.to_owned(),
                    kind: EnrollmentKind::SharedIpad,
                    user_id: Some(SHARED_IPAD_USER_ID.to_owned()),
                    user_short_name: Some(short_name.to_owned()),
                    user_long_name,
                })
            }
            Some(user_id) => Ok(Channel {
                id: format!("{udid}:{user_id}"),
                device_id: udid.to_owned(),
                kind: EnrollmentKind::User,
                user_id: Some(user_id.to_owned()),
                user_short_name: user_short_name.map(str::to_owned),
                user_long_name,
            }),
        };
    }

    let enrollment_id =
        device_identifier(dict, "EnrollmentID")?.ok_or(ProtocolError::MissingKey("UDID"))?;
    Ok(match identifier(dict, "EnrollmentUserID")? {
        None => device_channel(enrollment_id, EnrollmentKind::UserEnrollmentDevice),
        Some(enrollment_user_id) => Channel {
            id: format!("{enrollment_id}:{enrollment_user_id}"),
            device_id: enrollment_id.to_owned(),
            kind: EnrollmentKind::UserEnrollment,
            user_id: Some(enrollment_user_id.to_owned()),
            user_short_name: user_short_name.map(str::to_owned),
            user_long_name,
        },
    })
}

fn device_channel(id: &str, kind: EnrollmentKind) -> Channel {
    Channel {
        id: id.to_owned(),
        device_id: id.to_owned(),
        kind,
        user_id: None,
        user_short_name: None,
        user_long_name: None,
    }
}

/// A device id must not contain `:`, which separates it from the user part of a
/// user-channel id: otherwise device `X:Y` and user `Y` of device `X` would collide.
fn device_identifier<'a>(
    dict: &'a Dictionary,
    key: &'static str,
) -> Result<Option<&'a str>, ProtocolError> {
    let value = identifier(dict, key)?;
    if value.is_some_and(|v| v.contains(':')) {
        return Err(ProtocolError::InvalidIdentifier {
            key,
            reason: "contains ':', which separates device and user in enrollment ids",
        });
    }
    Ok(value)
}

/// Reads an optional identifier key and validates it when present.
fn identifier<'a>(
    dict: &'a Dictionary,
    key: &'static str,
) -> Result<Option<&'a str>, ProtocolError> {
    let value = borrow_string(dict, key)?;
    if let Some(value) = value {
        validate_identifier(key, value)?;
    }
    Ok(value)
}

/// Checks that an identifier can safely key storage and appear in URL paths and
/// comma-separated id lists: non-empty, at most [`MAX_IDENTIFIER_LEN`] bytes, without
/// control characters, whitespace or any of `, / ? # %`.
pub fn validate_identifier(key: &'static str, value: &str) -> Result<(), ProtocolError> {
    let reason = if value.is_empty() {
        "is empty"
    } else if value.len() > MAX_IDENTIFIER_LEN {
        "is longer than 255 bytes"
    } else if value.chars().any(char::is_control) {
        "contains a control character"
    } else if value.chars().any(char::is_whitespace) {
        "contains whitespace"
    } else if value.contains(RESERVED_CHARACTERS) {
        "contains one of the reserved characters , / ? # %"
    } else {
        return Ok(());
    };
    Err(ProtocolError::InvalidIdentifier { key, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::test_support::fixture;
    use plist::Value;

    const UDID: &str = "66ADE930-5FDF-5EC4-8429-15640684C489";
    const ENROLLMENT_ID: &str = "4D5E6F70-ENROLLMENT";

    fn keys<const N: usize>(entries: [(&str, &str); N]) -> Dictionary {
        entries
            .into_iter()
            .map(|(key, value)| (key, Value::String(value.to_owned())))
            .collect()
    }

    fn invalid(key: &'static str, reason: &'static str) -> ProtocolError {
        ProtocolError::InvalidIdentifier { key, reason }
    }

    #[test]
    fn a_device_id_containing_a_colon_is_refused_so_it_cannot_pose_as_a_user_channel() {
        let err = resolve_channel(&keys([("UDID", "X:Y")])).unwrap_err();
        assert!(matches!(
            err,
            ProtocolError::InvalidIdentifier { key: "UDID", .. }
        ));
        let err = resolve_channel(&keys([("EnrollmentID", "A:B")])).unwrap_err();
        assert!(matches!(
            err,
            ProtocolError::InvalidIdentifier {
                key: "EnrollmentID",
                ..
            }
        ));
    }

    #[test]
    fn enrollment_kinds_use_nanomdm_names() {
        let names = [
            EnrollmentKind::Device,
            EnrollmentKind::User,
            EnrollmentKind::UserEnrollmentDevice,
            EnrollmentKind::UserEnrollment,
            EnrollmentKind::SharedIpad,
        ]
        .map(EnrollmentKind::as_str);
        assert_eq!(
            names,
            [
                "Device",
                "User",
                "User Enrollment (Device)",
                "User Enrollment",
                "Shared iPad"
            ]
        );
    }

    #[test]
    fn a_udid_alone_is_the_device_channel_of_a_device_enrollment() {
        let body = fixture("nanomdm/Authenticate.2.plist");
        let dict = Value::from_reader_xml(&body[..])
            .unwrap()
            .into_dictionary()
            .unwrap();
        let channel = resolve_channel(&dict).unwrap();
        assert_eq!(channel, device_channel(UDID, EnrollmentKind::Device));
        assert!(channel.is_device_channel());
    }

    #[test]
    fn an_enrollment_id_alone_is_the_device_channel_of_a_user_enrollment() {
        let channel = resolve_channel(&keys([("EnrollmentID", ENROLLMENT_ID)])).unwrap();
        assert_eq!(channel.id, ENROLLMENT_ID);
        assert_eq!(channel.device_id, ENROLLMENT_ID);
        assert_eq!(channel.kind, EnrollmentKind::UserEnrollmentDevice);
        assert!(channel.is_device_channel());
    }

    #[test]
    fn a_udid_with_a_user_id_is_a_macos_user_channel() {
        let channel = resolve_channel(&keys([
            ("UDID", UDID),
            ("UserID", "A1B2C3D4-0000-1111-2222-333344445555"),
            ("UserShortName", "alice"),
            ("UserLongName", "Alice Appleseed"),
        ]))
        .unwrap();
        assert_eq!(
            channel,
            Channel {
                id: format!("{UDID}:A1B2C3D4-0000-1111-2222-333344445555"),
                device_id: UDID.to_owned(),
                kind: EnrollmentKind::User,
                user_id: Some("A1B2C3D4-0000-1111-2222-333344445555".to_owned()),
                user_short_name: Some("alice".to_owned()),
                user_long_name: Some("Alice Appleseed".to_owned()),
            }
        );
        assert!(!channel.is_device_channel());
    }

    #[test]
    fn the_all_f_user_id_is_a_shared_ipad_user_keyed_by_short_name() {
        let channel = resolve_channel(&keys([
            ("UDID", UDID),
            ("UserID", SHARED_IPAD_USER_ID),
            ("UserShortName", "student@school.example"),
        ]))
        .unwrap();
        assert_eq!(channel.id, format!("{UDID}:student@school.example"));
        assert_eq!(channel.device_id, UDID);
        assert_eq!(channel.kind, EnrollmentKind::SharedIpad);
        assert_eq!(
            channel.user_short_name.as_deref(),
            Some("student@school.example")
        );
        assert!(!channel.is_device_channel());
    }

    #[test]
    fn a_shared_ipad_user_needs_a_short_name() {
        let dict = keys([("UDID", UDID), ("UserID", SHARED_IPAD_USER_ID)]);
        assert_eq!(
            resolve_channel(&dict),
            Err(ProtocolError::MissingKey("UserShortName"))
        );
    }

    #[test]
    fn a_shared_ipad_short_name_is_validated_as_part_of_the_id() {
        let dict = keys([
            ("UDID", UDID),
            ("UserID", SHARED_IPAD_USER_ID),
            ("UserShortName", "Jane Doe"),
        ]);
        assert_eq!(
            resolve_channel(&dict),
            Err(invalid("UserShortName", "contains whitespace"))
        );
    }

    #[test]
    fn an_enrollment_id_with_an_enrollment_user_id_is_a_user_enrollment_user_channel() {
        let channel = resolve_channel(&keys([
            ("EnrollmentID", ENROLLMENT_ID),
            ("EnrollmentUserID", "USER-42"),
        ]))
        .unwrap();
        assert_eq!(channel.id, format!("{ENROLLMENT_ID}:USER-42"));
        assert_eq!(channel.device_id, ENROLLMENT_ID);
        assert_eq!(channel.kind, EnrollmentKind::UserEnrollment);
        assert_eq!(channel.user_id.as_deref(), Some("USER-42"));
    }

    #[test]
    fn the_udid_takes_precedence_over_an_enrollment_id() {
        let dict = keys([("UDID", UDID), ("EnrollmentID", ENROLLMENT_ID)]);
        assert_eq!(resolve_channel(&dict).unwrap().id, UDID);
    }

    #[test]
    fn a_message_without_udid_or_enrollment_id_names_no_channel() {
        let dict = keys([("UserID", "A1B2"), ("MessageType", "TokenUpdate")]);
        assert_eq!(
            resolve_channel(&dict),
            Err(ProtocolError::MissingKey("UDID"))
        );
    }

    #[test]
    fn identifier_keys_must_be_strings() {
        let dict: Dictionary = [("UDID", Value::Integer(42.into()))].into_iter().collect();
        assert_eq!(
            resolve_channel(&dict),
            Err(ProtocolError::WrongType {
                key: "UDID",
                expected: "string"
            })
        );
    }

    #[test]
    fn identifiers_that_could_break_urls_or_id_lists_are_rejected() {
        let too_long = "A".repeat(MAX_IDENTIFIER_LEN + 1);
        let cases = [
            ("", "is empty"),
            (too_long.as_str(), "is longer than 255 bytes"),
            ("ABC\u{7}DEF", "contains a control character"),
            ("ABC\nDEF", "contains a control character"),
            ("ABC DEF", "contains whitespace"),
            ("ABC\u{a0}DEF", "contains whitespace"),
            (
                "ABC,DEF",
                "contains one of the reserved characters , / ? # %",
            ),
            (
                "ABC/DEF",
                "contains one of the reserved characters , / ? # %",
            ),
            (
                "ABC?DEF",
                "contains one of the reserved characters , / ? # %",
            ),
            (
                "ABC#DEF",
                "contains one of the reserved characters , / ? # %",
            ),
            (
                "ABC%DEF",
                "contains one of the reserved characters , / ? # %",
            ),
        ];
        for (udid, reason) in cases {
            assert_eq!(
                resolve_channel(&keys([("UDID", udid)])),
                Err(invalid("UDID", reason)),
                "{udid:?}"
            );
        }
    }

    #[test]
    fn every_identifier_key_is_validated() {
        let cases = [
            keys([("UDID", UDID), ("UserID", "a/b")]),
            keys([("EnrollmentID", "a b")]),
            keys([("EnrollmentID", ENROLLMENT_ID), ("EnrollmentUserID", "")]),
        ];
        let failing_keys = cases.map(|dict| match resolve_channel(&dict) {
            Err(ProtocolError::InvalidIdentifier { key, .. }) => key,
            other => panic!("expected an invalid identifier, got {other:?}"),
        });
        assert_eq!(failing_keys, ["UserID", "EnrollmentID", "EnrollmentUserID"]);
    }

    #[test]
    fn a_255_byte_identifier_with_colons_dots_and_at_signs_is_accepted() {
        let longest = format!("{}:{}", "a.b@c-".repeat(41), "x".repeat(8));
        assert_eq!(longest.len(), MAX_IDENTIFIER_LEN);
        assert_eq!(validate_identifier("UDID", &longest), Ok(()));
    }
}
