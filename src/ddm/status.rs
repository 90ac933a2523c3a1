//! Status reports (`declarative/protocol/statusreport.yaml`) and the state
//! merged from them per enrollment.
//!
//! Devices send undocumented items and OS releases add new ones, so parsing
//! is tolerant: only a body that is not a JSON object (or whose `StatusItems`
//! is not one) is refused; unknown items are kept as values, and malformed
//! entries fall back to defaults or are skipped rather than failing the report.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::declaration::{type_name, Category};
use super::{json_text, DdmError};

/// Status item holding the per-declaration states.
const DECLARATIONS_ITEM: &str = "management.declarations";
/// Status item holding what the device's DDM client supports.
const CLIENT_CAPABILITIES_ITEM: &str = "management.client-capabilities";

/// The device's verdict on a declaration's content. It serialises as Apple's status
/// schema spells it (`valid`, `invalid`, `unknown`), the words scripts written for
/// KMFDDM compare; the capitalised aliases read DDM states stored before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Validity {
    #[serde(alias = "Valid")]
    Valid,
    #[serde(alias = "Invalid")]
    Invalid,
    /// Reported as `unknown`, or a value this snapshot does not know.
    #[serde(alias = "Unknown")]
    Unknown,
}

impl Validity {
    fn parse(text: &str) -> Validity {
        match text {
            "valid" => Validity::Valid,
            "invalid" => Validity::Invalid,
            _ => Validity::Unknown,
        }
    }

    /// The value of `valid` in a status report.
    pub fn as_str(self) -> &'static str {
        match self {
            Validity::Valid => "valid",
            Validity::Invalid => "invalid",
            Validity::Unknown => "unknown",
        }
    }
}

/// Why a declaration or status item is in its state (`Error.…`, `Info.…`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    pub code: String,
    pub description: Option<String>,
    #[serde(with = "json_text::option")]
    pub details: Option<Value>,
}

/// One entry of `management.declarations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeclarationStatus {
    pub category: Category,
    pub identifier: String,
    pub active: bool,
    pub valid: Validity,
    pub server_token: String,
    pub reasons: Vec<Reason>,
}

impl DeclarationStatus {
    /// Whether the device has applied the revision `current_server_token`:
    /// same token, valid, and active — except management declarations, which
    /// are never activated and count once valid.
    pub fn is_applied(&self, current_server_token: &str) -> bool {
        self.server_token == current_server_token
            && self.valid == Validity::Valid
            && (self.active || self.category == Category::Management)
    }
}

/// One entry of the top-level `Errors` array: a status item the device
/// could not report (typically an unsupported subscription).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusError {
    pub status_item: String,
    pub reasons: Vec<Reason>,
}

/// One parsed status report.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StatusReport {
    /// `FullReport: true`: a complete snapshot that replaces stored state.
    pub full_report: bool,
    /// The `management.declarations` section, `None` when the report has
    /// none. When present it lists every declaration the device holds.
    pub declarations: Option<Vec<DeclarationStatus>>,
    pub errors: Vec<StatusError>,
    /// Every other status item, flattened to dotted paths
    /// (`device.operating-system.version`) down to scalars, arrays or empty
    /// objects. `management.client-capabilities` is kept whole in
    /// `client_capabilities` instead, since it is always replaced as a unit.
    pub values: Vec<(String, Value)>,
    pub client_capabilities: Option<Value>,
}

impl StatusReport {
    /// Parses the JSON a device sends as the `Data` of a `status` check-in.
    pub fn parse(json: &[u8]) -> Result<StatusReport, DdmError> {
        let document: Value = serde_json::from_slice(json)
            .map_err(|error| DdmError::MalformedStatusReport(format!("not valid JSON: {error}")))?;
        let Value::Object(mut top) = document else {
            return Err(DdmError::MalformedStatusReport(format!(
                "expected a JSON object, found {}",
                type_name(&document)
            )));
        };
        let mut report = StatusReport {
            full_report: top.get("FullReport") == Some(&Value::Bool(true)),
            errors: match top.get("Errors") {
                Some(Value::Array(entries)) => entries.iter().filter_map(status_error).collect(),
                _ => Vec::new(),
            },
            ..StatusReport::default()
        };
        match top.remove("StatusItems") {
            None => {}
            Some(Value::Object(items)) => report.read_items(items, ""),
            Some(other) => {
                return Err(DdmError::MalformedStatusReport(format!(
                    "StatusItems must be an object, found {}",
                    type_name(&other)
                )))
            }
        }
        Ok(report)
    }

