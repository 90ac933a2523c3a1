//! Schema-guided conversion of JSON into property-list values.
//!
//! JSON has no data or date types, so API clients send base64 strings and
//! RFC 3339 strings; the schema says which keys hold those. Problems are
//! collected with their path and the offending value is left out, so one pass
//! reports everything that is wrong.

use base64::Engine as _;
use plist::{Dictionary, Value};
use serde_json::{Map, Number};

use super::model::{KeySchema, ValueType};
use super::validate::{best_alternative, find_key, index_path, member_path, Violation};

/// Converts a JSON object whose members are described by `layers`.
pub(crate) fn dictionary_from_json(
    layers: &[&[KeySchema]],
    object: &Map<String, serde_json::Value>,
    path: &str,
    problems: &mut Vec<Violation>,
) -> Dictionary {
    let mut dictionary = Dictionary::new();
    for (name, member) in object {
        let schema = find_key(layers, name);
        if let Some(value) = value_from_json(schema, member, &member_path(path, name), problems) {
            dictionary.insert(name.clone(), value);
        }
    }
    dictionary
}

fn value_from_json(
    schema: Option<&KeySchema>,
    value: &serde_json::Value,
    path: &str,
    problems: &mut Vec<Violation>,
) -> Option<Value> {
    let value_type = schema.map(|key| key.value_type);
    match value {
        serde_json::Value::Null => {
            problems.push(Violation::new(path, "null has no property-list equivalent"));
            None
        }
        serde_json::Value::Bool(flag) => Some(Value::Boolean(*flag)),
        serde_json::Value::Number(number) => Some(number_value(number, value_type)),
        serde_json::Value::String(text) => string_value(text, value_type, path, problems),
        serde_json::Value::Array(items) => Some(Value::Array(
            items
                .iter()
                .enumerate()
                .filter_map(|(index, item)| {
                    let item_path = index_path(path, index);
                    value_from_json(
                        item_schema(schema, item, &item_path),
                        item,
                        &item_path,
                        problems,
                    )
                })
                .collect(),
        )),
        serde_json::Value::Object(object) => {
            let subkeys = schema.map_or(&[][..], |key| key.subkeys.as_slice());
            Some(Value::Dictionary(dictionary_from_json(
                &[subkeys],
                object,
                path,
                problems,
            )))
        }
    }
}

/// Numbers become reals where the schema expects a real, integers otherwise when exact.
fn number_value(number: &Number, value_type: Option<ValueType>) -> Value {
    let as_real = || Value::Real(number.as_f64().unwrap_or(f64::NAN));
    if value_type == Some(ValueType::Real) {
        return as_real();
    }
    number
        .as_i64()
        .map(|signed| Value::Integer(signed.into()))
        .or_else(|| {
            number
                .as_u64()
                .map(|unsigned| Value::Integer(unsigned.into()))
        })
        .unwrap_or_else(as_real)
}

fn string_value(
    text: &str,
    value_type: Option<ValueType>,
    path: &str,
    problems: &mut Vec<Violation>,
) -> Option<Value> {
    match value_type {
        Some(ValueType::Data) => match base64::engine::general_purpose::STANDARD.decode(text) {
            Ok(bytes) => Some(Value::Data(bytes)),
            Err(error) => {
                problems.push(Violation::new(
                    path,
                    format!("data must be base64: {error}"),
                ));
                None
            }
        },
        Some(ValueType::Date) => match plist::Date::from_xml_format(text) {
            Ok(date) => Some(Value::Date(date)),
            Err(_) => {
                problems.push(Violation::new(
                    path,
                    format!("{text:?} is not an RFC 3339 date"),
                ));
                None
            }
        },
        _ => Some(Value::String(text.to_owned())),
    }
}

