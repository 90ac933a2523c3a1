//! Checks property-list (and JSON) values against schema key lists.
//!
//! Errors are violations a device would reject: missing required keys, wrong
//! types, values outside `rangelist`/`range`, strings not matching `format`.
//! Keys and enumerated values the schema does not know are only warnings,
//! because newer OS releases add them before the snapshot catches up.

use std::fmt;

use plist::{Dictionary, Value};

use super::json;
use super::model::{KeySchema, Presence, ValueType};

/// One problem, located by a JSON-path style path such as `$.Settings[0].Item`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub path: String,
    pub message: String,
}

impl Violation {
    pub(crate) fn new(path: &str, message: impl Into<String>) -> Violation {
        Violation {
            path: path.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: {}", self.path, self.message)
    }
}

/// The outcome of validating one value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validation {
    pub errors: Vec<Violation>,
    pub warnings: Vec<Violation>,
}

impl Validation {
    /// True when there are no errors (warnings do not count).
    pub fn is_valid(&self) -> bool {
        self.errors.is_empty()
    }

    pub(crate) fn error(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(Violation::new(path, message));
    }

    fn warning(&mut self, path: &str, message: impl Into<String>) {
        self.warnings.push(Violation::new(path, message));
    }

    pub(crate) fn absorb(&mut self, other: Validation) {
        self.errors.extend(other.errors);
        self.warnings.extend(other.warnings);
    }

    /// Ordering used to pick the schema variant a value was meant for.
    fn misfit(&self, discriminator_mismatches: usize) -> (usize, usize, usize) {
        (
            discriminator_mismatches,
            self.errors.len(),
            self.warnings.len(),
        )
    }
}

/// Validates a dictionary against a key list (a payload's, command's or declaration's `keys`).
pub fn validate(keys: &[KeySchema], value: &Dictionary) -> Validation {
    let mut validation = Validation::default();
    validate_dictionary(&[keys], value, "$", &mut validation);
    validation
}

/// Validates a JSON object (a declaration, say) against a key list.
///
/// The JSON is first converted to a property list the way Orchard would send
/// it — strings become data (base64) or dates (RFC 3339) where the schema asks
/// for those — so conversion problems and `null`s are reported at their path
/// alongside the schema violations.
pub fn validate_json(keys: &[KeySchema], value: &serde_json::Value) -> Validation {
    match value {
        serde_json::Value::Object(object) => convert_and_validate(keys, object).1,
        other => {
            let mut validation = Validation::default();
            validation.error(
                "$",
                format!("expected a JSON object, found {}", json::type_name(other)),
            );
            validation
        }
    }
}

/// Converts a JSON object described by `keys` and validates the result.
/// A value that could not be converted is reported once, by the conversion,
/// rather than also as missing or mistyped.
pub(crate) fn convert_and_validate(
    keys: &[KeySchema],
    object: &serde_json::Map<String, serde_json::Value>,
) -> (Dictionary, Validation) {
    let mut conversion_errors = Vec::new();
    let dictionary = json::dictionary_from_json(&[keys], object, "$", &mut conversion_errors);
    let mut schema_validation = validate(keys, &dictionary);
    schema_validation.errors.retain(|error| {
        conversion_errors
            .iter()
            .all(|conversion| conversion.path != error.path)
    });
    let mut validation = Validation {
        errors: conversion_errors,
        warnings: Vec::new(),
    };
    validation.absorb(schema_validation);
    (dictionary, validation)
}

/// The schema entry describing member `name`: a named key, else an `ANY` key.
/// Earlier layers win, so a payload's own keys override the common ones.
pub(crate) fn find_key<'a>(layers: &[&'a [KeySchema]], name: &str) -> Option<&'a KeySchema> {
    let all = || layers.iter().flat_map(|layer| layer.iter());
    all()
        .find(|key| !key.matches_any_key() && key.key == name)
        .or_else(|| all().find(|key| key.matches_any_key()))
}

/// Validates a dictionary whose members are described by the union of `layers`.
pub(crate) fn validate_dictionary(
    layers: &[&[KeySchema]],
    dictionary: &Dictionary,
    path: &str,
    validation: &mut Validation,
) {
    if layers.iter().all(|layer| layer.is_empty()) {
        // The schema does not describe this dictionary's contents.
        return;
    }
    let mut checked_required: Vec<&str> = Vec::new();
    for key in layers.iter().flat_map(|layer| layer.iter()) {
        let is_required = key.presence == Presence::Required && !key.matches_any_key();
        if is_required && !checked_required.contains(&key.key.as_str()) {
            checked_required.push(&key.key);
            if dictionary.contains_key(&key.key) {
                continue;
            }
            let member = member_path(path, &key.key);
            if key.is_platform_specific() {
                validation.warning(
                    &member,
                    "key is missing (required on the platforms that support it)",
                );
            } else {
                validation.error(&member, "required key is missing");
            }
        }
    }
    for (name, value) in dictionary {
        let member = member_path(path, name);
        match find_key(layers, name) {
            Some(key) => validate_value(key, value, &member, validation),
            None => validation.warning(&member, "key is not described by the schema"),
        }
    }
}