    /// Sorts the members of a (nested) status-item object into declarations,
    /// client capabilities and flattened values.
    fn read_items(&mut self, items: Map<String, Value>, prefix: &str) {
        for (name, value) in items {
            let item_path = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}.{name}")
            };
            match (item_path.as_str(), value) {
                (DECLARATIONS_ITEM, Value::Object(sections)) => {
                    self.declarations = Some(self.read_declarations(sections));
                }
                (CLIENT_CAPABILITIES_ITEM, capabilities) => {
                    self.client_capabilities = Some(capabilities);
                }
                (_, Value::Object(nested)) if !nested.is_empty() => {
                    self.read_items(nested, &item_path);
                }
                (_, leaf) => self.values.push((item_path, leaf)),
            }
        }
    }

    /// Reads the per-category arrays; a key that is not a category is kept as a value.
    fn read_declarations(&mut self, sections: Map<String, Value>) -> Vec<DeclarationStatus> {
        let mut declarations = Vec::new();
        for (key, section) in sections {
            match (Category::from_status_key(&key), section) {
                (Some(category), Value::Array(entries)) => declarations.extend(
                    entries
                        .iter()
                        .filter_map(|entry| declaration_status(category, entry)),
                ),
                (_, other) => self
                    .values
                    .push((format!("{DECLARATIONS_ITEM}.{key}"), other)),
            }
        }
        declarations
    }
}

/// One declaration entry; skipped when it has no `identifier` to key it by.
fn declaration_status(category: Category, entry: &Value) -> Option<DeclarationStatus> {
    let identifier = entry.get("identifier")?.as_str()?.to_owned();
    Some(DeclarationStatus {
        category,
        identifier,
        active: entry
            .get("active")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        valid: entry
            .get("valid")
            .and_then(Value::as_str)
            .map_or(Validity::Unknown, Validity::parse),
        server_token: string_member(entry, "server-token").unwrap_or_default(),
        reasons: reasons(entry.get("reasons")),
    })
}

fn status_error(entry: &Value) -> Option<StatusError> {
    Some(StatusError {
        status_item: string_member(entry, "StatusItem")?,
        reasons: reasons(entry.get("Reasons")),
    })
}

/// Reasons are lowercase inside `management.declarations` and capitalised
/// in `Errors`; both spellings are read everywhere.
fn reasons(list: Option<&Value>) -> Vec<Reason> {
    let Some(Value::Array(entries)) = list else {
        return Vec::new();
    };
    entries
        .iter()
        .filter(|entry| entry.is_object())
        .map(|entry| Reason {
            code: string_member(entry, "code")
                .or_else(|| string_member(entry, "Code"))
                .unwrap_or_default(),
            description: string_member(entry, "description")
                .or_else(|| string_member(entry, "Description")),
            details: entry
                .get("details")
                .or_else(|| entry.get("Details"))
                .cloned(),
        })
        .collect()
}

fn string_member(object: &Value, key: &str) -> Option<String> {
    object.get(key)?.as_str().map(str::to_owned)
}

/// Everything known about one enrollment's DDM state, merged from its
/// status reports; stored per enrollment (postcard-compatible).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EnrollmentStatus {
    /// The last reported state of each declaration, by Identifier.
    pub declarations: BTreeMap<String, DeclarationStatus>,
    /// Status items the device could not report, at most one entry per item.
    pub errors: Vec<StatusError>,
    /// Status values by dotted path.
    #[serde(with = "json_text::map")]
    pub values: BTreeMap<String, Value>,
    /// The last `management.client-capabilities` received; it outlives full
    /// reports because devices send it only at first and after OS updates.
    #[serde(with = "json_text::option")]
    pub client_capabilities: Option<Value>,
    /// UNIX seconds of the last report applied.
    pub last_report_at: Option<i64>,
}

