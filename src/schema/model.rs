//! The typed form of one schema file (see `docs/schema.md` in the snapshot).
//!
//! Conversion from the YAML tree is strict where Apple's meta-schema enumerates
//! the allowed values (key types, presence, usage modes) so that a snapshot
//! update with a new value fails the parse test loudly, and tolerant elsewhere:
//! unknown attributes are ignored and structures cut at a recursive alias are
//! treated as undescribed.

use regex_lite::Regex;

use super::yaml::Node;
use super::SchemaError;

/// Which part of the snapshot a schema file comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchemaKind {
    /// `mdm/profiles`: a configuration-profile payload, keyed by `PayloadType`.
    ProfilePayload,
    /// `mdm/commands`: an MDM command, keyed by `RequestType`.
    Command,
    /// `mdm/checkin`: a check-in message, keyed by `MessageType`.
    CheckIn,
    /// `mdm/errors`: an MDM error response body.
    Error,
    /// `declarative/declarations`: a declaration, keyed by its `Type`.
    Declaration,
    /// `declarative/status`: a status item, keyed by its name.
    StatusItem,
    /// `declarative/protocol`: a declarative-management protocol document.
    Protocol,
    /// `other`: miscellaneous dictionaries (setup skip keys, machine info, …).
    Other,
}

impl SchemaKind {
    /// The kind implied by a path relative to the snapshot root.
    fn from_path(path: &str) -> SchemaKind {
        const PREFIXES: &[(&str, SchemaKind)] = &[
            ("mdm/profiles/", SchemaKind::ProfilePayload),
            ("mdm/commands/", SchemaKind::Command),
            ("mdm/checkin/", SchemaKind::CheckIn),
            ("mdm/errors/", SchemaKind::Error),
            ("declarative/declarations/", SchemaKind::Declaration),
            ("declarative/status/", SchemaKind::StatusItem),
            ("declarative/protocol/", SchemaKind::Protocol),
        ];
        PREFIXES
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix))
            .map_or(SchemaKind::Other, |(_, kind)| *kind)
    }
}

/// One schema file: a payload, command, check-in message, declaration or status item.
#[derive(Debug, Clone)]
pub struct PayloadSchema {
    /// Path of the file relative to the snapshot root, e.g. `mdm/profiles/com.apple.mdm.yaml`.
    pub source: &'static str,
    pub title: String,
    pub kind: SchemaKind,
    /// The `payloadtype`, `requesttype`, `declarationtype` or `statusitemtype`.
    pub identifier: Option<String>,
    pub supported_os: SupportedOs,
    /// Keys of the payload, command request or declaration.
    pub keys: Vec<KeySchema>,
    /// Keys of a command's response.
    pub response_keys: Vec<KeySchema>,
    /// How several declarations of this type combine.
    pub apply: Option<Apply>,
}

/// `payload.apply` of declarations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    Single,
    Multiple,
    Combined,
}

/// The plist/JSON type a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    String,
    Integer,
    Real,
    Boolean,
    Date,
    Data,
    Array,
    Dictionary,
    Any,
}

impl ValueType {
    /// The name used in messages, matching the plist element names.
    pub fn name(self) -> &'static str {
        match self {
            ValueType::String => "string",
            ValueType::Integer => "integer",
            ValueType::Real => "real",
            ValueType::Boolean => "boolean",
            ValueType::Date => "date",
            ValueType::Data => "data",
            ValueType::Array => "array",
            ValueType::Dictionary => "dictionary",
            ValueType::Any => "any",
        }
    }

    fn parse(text: &str) -> Option<ValueType> {
        Some(match text {
            "<string>" => ValueType::String,
            "<integer>" => ValueType::Integer,
            "<real>" => ValueType::Real,
            "<boolean>" => ValueType::Boolean,
            "<date>" => ValueType::Date,
            "<data>" => ValueType::Data,
            "<array>" => ValueType::Array,
            "<dictionary>" => ValueType::Dictionary,
            "<any>" => ValueType::Any,
            _ => return None,
        })
    }
}

/// Whether a key must be present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Required,
    Optional,
}

