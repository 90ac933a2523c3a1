//! One declaration as the admin API uploads it and the device fetches it
//! (`declarative/declarations/declarationbase.yaml`), with the publish-time
//! checks that a single declaration can answer on its own (SD-P01…P06).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{path, DdmError};
use crate::schema;

/// Apple's limit for an Identifier ("should not exceed 64 octets"); it also
/// bounds the `declaration/<category>/<Identifier>` endpoint path.
const MAX_IDENTIFIER_OCTETS: usize = 64;

/// Hex characters of SHA-256 kept in a ServerToken: 128 bits are plenty to
/// tell revisions apart and stay well under the 64-octet limit.
const SERVER_TOKEN_HEX_CHARS: usize = 32;

/// Prefix shared by every Apple declaration Type.
const APPLE_TYPE_PREFIX: &str = "com.apple.";

/// The four kinds of declaration, named by the third label of the Type
/// (`com.apple.<category>.…`). The order is the manifest's sort order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Category {
    Activation,
    Configuration,
    Asset,
    Management,
}

impl Category {
    /// Every category, in manifest order.
    pub const ALL: [Category; 4] = [
        Category::Activation,
        Category::Configuration,
        Category::Asset,
        Category::Management,
    ];

    /// The singular label used in Types and in `declaration/<category>/<id>` endpoint paths.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Activation => "activation",
            Category::Configuration => "configuration",
            Category::Asset => "asset",
            Category::Management => "management",
        }
    }

    /// The key of this category's array in a DeclarationItemsResponse.
    pub fn plural(self) -> &'static str {
        match self {
            Category::Activation => "Activations",
            Category::Configuration => "Configurations",
            Category::Asset => "Assets",
            Category::Management => "Management",
        }
    }

    /// The key of this category's array under `management.declarations` in a status report.
    pub fn status_key(self) -> &'static str {
        match self {
            Category::Activation => "activations",
            Category::Configuration => "configurations",
            Category::Asset => "assets",
            Category::Management => "management",
        }
    }

    /// The category named by an endpoint path segment (`activation`, …).
    pub fn parse(label: &str) -> Option<Category> {
        Category::ALL
            .into_iter()
            .find(|category| category.as_str() == label)
    }

    /// The category named by a status-report key (`activations`, …).
    pub fn from_status_key(key: &str) -> Option<Category> {
        Category::ALL
            .into_iter()
            .find(|category| category.status_key() == key)
    }

    /// The category of a well-formed Apple declaration Type,
    /// `com.apple.<category>.<name>` where `<name>` is one or more dot-separated
    /// labels of letters, digits and `-`/`_`; `None` for anything else.
    pub fn from_type(declaration_type: &str) -> Option<Category> {
        let rest = declaration_type.strip_prefix(APPLE_TYPE_PREFIX)?;
        let (label, name) = rest.split_once('.')?;
        let category = Category::parse(label)?;
        let well_formed = name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
        well_formed.then_some(category)
    }
}

impl fmt::Display for Category {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// How serious a rule violation is: errors block publishing, warnings are
/// reported alongside an accepted declaration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One rule violation, located by a JSON path such as
/// `$.Payload.StandardConfigurations[0]` (prefixed with the declaration's
/// Identifier when it comes from a check across declarations).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Issue {
    pub severity: Severity,
    pub path: String,
    pub message: String,
    /// The sync-doctor rule, e.g. `SD-P06`.
    pub rule: &'static str,
}

impl Issue {
    pub(crate) fn error(
        path: impl Into<String>,
        message: impl Into<String>,
        rule: &'static str,
    ) -> Issue {
        Issue {
            severity: Severity::Error,
            path: path.into(),
            message: message.into(),
            rule,
        }
    }

