//! Rules across the declarations one enrollment receives (SD-P08…P13): what
//! the device itself would report as `Error.MissingConfigurations`,
//! `Error.MissingAssets` or `Info.NotReferenced…`, caught before publishing.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::declaration::{Category, Declaration, Issue};
use super::path;
use crate::schema::{self, Apply, KeySchema};

/// Checks the references between `declarations` (the union an enrollment or
/// a set will receive). Paths name the declaration first, e.g.
/// `com.example.act: $.Payload.StandardConfigurations[1]`.
pub fn check_references(declarations: &[&Declaration]) -> Vec<Issue> {
    let mut issues = Vec::new();
    let index = distinct_identifiers(declarations, &mut issues);
    let mut referenced = BTreeSet::new();
    for declaration in index.values() {
        match declaration.category() {
            Some(Category::Activation) => {
                check_activation(declaration, &index, &mut referenced, &mut issues)
            }
            Some(_) => check_asset_references(declaration, &index, &mut referenced, &mut issues),
            None => {}
        }
    }
    report_unreferenced(&index, &referenced, &mut issues);
    report_repeated_single_types(&index, &mut issues);
    issues
}

/// SD-P12: one Identifier, one declaration. Copies of the same revision
/// (reached through several sets) are fine; different content is not, since
/// the device addresses declarations by Identifier alone.
fn distinct_identifiers<'a>(
    declarations: &[&'a Declaration],
    issues: &mut Vec<Issue>,
) -> BTreeMap<&'a str, &'a Declaration> {
    let mut groups: BTreeMap<&str, Vec<&Declaration>> = BTreeMap::new();
    for declaration in declarations {
        groups
            .entry(&declaration.identifier)
            .or_default()
            .push(declaration);
    }
    let mut index = BTreeMap::new();
    for (identifier, mut group) in groups {
        group.sort_by(|left, right| left.server_token.cmp(&right.server_token));
        group.dedup_by(|later, earlier| later.server_token == earlier.server_token);
        if group.len() > 1 {
            let types: Vec<&str> = group
                .iter()
                .map(|declaration| declaration.declaration_type.as_str())
                .collect();
            issues.push(Issue::error(
                located(identifier, "$.Identifier"),
                format!(
                    "{} different declarations share this Identifier ({})",
                    group.len(),
                    types.join(", ")
                ),
                "SD-P12",
            ));
        }
        index.insert(identifier, group[0]);
    }
    index
}

/// SD-P08/SD-P11: every identifier an activation lists names a configuration
/// in the same set. Any payload key ending in `Configurations` that holds an
/// array counts as such a list, so newer activation types are covered too.
fn check_activation<'a>(
    activation: &Declaration,
    index: &BTreeMap<&'a str, &'a Declaration>,
    referenced: &mut BTreeSet<&'a str>,
    issues: &mut Vec<Issue>,
) {
    for (key, value) in &activation.payload {
        let Value::Array(entries) = value else {
            continue;
        };
        if !key.ends_with("Configurations") {
            continue;
        }
        let key_path = path::member("$.Payload", key);
        for (position, entry) in entries.iter().enumerate() {
            let Value::String(target) = entry else {
                continue;
            };
            let location = located(&activation.identifier, &path::index(&key_path, position));
            match index.get_key_value(target.as_str()) {
                None => issues.push(Issue::error(
                    location,
                    format!("no declaration {target:?} in this set (the device reports Error.MissingConfigurations)"),
                    "SD-P08",
                )),
                Some((_, found)) => match found.category() {
                    Some(Category::Configuration) => {
                        referenced.insert(found.identifier.as_str());
                    }
                    Some(Category::Management) => issues.push(Issue::error(
                        location,
                        format!("{target:?} is a management declaration; those take effect on their own and are never activated"),
                        "SD-P11",
                    )),
                    other => issues.push(Issue::error(
                        location,
                        format!(
                            "{target:?} is {}, not a configuration",
                            describe_category(other)
                        ),
                        "SD-P08",
                    )),
                },
            }
        }
    }
}

/// One asset Identifier found in a payload, with the asset types its key allows
/// (empty when the schema does not say).
struct AssetReference<'s> {
    path: String,
    identifier: String,
    allowed_types: &'s [String],
}