impl EnrollmentStatus {
    /// Merges a report received at `received_at` (UNIX seconds).
    ///
    /// A full report replaces declarations, values and errors. Otherwise a
    /// declarations section (always the device's complete list) replaces the
    /// previous one, values are merged by path, and errors by status item.
    pub fn apply(&mut self, report: &StatusReport, received_at: i64) {
        if report.full_report {
            self.declarations.clear();
            self.values.clear();
            self.errors.clear();
        }
        if let Some(declarations) = &report.declarations {
            self.declarations = declarations
                .iter()
                .map(|status| (status.identifier.clone(), status.clone()))
                .collect();
        }
        for (value_path, value) in &report.values {
            self.set_value(value_path, value.clone());
        }
        for error in &report.errors {
            self.errors
                .retain(|known| known.status_item != error.status_item);
            self.errors.push(error.clone());
        }
        if let Some(capabilities) = &report.client_capabilities {
            self.client_capabilities = Some(capabilities.clone());
        }
        self.last_report_at = Some(received_at);
    }

    /// Stores one value, dropping what it supersedes: values stored below it
    /// or above it (the item changed shape) and errors for its status item
    /// (the device can report it now).
    fn set_value(&mut self, value_path: &str, value: Value) {
        let below = format!("{value_path}.");
        let superseded: Vec<String> = self
            .values
            .range(below.clone()..)
            .take_while(|(stored, _)| stored.starts_with(&below))
            .map(|(stored, _)| stored.clone())
            .collect();
        for stored in superseded {
            self.values.remove(&stored);
        }
        for (position, _) in value_path.match_indices('.') {
            self.values.remove(&value_path[..position]);
        }
        self.errors
            .retain(|error| !is_within(value_path, &error.status_item));
        self.values.insert(value_path.to_owned(), value);
    }
}