    pub(crate) fn warning(
        path: impl Into<String>,
        message: impl Into<String>,
        rule: &'static str,
    ) -> Issue {
        Issue {
            severity: Severity::Warning,
            path: path.into(),
            message: message.into(),
            rule,
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: {} ({})", self.path, self.message, self.rule)
    }
}

/// A validated declaration with its content-derived ServerToken.
#[derive(Debug, Clone, PartialEq)]
pub struct Declaration {
    pub identifier: String,
    pub declaration_type: String,
    pub payload: Map<String, Value>,
    /// `hex(SHA-256(canonical {Type, Identifier, Payload} ‖ touch))[..32]`.
    pub server_token: String,
    /// How often an operator forced a new revision of unchanged content.
    pub touch: u64,
}

impl Declaration {
    /// Parses and checks a declaration uploaded through the admin API.
    ///
    /// A `ServerToken` in the upload is ignored: the token is always derived
    /// from the content so that re-uploading identical content (in any key
    /// order or layout) keeps it, and anything else changes it. The warnings
    /// that did not block the upload are returned with the declaration.
    pub fn from_api_json(bytes: &[u8], touch: u64) -> Result<(Declaration, Vec<Issue>), DdmError> {
        let object = match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(object)) => object,
            Ok(other) => {
                let message = format!(
                    "a declaration is a JSON object, found {}",
                    type_name(&other)
                );
                return Err(invalid(None, vec![Issue::error("$", message, "SD-P01")]));
            }
            Err(error) => {
                let message = format!("not valid JSON: {error}");
                return Err(invalid(None, vec![Issue::error("$", message, "SD-P01")]));
            }
        };
        let mut issues = Vec::new();
        let parts = DeclarationParts::take(object, &mut issues);
        if let Some(identifier) = &parts.identifier {
            check_identifier(identifier, &mut issues);
        }
        if let (Some(declaration_type), Some(payload)) = (&parts.declaration_type, &parts.payload) {
            check_type_and_payload(declaration_type, payload, &mut issues);
        }
        match parts {
            DeclarationParts {
                identifier: Some(identifier),
                declaration_type: Some(declaration_type),
                payload: Some(payload),
            } if !issues.iter().any(Issue::is_error) => {
                let server_token = server_token(&declaration_type, &identifier, &payload, touch);
                let declaration = Declaration {
                    identifier,
                    declaration_type,
                    payload,
                    server_token,
                    touch,
                };
                Ok((declaration, issues))
            }
            DeclarationParts { identifier, .. } => Err(invalid(identifier, issues)),
        }
    }

    /// The category named by the Type; `None` for a Type outside `com.apple.<category>.`,
    /// which no manifest lists.
    pub fn category(&self) -> Option<Category> {
        Category::from_type(&self.declaration_type)
    }

    /// The body served on `declaration/<category>/<Identifier>`:
    /// `{"Type","Identifier","ServerToken","Payload"}`, compact, payload keys sorted.
    pub fn to_device_json(&self) -> Vec<u8> {
        let mut out = String::with_capacity(128);
        out.push_str("{\"Type\":");
        write_json_string(&mut out, &self.declaration_type);
        out.push_str(",\"Identifier\":");
        write_json_string(&mut out, &self.identifier);
        out.push_str(",\"ServerToken\":");
        write_json_string(&mut out, &self.server_token);
        out.push_str(",\"Payload\":");
        write_canonical_object(&mut out, &self.payload);
        out.push('}');
        out.into_bytes()
    }
}

/// The top-level members of an upload, each `None` when missing or mistyped
/// (with the reason recorded as an issue).
struct DeclarationParts {
    identifier: Option<String>,
    declaration_type: Option<String>,
    payload: Option<Map<String, Value>>,
}

impl DeclarationParts {
    fn take(mut object: Map<String, Value>, issues: &mut Vec<Issue>) -> DeclarationParts {
        let declaration_type = take_string(&mut object, "Type", issues);
        let identifier = take_string(&mut object, "Identifier", issues);
        let payload = match object.remove("Payload") {
            Some(Value::Object(payload)) => Some(payload),
            Some(other) => {
                let message = format!("Payload must be an object, found {}", type_name(&other));
                issues.push(Issue::error("$.Payload", message, "SD-P01"));
                None
            }
            None => {
                issues.push(Issue::error(
                    "$.Payload",
                    "required key is missing",
                    "SD-P01",
                ));
                None
            }
        };
        // The server owns the token; a client's value is dropped, not checked.
        object.remove("ServerToken");
        for name in object.keys() {
            issues.push(Issue::warning(
                path::member("$", name),
                "not a declaration key; dropped",
                "SD-P01",
            ));
        }
        DeclarationParts {
            identifier,
            declaration_type,
            payload,
        }
    }
}

fn take_string(
    object: &mut Map<String, Value>,
    key: &str,
    issues: &mut Vec<Issue>,
) -> Option<String> {
    let location = path::member("$", key);
    match object.remove(key) {
        Some(Value::String(text)) => Some(text),
        Some(other) => {
            let message = format!("{key} must be a string, found {}", type_name(&other));
            issues.push(Issue::error(location, message, "SD-P01"));
            None
        }
        None => {
            issues.push(Issue::error(location, "required key is missing", "SD-P01"));
            None
        }
    }
}

