//! The sync doctor (ddm-stall.md §5): pure rules over an enrollment's DDM timeline, its
//! merged status, the manifest it should hold, and enrollment facts. Each finding names
//! the rule, a severity, the evidence, and what to do.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::Serialize;
use serde_json::{json, Value};

use super::catalog::ManifestSnapshot;
use super::sync::{DdmState, SyncEvent, SyncEventKind};
use super::{
    check_references, Declaration, DeclarationStatus, EnrollmentStatus, ManifestItem, Severity,
    Validity,
};
use crate::store::EnrollmentRecord;

/// Every rule the doctor applies (the `rule` label values of the findings metrics).
pub const RULES: [&str; 9] = [
    "SD-S05", "SD-S07", "SD-T01", "SD-T02", "SD-P08", "SD-E02", "SD-E01", "SD-A01", "SD-E03",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FindingSeverity {
    Error,
    Warning,
    Info,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    pub rule: &'static str,
    pub severity: FindingSeverity,
    pub evidence: Value,
    pub fix: String,
}

/// What the doctor needs to know about the enrollment besides its DDM state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct EnrollmentFacts {
    pub enabled: bool,
    pub push_token_valid: bool,
    pub awaiting_configuration: bool,
}

impl EnrollmentFacts {
    /// The facts of a stored enrollment (an unknown one: not enabled, nothing to flag).
    pub fn of(record: Option<&EnrollmentRecord>) -> EnrollmentFacts {
        record
            .map(|r| EnrollmentFacts {
                enabled: r.enabled,
                push_token_valid: r.push_token_valid && r.push.is_some(),
                awaiting_configuration: r.awaiting_configuration,
            })
            .unwrap_or_default()
    }

    /// SD-A01's condition: push is expected but APNs refused the token.
    pub(super) fn push_token_broken(&self) -> bool {
        self.enabled && !self.push_token_valid
    }
}

/// Every rule, in a fixed order.
pub fn diagnose(
    state: &DdmState,
    manifest: &ManifestSnapshot,
    facts: &EnrollmentFacts,
    now: i64,
    stall_after_secs: i64,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    stalled_after_items(state, manifest, now, stall_after_secs, &mut findings);
    no_status_after_fetches(state, now, stall_after_secs, &mut findings);
    reported_token_differs(state, manifest, &mut findings);
    invalid_declarations(state, &mut findings);
    missing_references(manifest, &mut findings);
    unsupported_types(state, manifest, &mut findings);
    gating(state, facts, &mut findings);
    findings
}

/// SD-S05: `declaration-items` served, declarations to fetch, but no fetch since.
fn stalled_after_items(
    state: &DdmState,
    manifest: &ManifestSnapshot,
    now: i64,
    stall_after: i64,
    findings: &mut Vec<Finding>,
) {
    let Some((served_at, token)) = items_without_fetch(&state.timeline) else {
        return;
    };
    let expected: Vec<String> = items_not_held(manifest, &state.status)
        .map(|(item, _)| item.identifier.clone())
        .collect();
    if expected.is_empty() || now - served_at < stall_after {
        return;
    }
    findings.push(Finding {
        rule: "SD-S05",
        severity: FindingSeverity::Error,
        evidence: json!({
            "declaration_items_served_at": rfc3339(served_at),
            "declarations_token": token,
            "expected_fetches": expected,
            "seconds_since": now - served_at,
        }),
        fix: "The device read the manifest but fetched none of the declarations it lacks. Orchard's answers passed the response rules; check that the device is not in Setup Assistant or deferring (SD-E01), look for rejected requests in orchard_rejected_requests_total, then re-trigger a sync (POST /api/v1/ddm/notify?id=<enrollment>), which sends the tokens in the command's Data.".into(),
    });
}

/// When the last `declaration-items` was served and its DeclarationsToken, if no
/// declaration was fetched after it (SD-S05's clock).
pub(super) fn items_without_fetch(timeline: &VecDeque<SyncEvent>) -> Option<(i64, &str)> {
    let (position, served_at, token) =
        timeline
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, e)| match &e.kind {
                SyncEventKind::Items { token, .. } => Some((i, e.at, token.as_str())),
                _ => None,
            })?;
    let fetched_since = timeline
        .iter()
        .skip(position + 1)
        .any(|e| matches!(e.kind, SyncEventKind::Declaration { .. }));
    (!fetched_since).then_some((served_at, token))
}