/// One allowed value from a `rangelist`.
#[derive(Debug, Clone, PartialEq)]
pub enum RangeValue {
    String(String),
    Integer(i64),
    Real(f64),
    Boolean(bool),
}

impl RangeValue {
    /// Whether a plist value equals this allowed value (integers match equal reals).
    pub fn matches(&self, value: &plist::Value) -> bool {
        match (self, value) {
            (RangeValue::String(allowed), plist::Value::String(actual)) => allowed == actual,
            (RangeValue::Boolean(allowed), plist::Value::Boolean(actual)) => allowed == actual,
            (RangeValue::Integer(allowed), plist::Value::Integer(actual)) => {
                actual.as_signed() == Some(*allowed)
            }
            (RangeValue::Real(allowed), plist::Value::Real(actual)) => allowed == actual,
            (RangeValue::Real(allowed), plist::Value::Integer(actual)) => actual
                .as_signed()
                .is_some_and(|actual| *allowed == actual as f64),
            (RangeValue::Integer(allowed), plist::Value::Real(actual)) => {
                *allowed as f64 == *actual
            }
            _ => false,
        }
    }

    fn parse(node: &Node) -> Option<RangeValue> {
        Some(match node {
            Node::String(text) => RangeValue::String(text.clone()),
            Node::Integer(number) => RangeValue::Integer(*number),
            Node::Real(number) => RangeValue::Real(*number),
            Node::Bool(flag) => RangeValue::Boolean(*flag),
            Node::Null | Node::Sequence(_) | Node::Mapping(_) | Node::Truncated => return None,
        })
    }
}

impl std::fmt::Display for RangeValue {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RangeValue::String(text) => write!(formatter, "{text:?}"),
            RangeValue::Integer(number) => write!(formatter, "{number}"),
            RangeValue::Real(number) => write!(formatter, "{number}"),
            RangeValue::Boolean(flag) => write!(formatter, "{flag}"),
        }
    }
}

/// Numeric bounds from `range`; either side may be open.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Range {
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// A `format` regular expression, compiled once.
#[derive(Debug, Clone)]
pub struct Format {
    pub pattern: String,
    pub regex: Regex,
}

/// One key of a payload, command or declaration, possibly with nested keys.
#[derive(Debug, Clone)]
pub struct KeySchema {
    pub key: String,
    pub title: Option<String>,
    pub value_type: ValueType,
    pub presence: Presence,
    pub rangelist: Vec<RangeValue>,
    pub range: Option<Range>,
    pub format: Option<Format>,
    /// Dictionary members, the single array item schema, alternatives of a
    /// heterogeneous array, or the allowed values of a string list item.
    pub subkeys: Vec<KeySchema>,
    /// Per-OS overrides of the enclosing payload's support.
    pub supported_os: Option<SupportedOs>,
    /// Asset types allowed for a declarative asset reference.
    pub assettypes: Vec<String>,
    /// String format name (`url`, `hostname`, `email`, …).
    pub valuetype: Option<String>,
}

impl KeySchema {
    /// Whether the key's own `supportedOS` rules it out on some platform; such
    /// a key is required only where it exists (e.g. `DeviceName` in a macOS
    /// `Authenticate`), which a platform-agnostic check cannot decide.
    pub fn is_platform_specific(&self) -> bool {
        self.supported_os.as_ref().is_some_and(|supported| {
            supported
                .platforms
                .iter()
                .any(|(_, support)| support.is_unsupported())
        })
    }

    /// Whether this entry stands for arbitrary member names of its dictionary.
    ///
    /// Apple spells these `ANY`, or `ANY <what the name is>` (e.g. `ANY app identifier`).
    pub fn matches_any_key(&self) -> bool {
        self.key == "ANY" || self.key.starts_with("ANY ")
    }
}

/// The operating systems a schema describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Platform {
    Ios,
    MacOs,
    TvOs,
    VisionOs,
    WatchOs,
}