/// Whether `value_path` is the status item `item` or lies below it.
fn is_within(value_path: &str, item: &str) -> bool {
    value_path
        .strip_prefix(item)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(path).unwrap()
    }

    fn report(name: &str) -> StatusReport {
        StatusReport::parse(&fixture(name)).unwrap()
    }

    fn value<'r>(report: &'r StatusReport, wanted: &str) -> Option<&'r Value> {
        report
            .values
            .iter()
            .find(|(item_path, _)| item_path == wanted)
            .map(|(_, value)| value)
    }

    fn parse(value: Value) -> StatusReport {
        StatusReport::parse(value.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn a_first_report_carries_device_facts_and_client_capabilities() {
        let first = report("kmfddm/status.1st.json");
        assert!(!first.full_report);
        assert_eq!(first.declarations, Some(Vec::new()));
        assert!(first.errors.is_empty());
        assert_eq!(
            value(&first, "device.operating-system.version"),
            Some(&json!("13.3.1"))
        );
        assert_eq!(
            value(&first, "device.operating-system.supplemental.extra-version"),
            Some(&json!("(a)"))
        );
        assert_eq!(
            value(&first, "device.identifier.serial-number"),
            Some(&json!("ZRMXJQTTFX"))
        );
        let capabilities = first.client_capabilities.as_ref().unwrap();
        assert_eq!(capabilities["supported-versions"], json!(["1.0.0"]));
        assert!(first
            .values
            .iter()
            .all(|(item_path, _)| !item_path.starts_with("management.")));
    }

    #[test]
    fn a_declaration_report_carries_state_and_reasons() {
        let report = report("kmfddm/status.D0.error.json");
        let declarations = report.declarations.unwrap();
        assert_eq!(declarations.len(), 1);
        let test = &declarations[0];
        assert_eq!(test.category, Category::Configuration);
        assert_eq!(test.identifier, "com.example.test");
        assert_eq!(test.server_token, "7c6d85989e823101");
        assert!(!test.active);
        assert_eq!(test.valid, Validity::Unknown);
        assert_eq!(test.reasons.len(), 1);
        let reason = &test.reasons[0];
        assert_eq!(reason.code, "Info.NotReferencedByActivation");
        assert!(reason
            .description
            .as_deref()
            .unwrap()
            .contains("not referenced"));
        assert_eq!(
            reason.details,
            Some(json!({"Identifier": "com.example.test", "ServerToken": "7c6d85989e823101"}))
        );
        assert!(report.values.is_empty());
    }

    #[test]
    fn a_device_report_keeps_every_category_and_undocumented_items() {
        let report = report("kmfddm/status.device-report.json");
        let declarations = report.declarations.as_ref().unwrap();
        let count = |category| {
            declarations
                .iter()
                .filter(|status| status.category == category)
                .count()
        };
        assert_eq!(
            Category::ALL.map(count),
            [1, 3, 0, 1],
            "activations, configurations, assets, management"
        );
        let failed: Vec<&str> = declarations
            .iter()
            .filter(|status| status.valid == Validity::Invalid)
            .map(|status| status.reasons[0].code.as_str())
            .collect();
        assert_eq!(failed, ["Error.ConfigurationCannotBeApplied"; 2]);
        assert_eq!(
            value(&report, "management.push-token"),
            Some(&json!("bwyw7bcwAI7jmDvkYswfcQ6sHhkZIO+ss0hvLsNLJmg="))
        );
        assert_eq!(
            value(&report, "device.model.marketing-name"),
            Some(&json!("iPhone 8 Plus"))
        );
    }

    #[test]
    fn the_recorded_nanohub_status_report_parses() {
        let report = report("nanohub-transcripts/30-ddm-status-report.Data-decoded.json");
        let declarations = report.declarations.as_ref().unwrap();
        assert_eq!(declarations.len(), 2);
        assert!(declarations
            .iter()
            .all(|status| status.active && status.valid == Validity::Valid));
        assert_eq!(
            value(&report, "device.model.identifier"),
            Some(&json!("iMac14,2"))
        );
    }

    #[test]
    fn reports_merge_in_arrival_order() {
        let mut status = EnrollmentStatus::default();
        status.apply(&report("kmfddm/status.1st.json"), 100);
        status.apply(&report("kmfddm/status.D0.error.json"), 200);
        assert_eq!(
            status.declarations.keys().collect::<Vec<_>>(),
            ["com.example.test"]
        );
        assert_eq!(status.values["device.operating-system.version"], "13.3.1");

        status.apply(&report("kmfddm/status.device-report.json"), 300);
        // The declarations section is the device's whole list: the old entry is gone.
        assert_eq!(status.declarations.len(), 5);
        assert!(!status.declarations.contains_key("com.example.test"));
        // Values merge by path: updated ones change, others stay.
        assert_eq!(status.values["device.operating-system.version"], "16.0");
        assert_eq!(
            status.values["device.identifier.udid"],
            "0000FE00-5FADE97DCBBBEDA5"
        );
        let capabilities = status.client_capabilities.as_ref().unwrap();
        assert!(capabilities["supported-payloads"]["status-items"]
            .as_array()
            .unwrap()
            .contains(&json!("mdm.app")));
        assert_eq!(status.last_report_at, Some(300));
    }

    #[test]
    fn an_incremental_report_without_declarations_keeps_them() {
        let mut status = EnrollmentStatus::default();
        status.apply(&report("kmfddm/status.device-report.json"), 1);
        let only_value = parse(json!({
            "StatusItems": {"passcode": {"is-present": true}},
            "Errors": []
        }));
        assert_eq!(only_value.declarations, None);
        status.apply(&only_value, 2);
        assert_eq!(status.declarations.len(), 5);
        assert_eq!(status.values["passcode.is-present"], true);
        assert!(status.values.contains_key("device.model.family"));
    }

    #[test]
    fn a_full_report_replaces_what_was_stored() {
        let mut status = EnrollmentStatus::default();
        status.apply(&report("kmfddm/status.device-report.json"), 1);
        let full = parse(json!({
            "FullReport": true,
            "StatusItems": {"device": {"operating-system": {"version": "17.0"}}},
            "Errors": []
        }));
        assert!(full.full_report);
        status.apply(&full, 2);
        assert!(status.declarations.is_empty());
        assert_eq!(
            status.values.keys().collect::<Vec<_>>(),
            ["device.operating-system.version"]
        );
        assert!(status.client_capabilities.is_some());
    }

    #[test]
    fn top_level_errors_use_capitalised_keys_and_clear_once_the_item_reports() {
        let failing = parse(json!({
            "StatusItems": {},
            "Errors": [{
                "StatusItem": "softwareupdate.pending-version",
                "Reasons": [{"Code": "Error.NotSupported", "Description": "nope", "Details": {"x": 1}}]
            }]
        }));
        assert_eq!(
            failing.errors,
            [StatusError {
                status_item: "softwareupdate.pending-version".into(),
                reasons: vec![Reason {
                    code: "Error.NotSupported".into(),
                    description: Some("nope".into()),
                    details: Some(json!({"x": 1})),
                }],
            }]
        );
        let mut status = EnrollmentStatus::default();
        status.apply(&failing, 1);
        status.apply(&failing, 2);
        assert_eq!(status.errors.len(), 1, "one entry per status item");

        let reporting = parse(json!({
            "StatusItems": {"softwareupdate": {"pending-version": {"os-version": "18.1"}}},
            "Errors": []
        }));
        status.apply(&reporting, 3);
        assert!(status.errors.is_empty());
        assert_eq!(
            status.values["softwareupdate.pending-version.os-version"],
            "18.1"
        );
    }

    #[test]
    fn a_value_that_changes_shape_replaces_the_old_one() {
        let mut status = EnrollmentStatus::default();
        status.apply(
            &parse(json!({"StatusItems": {"test": {"dictionary-value": {"a": 1, "b": 2}}}})),
            1,
        );
        status.apply(
            &parse(json!({"StatusItems": {"test": {"dictionary-value": [1]}}})),
            2,
        );
        assert_eq!(
            status.values.keys().collect::<Vec<_>>(),
            ["test.dictionary-value"]
        );
        status.apply(
            &parse(json!({"StatusItems": {"test": {"dictionary-value": {"c": 3}}}})),
            3,
        );
        assert_eq!(
            status.values.keys().collect::<Vec<_>>(),
            ["test.dictionary-value.c"]
        );
    }

    #[test]
    fn parsing_is_tolerant_of_everything_but_a_non_object() {
        let odd = parse(json!({
            "StatusItems": {
                "management": {"declarations": {
                    "configurations": [{"server-token": "no identifier"}, {"identifier": "x", "valid": "maybe", "reasons": [3]}],
                    "gadgets": [{"identifier": "y"}]
                }},
                "empty": {}
            },
            "Errors": "not an array",
            "Surprise": 1
        }));
        let declarations = odd.declarations.as_ref().unwrap();
        assert_eq!(declarations.len(), 1);
        assert_eq!(declarations[0].valid, Validity::Unknown);
        assert!(declarations[0].reasons.is_empty());
        assert_eq!(
            value(&odd, "management.declarations.gadgets"),
            Some(&json!([{"identifier": "y"}]))
        );
        assert_eq!(value(&odd, "empty"), Some(&json!({})));
        assert!(odd.errors.is_empty());

        assert!(StatusReport::parse(br#"{"Errors":[]}"#).is_ok());
        for refused in [&b"[]"[..], b"not json", br#"{"StatusItems":[1]}"#] {
            assert!(matches!(
                StatusReport::parse(refused),
                Err(DdmError::MalformedStatusReport(_))
            ));
        }
    }

    #[test]
    fn a_declaration_is_applied_when_its_current_revision_is_active_and_valid() {
        let report = report("kmfddm/status.device-report.json");
        let declarations = report.declarations.unwrap();
        let by_id = |identifier: &str| {
            declarations
                .iter()
                .find(|status| status.identifier == identifier)
                .unwrap()
        };
        let activation = by_id("49F6F16A-70EB-4A89-B092-465FAEC5E550");
        assert!(activation.is_applied("8f700d70-f2d6-5b02-926d-ff36b5e47260"));
        assert!(!activation.is_applied("a-newer-token"));
        let failed = by_id("0FCD2F56-D5BC-48EA-B98D-E0CCC0C6F9E0");
        assert!(!failed.is_applied("2c8e5ce2-f7ba-5381-bce0-7d9c60f8c092"));
        let management = by_id("AF0E633E-7ADB-4B2A-A48C-1B20AA271D08");
        assert!(management.is_applied("456fc8c6-85e9-52e9-b93d-eed694a4f487"));
    }

    #[test]
    fn merged_state_round_trips_through_postcard_and_json() {
        let mut status = EnrollmentStatus::default();
        status.apply(&report("kmfddm/status.1st.json"), 1);
        status.apply(&report("kmfddm/status.device-report.json"), 2);
        let bytes = postcard::to_stdvec(&status).unwrap();
        let decoded: EnrollmentStatus = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, status);
        let text = serde_json::to_string(&status).unwrap();
        assert_eq!(
            serde_json::from_str::<EnrollmentStatus>(&text).unwrap(),
            status
        );
    }
}