/// Validates one value against its key schema.
pub(crate) fn validate_value(
    key: &KeySchema,
    value: &Value,
    path: &str,
    validation: &mut Validation,
) {
    match (key.value_type, value) {
        (ValueType::Any, _) => {}
        (ValueType::Boolean, Value::Boolean(_))
        | (ValueType::Date, Value::Date(_))
        | (ValueType::Data, Value::Data(_)) => check_rangelist(key, value, path, validation),
        (ValueType::String, Value::String(text)) => {
            check_rangelist(key, value, path, validation);
            check_string(key, text, path, validation);
        }
        (ValueType::Integer, Value::Integer(_))
        | (ValueType::Real, Value::Integer(_) | Value::Real(_)) => {
            check_rangelist(key, value, path, validation);
            check_number(key, value, path, validation);
        }
        (ValueType::Dictionary, Value::Dictionary(dictionary)) => {
            validate_dictionary(&[&key.subkeys], dictionary, path, validation);
        }
        (ValueType::Array, Value::Array(items)) => validate_array(key, items, path, validation),
        (expected, actual) => validation.error(
            path,
            format!(
                "expected {}, found {}",
                expected.name(),
                plist_type_name(actual)
            ),
        ),
    }
}

fn check_string(key: &KeySchema, text: &str, path: &str, validation: &mut Validation) {
    if let Some(format) = &key.format {
        if !format.regex.is_match(text) {
            validation.error(
                path,
                format!("{text:?} does not match the format {}", format.pattern),
            );
        }
    }
    // A string whose schema lists subkeys names its known values (e.g. DeviceInformation queries).
    if !key.subkeys.is_empty() && key.subkeys.iter().all(|known| known.key != text) {
        validation.warning(path, format!("{text:?} is not a value the schema knows"));
    }
}

fn check_number(key: &KeySchema, value: &Value, path: &str, validation: &mut Validation) {
    let (Some(range), Some(number)) = (key.range, as_f64(value)) else {
        return;
    };
    if range.min.is_some_and(|min| number < min) || range.max.is_some_and(|max| number > max) {
        let bound =
            |limit: Option<f64>| limit.map_or_else(|| "…".to_owned(), |limit| limit.to_string());
        validation.error(
            path,
            format!(
                "{number} is outside the range {}..={}",
                bound(range.min),
                bound(range.max)
            ),
        );
    }
}

fn check_rangelist(key: &KeySchema, value: &Value, path: &str, validation: &mut Validation) {
    if !key.rangelist.is_empty() && !key.rangelist.iter().any(|allowed| allowed.matches(value)) {
        let allowed: Vec<String> = key.rangelist.iter().map(ToString::to_string).collect();
        validation.error(path, format!("value must be one of {}", allowed.join(", ")));
    }
}

/// Arrays have one item schema, or several alternatives for heterogeneous
/// lists (the `Settings` command's items, told apart by their `Item` key).
fn validate_array(key: &KeySchema, items: &[Value], path: &str, validation: &mut Validation) {
    for (index, item) in items.iter().enumerate() {
        let item_path = index_path(path, index);
        match key.subkeys.as_slice() {
            [] => {}
            [only] => validate_value(only, item, &item_path, validation),
            alternatives => {
                if let Some((_, fitted)) = best_alternative(alternatives, item, &item_path) {
                    validation.absorb(fitted);
                }
            }
        }
    }
}

/// The alternative an array item fits best, with the item's validation against it.
pub(crate) fn best_alternative<'a>(
    alternatives: &'a [KeySchema],
    item: &Value,
    path: &str,
) -> Option<(&'a KeySchema, Validation)> {
    alternatives
        .iter()
        .map(|alternative| {
            let mut validation = Validation::default();
            validate_value(alternative, item, path, &mut validation);
            let mismatches = item.as_dictionary().map_or(0, |dictionary| {
                discriminator_mismatches(&alternative.subkeys, dictionary)
            });
            (alternative, validation, mismatches)
        })
        .min_by_key(|(_, validation, mismatches)| validation.misfit(*mismatches))
        .map(|(alternative, validation, _)| (alternative, validation))
}