/// The ServerToken an enrollment reports for a declaration: the merged status for one
/// device, the reduced facts for the fleet tally.
pub(super) trait ReportedTokens {
    fn reported_token(&self, identifier: &str) -> Option<&str>;
}

impl ReportedTokens for EnrollmentStatus {
    fn reported_token(&self, identifier: &str) -> Option<&str> {
        self.declarations
            .get(identifier)
            .map(|s| s.server_token.as_str())
    }
}

/// Manifest items the enrollment does not hold at their current ServerToken, each with
/// the token it reports (`None`: never reported).
pub(super) fn items_not_held<'a>(
    manifest: &'a ManifestSnapshot,
    reported: &'a impl ReportedTokens,
) -> impl Iterator<Item = (&'a ManifestItem, Option<&'a str>)> + 'a {
    manifest.manifest.items().iter().filter_map(|item| {
        let token = reported.reported_token(&item.identifier);
        (token != Some(item.server_token.as_str())).then_some((item, token))
    })
}

/// SD-S07: bodies fetched, no status report since.
fn no_status_after_fetches(
    state: &DdmState,
    now: i64,
    stall_after: i64,
    findings: &mut Vec<Finding>,
) {
    let Some(fetched_at) = fetch_without_status(&state.timeline) else {
        return;
    };
    if now - fetched_at < stall_after {
        return;
    }
    findings.push(Finding {
        rule: "SD-S07",
        severity: FindingSeverity::Warning,
        evidence: json!({ "last_fetch_at": rfc3339(fetched_at), "seconds_since": now - fetched_at }),
        fix: "The device fetched declarations but has not reported status. Check proxy body limits on the status check-in (413s at the edge) and re-trigger a sync.".into(),
    });
}

/// When the last declaration body was served, if no status report came at or after it
/// (SD-S07's clock).
pub(super) fn fetch_without_status(timeline: &VecDeque<SyncEvent>) -> Option<i64> {
    let fetch = timeline
        .iter()
        .rev()
        .find(|e| matches!(e.kind, SyncEventKind::Declaration { served: true, .. }))?;
    let reported_after = timeline.iter().any(|e| {
        e.at >= fetch.at
            && matches!(
                e.kind,
                SyncEventKind::Status { .. } | SyncEventKind::StatusUnparseable { .. }
            )
    });
    (!reported_after).then_some(fetch.at)
}

/// SD-T01: the device reports an older (or newer) ServerToken than the current one.
fn reported_token_differs(
    state: &DdmState,
    manifest: &ManifestSnapshot,
    findings: &mut Vec<Finding>,
) {
    let stale: Vec<Value> = items_not_held(manifest, &state.status)
        .filter_map(|(item, reported)| {
            reported.map(|reported| {
                json!({
                    "identifier": item.identifier,
                    "reported_server_token": reported,
                    "current_server_token": item.server_token,
                })
            })
        })
        .collect();
    if stale.is_empty() {
        return;
    }
    findings.push(Finding {
        rule: "SD-T01",
        severity: FindingSeverity::Warning,
        evidence: json!({ "declarations": stale }),
        fix: "The device has not applied the current revision of these declarations. If this lasts, re-trigger a sync; if a fetch failed, see SD-S05.".into(),
    });
}

/// SD-T02: the device rejected declarations.
fn invalid_declarations(state: &DdmState, findings: &mut Vec<Finding>) {
    let invalid: Vec<Value> = state
        .status
        .declarations
        .values()
        .filter(|d| is_rejected(d))
        .map(|d| {
            json!({
                "identifier": d.identifier,
                "server_token": d.server_token,
                "valid": d.valid,
                "reasons": d.reasons.iter().map(|r| json!({"code": r.code, "description": r.description, "details": r.details})).collect::<Vec<_>>(),
            })
        })
        .collect();
    if invalid.is_empty() {
        return;
    }
    findings.push(Finding {
        rule: "SD-T02",
        severity: FindingSeverity::Error,
        evidence: json!({ "declarations": invalid }),
        fix: "The device refused these declarations; the reason codes say why (Error.ConfigurationNotSupported: type or key not supported on this platform or enrollment; Error.MissingConfigurations / Error.MissingAssets: fix the references; Error.UnknownPayloadKeys: remove keys this OS does not know). Publish a corrected declaration.".into(),
    });
}