/// The schema of one array element; for heterogeneous arrays, the variant the
/// element (read without a schema) fits best.
fn item_schema<'a>(
    array: Option<&'a KeySchema>,
    item: &serde_json::Value,
    path: &str,
) -> Option<&'a KeySchema> {
    match array?.subkeys.as_slice() {
        [] => None,
        [only] => Some(only),
        alternatives => {
            let plain = value_from_json(None, item, path, &mut Vec::new())?;
            best_alternative(alternatives, &plain, path).map(|(alternative, _)| alternative)
        }
    }
}

/// The JSON type of a value, for messages.
pub(crate) fn type_name(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::command;
    use serde_json::json;

    fn convert(request_type: &str, value: serde_json::Value) -> (Dictionary, Vec<Violation>) {
        let keys = &command(request_type).unwrap().keys;
        let mut problems = Vec::new();
        let object = value.as_object().unwrap();
        let dictionary = dictionary_from_json(&[keys], object, "$", &mut problems);
        (dictionary, problems)
    }

    #[test]
    fn data_keys_take_base64_and_other_strings_stay_strings() {
        let (dictionary, problems) = convert(
            "InstallProfile",
            json!({"Payload": "aGVsbG8=", "Extra": "aGVsbG8="}),
        );
        assert!(problems.is_empty());
        assert_eq!(
            dictionary.get("Payload"),
            Some(&Value::Data(b"hello".to_vec()))
        );
        assert_eq!(
            dictionary.get("Extra"),
            Some(&Value::String("aGVsbG8=".into()))
        );
    }

    #[test]
    fn bad_base64_and_nulls_are_reported_at_their_path() {
        let (dictionary, problems) = convert(
            "InstallProfile",
            json!({"Payload": "not base64!", "Other": null}),
        );
        assert!(dictionary.is_empty());
        let paths: Vec<&str> = problems
            .iter()
            .map(|problem| problem.path.as_str())
            .collect();
        assert_eq!(paths, ["$.Other", "$.Payload"]);
    }

    #[test]
    fn heterogeneous_array_items_convert_with_their_own_variant() {
        let (dictionary, problems) = convert(
            "Settings",
            json!({"Settings": [{"Item": "Wallpaper", "Image": "AAEC", "Where": 1}]}),
        );
        assert!(problems.is_empty());
        let item = &dictionary.get("Settings").unwrap().as_array().unwrap()[0];
        assert_eq!(
            item.as_dictionary().unwrap().get("Image"),
            Some(&Value::Data(vec![0, 1, 2]))
        );
    }

    #[test]
    fn numbers_follow_the_schema_type() {
        let real = KeySchema {
            key: "Ratio".into(),
            title: None,
            value_type: ValueType::Real,
            presence: crate::schema::Presence::Optional,
            rangelist: Vec::new(),
            range: None,
            format: None,
            subkeys: Vec::new(),
            supported_os: None,
            assettypes: Vec::new(),
            valuetype: None,
        };
        let keys = [real];
        let mut problems = Vec::new();
        let object = json!({"Ratio": 2, "Count": 3, "Big": 1.5})
            .as_object()
            .unwrap()
            .clone();
        let dictionary = dictionary_from_json(&[&keys], &object, "$", &mut problems);
        assert_eq!(dictionary.get("Ratio"), Some(&Value::Real(2.0)));
        assert_eq!(dictionary.get("Count"), Some(&Value::Integer(3.into())));
        assert_eq!(dictionary.get("Big"), Some(&Value::Real(1.5)));
    }

    #[test]
    fn date_keys_take_rfc3339() {
        let keys = &crate::schema::profile_payload("TopLevel").unwrap().keys;
        let mut problems = Vec::new();
        let object =
            json!({"RemovalDate": "2030-01-02T03:04:05+01:00", "PayloadExpirationDate": "soon"});
        let dictionary =
            dictionary_from_json(&[keys], object.as_object().unwrap(), "$", &mut problems);
        assert!(matches!(
            dictionary.get("RemovalDate"),
            Some(Value::Date(_))
        ));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].path, "$.PayloadExpirationDate");
    }
}