impl Platform {
    fn parse(name: &str) -> Option<Platform> {
        Some(match name {
            "iOS" => Platform::Ios,
            "macOS" => Platform::MacOs,
            "tvOS" => Platform::TvOs,
            "visionOS" => Platform::VisionOs,
            "watchOS" => Platform::WatchOs,
            _ => return None,
        })
    }
}

/// `supportedOS`: support details per platform, in file order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SupportedOs {
    pub platforms: Vec<(Platform, OsSupport)>,
}

impl SupportedOs {
    /// The details for one platform, if the schema mentions it.
    pub fn platform(&self, platform: Platform) -> Option<&OsSupport> {
        self.platforms
            .iter()
            .find(|(candidate, _)| *candidate == platform)
            .map(|(_, support)| support)
    }
}

/// Support details for one platform. Versions are kept as written (`n/a` means unsupported).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OsSupport {
    pub introduced: Option<String>,
    pub deprecated: Option<String>,
    pub removed: Option<String>,
    /// Name of the MDM access right the command needs, e.g. `AllowQueryDeviceInformation`.
    pub accessrights: Option<String>,
    pub multiple: Option<bool>,
    pub devicechannel: Option<bool>,
    pub userchannel: Option<bool>,
    pub supervised: Option<bool>,
    pub requiresdep: Option<bool>,
    pub userapprovedmdm: Option<bool>,
    pub allowmanualinstall: Option<bool>,
    pub always_skippable: Option<bool>,
    pub beta: Option<bool>,
    pub shared_ipad: Option<SharedIpad>,
    pub user_enrollment: Option<UserEnrollment>,
    /// Declarative enrollment types: `supervised`, `device`, `user`, `local`.
    pub allowed_enrollments: Vec<String>,
    /// Declarative scopes: `system`, `user`.
    pub allowed_scopes: Vec<String>,
}

impl OsSupport {
    /// `introduced: n/a` marks a platform that does not have the feature.
    pub fn is_unsupported(&self) -> bool {
        self.introduced.as_deref() == Some("n/a")
    }
}

/// Behaviour on Shared iPad.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SharedIpad {
    pub mode: Option<UsageMode>,
    pub devicechannel: Option<bool>,
    pub userchannel: Option<bool>,
    pub allowed_scopes: Vec<String>,
}

/// Behaviour under User Enrollment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UserEnrollment {
    pub mode: Option<UsageMode>,
    pub behavior: Option<String>,
}

/// Whether a payload or key may be used in a given enrollment situation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageMode {
    Allowed,
    Required,
    Forbidden,
    Ignored,
}

/// Builds a [`PayloadSchema`] from one parsed file.
pub(crate) fn payload_schema(
    source: &'static str,
    document: &Node,
) -> Result<PayloadSchema, SchemaError> {
    let context = Context { file: source };
    let payload = document.get("payload");
    let identifier = payload.and_then(|payload| {
        [
            "payloadtype",
            "requesttype",
            "declarationtype",
            "statusitemtype",
        ]
        .iter()
        .find_map(|field| payload.get(field).and_then(Node::scalar_text))
    });
    let apply = match payload
        .and_then(|payload| payload.get("apply"))
        .and_then(Node::as_str)
    {
        None => None,
        Some("single") => Some(Apply::Single),
        Some("multiple") => Some(Apply::Multiple),
        Some("combined") => Some(Apply::Combined),
        Some(other) => {
            return Err(context.error("payload.apply", format!("unknown apply mode {other:?}")))
        }
    };
    Ok(PayloadSchema {
        source,
        title: document
            .get("title")
            .and_then(Node::scalar_text)
            .unwrap_or_default(),
        kind: SchemaKind::from_path(source),
        identifier,
        supported_os: match payload.and_then(|payload| payload.get("supportedOS")) {
            Some(node) => context.supported_os(node, "payload.supportedOS")?,
            None => SupportedOs::default(),
        },
        keys: context.key_list(document.get("payloadkeys"), "payloadkeys")?,
        response_keys: context.key_list(document.get("responsekeys"), "responsekeys")?,
        apply,
    })
}

/// Carries the file name into every error.
struct Context {
    file: &'static str,
}

