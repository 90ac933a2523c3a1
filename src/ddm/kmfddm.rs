//! One enrollment's merged status in KMFDDM's JSON shapes, so that scripts written for
//! KMFDDM's `declaration-status`, `status-errors` and `status-values` routes read
//! Orchard's answers unchanged: the same field names, Apple's own value spellings
//! (`"valid": "valid"`), values as strings, and the status-report paths KMFDDM reports
//! (`.StatusItems.…`, `.Errors`).
//!
//! Where KMFDDM is wrong Orchard is not: errors are the device's current ones (not every
//! error it ever reported), a declaration that is active but invalid with an `Error.`
//! reason is an error too, and every status item's values are listed (KMFDDM keeps only
//! `device.*` and `management.*`).

use serde_json::{json, Map, Value};

use super::status::{DeclarationStatus, EnrollmentStatus, Reason, StatusError, Validity};
use super::Manifest;

/// Where declaration states sit in a status report.
const DECLARATIONS_PATH: &str = ".StatusItems.management.declarations";
/// Where a status item's values sit in a status report.
const STATUS_ITEMS_PATH: &str = ".StatusItems";
/// The path KMFDDM gives entries of the report's top-level `Errors` array.
const ERRORS_PATH: &str = ".Errors";
/// The status item that `EnrollmentStatus` keeps whole, outside its values.
const CLIENT_CAPABILITIES_ITEM: &str = "management.client-capabilities";

/// `declaration-status` rows: each declaration as the device reported it, with `current`
/// (the reported ServerToken is the one the enrollment's manifest serves now) and
/// `status_received` (when the report arrived, RFC 3339).
pub fn declaration_status(
    status: &EnrollmentStatus,
    manifest: &Manifest,
    received: &str,
) -> Vec<Value> {
    status
        .declarations
        .values()
        .map(|declaration| {
            let current = manifest
                .item(declaration.category, &declaration.identifier)
                .is_some_and(|item| item.server_token == declaration.server_token);
            let mut row = as_reported(declaration);
            row.remove("reasons");
            row.insert(
                "ManifestType".into(),
                declaration.category.status_key().into(),
            );
            row.insert("current".into(), current.into());
            row.insert("status_received".into(), received.into());
            if !declaration.reasons.is_empty() {
                row.insert("reasons".into(), reasons(&declaration.reasons, Case::Lower));
            }
            Value::Object(row)
        })
        .collect()
}

/// `status-errors` rows: declarations the device could not apply (the whole entry as
/// reported, under the path of its category) and the report's `Errors` entries.
pub fn status_errors(status: &EnrollmentStatus, received: &str) -> Vec<Value> {
    let declarations = status
        .declarations
        .values()
        .filter(|declaration| is_error(declaration))
        .map(|declaration| {
            json!({
                "path": format!("{DECLARATIONS_PATH}.{}", declaration.category.status_key()),
                "error": Value::Object(as_reported(declaration)),
                "timestamp": received,
            })
        });
    let items = status.errors.iter().map(
        |error| json!({ "path": ERRORS_PATH, "error": error_entry(error), "timestamp": received }),
    );
    declarations.chain(items).collect()
}

/// `status-values` rows: every scalar the device reported, as a string, under its
/// status-report path; an array gives one row per element under the array's path (as
/// KMFDDM stores them). `prefix` filters paths like KMFDDM's (see [`PathPrefix`]).
pub fn status_values(
    status: &EnrollmentStatus,
    prefix: Option<&PathPrefix>,
    received: &str,
) -> Vec<Value> {
    let mut rows = Vec::new();
    let capabilities = status
        .client_capabilities
        .as_ref()
        .map(|value| (CLIENT_CAPABILITIES_ITEM, value));
    let stored = status
        .values
        .iter()
        .map(|(item_path, value)| (item_path.as_str(), value));
    for (item_path, value) in capabilities.into_iter().chain(stored) {
        flatten(
            &format!("{STATUS_ITEMS_PATH}.{item_path}"),
            value,
            &mut |path, text| {
                if prefix.is_none_or(|prefix| prefix.matches(path)) {
                    rows.push(json!({ "path": path, "value": text, "timestamp": received }));
                }
            },
        );
    }
    rows.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
    rows
}

/// A declaration the device could not apply: KMFDDM's rule (neither active nor valid),
/// and any declaration reported invalid or with an `Error.` reason.
fn is_error(declaration: &DeclarationStatus) -> bool {
    (!declaration.active && declaration.valid != Validity::Valid)
        || declaration.valid == Validity::Invalid
        || declaration
            .reasons
            .iter()
            .any(|reason| reason.code.starts_with("Error."))
}