/// SD-P09: every asset reference names an asset in the same set, of a type
/// the referencing key allows.
fn check_asset_references<'a>(
    declaration: &Declaration,
    index: &BTreeMap<&'a str, &'a Declaration>,
    referenced: &mut BTreeSet<&'a str>,
    issues: &mut Vec<Issue>,
) {
    let keys = schema::declaration(&declaration.declaration_type)
        .map_or(&[][..], |schema| schema.keys.as_slice());
    let mut references = Vec::new();
    collect_in_object(&declaration.payload, keys, "$.Payload", &mut references);
    for reference in references {
        let location = located(&declaration.identifier, &reference.path);
        let target = reference.identifier.as_str();
        let Some((_, asset)) = index.get_key_value(target) else {
            issues.push(Issue::error(
                location,
                format!("no asset {target:?} in this set (the device reports Error.MissingAssets)"),
                "SD-P09",
            ));
            continue;
        };
        if asset.category() != Some(Category::Asset) {
            issues.push(Issue::error(
                location,
                format!(
                    "{target:?} is {}, not an asset",
                    describe_category(asset.category())
                ),
                "SD-P09",
            ));
            continue;
        }
        referenced.insert(asset.identifier.as_str());
        let allowed = &reference.allowed_types;
        if !allowed.is_empty() && !allowed.contains(&asset.declaration_type) {
            issues.push(Issue::error(
                location,
                format!(
                    "asset {target:?} is a {}; this key takes {}",
                    asset.declaration_type,
                    allowed.join(" or ")
                ),
                "SD-P09",
            ));
        }
    }
}

/// Walks an object described by `keys` (possibly nothing) for asset references.
fn collect_in_object<'s>(
    object: &Map<String, Value>,
    keys: &'s [KeySchema],
    parent: &str,
    out: &mut Vec<AssetReference<'s>>,
) {
    for (name, member) in object {
        let key = find_key(keys, name);
        let member_path = path::member(parent, name);
        if is_asset_reference(name, key) {
            let allowed_types = key.map_or(&[][..], |key| key.assettypes.as_slice());
            collect_reference(member, allowed_types, member_path, out);
        } else {
            collect_in_value(member, key, &member_path, out);
        }
    }
}

fn collect_in_value<'s>(
    value: &Value,
    key: Option<&'s KeySchema>,
    value_path: &str,
    out: &mut Vec<AssetReference<'s>>,
) {
    match value {
        Value::Object(object) => {
            let members = key.map_or(&[][..], |key| key.subkeys.as_slice());
            collect_in_object(object, members, value_path, out);
        }
        Value::Array(items) => {
            // A homogeneous array has exactly one item schema.
            let item_key = key.and_then(|key| match key.subkeys.as_slice() {
                [only] => Some(only),
                _ => None,
            });
            for (position, item) in items.iter().enumerate() {
                collect_in_value(item, item_key, &path::index(value_path, position), out);
            }
        }
        _ => {}
    }
}

/// Records the Identifier(s) held by a reference key: a string, or an array
/// of strings (`AnchorCertificateAssetReferences`). Other shapes are the
/// schema check's business.
fn collect_reference<'s>(
    value: &Value,
    allowed_types: &'s [String],
    value_path: String,
    out: &mut Vec<AssetReference<'s>>,
) {
    match value {
        Value::String(identifier) => out.push(AssetReference {
            path: value_path,
            identifier: identifier.clone(),
            allowed_types,
        }),
        Value::Array(items) => {
            for (position, item) in items.iter().enumerate() {
                if let Value::String(identifier) = item {
                    out.push(AssetReference {
                        path: path::index(&value_path, position),
                        identifier: identifier.clone(),
                        allowed_types,
                    });
                }
            }
        }
        _ => {}
    }
}

/// A key holds asset Identifiers when the schema gives it `assettypes`, or,
/// for keys the snapshot does not describe, when its name says so.
fn is_asset_reference(name: &str, key: Option<&KeySchema>) -> bool {
    key.is_some_and(|key| !key.assettypes.is_empty())
        || name.ends_with("AssetReference")
        || name.ends_with("AssetReferences")
}

fn find_key<'s>(keys: &'s [KeySchema], name: &str) -> Option<&'s KeySchema> {
    keys.iter()
        .find(|key| !key.matches_any_key() && key.key == name)
        .or_else(|| keys.iter().find(|key| key.matches_any_key()))
}