/// SD-P02: the Identifier appears verbatim in the endpoint path the device
/// requests, so it must be short and URL-safe.
fn check_identifier(identifier: &str, issues: &mut Vec<Issue>) {
    if identifier.is_empty() {
        issues.push(Issue::error("$.Identifier", "must not be empty", "SD-P02"));
        return;
    }
    if identifier.len() > MAX_IDENTIFIER_OCTETS {
        let message = format!(
            "is {} octets long; at most {MAX_IDENTIFIER_OCTETS} are allowed",
            identifier.len()
        );
        issues.push(Issue::error("$.Identifier", message, "SD-P02"));
    }
    if let Some(bad) = identifier
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        let message = format!("contains {bad:?}; only A-Z a-z 0-9 . _ - are allowed");
        issues.push(Issue::error("$.Identifier", message, "SD-P02"));
    }
}

/// SD-P05/SD-P06: the Type must be a well-formed Apple declaration type; a
/// type in the schema snapshot has its payload checked against the schema,
/// a newer one is accepted unchecked with a warning.
fn check_type_and_payload(
    declaration_type: &str,
    payload: &Map<String, Value>,
    issues: &mut Vec<Issue>,
) {
    if Category::from_type(declaration_type).is_none() {
        let message = format!(
            "{declaration_type:?} is not com.apple.{{activation,configuration,asset,management}}.<name>"
        );
        issues.push(Issue::error("$.Type", message, "SD-P05"));
        return;
    }
    let Some(schema) = schema::declaration(declaration_type) else {
        let message = format!(
            "{declaration_type:?} is not in Apple's schema snapshot; accepted as a newer type without payload checks"
        );
        issues.push(Issue::warning("$.Type", message, "SD-P05"));
        return;
    };
    let validation = schema::validate_json(&schema.keys, &Value::Object(payload.clone()));
    let located = |violation: schema::Violation| {
        (
            path::rebase("$.Payload", &violation.path),
            violation.message,
        )
    };
    issues.extend(
        validation
            .errors
            .into_iter()
            .map(located)
            .map(|(path, message)| Issue::error(path, message, "SD-P06")),
    );
    issues.extend(
        validation
            .warnings
            .into_iter()
            .map(located)
            .map(|(path, message)| Issue::warning(path, message, "SD-P06")),
    );
}

fn invalid(identifier: Option<String>, issues: Vec<Issue>) -> DdmError {
    DdmError::Invalid { identifier, issues }
}

/// SD-P03/SD-P04: a token over the canonical content, so layout and key order
/// do not matter, followed by the touch counter, so an operator can force a
/// new revision. The canonical text ends with `}`, so appending the decimal
/// counter cannot make two different inputs collide.
fn server_token(
    declaration_type: &str,
    identifier: &str,
    payload: &Map<String, Value>,
    touch: u64,
) -> String {
    // Keys in canonical (sorted) order: Identifier < Payload < Type.
    let mut content = String::with_capacity(128);
    content.push_str("{\"Identifier\":");
    write_json_string(&mut content, identifier);
    content.push_str(",\"Payload\":");
    write_canonical_object(&mut content, payload);
    content.push_str(",\"Type\":");
    write_json_string(&mut content, declaration_type);
    content.push('}');
    let digest = Sha256::new()
        .chain_update(content.as_bytes())
        .chain_update(touch.to_string().as_bytes())
        .finalize();
    let mut token = hex::encode(digest);
    token.truncate(SERVER_TOKEN_HEX_CHARS);
    token
}

/// The canonical JSON text of a value: object keys sorted by their UTF-8
/// bytes, no insignificant whitespace, strings escaped minimally. Two values
/// that are equal as JSON data have the same canonical text.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(&mut out, value);
    out
}

fn write_canonical(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(flag) => out.push_str(if *flag { "true" } else { "false" }),
        Value::Number(number) => out.push_str(&number.to_string()),
        Value::String(text) => write_json_string(out, text),
        Value::Array(items) => {
            out.push('[');
            for (position, item) in items.iter().enumerate() {
                if position > 0 {
                    out.push(',');
                }
                write_canonical(out, item);
            }
            out.push(']');
        }
        Value::Object(object) => write_canonical_object(out, object),
    }
}

