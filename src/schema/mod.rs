//! Apple's device-management schemas and the validators built from them.
//!
//! The YAML published by Apple (`schemas/apple-device-management`, vendored
//! unchanged) is embedded at build time and parsed once, on first use, into a
//! [`Registry`]. Every key list Orchard checks against — profile payloads, MDM
//! commands, check-in messages, declarations, status items — comes from that
//! data, so a snapshot update is the only change needed when Apple adds keys.

mod json;
mod model;
mod profile;
mod templates;
mod validate;
mod yaml;

use std::collections::HashMap;
use std::sync::LazyLock;

pub use model::{
    Apply, Format, KeySchema, OsSupport, PayloadSchema, Platform, Presence, Range, RangeValue,
    SchemaKind, SharedIpad, SupportedOs, UsageMode, UserEnrollment, ValueType,
};
pub use profile::{validate_mdm_payload, validate_profile_payload};
pub use templates::{build_command, template_names, TemplateError};
pub(crate) use validate::{index_path, member_path};
pub use validate::{validate, validate_json, Validation, Violation};

use yaml::Node;

/// The embedded snapshot as `(path relative to the snapshot root, YAML text)`, sorted by path.
mod embedded {
    include!(concat!(env!("OUT_DIR"), "/apple_schemas.rs"));
}

/// Why an embedded schema file could not be turned into a [`PayloadSchema`].
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("{file}: invalid YAML: {source}")]
    Yaml {
        file: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{file}: {location}: {problem}")]
    Shape {
        file: String,
        location: String,
        problem: String,
    },
    #[error("{file}: {location}: invalid format pattern: {source}")]
    Format {
        file: String,
        location: String,
        #[source]
        source: regex_lite::Error,
    },
}

/// Parses one embedded file.
fn parse_file(source: &'static str, text: &str) -> Result<PayloadSchema, SchemaError> {
    let document = Node::parse(text).map_err(|source_error| SchemaError::Yaml {
        file: source.to_owned(),
        source: source_error,
    })?;
    model::payload_schema(source, &document)
}

/// All parsed schemas, indexed by the identifier each kind is looked up by.
#[derive(Debug, Default)]
struct Registry {
    /// Several files may describe one payload type (e.g. the `com.apple.MCX`
    /// sections); the file named after the type comes first.
    profiles: HashMap<String, Vec<PayloadSchema>>,
    commands: HashMap<String, PayloadSchema>,
    checkins: HashMap<String, PayloadSchema>,
    declarations: HashMap<String, PayloadSchema>,
    status_items: HashMap<String, PayloadSchema>,
}

impl Registry {
    /// Parses every embedded file. A file that fails to parse is logged and
    /// left out, so one bad snapshot file cannot take validation down; the
    /// test suite requires all of them to parse.
    fn load() -> Registry {
        let mut registry = Registry::default();
        for (source, text) in embedded::FILES {
            match parse_file(source, text) {
                Ok(schema) => registry.insert(schema),
                Err(error) => {
                    tracing::error!(%error, "skipping unparsable device-management schema")
                }
            }
        }
        for variants in registry.profiles.values_mut() {
            variants.sort_by_key(|schema| !is_named_after_identifier(schema));
        }
        registry
    }

    fn insert(&mut self, schema: PayloadSchema) {
        let Some(identifier) = schema.identifier.clone() else {
            return;
        };
        let index = match schema.kind {
            SchemaKind::ProfilePayload => {
                self.profiles.entry(identifier).or_default().push(schema);
                return;
            }
            SchemaKind::Command => &mut self.commands,
            SchemaKind::CheckIn => &mut self.checkins,
            SchemaKind::Declaration => &mut self.declarations,
            SchemaKind::StatusItem => &mut self.status_items,
            SchemaKind::Error | SchemaKind::Protocol | SchemaKind::Other => return,
        };
        index.insert(identifier, schema);
    }
}

/// Whether the file name is `<identifier>.yaml`, i.e. the general description
/// rather than a specialised variant such as `com.apple.extensiblesso(kerberos)`.
fn is_named_after_identifier(schema: &PayloadSchema) -> bool {
    let file_name = schema.source.rsplit('/').next().unwrap_or(schema.source);
    schema
        .identifier
        .as_deref()
        .is_some_and(|identifier| file_name.strip_suffix(".yaml") == Some(identifier))
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::load);