/// Picks, among several schemas for one dictionary, the validation of the one
/// it fits best. `candidates` yields each schema's keys and its validation.
pub(crate) fn best_fit<'a>(
    dictionary: &Dictionary,
    candidates: impl IntoIterator<Item = (&'a [KeySchema], Validation)>,
) -> Option<Validation> {
    candidates
        .into_iter()
        .min_by_key(|(keys, validation)| {
            validation.misfit(discriminator_mismatches(keys, dictionary))
        })
        .map(|(_, validation)| validation)
}

/// Counts members whose value contradicts a key that allows exactly one value:
/// such a key names the variant (`Item: Wallpaper`, `Type: Kerberos`), so a
/// contradiction rules the variant out more firmly than any other error.
fn discriminator_mismatches(keys: &[KeySchema], dictionary: &Dictionary) -> usize {
    keys.iter()
        .filter(|key| key.rangelist.len() == 1)
        .filter(|key| {
            dictionary
                .get(&key.key)
                .is_some_and(|value| !key.rangelist[0].matches(value))
        })
        .count()
}

fn as_f64(value: &Value) -> Option<f64> {
    match value {
        Value::Real(number) => Some(*number),
        Value::Integer(number) => number
            .as_signed()
            .map(|signed| signed as f64)
            .or_else(|| number.as_unsigned().map(|unsigned| unsigned as f64)),
        _ => None,
    }
}

fn plist_type_name(value: &Value) -> &'static str {
    match value {
        Value::Array(_) => "array",
        Value::Dictionary(_) => "dictionary",
        Value::Boolean(_) => "boolean",
        Value::Data(_) => "data",
        Value::Date(_) => "date",
        Value::Real(_) => "real",
        Value::Integer(_) => "integer",
        Value::String(_) => "string",
        Value::Uid(_) => "uid",
        _ => "unknown value",
    }
}

/// `$.Key`, or `$['odd key']` for names that are not plain identifiers.
pub(crate) fn member_path(parent: &str, name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        format!("{parent}.{name}")
    } else {
        format!("{parent}[{name:?}]")
    }
}