/// SD-P10: the device installs a configuration only through an activation
/// and an asset only through a configuration; anything else just sits there.
fn report_unreferenced(
    index: &BTreeMap<&str, &Declaration>,
    referenced: &BTreeSet<&str>,
    issues: &mut Vec<Issue>,
) {
    for (identifier, declaration) in index {
        let message = match declaration.category() {
            Some(Category::Configuration) => {
                "no activation lists this configuration (the device reports Info.NotReferencedByActivation)"
            }
            Some(Category::Asset) => {
                "no configuration references this asset (the device reports Info.NotReferencedByConfiguration)"
            }
            _ => continue,
        };
        if !referenced.contains(identifier) {
            issues.push(Issue::warning(located(identifier, "$"), message, "SD-P10"));
        }
    }
}

/// SD-P13: a type whose schema says `apply: single` takes effect once; the
/// device picks one of several and ignores the others.
fn report_repeated_single_types(index: &BTreeMap<&str, &Declaration>, issues: &mut Vec<Issue>) {
    let mut first_of_type: BTreeMap<&str, &str> = BTreeMap::new();
    for (identifier, declaration) in index {
        let declaration_type = declaration.declaration_type.as_str();
        let is_single = schema::declaration(declaration_type)
            .is_some_and(|schema| schema.apply == Some(Apply::Single));
        if !is_single {
            continue;
        }
        match first_of_type.get(declaration_type) {
            None => {
                first_of_type.insert(declaration_type, identifier);
            }
            Some(first) => issues.push(Issue::warning(
                located(identifier, "$.Type"),
                format!(
                    "{declaration_type} applies only once per device, and {first:?} already has it"
                ),
                "SD-P13",
            )),
        }
    }
}

/// `<identifier>: <path>`, naming the declaration a problem belongs to.
fn located(identifier: &str, within: &str) -> String {
    format!("{identifier}: {within}")
}