/// A `management.declarations` entry with the keys Apple's schema gives it.
fn as_reported(declaration: &DeclarationStatus) -> Map<String, Value> {
    let mut entry = Map::new();
    entry.insert("identifier".into(), declaration.identifier.clone().into());
    entry.insert("active".into(), declaration.active.into());
    entry.insert("valid".into(), declaration.valid.as_str().into());
    entry.insert(
        "server-token".into(),
        declaration.server_token.clone().into(),
    );
    if !declaration.reasons.is_empty() {
        entry.insert("reasons".into(), reasons(&declaration.reasons, Case::Lower));
    }
    entry
}

/// An `Errors` entry with the keys Apple's schema gives it.
fn error_entry(error: &StatusError) -> Value {
    json!({ "StatusItem": error.status_item, "Reasons": reasons(&error.reasons, Case::Upper) })
}

/// Reasons are spelled in lower case inside `management.declarations` and capitalised
/// in `Errors` (Apple's status schema).
#[derive(Clone, Copy)]
enum Case {
    Lower,
    Upper,
}

fn reasons(reasons: &[Reason], case: Case) -> Value {
    let [code, description, details] = match case {
        Case::Lower => ["code", "description", "details"],
        Case::Upper => ["Code", "Description", "Details"],
    };
    reasons
        .iter()
        .map(|reason| {
            let mut entry = Map::new();
            entry.insert(code.into(), reason.code.clone().into());
            if let Some(text) = &reason.description {
                entry.insert(description.into(), text.clone().into());
            }
            if let Some(value) = &reason.details {
                entry.insert(details.into(), value.clone());
            }
            Value::Object(entry)
        })
        .collect()
}

/// Hands every scalar under `value` to `row` as (path, text): objects extend the path,
/// array elements keep it, numbers and booleans are their JSON text; nulls and empty
/// containers give nothing.
fn flatten(path: &str, value: &Value, row: &mut dyn FnMut(&str, String)) {
    match value {
        Value::Object(members) => {
            for (key, member) in members {
                flatten(&format!("{path}.{key}"), member, row);
            }
        }
        Value::Array(elements) => {
            for element in elements {
                flatten(path, element, row);
            }
        }
        Value::String(text) => row(path, text.clone()),
        Value::Number(number) => row(path, number.to_string()),
        Value::Bool(flag) => row(path, flag.to_string()),
        Value::Null => {}
    }
}

/// The `prefix` filter of `status-values`. KMFDDM passes it to SQL `LIKE` (its
/// documented example is `.StatusItems.device.%`), so `%` matches any run of characters,
/// `_` any one character and `\` escapes the next; the pattern must match the start of a
/// path, so a plain prefix such as `.StatusItems.device` works too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathPrefix {
    tokens: Vec<Token>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Literal(char),
    AnyOne,
    AnyRun,
}