fn write_canonical_object(out: &mut String, object: &Map<String, Value>) {
    let mut members: Vec<(&String, &Value)> = object.iter().collect();
    members.sort_unstable_by(|left, right| left.0.as_bytes().cmp(right.0.as_bytes()));
    out.push('{');
    for (position, (name, member)) in members.into_iter().enumerate() {
        if position > 0 {
            out.push(',');
        }
        write_json_string(out, name);
        out.push(':');
        write_canonical(out, member);
    }
    out.push('}');
}

/// Appends `text` as a JSON string literal, escaping only what RFC 8259 requires.
pub(crate) fn write_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            control if u32::from(control) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", u32::from(control)));
            }
            other => out.push(other),
        }
    }
    out.push('"');
}

/// The JSON type of a value, for messages.
pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// Parses a declaration that must be valid.
    pub(crate) fn declaration(value: Value) -> Declaration {
        let bytes = serde_json::to_vec(&value).unwrap();
        match Declaration::from_api_json(&bytes, 0) {
            Ok((declaration, _)) => declaration,
            Err(error) => panic!("{error}"),
        }
    }

    fn issues_of(value: Value) -> Vec<Issue> {
        let bytes = serde_json::to_vec(&value).unwrap();
        match Declaration::from_api_json(&bytes, 0) {
            Ok((_, warnings)) => warnings,
            Err(DdmError::Invalid { issues, .. }) => issues,
            Err(other) => panic!("{other}"),
        }
    }

    fn rules_at(issues: &[Issue], severity: Severity) -> Vec<(&str, &str)> {
        issues
            .iter()
            .filter(|issue| issue.severity == severity)
            .map(|issue| (issue.rule, issue.path.as_str()))
            .collect()
    }

    /// The body of the first request or response section of a recorded NanoHUB exchange.
    pub(crate) fn transcript_body(name: &str, section: &str) -> String {
        let path = format!(
            "{}/tests/fixtures/nanohub-transcripts/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(path).unwrap();
        let marker = format!("=============================== {section} ");
        let after_marker = &text[text.find(&marker).unwrap()..];
        let body_start = after_marker.find("\n\n").unwrap() + 2;
        let body = &after_marker[body_start..];
        body[..body.find("\n====").unwrap()].to_owned()
    }

    #[test]
    fn the_category_is_the_third_label_of_the_type() {
        assert_eq!(
            Category::from_type("com.apple.configuration.softwareupdate.settings"),
            Some(Category::Configuration)
        );
        assert_eq!(
            Category::from_type("com.apple.activation.simple"),
            Some(Category::Activation)
        );
        assert_eq!(
            Category::from_type("com.apple.asset.data"),
            Some(Category::Asset)
        );
        assert_eq!(
            Category::from_type("com.apple.management.organization-info"),
            Some(Category::Management)
        );
        for malformed in [
            "com.apple.configuration",
            "com.apple.configuration.",
            "com.apple.configuration..x",
            "com.apple.credential.acme",
            "com.example.configuration.x",
            "com.apple.configuration.has space",
        ] {
            assert_eq!(Category::from_type(malformed), None, "{malformed}");
        }
    }

    #[test]
    fn categories_have_their_wire_spellings() {
        let spellings: Vec<_> = Category::ALL
            .iter()
            .map(|category| (category.as_str(), category.plural(), category.status_key()))
            .collect();
        assert_eq!(
            spellings,
            [
                ("activation", "Activations", "activations"),
                ("configuration", "Configurations", "configurations"),
                ("asset", "Assets", "assets"),
                ("management", "Management", "management"),
            ]
        );
        assert_eq!(Category::parse("asset"), Some(Category::Asset));
        assert_eq!(Category::parse("assets"), None);
        assert_eq!(
            Category::from_status_key("management"),
            Some(Category::Management)
        );
    }

    #[test]
    fn the_recorded_nanohub_upload_parses_and_its_server_token_is_ours() {
        let upload = transcript_body("12-api-put-declaration-config.txt", "REQUEST");
        let (declaration, warnings) = Declaration::from_api_json(upload.as_bytes(), 0).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(declaration.identifier, "com.example.test");
        assert_eq!(
            declaration.declaration_type,
            "com.apple.configuration.management.test"
        );
        assert_eq!(declaration.payload["Echo"], "NanoHUB peer");
        assert_eq!(declaration.category(), Some(Category::Configuration));
        assert_eq!(declaration.server_token.len(), 32);

        // NanoHUB serves the same content pretty-printed, reordered and with its
        // own ServerToken; the client's token is ignored and ours is unchanged.
        let served = transcript_body("16-api-get-declaration.txt", "RESPONSE");
        assert!(served.contains("\"ServerToken\": \"90417ed27ff3af0d\""));
        let (again, _) = Declaration::from_api_json(served.as_bytes(), 0).unwrap();
        assert_eq!(again.server_token, declaration.server_token);
    }

    #[test]
    fn the_server_token_depends_on_content_only_and_a_touch_renews_it() {
        let compact = br#"{"Type":"com.apple.configuration.management.test","Identifier":"t","Payload":{"Echo":"x","EchoDataAssetReference":"a"}}"#;
        let reordered = b"{ \"Payload\" : {\"EchoDataAssetReference\":\"a\",\n \"Echo\":\"x\"},\n\"Identifier\":\"t\",\"Type\":\"com.apple.configuration.management.test\"}";
        let (first, _) = Declaration::from_api_json(compact, 0).unwrap();
        let (second, _) = Declaration::from_api_json(reordered, 0).unwrap();
        assert_eq!(first.server_token, second.server_token);

        let (touched, _) = Declaration::from_api_json(compact, 1).unwrap();
        assert_ne!(touched.server_token, first.server_token);
        assert_eq!(touched.touch, 1);

        let changed = br#"{"Type":"com.apple.configuration.management.test","Identifier":"t","Payload":{"Echo":"y","EchoDataAssetReference":"a"}}"#;
        let (edited, _) = Declaration::from_api_json(changed, 0).unwrap();
        assert_ne!(edited.server_token, first.server_token);
        assert!(first
            .server_token
            .bytes()
            .all(|byte| byte.is_ascii_hexdigit()));
    }

    #[test]
    fn a_missing_member_or_a_non_object_payload_is_refused() {
        let issues =
            issues_of(json!({"Type": "com.apple.configuration.management.test", "Payload": []}));
        assert_eq!(
            rules_at(&issues, Severity::Error),
            [("SD-P01", "$.Identifier"), ("SD-P01", "$.Payload")]
        );
        let issues = issues_of(json!({"Identifier": "x", "Payload": {}}));
        assert_eq!(rules_at(&issues, Severity::Error), [("SD-P01", "$.Type")]);
        assert!(matches!(
            Declaration::from_api_json(b"not json", 0),
            Err(DdmError::Invalid {
                identifier: None,
                ..
            })
        ));
        assert!(Declaration::from_api_json(b"[1]", 0).is_err());
    }

    #[test]
    fn identifiers_are_short_and_url_safe() {
        let with_identifier = |identifier: &str| {
            issues_of(json!({
                "Type": "com.apple.configuration.management.test",
                "Identifier": identifier,
                "Payload": {"Echo": "x"}
            }))
        };
        assert!(with_identifier("A-z_0.9").is_empty());
        assert!(with_identifier(&"a".repeat(64)).is_empty());
        for bad in [
            "",
            "has space",
            "a/b",
            "50%",
            "q?",
            "frag#",
            &"a".repeat(65),
        ] {
            assert_eq!(
                rules_at(&with_identifier(bad), Severity::Error),
                [("SD-P02", "$.Identifier")],
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_unknown_but_well_formed_type_is_accepted_with_a_warning() {
        let issues = issues_of(json!({
            "Type": "com.apple.configuration.someday.settings",
            "Identifier": "x",
            "Payload": {"Anything": [1, 2]}
        }));
        assert_eq!(rules_at(&issues, Severity::Warning), [("SD-P05", "$.Type")]);
        assert!(rules_at(&issues, Severity::Error).is_empty());

        for malformed in [
            "com.example.configuration.x",
            "com.apple.profile.x",
            "configuration",
        ] {
            let issues = issues_of(json!({"Type": malformed, "Identifier": "x", "Payload": {}}));
            assert_eq!(rules_at(&issues, Severity::Error), [("SD-P05", "$.Type")]);
        }
    }

    #[test]
    fn a_known_type_is_checked_against_apples_schema() {
        // Required key missing, wrong type, value outside the rangelist, and an unknown key.
        let issues = issues_of(json!({
            "Type": "com.apple.configuration.softwareupdate.settings",
            "Identifier": "su",
            "Payload": {
                "AutomaticActions": {"Download": "Sometimes"},
                "Deferrals": {"CombinedPeriodInDays": "ninety"},
                "Surprise": true
            }
        }));
        let errors = rules_at(&issues, Severity::Error);
        assert!(
            errors.contains(&("SD-P06", "$.Payload.AutomaticActions.Download")),
            "{issues:#?}"
        );
        assert!(
            errors.contains(&("SD-P06", "$.Payload.Deferrals.CombinedPeriodInDays")),
            "{issues:#?}"
        );
        assert!(rules_at(&issues, Severity::Warning).contains(&("SD-P06", "$.Payload.Surprise")));

        let issues = issues_of(json!({
            "Type": "com.apple.configuration.management.test",
            "Identifier": "t",
            "Payload": {}
        }));
        assert_eq!(
            rules_at(&issues, Severity::Error),
            [("SD-P06", "$.Payload.Echo")]
        );

        let issues = issues_of(json!({
            "Type": "com.apple.activation.simple",
            "Identifier": "a",
            "Payload": {"StandardConfigurations": ["ok", 7]}
        }));
        assert_eq!(
            rules_at(&issues, Severity::Error),
            [("SD-P06", "$.Payload.StandardConfigurations[1]")]
        );
    }

    #[test]
    fn an_invalid_declaration_error_names_the_declaration_and_the_path() {
        let error = Declaration::from_api_json(
            br#"{"Type":"com.apple.configuration.passcode.settings","Identifier":"com.example.pin","Payload":{"MinimumLength":"six"}}"#,
            0,
        )
        .unwrap_err();
        let DdmError::Invalid { identifier, issues } = &error else {
            panic!("{error}");
        };
        assert_eq!(identifier.as_deref(), Some("com.example.pin"));
        assert_eq!(issues[0].path, "$.Payload.MinimumLength");
        assert!(error.to_string().contains("com.example.pin"));
        assert!(error.to_string().contains("$.Payload.MinimumLength"));
    }

    #[test]
    fn a_client_server_token_is_ignored_and_extra_members_are_dropped_with_a_warning() {
        let (declaration, warnings) = Declaration::from_api_json(
            br#"{"Type":"com.apple.management.properties","Identifier":"p","ServerToken":"mine","Payload":{"shard":3},"Extra":1}"#,
            0,
        )
        .unwrap();
        assert_ne!(declaration.server_token, "mine");
        assert_eq!(
            rules_at(&warnings, Severity::Warning),
            [("SD-P01", "$.Extra")]
        );
    }

    #[test]
    fn the_device_body_has_the_four_members_in_order() {
        let declaration = declaration(json!({
            "Type": "com.apple.configuration.management.test",
            "Identifier": "com.example.test",
            "Payload": {"Echo": "hi \"there\"\n"}
        }));
        let body = String::from_utf8(declaration.to_device_json()).unwrap();
        let expected = format!(
            r#"{{"Type":"com.apple.configuration.management.test","Identifier":"com.example.test","ServerToken":"{}","Payload":{{"Echo":"hi \"there\"\n"}}}}"#,
            declaration.server_token
        );
        assert_eq!(body, expected);
        let parsed: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["Payload"]["Echo"], "hi \"there\"\n");
    }

    /// The catalog reloads a declaration from the body it serves: a long integer in the
    /// payload (read as a float) must read back as the same number, or the reloaded
    /// declaration gets another ServerToken and every device assigned it syncs again.
    #[test]
    fn the_served_body_reads_back_with_the_same_server_token() {
        let published = br#"{"Type": "com.apple.configuration.passcode.settings",
            "Identifier": "com.example.passcode", "Payload": {"RequirePasscode": true,
            "ExampleLimit": 33373333333333333333333333333333333333333333333333333333310}}"#;
        let (declaration, _) = Declaration::from_api_json(published, 0).unwrap();
        let (served, _) = Declaration::from_api_json(&declaration.to_device_json(), 0).unwrap();
        assert_eq!(served, declaration);
    }

    #[test]
    fn canonical_json_sorts_keys_and_drops_whitespace() {
        let value: Value = serde_json::from_str(
            "{ \"b\": [1, 2.5, null, true], \"a\": {\"y\": \"\\u0001\", \"x\": {}} }",
        )
        .unwrap();
        assert_eq!(
            canonical_json(&value),
            r#"{"a":{"x":{},"y":"\u0001"},"b":[1,2.5,null,true]}"#
        );
        let reparsed: Value = serde_json::from_str(&canonical_json(&value)).unwrap();
        assert_eq!(reparsed, value);
    }
}