/// Whether the device refused the declaration (SD-T02).
pub(super) fn is_rejected(status: &DeclarationStatus) -> bool {
    status.valid == Validity::Invalid || status.reasons.iter().any(|r| r.code.starts_with("Error."))
}

/// SD-P08/SD-P09: references that do not resolve within the device's own manifest.
fn missing_references(manifest: &ManifestSnapshot, findings: &mut Vec<Finding>) {
    let problems = reference_problems(manifest);
    if problems.is_empty() {
        return;
    }
    findings.push(Finding {
        rule: "SD-P08",
        severity: FindingSeverity::Error,
        evidence: json!({ "problems": problems }),
        fix: "An activation or configuration references a declaration that is not in this enrollment's sets (or has the wrong category/asset type). Add the referenced declaration to one of the enrollment's sets, or fix the reference.".into(),
    });
}

/// The reference errors within a manifest (SD-P08's evidence).
pub(super) fn reference_problems(manifest: &ManifestSnapshot) -> Vec<Value> {
    let declarations: Vec<&Declaration> = manifest.declarations().map(|d| d.as_ref()).collect();
    check_references(&declarations)
        .into_iter()
        .filter(|issue| issue.severity == Severity::Error)
        .map(|issue| json!({ "rule": issue.rule, "path": issue.path, "message": issue.message }))
        .collect()
}

/// SD-E02: declaration types the device says it does not support.
fn unsupported_types(state: &DdmState, manifest: &ManifestSnapshot, findings: &mut Vec<Finding>) {
    let Some(supported) = state
        .status
        .client_capabilities
        .as_ref()
        .and_then(SupportedTypes::from_capabilities)
    else {
        return;
    };
    let unsupported = supported.unsupported_in(manifest);
    if unsupported.is_empty() {
        return;
    }
    findings.push(Finding {
        rule: "SD-E02",
        severity: FindingSeverity::Error,
        evidence: json!({ "unsupported": unsupported }),
        fix: "The device's client-capabilities do not list these declaration types (platform, OS version or enrollment type). Assign them only to devices that support them.".into(),
    });
}

/// The declaration types a device's client-capabilities list as supported, per status
/// category key (`activations`, `configurations`, ...). A category the device lists no
/// array for is not checked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SupportedTypes(BTreeMap<String, BTreeSet<String>>);

impl SupportedTypes {
    /// `None` when the capabilities carry no `supported-payloads/declarations`.
    pub fn from_capabilities(capabilities: &Value) -> Option<SupportedTypes> {
        let declarations = capabilities.pointer("/supported-payloads/declarations")?;
        let lists =
            declarations
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(category, types)| {
                    let types = types.as_array()?.iter().filter_map(Value::as_str);
                    Some((category.clone(), types.map(str::to_owned).collect()))
                });
        Some(SupportedTypes(lists.collect()))
    }

    /// Declarations of `manifest` whose type is missing from their category's list, with
    /// that type.
    pub fn unsupported_in(&self, manifest: &ManifestSnapshot) -> BTreeMap<String, String> {
        manifest
            .declarations()
            .filter(|declaration| {
                declaration.category().is_some_and(|category| {
                    self.0
                        .get(category.status_key())
                        .is_some_and(|types| !types.contains(&declaration.declaration_type))
                })
            })
            .map(|d| (d.identifier.clone(), d.declaration_type.clone()))
            .collect()
    }
}