pub(crate) fn index_path(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{command, profile_payload};
    use serde_json::json;

    fn dictionary(value: serde_json::Value) -> Dictionary {
        plist::to_value(&value).unwrap().into_dictionary().unwrap()
    }

    fn paths(violations: &[Violation]) -> Vec<&str> {
        violations
            .iter()
            .map(|violation| violation.path.as_str())
            .collect()
    }

    #[test]
    fn a_complete_payload_has_no_violations() {
        let keys = &profile_payload("com.apple.mdm").unwrap().keys;
        let payload = dictionary(json!({
            "IdentityCertificateUUID": "8A3B1C2D-1111-2222-3333-444455556666",
            "Topic": "com.apple.mgmt.External.1",
            "ServerURL": "https://mdm.example.com/mdm",
            "AccessRights": 8191,
        }));
        assert_eq!(validate(keys, &payload), Validation::default());
    }

    #[test]
    fn missing_required_keys_and_wrong_types_are_errors() {
        let keys = &profile_payload("com.apple.mdm").unwrap().keys;
        let payload = dictionary(json!({"ServerURL": 5, "SignMessage": "yes"}));
        let validation = validate(keys, &payload);
        let mut error_paths = paths(&validation.errors);
        error_paths.sort_unstable();
        assert_eq!(
            error_paths,
            [
                "$.IdentityCertificateUUID",
                "$.ServerURL",
                "$.SignMessage",
                "$.Topic"
            ]
        );
        assert!(validation
            .errors
            .iter()
            .any(|error| error.message == "expected boolean, found string"));
    }

    #[test]
    fn keys_required_only_on_some_platforms_are_warnings_when_missing() {
        let keys = &crate::schema::checkin("Authenticate").unwrap().keys;
        let message = dictionary(json!({
            "MessageType": "Authenticate",
            "Topic": "com.apple.mgmt.External.1",
            "UDID": "663b07bb783e9ade1dae4fbb92ea12afc0ce5b69",
            "BuildVersion": "13G36",
            "OSVersion": "9.3.5",
            "ProductName": "iPad2,5",
            "SerialNumber": "F5JM992LF193",
        }));
        let validation = validate(keys, &message);
        assert!(validation.is_valid(), "{:?}", validation.errors);
        assert!(paths(&validation.warnings).contains(&"$.DeviceName"));
    }

    #[test]
    fn unknown_keys_are_warnings_not_errors() {
        let keys = &command("RestartDevice").unwrap().keys;
        let validation = validate(keys, &dictionary(json!({"FutureOption": true})));
        assert!(validation.is_valid());
        assert_eq!(paths(&validation.warnings), ["$.FutureOption"]);
    }

    #[test]
    fn integers_are_accepted_where_reals_are_expected() {
        let keys = &profile_payload("TopLevel").unwrap().keys;
        let duration = keys
            .iter()
            .find(|key| key.key == "DurationUntilRemoval")
            .unwrap();
        let mut validation = Validation::default();
        validate_value(duration, &Value::Integer(3600.into()), "$", &mut validation);
        validate_value(duration, &Value::Real(0.5), "$", &mut validation);
        assert!(validation.is_valid());
    }

    #[test]
    fn range_bounds_are_enforced() {
        let keys = &crate::schema::declaration("com.apple.configuration.passcode.settings")
            .unwrap()
            .keys;
        let ranged = keys
            .iter()
            .find(|key| key.range.and_then(|range| range.min).is_some())
            .unwrap();
        let below = ranged.range.unwrap().min.unwrap() as i64 - 1;
        let mut validation = Validation::default();
        validate_value(
            ranged,
            &Value::Integer(below.into()),
            "$.x",
            &mut validation,
        );
        assert_eq!(paths(&validation.errors), ["$.x"]);
    }

    #[test]
    fn array_items_are_checked_against_the_item_rangelist() {
        let keys = &profile_payload("com.apple.mdm").unwrap().keys;
        let capabilities = keys
            .iter()
            .find(|key| key.key == "ServerCapabilities")
            .unwrap();
        let mut validation = Validation::default();
        let items = plist::to_value(&json!(["com.apple.mdm.token", "com.example.nope"])).unwrap();
        validate_value(
            capabilities,
            &items,
            "$.ServerCapabilities",
            &mut validation,
        );
        assert_eq!(paths(&validation.errors), ["$.ServerCapabilities[1]"]);
    }

    #[test]
    fn any_keys_accept_arbitrary_member_names() {
        let keys = &profile_payload("TopLevel").unwrap().keys;
        let consent = keys.iter().find(|key| key.key == "ConsentText").unwrap();
        let mut validation = Validation::default();
        let text = plist::to_value(&json!({"default": "Agree?", "en": "Agree?"})).unwrap();
        validate_value(consent, &text, "$.ConsentText", &mut validation);
        assert_eq!(validation, Validation::default());

        let wrong = plist::to_value(&json!({"en": 1})).unwrap();
        validate_value(consent, &wrong, "$.ConsentText", &mut validation);
        assert_eq!(paths(&validation.errors), ["$.ConsentText.en"]);
    }

    #[test]
    fn heterogeneous_arrays_validate_each_item_against_its_own_variant() {
        let keys = &command("Settings").unwrap().keys;
        let valid = dictionary(json!({"Settings": [
            {"Item": "DeviceName", "DeviceName": "Lab iPad"},
            {"Item": "Bluetooth", "Enabled": true},
        ]}));
        assert_eq!(validate(keys, &valid), Validation::default());

        let invalid = dictionary(json!({"Settings": [
            {"Item": "Bluetooth", "Enabled": true},
            {"Item": "DeviceName", "DeviceName": 7},
            {"Item": "Bluetooth"},
        ]}));
        let validation = validate(keys, &invalid);
        assert_eq!(
            paths(&validation.errors),
            ["$.Settings[1].DeviceName", "$.Settings[2].Enabled"]
        );
    }

    #[test]
    fn unknown_enumerated_string_values_are_warnings() {
        let keys = &command("DeviceInformation").unwrap().keys;
        let validation = validate(
            keys,
            &dictionary(json!({"Queries": ["SerialNumber", "FutureQuery"]})),
        );
        assert!(validation.is_valid());
        assert_eq!(paths(&validation.warnings), ["$.Queries[1]"]);
    }

    #[test]
    fn odd_member_names_are_quoted_in_paths() {
        assert_eq!(member_path("$", "Key Type"), "$[\"Key Type\"]");
        assert_eq!(member_path("$.a", "PayloadUUID"), "$.a.PayloadUUID");
    }

    #[test]
    fn json_nulls_and_non_objects_are_errors_at_their_path() {
        let keys = &profile_payload("com.apple.mdm").unwrap().keys;
        let validation = validate_json(
            keys,
            &json!({
                "IdentityCertificateUUID": "8A3B1C2D-1111-2222-3333-444455556666",
                "Topic": null,
                "ServerURL": "https://mdm.example.com",
            }),
        );
        assert_eq!(paths(&validation.errors), ["$.Topic"]);
        assert!(validation.errors[0].message.contains("null"));
        assert_eq!(paths(&validate_json(keys, &json!([1])).errors), ["$"]);
    }

    #[test]
    fn json_declarations_validate_against_declaration_schemas() {
        let keys = &crate::schema::declaration("com.apple.configuration.passcode.settings")
            .unwrap()
            .keys;
        assert!(validate_json(keys, &json!({"RequirePasscode": true})).is_valid());
        let validation = validate_json(keys, &json!({"RequirePasscode": "yes"}));
        assert_eq!(paths(&validation.errors), ["$.RequirePasscode"]);
    }
}