impl PathPrefix {
    pub fn new(pattern: &str) -> PathPrefix {
        let mut tokens = Vec::new();
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            tokens.push(match c {
                '%' => Token::AnyRun,
                '_' => Token::AnyOne,
                '\\' => Token::Literal(chars.next().unwrap_or('\\')),
                c => Token::Literal(c),
            });
        }
        PathPrefix { tokens }
    }

    /// Whether the pattern matches the start of `path`.
    pub fn matches(&self, path: &str) -> bool {
        let path: Vec<char> = path.chars().collect();
        // Greedy wildcard matching with one backtrack point (the last `%` seen): linear
        // in practice, and exact for `%`/`_` patterns.
        let (mut t, mut p) = (0, 0);
        let mut backtrack: Option<(usize, usize)> = None;
        loop {
            if t == self.tokens.len() {
                return true; // the rest of the path is the implicit trailing `%`
            }
            let step = match (self.tokens[t], path.get(p)) {
                (Token::AnyRun, _) => {
                    backtrack = Some((t, p));
                    t += 1;
                    continue;
                }
                (Token::AnyOne, Some(_)) => true,
                (Token::Literal(expected), Some(&c)) => expected == c,
                (_, None) => false,
            };
            if step {
                t += 1;
                p += 1;
            } else if let Some((run, from)) = backtrack.filter(|&(_, from)| from < path.len()) {
                backtrack = Some((run, from + 1));
                t = run + 1;
                p = from + 1;
            } else {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ddm::StatusReport;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(path).unwrap()
    }

    fn merged(report: &[u8]) -> EnrollmentStatus {
        let mut status = EnrollmentStatus::default();
        status.apply(&StatusReport::parse(report).unwrap(), 1_700_000_000);
        status
    }

    const RECEIVED: &str = "2023-11-14T22:13:20Z";

    #[test]
    fn declaration_status_has_kmfddms_fields_and_apples_valid_spelling() {
        let status = merged(&fixture("kmfddm/status.D0.error.json"));
        let rows = declaration_status(&status, &Manifest::new([]), RECEIVED);
        assert_eq!(
            rows,
            vec![json!({
                "identifier": "com.example.test",
                "active": false,
                "valid": "unknown",
                "server-token": "7c6d85989e823101",
                "ManifestType": "configurations",
                "current": false,
                "status_received": RECEIVED,
                "reasons": [{
                    "code": "Info.NotReferencedByActivation",
                    "description": "Configuration “com.example.test:7c6d85989e823101” is not referenced by an activation.",
                    "details": {"Identifier": "com.example.test", "ServerToken": "7c6d85989e823101"},
                }],
            })]
        );
    }

    #[test]
    fn a_declaration_without_reasons_has_no_reasons_field() {
        let status = merged(&fixture("kmfddm/status.device-report.json"));
        let rows = declaration_status(&status, &Manifest::new([]), RECEIVED);
        let activation = rows
            .iter()
            .find(|row| row["ManifestType"] == "activations")
            .unwrap();
        assert_eq!(activation["valid"], "valid");
        assert!(activation.get("reasons").is_none());
        assert!(rows.iter().any(|row| row["valid"] == "invalid"));
    }

    #[test]
    fn status_errors_give_the_reported_entry_under_its_report_path() {
        let report = json!({"StatusItems": {"management": {"declarations": {"configurations": [{
            "identifier": "cfg", "active": false, "valid": "invalid", "server-token": "t1",
            "reasons": [{"code": "Error.ConfigurationCannotBeApplied", "description": "no"}]
        }]}}}, "Errors": [{"StatusItem": "passcode.is-compliant",
            "Reasons": [{"Code": "Error.NotSupported", "Description": "not here"}]}]});
        let status = merged(report.to_string().as_bytes());
        assert_eq!(
            status_errors(&status, RECEIVED),
            vec![
                json!({"path": ".StatusItems.management.declarations.configurations",
                    "error": {"identifier": "cfg", "active": false, "valid": "invalid", "server-token": "t1",
                        "reasons": [{"code": "Error.ConfigurationCannotBeApplied", "description": "no"}]},
                    "timestamp": RECEIVED}),
                json!({"path": ".Errors",
                    "error": {"StatusItem": "passcode.is-compliant",
                        "Reasons": [{"Code": "Error.NotSupported", "Description": "not here"}]},
                    "timestamp": RECEIVED}),
            ]
        );
    }

    #[test]
    fn an_applied_declaration_is_no_error() {
        let status = merged(&fixture("kmfddm/status.1st.json"));
        assert_eq!(status_errors(&status, RECEIVED), Vec::<Value>::new());
    }

    #[test]
    fn status_values_are_strings_one_row_per_array_element() {
        let report = json!({"StatusItems": {
            "device": {"operating-system": {"version": "14.4", "marketing-name": null},
                       "model": {"identifier": "iMac14,2"}},
            "management": {"client-capabilities": {"supported-versions": ["1.0.0", "2.0.0"]}},
            "passcode": {"is-compliant": true},
            "diskmanagement": {"filevault": {"enabled": false}, "capacity": 42}
        }});
        let status = merged(report.to_string().as_bytes());
        let rows: Vec<(String, String)> = status_values(&status, None, RECEIVED)
            .into_iter()
            .map(|row| {
                assert_eq!(row["timestamp"], RECEIVED);
                (
                    row["path"].as_str().unwrap().into(),
                    row["value"].as_str().unwrap().into(),
                )
            })
            .collect();
        let expected = [
            (".StatusItems.device.model.identifier", "iMac14,2"),
            (".StatusItems.device.operating-system.version", "14.4"),
            (".StatusItems.diskmanagement.capacity", "42"),
            (".StatusItems.diskmanagement.filevault.enabled", "false"),
            (
                ".StatusItems.management.client-capabilities.supported-versions",
                "1.0.0",
            ),
            (
                ".StatusItems.management.client-capabilities.supported-versions",
                "2.0.0",
            ),
            (".StatusItems.passcode.is-compliant", "true"),
        ];
        assert_eq!(
            rows,
            expected
                .iter()
                .map(|(p, v)| (p.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        );
        let device = PathPrefix::new(".StatusItems.device.%");
        let filtered = status_values(&status, Some(&device), RECEIVED);
        assert_eq!(filtered.len(), 2);
    }

    #[test]
    fn the_prefix_is_a_like_pattern_anchored_at_the_start() {
        let path = ".StatusItems.device.operating-system.version";
        for matching in [
            ".StatusItems.device.%",
            ".StatusItems.device",
            "%operating-system%",
            ".StatusItems._evice.%.version",
            path,
            "",
            "%",
        ] {
            assert!(PathPrefix::new(matching).matches(path), "{matching}");
        }
        for refusing in [
            ".StatusItems.management.%",
            "StatusItems",
            "%.build-version",
            ".StatusItems.device.operating-system.version.more",
            ".StatusItems\\%",
        ] {
            assert!(!PathPrefix::new(refusing).matches(path), "{refusing}");
        }
        assert!(PathPrefix::new("100\\%").matches("100%"));
    }
}