fn describe_category(category: Option<Category>) -> &'static str {
    match category {
        Some(Category::Activation) => "an activation",
        Some(Category::Configuration) => "a configuration",
        Some(Category::Asset) => "an asset",
        Some(Category::Management) => "a management declaration",
        None => "not an Apple declaration",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ddm::declaration::tests::declaration;
    use crate::ddm::Severity;
    use serde_json::json;

    fn activation(identifier: &str, configurations: &[&str]) -> Declaration {
        declaration(json!({
            "Type": "com.apple.activation.simple",
            "Identifier": identifier,
            "Payload": {"StandardConfigurations": configurations}
        }))
    }

    fn test_configuration(identifier: &str) -> Declaration {
        declaration(json!({
            "Type": "com.apple.configuration.management.test",
            "Identifier": identifier,
            "Payload": {"Echo": identifier}
        }))
    }

    fn asset(identifier: &str, asset_type: &str) -> Declaration {
        declaration(json!({
            "Type": asset_type,
            "Identifier": identifier,
            "Payload": {"Reference": {"DataURL": "https://mdm.example.com/assets/x"}}
        }))
    }

    fn organization(identifier: &str) -> Declaration {
        declaration(json!({
            "Type": "com.apple.management.organization-info",
            "Identifier": identifier,
            "Payload": {"Name": "Example"}
        }))
    }

    fn check(declarations: &[Declaration]) -> Vec<Issue> {
        let borrowed: Vec<&Declaration> = declarations.iter().collect();
        check_references(&borrowed)
    }

    fn found(issues: &[Issue], severity: Severity) -> Vec<(&str, &str)> {
        issues
            .iter()
            .filter(|issue| issue.severity == severity)
            .map(|issue| (issue.rule, issue.path.as_str()))
            .collect()
    }

    #[test]
    fn a_complete_set_passes() {
        let issues = check(&[
            activation("com.example.act", &["com.example.cfg"]),
            test_configuration("com.example.cfg"),
            organization("com.example.org"),
        ]);
        assert!(issues.is_empty(), "{issues:#?}");
    }

    #[test]
    fn activations_list_only_configurations_of_the_same_set() {
        let issues = check(&[
            activation(
                "com.example.act",
                &[
                    "com.example.cfg",
                    "com.example.missing",
                    "com.example.asset",
                    "com.example.org",
                ],
            ),
            test_configuration("com.example.cfg"),
            asset("com.example.asset", "com.apple.asset.data"),
            organization("com.example.org"),
        ]);
        assert_eq!(
            found(&issues, Severity::Error),
            [
                (
                    "SD-P08",
                    "com.example.act: $.Payload.StandardConfigurations[1]"
                ),
                (
                    "SD-P08",
                    "com.example.act: $.Payload.StandardConfigurations[2]"
                ),
                (
                    "SD-P11",
                    "com.example.act: $.Payload.StandardConfigurations[3]"
                ),
            ]
        );
    }

    #[test]
    fn asset_references_name_assets_of_an_allowed_type() {
        let configuration = |identifier: &str, reference: &str| {
            declaration(json!({
                "Type": "com.apple.configuration.security.certificate",
                "Identifier": identifier,
                "Payload": {"CredentialAssetReference": reference}
            }))
        };
        let issues = check(&[
            activation("act", &["good", "wrong-type", "missing", "not-an-asset"]),
            configuration("good", "cert"),
            configuration("wrong-type", "data"),
            configuration("missing", "nowhere"),
            configuration("not-an-asset", "good"),
            asset("cert", "com.apple.asset.credential.certificate"),
            asset("data", "com.apple.asset.data"),
        ]);
        assert_eq!(
            found(&issues, Severity::Error),
            [
                ("SD-P09", "missing: $.Payload.CredentialAssetReference"),
                ("SD-P09", "not-an-asset: $.Payload.CredentialAssetReference"),
                ("SD-P09", "wrong-type: $.Payload.CredentialAssetReference"),
            ]
        );
        let wrong_type = issues
            .iter()
            .find(|issue| issue.path.starts_with("wrong-type"))
            .unwrap();
        assert!(wrong_type
            .message
            .contains("com.apple.asset.credential.certificate"));
    }

    #[test]
    fn reference_arrays_and_nested_references_are_followed() {
        let watch = declaration(json!({
            "Type": "com.apple.configuration.watch.enrollment",
            "Identifier": "watch",
            "Payload": {
                "EnrollmentProfileURL": "https://mdm.example.com/watch",
                "AnchorCertificateAssetReferences": ["anchor", "gone"]
            }
        }));
        let tasks = declaration(json!({
            "Type": "com.apple.configuration.services.background-tasks",
            "Identifier": "tasks",
            "Payload": {
                "TaskType": "com.example.task",
                "LaunchdConfigurations": [{"FileAssetReference": "anchor", "Context": "daemon"}]
            }
        }));
        let issues = check(&[
            activation("act", &["watch", "tasks"]),
            watch,
            tasks,
            asset("anchor", "com.apple.asset.credential.certificate"),
        ]);
        assert_eq!(
            found(&issues, Severity::Error),
            [
                (
                    "SD-P09",
                    "tasks: $.Payload.LaunchdConfigurations[0].FileAssetReference"
                ),
                (
                    "SD-P09",
                    "watch: $.Payload.AnchorCertificateAssetReferences[1]"
                ),
            ]
        );
    }

    #[test]
    fn references_in_types_newer_than_the_snapshot_are_found_by_name() {
        let newer = declaration(json!({
            "Type": "com.apple.configuration.someday.settings",
            "Identifier": "newer",
            "Payload": {"Inner": {"SigningAssetReference": "missing"}}
        }));
        let issues = check(&[activation("act", &["newer"]), newer]);
        assert_eq!(
            found(&issues, Severity::Error),
            [("SD-P09", "newer: $.Payload.Inner.SigningAssetReference")]
        );
    }

    #[test]
    fn unreferenced_configurations_and_assets_are_warnings() {
        let issues = check(&[
            test_configuration("lonely"),
            asset("unused", "com.apple.asset.data"),
            organization("org"),
        ]);
        assert!(found(&issues, Severity::Error).is_empty());
        assert_eq!(
            found(&issues, Severity::Warning),
            [("SD-P10", "lonely: $"), ("SD-P10", "unused: $")]
        );
    }

    #[test]
    fn an_identifier_names_one_declaration_across_all_categories() {
        let issues = check(&[
            activation("act", &["shared"]),
            test_configuration("shared"),
            asset("shared", "com.apple.asset.data"),
        ]);
        assert!(found(&issues, Severity::Error).contains(&("SD-P12", "shared: $.Identifier")));

        // The same revision reached twice is one declaration.
        let issues = check(&[
            activation("act", &["cfg"]),
            test_configuration("cfg"),
            test_configuration("cfg"),
        ]);
        assert!(issues.is_empty(), "{issues:#?}");
    }

    #[test]
    fn a_single_apply_type_twice_is_a_warning() {
        let host = |identifier: &str| {
            declaration(json!({
                "Type": "com.apple.configuration.screensharing.host.settings",
                "Identifier": identifier,
                "Payload": {}
            }))
        };
        let issues = check(&[
            activation("act", &["host-a", "host-b"]),
            host("host-a"),
            host("host-b"),
        ]);
        assert_eq!(
            found(&issues, Severity::Warning),
            [("SD-P13", "host-b: $.Type")]
        );
    }
}