impl Context {
    fn error(&self, location: &str, problem: String) -> SchemaError {
        SchemaError::Shape {
            file: self.file.to_owned(),
            location: location.to_owned(),
            problem,
        }
    }

    fn key_list(&self, node: Option<&Node>, location: &str) -> Result<Vec<KeySchema>, SchemaError> {
        match node {
            None | Some(Node::Null | Node::Truncated) => Ok(Vec::new()),
            Some(Node::Sequence(items)) => items
                .iter()
                .enumerate()
                .filter(|(_, item)| **item != Node::Truncated)
                .map(|(index, item)| self.key(item, &format!("{location}[{index}]")))
                .collect(),
            Some(_) => Err(self.error(location, "expected a list of keys".into())),
        }
    }

    fn key(&self, node: &Node, location: &str) -> Result<KeySchema, SchemaError> {
        if !matches!(node, Node::Mapping(_)) {
            return Err(self.error(location, "expected a key mapping".into()));
        }
        let key = node
            .get("key")
            .and_then(Node::scalar_text)
            .ok_or_else(|| self.error(location, "missing `key`".into()))?;
        let location = format!("{location}({key})");
        let type_text = node
            .get("type")
            .and_then(Node::as_str)
            .ok_or_else(|| self.error(&location, "missing `type`".into()))?;
        let value_type = ValueType::parse(type_text)
            .ok_or_else(|| self.error(&location, format!("unknown type {type_text:?}")))?;
        let presence = match node.get("presence").and_then(Node::as_str) {
            None | Some("optional") => Presence::Optional,
            Some("required") => Presence::Required,
            Some(other) => return Err(self.error(&location, format!("unknown presence {other:?}"))),
        };
        let subkeys = self.key_list(node.get("subkeys"), &format!("{location}.subkeys"))?;
        Ok(KeySchema {
            title: node.get("title").and_then(Node::scalar_text),
            value_type,
            presence,
            rangelist: self.rangelist(node.get("rangelist"), &location)?,
            range: node.get("range").map(|range| Range {
                min: range.get("min").and_then(Node::as_f64),
                max: range.get("max").and_then(Node::as_f64),
            }),
            format: self.format(node.get("format"), &location)?,
            subkeys: unwrap_item_wrapper(&key, value_type, subkeys),
            supported_os: node
                .get("supportedOS")
                .map(|os| self.supported_os(os, &format!("{location}.supportedOS")))
                .transpose()?,
            assettypes: strings(node.get("assettypes")),
            valuetype: node
                .get("valuetype")
                .and_then(Node::scalar_text)
                .or_else(|| {
                    // `subtype` is the deprecated spelling, written as `<url>`.
                    node.get("subtype").and_then(Node::as_str).map(|subtype| {
                        subtype
                            .trim_start_matches('<')
                            .trim_end_matches('>')
                            .to_owned()
                    })
                }),
            key,
        })
    }

    fn rangelist(
        &self,
        node: Option<&Node>,
        location: &str,
    ) -> Result<Vec<RangeValue>, SchemaError> {
        match node {
            None | Some(Node::Null) => Ok(Vec::new()),
            Some(Node::Sequence(items)) => items
                .iter()
                .map(|item| {
                    RangeValue::parse(item).ok_or_else(|| {
                        self.error(location, format!("rangelist holds a non-scalar: {item:?}"))
                    })
                })
                .collect(),
            Some(other) => Err(self.error(location, format!("rangelist is not a list: {other:?}"))),
        }
    }

    fn format(&self, node: Option<&Node>, location: &str) -> Result<Option<Format>, SchemaError> {
        let Some(pattern) = node.and_then(Node::scalar_text) else {
            return Ok(None);
        };
        let regex = Regex::new(&pattern).map_err(|source| SchemaError::Format {
            file: self.file.to_owned(),
            location: location.to_owned(),
            source,
        })?;
        Ok(Some(Format { pattern, regex }))
    }