/// The schema of a configuration-profile payload, by `PayloadType`
/// (also `TopLevel` and `CommonPayloadKeys`).
pub fn profile_payload(payload_type: &str) -> Option<&'static PayloadSchema> {
    profile_payload_variants(payload_type).first()
}

/// Every file describing a payload type, the general one first.
pub fn profile_payload_variants(payload_type: &str) -> &'static [PayloadSchema] {
    REGISTRY
        .profiles
        .get(payload_type)
        .map_or(&[], Vec::as_slice)
}

/// The schema of an MDM command, by `RequestType`.
pub fn command(request_type: &str) -> Option<&'static PayloadSchema> {
    REGISTRY.commands.get(request_type)
}

/// The schema of a check-in message, by `MessageType`.
pub fn checkin(message_type: &str) -> Option<&'static PayloadSchema> {
    REGISTRY.checkins.get(message_type)
}

/// The schema of a declaration, by declaration `Type`; `any` holds the keys common to all.
pub fn declaration(declaration_type: &str) -> Option<&'static PayloadSchema> {
    REGISTRY.declarations.get(declaration_type)
}

/// The schema of a status item, by name (e.g. `device.identifier.serial-number`).
pub fn status_item(name: &str) -> Option<&'static PayloadSchema> {
    REGISTRY.status_items.get(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_file_parses() {
        assert!(
            embedded::FILES.len() > 290,
            "only {} files embedded",
            embedded::FILES.len()
        );
        let failures: Vec<String> = embedded::FILES
            .iter()
            .filter_map(|(source, text)| parse_file(source, text).err())
            .map(|error| error.to_string())
            .collect();
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn embedded_files_are_sorted_schema_yaml() {
        let paths: Vec<&str> = embedded::FILES.iter().map(|(path, _)| *path).collect();
        assert!(paths.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(paths.contains(&"mdm/commands/information.device.yaml"));
        assert!(paths
            .iter()
            .all(|path| path.ends_with(".yaml") && !path.starts_with("docs/")));
    }

    #[test]
    fn lookups_find_each_kind_by_its_identifier() {
        assert_eq!(profile_payload("com.apple.mdm").unwrap().title, "MDM");
        assert_eq!(
            command("DeviceInformation").unwrap().kind,
            SchemaKind::Command
        );
        assert_eq!(checkin("TokenUpdate").unwrap().kind, SchemaKind::CheckIn);
        assert_eq!(
            declaration("com.apple.configuration.passcode.settings")
                .unwrap()
                .kind,
            SchemaKind::Declaration
        );
        assert_eq!(
            status_item("device.identifier.serial-number").unwrap().kind,
            SchemaKind::StatusItem
        );
        assert!(command("NoSuchCommand").is_none());
    }

    #[test]
    fn command_and_checkin_of_the_same_name_stay_apart() {
        assert_eq!(
            command("DeclarativeManagement").unwrap().source,
            "mdm/commands/declarativemanagement.yaml"
        );
        assert_eq!(
            checkin("DeclarativeManagement").unwrap().source,
            "mdm/checkin/declarativemanagement.yaml"
        );
    }

    #[test]
    fn a_payload_type_described_by_several_files_prefers_the_general_one() {
        let variants = profile_payload_variants("com.apple.extensiblesso");
        assert_eq!(variants.len(), 2);
        assert_eq!(
            variants[0].source,
            "mdm/profiles/com.apple.extensiblesso.yaml"
        );
        assert_eq!(profile_payload_variants("com.apple.MCX").len(), 6);
    }

    #[test]
    fn keys_carry_constraints_and_per_os_details() {
        let mdm = profile_payload("com.apple.mdm").unwrap();
        let ios = mdm.supported_os.platform(Platform::Ios).unwrap();
        assert_eq!(ios.introduced.as_deref(), Some("4.0"));
        assert_eq!(ios.shared_ipad.as_ref().unwrap().devicechannel, Some(true));
        assert_eq!(
            ios.user_enrollment.as_ref().unwrap().mode,
            Some(UsageMode::Allowed)
        );

        let key = |name: &str| mdm.keys.iter().find(|key| key.key == name).unwrap();
        assert_eq!(key("Topic").presence, Presence::Required);
        assert!(key("ServerURL")
            .format
            .as_ref()
            .unwrap()
            .regex
            .is_match("https://mdm.example.com"));
        assert_eq!(
            key("EnrollmentMode").rangelist,
            vec![
                RangeValue::String("BYOD".into()),
                RangeValue::String("ADDE".into())
            ]
        );
        let removed = key("ManagedAppleID").supported_os.as_ref().unwrap();
        assert_eq!(
            removed
                .platform(Platform::MacOs)
                .unwrap()
                .removed
                .as_deref(),
            Some("15.0")
        );
        let capabilities = key("ServerCapabilities");
        assert_eq!(capabilities.value_type, ValueType::Array);
        assert_eq!(capabilities.subkeys[0].rangelist.len(), 3);

        let security = command("SecurityInfo").unwrap();
        assert_eq!(
            security
                .supported_os
                .platform(Platform::Ios)
                .unwrap()
                .accessrights
                .as_deref(),
            Some("AllowQuerySecurity")
        );
        assert!(!security.response_keys.is_empty());
    }

    #[test]
    fn declarative_details_are_kept() {
        let passcode = declaration("com.apple.configuration.passcode.settings").unwrap();
        assert_eq!(passcode.apply, Some(Apply::Combined));
        let ios = passcode.supported_os.platform(Platform::Ios).unwrap();
        assert!(ios.allowed_enrollments.contains(&"device".to_owned()));
        assert!(ios.allowed_scopes.contains(&"system".to_owned()));
        let ranged = passcode
            .keys
            .iter()
            .find(|key| key.range.is_some())
            .unwrap();
        assert!(ranged.range.unwrap().min.is_some() || ranged.range.unwrap().max.is_some());
    }

    #[test]
    fn recursive_structures_are_unrolled() {
        let restrictions = profile_payload("com.apple.applicationaccess.new").unwrap();
        let mut depth = 0;
        let mut list = restrictions
            .keys
            .iter()
            .find(|key| key.key == "whiteList")
            .unwrap();
        while let Some(nested) = list
            .subkeys
            .first()
            .and_then(|item| item.subkeys.iter().find(|key| key.key == "subApps"))
        {
            depth += 1;
            list = nested;
        }
        assert!(depth >= 3, "subApps unrolled only {depth} levels");
    }

    #[test]
    fn consent_text_wrapper_is_read_as_the_language_dictionary() {
        let top_level = profile_payload("TopLevel").unwrap();
        let consent = top_level
            .keys
            .iter()
            .find(|key| key.key == "ConsentText")
            .unwrap();
        assert_eq!(consent.subkeys.len(), 1);
        assert!(consent.subkeys[0].matches_any_key());
        assert_eq!(consent.subkeys[0].value_type, ValueType::String);
    }

    fn fixture(name: &str) -> plist::Dictionary {
        let path = format!(
            "{}/tests/fixtures/nanomdm/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        plist::from_file(path).unwrap()
    }

    #[test]
    fn real_checkin_messages_satisfy_their_schemas() {
        for name in [
            "Authenticate.1.plist",
            "Authenticate.2.plist",
            "TokenUpdate.1.plist",
            "TokenUpdate.2.plist",
        ] {
            let message = fixture(name);
            let message_type = message
                .get("MessageType")
                .and_then(plist::Value::as_string)
                .unwrap();
            let validation = validate(&checkin(message_type).unwrap().keys, &message);
            assert!(validation.is_valid(), "{name}: {:?}", validation.errors);
        }
    }

    #[test]
    fn a_real_device_information_result_satisfies_the_response_schema() {
        let response = fixture("DeviceInformation.1.plist");
        let validation = validate(
            &command("DeviceInformation").unwrap().response_keys,
            &response,
        );
        assert!(validation.is_valid(), "{:?}", validation.errors);
    }
}
