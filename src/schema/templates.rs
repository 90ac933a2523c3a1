//! Building MDM commands from JSON parameters.
//!
//! API clients enqueue common commands as JSON. The command's schema decides
//! how each JSON value becomes a property-list value (base64 strings for data,
//! RFC 3339 strings for dates) and then validates the result, so a command that
//! a device would reject is refused before it is queued.

use plist::{Dictionary, Value};
use serde_json::Map;

use super::command;
use super::validate::{convert_and_validate, member_path, Violation};

/// Commands that may be built from JSON parameters.
const TEMPLATE_NAMES: &[&str] = &[
    "DeviceInformation",
    "SecurityInfo",
    "InstalledApplicationList",
    "ProfileList",
    "InstallProfile",
    "RemoveProfile",
    "DeviceLock",
    "EraseDevice",
    "RestartDevice",
    "ShutDownDevice",
    "Settings",
    "DeclarativeManagement",
];

const REQUEST_TYPE: &str = "RequestType";

/// Why a command could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("no command template for {requested:?}; supported: {}", supported.join(", "))]
    UnsupportedTemplate {
        requested: String,
        supported: Vec<&'static str>,
    },
    #[error("the schema snapshot has no command {0:?}")]
    MissingSchema(String),
    #[error("invalid command parameters: {}", describe(.0))]
    Invalid(Vec<Violation>),
}

fn describe(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The `RequestType`s [`build_command`] accepts.
pub fn template_names() -> &'static [&'static str] {
    TEMPLATE_NAMES
}