    fn supported_os(&self, node: &Node, location: &str) -> Result<SupportedOs, SchemaError> {
        let Node::Mapping(entries) = node else {
            return Ok(SupportedOs::default());
        };
        let mut platforms = Vec::new();
        for (name, details) in entries {
            let platform = Platform::parse(name)
                .ok_or_else(|| self.error(location, format!("unknown platform {name:?}")))?;
            platforms.push((
                platform,
                self.os_support(details, &format!("{location}.{name}"))?,
            ));
        }
        Ok(SupportedOs { platforms })
    }

    fn os_support(&self, node: &Node, location: &str) -> Result<OsSupport, SchemaError> {
        let text = |field: &str| node.get(field).and_then(Node::scalar_text);
        let flag = |field: &str| node.get(field).and_then(Node::as_bool);
        Ok(OsSupport {
            introduced: text("introduced"),
            deprecated: text("deprecated"),
            removed: text("removed"),
            accessrights: text("accessrights"),
            multiple: flag("multiple"),
            devicechannel: flag("devicechannel"),
            userchannel: flag("userchannel"),
            supervised: flag("supervised"),
            requiresdep: flag("requiresdep"),
            userapprovedmdm: flag("userapprovedmdm"),
            allowmanualinstall: flag("allowmanualinstall"),
            always_skippable: flag("always-skippable"),
            beta: flag("beta"),
            shared_ipad: node
                .get("sharedipad")
                .map(|shared| -> Result<SharedIpad, SchemaError> {
                    Ok(SharedIpad {
                        mode: self.usage_mode(shared, &format!("{location}.sharedipad"))?,
                        devicechannel: shared.get("devicechannel").and_then(Node::as_bool),
                        userchannel: shared.get("userchannel").and_then(Node::as_bool),
                        allowed_scopes: strings(shared.get("allowed-scopes")),
                    })
                })
                .transpose()?,
            user_enrollment: node
                .get("userenrollment")
                .map(|user| -> Result<UserEnrollment, SchemaError> {
                    Ok(UserEnrollment {
                        mode: self.usage_mode(user, &format!("{location}.userenrollment"))?,
                        behavior: user.get("behavior").and_then(Node::scalar_text),
                    })
                })
                .transpose()?,
            allowed_enrollments: strings(node.get("allowed-enrollments")),
            allowed_scopes: strings(node.get("allowed-scopes")),
        })
    }

    fn usage_mode(&self, node: &Node, location: &str) -> Result<Option<UsageMode>, SchemaError> {
        Ok(match node.get("mode").and_then(Node::as_str) {
            None => None,
            Some("allowed") => Some(UsageMode::Allowed),
            Some("required") => Some(UsageMode::Required),
            Some("forbidden") => Some(UsageMode::Forbidden),
            Some("ignored") => Some(UsageMode::Ignored),
            Some(other) => return Err(self.error(location, format!("unknown mode {other:?}"))),
        })
    }
}

/// The scalar entries of a list (a lone scalar counts as a one-item list).
fn strings(node: Option<&Node>) -> Vec<String> {
    match node {
        Some(Node::Sequence(items)) => items.iter().filter_map(Node::scalar_text).collect(),
        Some(scalar) => scalar.scalar_text().into_iter().collect(),
        None => Vec::new(),
    }
}

/// Removes a redundant wrapper level some dictionaries carry.
///
/// `TopLevel.ConsentText` is documented as a dictionary whose single subkey
/// `ConsentTextItem` is itself the dictionary of language → text, although
/// profiles put the languages directly into `ConsentText`. A dictionary whose
/// only subkey is a dictionary named `<key>Item` is read as that item.
fn unwrap_item_wrapper(
    key: &str,
    value_type: ValueType,
    mut subkeys: Vec<KeySchema>,
) -> Vec<KeySchema> {
    let is_wrapper = value_type == ValueType::Dictionary
        && subkeys.len() == 1
        && subkeys[0].value_type == ValueType::Dictionary
        && subkeys[0].key.strip_suffix("Item") == Some(key);
    match subkeys.pop() {
        Some(item) if is_wrapper => item.subkeys,
        Some(other) => {
            subkeys.push(other);
            subkeys
        }
        None => subkeys,
    }
}