/// SD-E01, SD-A01, SD-E03: the enrollment itself prevents or delays syncing.
fn gating(state: &DdmState, facts: &EnrollmentFacts, findings: &mut Vec<Finding>) {
    if facts.awaiting_configuration {
        findings.push(Finding {
            rule: "SD-E01",
            severity: FindingSeverity::Warning,
            evidence: json!({ "awaiting_configuration": true }),
            fix: "The device is waiting in Setup Assistant and may not process declarations until released: send DeviceConfigured when its setup commands are done.".into(),
        });
    }
    if facts.push_token_broken() {
        findings.push(Finding {
            rule: "SD-A01",
            severity: FindingSeverity::Error,
            evidence: json!({ "push_token_valid": false }),
            fix: "APNs reported the device's push token invalid, so no sync can start. The device must check in with a new TokenUpdate (re-enroll it if it never does).".into(),
        });
    }
    if state.status.client_capabilities.is_none() {
        findings.push(Finding {
            rule: "SD-E03",
            severity: FindingSeverity::Info,
            evidence: json!({ "client_capabilities": null }),
            fix: "No status report with client-capabilities yet: expect one after the first sync."
                .into(),
        });
    }
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ddm::sync::ServedItem;
    use crate::ddm::StatusReport;

    fn declaration(json: serde_json::Value) -> Arc<Declaration> {
        Arc::new(
            Declaration::from_api_json(json.to_string().as_bytes(), 0)
                .unwrap()
                .0,
        )
    }

    fn config() -> Arc<Declaration> {
        declaration(
            json!({"Type": "com.apple.configuration.management.test", "Identifier": "cfg", "Payload": {"Echo": "x"}}),
        )
    }

    fn activation(target: &str) -> Arc<Declaration> {
        declaration(
            json!({"Type": "com.apple.activation.simple", "Identifier": "act", "Payload": {"StandardConfigurations": [target]}}),
        )
    }

    fn healthy() -> EnrollmentFacts {
        EnrollmentFacts {
            enabled: true,
            push_token_valid: true,
            awaiting_configuration: false,
        }
    }

    fn rules(findings: &[Finding]) -> Vec<&'static str> {
        findings.iter().map(|f| f.rule).collect()
    }

    /// A state whose device reported every declaration of `manifest` active and current.
    fn converged(manifest: &ManifestSnapshot) -> DdmState {
        let mut state = DdmState::default();
        let items: Vec<serde_json::Value> = manifest.manifest.items().iter().map(|i| json!({
            "identifier": i.identifier, "server-token": i.server_token, "active": true, "valid": "valid"
        })).collect();
        let report = json!({"StatusItems": {"management": {
            "declarations": {"activations": items.iter().filter(|i| i["identifier"] == "act").collect::<Vec<_>>(),
                             "configurations": items.iter().filter(|i| i["identifier"] == "cfg").collect::<Vec<_>>(),
                             "assets": [], "management": []},
            "client-capabilities": {"supported-payloads": {"declarations": {
                "activations": ["com.apple.activation.simple"],
                "configurations": ["com.apple.configuration.management.test"], "assets": [], "management": []}}}
        }}, "Errors": []});
        let raw = report.to_string();
        state.ingest(&StatusReport::parse(raw.as_bytes()).unwrap(), 0);
        state
    }

    fn items_served(state: &mut DdmState, manifest: &ManifestSnapshot, at: i64) {
        state.record(
            at,
            SyncEventKind::Items {
                token: manifest.manifest.declarations_token().into(),
                items: vec![ServedItem {
                    category: "configuration".into(),
                    identifier: "cfg".into(),
                    server_token: "t".into(),
                }],
            },
        );
    }

    #[test]
    fn a_converged_enrollment_has_no_findings() {
        let manifest = ManifestSnapshot::from_declarations(vec![config(), activation("cfg")]);
        let state = converged(&manifest);
        assert!(diagnose(&state, &manifest, &healthy(), 1000, 120).is_empty());
    }

    #[test]
    fn items_served_without_fetches_past_the_deadline_is_a_stall() {
        let manifest = ManifestSnapshot::from_declarations(vec![config(), activation("cfg")]);
        let mut state = DdmState::default();
        items_served(&mut state, &manifest, 100);
        assert!(
            !rules(&diagnose(&state, &manifest, &healthy(), 150, 120)).contains(&"SD-S05"),
            "not yet"
        );
        let findings = diagnose(&state, &manifest, &healthy(), 300, 120);
        let stall = findings.iter().find(|f| f.rule == "SD-S05").unwrap();
        assert_eq!(stall.severity, FindingSeverity::Error);
        assert_eq!(
            stall.evidence["expected_fetches"].as_array().unwrap().len(),
            2
        );
    }

    #[test]
    fn fetches_without_a_status_report_are_flagged() {
        let manifest = ManifestSnapshot::from_declarations(vec![config(), activation("cfg")]);
        let mut state = DdmState::default();
        items_served(&mut state, &manifest, 100);
        state.record(
            101,
            SyncEventKind::Declaration {
                category: "configuration".into(),
                identifier: "cfg".into(),
                served: true,
            },
        );
        let found = rules(&diagnose(&state, &manifest, &healthy(), 400, 120));
        assert!(
            found.contains(&"SD-S07") && !found.contains(&"SD-S05"),
            "{found:?}"
        );
    }

    #[test]
    fn a_reported_server_token_that_is_not_current_is_flagged() {
        let old = ManifestSnapshot::from_declarations(vec![config(), activation("cfg")]);
        let state = converged(&old);
        let changed = declaration(
            json!({"Type": "com.apple.configuration.management.test", "Identifier": "cfg", "Payload": {"Echo": "new"}}),
        );
        let current = ManifestSnapshot::from_declarations(vec![changed, activation("cfg")]);
        let findings = diagnose(&state, &current, &healthy(), 1000, 120);
        let stale = findings.iter().find(|f| f.rule == "SD-T01").unwrap();
        assert_eq!(stale.evidence["declarations"][0]["identifier"], "cfg");
    }

    #[test]
    fn a_declaration_the_device_rejected_is_an_error_with_its_reasons() {
        let manifest = ManifestSnapshot::from_declarations(vec![config()]);
        let mut state = DdmState::default();
        let report = json!({"StatusItems": {"management": {"declarations": {"activations": [], "assets": [], "management": [],
            "configurations": [{"identifier": "cfg", "server-token": "t", "active": false, "valid": "invalid",
                "reasons": [{"code": "Error.ConfigurationCannotBeApplied"}]}]}}}, "Errors": []}).to_string();
        state.ingest(&StatusReport::parse(report.as_bytes()).unwrap(), 0);
        let findings = diagnose(&state, &manifest, &healthy(), 10, 120);
        let invalid = findings.iter().find(|f| f.rule == "SD-T02").unwrap();
        assert!(invalid
            .evidence
            .to_string()
            .contains("Error.ConfigurationCannotBeApplied"));
    }

    #[test]
    fn an_activation_referencing_a_configuration_outside_the_manifest_is_flagged() {
        let manifest = ManifestSnapshot::from_declarations(vec![activation("cfg")]);
        let state = DdmState::default();
        assert!(rules(&diagnose(&state, &manifest, &healthy(), 10, 120)).contains(&"SD-P08"));
    }

    #[test]
    fn a_type_missing_from_client_capabilities_is_unsupported() {
        let passcode = declaration(
            json!({"Type": "com.apple.configuration.passcode.settings", "Identifier": "pc", "Payload": {}}),
        );
        let manifest =
            ManifestSnapshot::from_declarations(vec![config(), activation("cfg"), passcode]);
        let state = converged(&ManifestSnapshot::from_declarations(vec![
            config(),
            activation("cfg"),
        ]));
        let findings = diagnose(&state, &manifest, &healthy(), 10, 120);
        let unsupported = findings.iter().find(|f| f.rule == "SD-E02").unwrap();
        assert_eq!(
            unsupported.evidence["unsupported"]["pc"],
            "com.apple.configuration.passcode.settings"
        );
    }

    #[test]
    fn enrollment_gates_are_reported() {
        let manifest = ManifestSnapshot::from_declarations(vec![]);
        let state = DdmState::default();
        let facts = EnrollmentFacts {
            enabled: true,
            push_token_valid: false,
            awaiting_configuration: true,
        };
        let found = rules(&diagnose(&state, &manifest, &facts, 10, 120));
        assert_eq!(found, ["SD-E01", "SD-A01", "SD-E03"]);
    }
}