/// Builds the `Command` dictionary (including `RequestType`) for one of
/// [`template_names`] from JSON parameters, validated against Apple's schema.
///
/// Parameters the schema does not know are passed through, since newer OS
/// releases accept keys the snapshot may not describe yet.
pub fn build_command(
    request_type: &str,
    params: &Map<String, serde_json::Value>,
) -> Result<Dictionary, TemplateError> {
    if !TEMPLATE_NAMES.contains(&request_type) {
        return Err(TemplateError::UnsupportedTemplate {
            requested: request_type.to_owned(),
            supported: TEMPLATE_NAMES.to_vec(),
        });
    }
    let schema = command(request_type)
        .ok_or_else(|| TemplateError::MissingSchema(request_type.to_owned()))?;

    let mut problems = Vec::new();
    let mut parameters = params.clone();
    // `RequestType` belongs to the command envelope rather than to the schema's keys.
    if let Some(given) = parameters.remove(REQUEST_TYPE) {
        if given.as_str() != Some(request_type) {
            problems.push(Violation::new(
                &member_path("$", REQUEST_TYPE),
                format!("must be {request_type:?} when given"),
            ));
        }
    }
    let (mut dictionary, validation) = convert_and_validate(&schema.keys, &parameters);
    problems.extend(validation.errors);
    if !problems.is_empty() {
        return Err(TemplateError::Invalid(problems));
    }
    dictionary.insert(
        REQUEST_TYPE.to_owned(),
        Value::String(request_type.to_owned()),
    );
    Ok(dictionary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(value: serde_json::Value) -> Map<String, serde_json::Value> {
        value.as_object().unwrap().clone()
    }

    fn invalid_paths(result: Result<Dictionary, TemplateError>) -> Vec<String> {
        match result {
            Err(TemplateError::Invalid(violations)) => violations
                .into_iter()
                .map(|violation| violation.path)
                .collect(),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn every_template_has_a_schema_in_the_snapshot() {
        assert_eq!(template_names().len(), 12);
        for name in template_names() {
            assert!(command(name).is_some(), "{name}");
        }
    }

    #[test]
    fn other_request_types_are_unsupported_and_the_error_lists_the_supported_ones() {
        let error = build_command("InstallApplication", &Map::new()).unwrap_err();
        assert!(matches!(error, TemplateError::UnsupportedTemplate { .. }));
        let message = error.to_string();
        assert!(
            message.contains("InstallApplication")
                && message.contains("DeviceInformation, SecurityInfo")
        );
    }

    #[test]
    fn parameterless_commands_carry_only_their_request_type() {
        for name in [
            "SecurityInfo",
            "ProfileList",
            "RestartDevice",
            "ShutDownDevice",
        ] {
            let command = build_command(name, &Map::new()).unwrap();
            assert_eq!(command.len(), 1);
            assert_eq!(
                command.get("RequestType").and_then(Value::as_string),
                Some(name)
            );
        }
    }

    #[test]
    fn device_information_requires_queries() {
        assert_eq!(
            invalid_paths(build_command("DeviceInformation", &Map::new())),
            ["$.Queries"]
        );
        let command = build_command(
            "DeviceInformation",
            &params(json!({"Queries": ["UDID", "SerialNumber", "OSVersion"]})),
        )
        .unwrap();
        let queries = command.get("Queries").and_then(Value::as_array).unwrap();
        assert_eq!(queries.len(), 3);
        assert_eq!(
            command.get("RequestType").and_then(Value::as_string),
            Some("DeviceInformation")
        );
    }

    #[test]
    fn install_profile_decodes_the_payload_from_base64() {
        let command =
            build_command("InstallProfile", &params(json!({"Payload": "PD94bWw+"}))).unwrap();
        assert_eq!(
            command.get("Payload"),
            Some(&Value::Data(b"<?xml>".to_vec()))
        );
        assert_eq!(
            invalid_paths(build_command(
                "InstallProfile",
                &params(json!({"Payload": "%%%"}))
            )),
            ["$.Payload"]
        );
        assert_eq!(
            invalid_paths(build_command("InstallProfile", &Map::new())),
            ["$.Payload"]
        );
    }

    #[test]
    fn settings_items_are_validated_against_their_item_kind() {
        let valid = params(json!({"Settings": [
            {"Item": "DeviceName", "DeviceName": "Front desk"},
            {"Item": "Bluetooth", "Enabled": false},
        ]}));
        let command = build_command("Settings", &valid).unwrap();
        assert_eq!(
            command
                .get("Settings")
                .and_then(Value::as_array)
                .map(Vec::len),
            Some(2)
        );

        let invalid = params(json!({"Settings": [
            {"Item": "DeviceName", "DeviceName": "Front desk"},
            {"Item": "Bluetooth", "Enabled": "off"},
        ]}));
        assert_eq!(
            invalid_paths(build_command("Settings", &invalid)),
            ["$.Settings[1].Enabled"]
        );
    }

    #[test]
    fn unknown_parameters_pass_through() {
        let command = build_command("ProfileList", &params(json!({"FutureFlag": true}))).unwrap();
        assert_eq!(command.get("FutureFlag"), Some(&Value::Boolean(true)));
    }

    #[test]
    fn erase_device_rejects_an_unknown_obliteration_behavior() {
        let good = build_command(
            "EraseDevice",
            &params(json!({"ObliterationBehavior": "DoNotObliterate"})),
        );
        assert!(good.is_ok(), "{good:?}");
        let bad = build_command(
            "EraseDevice",
            &params(json!({"ObliterationBehavior": "Shred"})),
        );
        assert_eq!(invalid_paths(bad), ["$.ObliterationBehavior"]);
    }

    #[test]
    fn a_request_type_parameter_must_match() {
        assert!(build_command(
            "ProfileList",
            &params(json!({"RequestType": "ProfileList"}))
        )
        .is_ok());
        assert_eq!(
            invalid_paths(build_command(
                "ProfileList",
                &params(json!({"RequestType": "EraseDevice"}))
            )),
            ["$.RequestType"]
        );
    }

    #[test]
    fn declarative_management_and_remove_profile_take_their_parameters() {
        let command =
            build_command("DeclarativeManagement", &params(json!({"Data": "e30="}))).unwrap();
        assert_eq!(command.get("Data"), Some(&Value::Data(b"{}".to_vec())));
        assert_eq!(
            invalid_paths(build_command("RemoveProfile", &Map::new())),
            ["$.Identifier"]
        );
        assert!(build_command(
            "RemoveProfile",
            &params(json!({"Identifier": "com.example.wifi"}))
        )
        .is_ok());
        assert!(build_command(
            "DeviceLock",
            &params(json!({"Message": "Call IT", "PIN": "123456"}))
        )
        .is_ok());
    }
}
