//! What a simulated device puts on the wire and how it reads what Orchard answers.
//!
//! Check-in bodies start from real device messages (NanoMDM's fixtures, KMFDDM's status
//! report) re-addressed to one device, so Orchard sees exactly the shapes real hardware sends.

use plist::{Dictionary, Value};
use serde_json::{json, Value as Json};

const AUTHENTICATE: &[u8] = include_bytes!("../../tests/fixtures/nanomdm/Authenticate.2.plist");
const TOKEN_UPDATE: &[u8] = include_bytes!("../../tests/fixtures/nanomdm/TokenUpdate.2.plist");
const STATUS_REPORT: &[u8] = include_bytes!("../../tests/fixtures/kmfddm/status.1st.json");

/// Content-Type of check-in messages (`PUT /mdm` with a `MessageType`).
pub const CHECKIN: &str = "application/x-apple-aspen-mdm-checkin";
/// Content-Type of connect reports (`PUT /mdm` with a `Status`).
pub const CONNECT: &str = "application/x-apple-aspen-mdm";

/// Errors in what Orchard sent back; a device that cannot read a command ends its session.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("not a plist: {0}")]
    Plist(#[from] plist::Error),
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("missing or mistyped {0}")]
    Missing(&'static str),
}

fn to_xml(dict: Dictionary) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    // Writing a dictionary of strings, data and integers into a Vec cannot fail.
    let _ = Value::Dictionary(dict).to_writer_xml(&mut out);
    out
}

fn fixture(bytes: &[u8]) -> Dictionary {
    plist::from_bytes(bytes).unwrap_or_default()
}

/// The real `Authenticate` message, re-addressed to `udid` on `topic`.
pub fn authenticate(udid: &str, topic: &str) -> Vec<u8> {
    let mut message = fixture(AUTHENTICATE);
    message.insert("UDID".into(), udid.into());
    message.insert("Topic".into(), topic.into());
    to_xml(message)
}

/// The real `TokenUpdate` message carrying this device's push token and PushMagic.
pub fn token_update(udid: &str, topic: &str, token: &[u8], push_magic: &str) -> Vec<u8> {
    let mut message = fixture(TOKEN_UPDATE);
    message.insert("UDID".into(), udid.into());
    message.insert("Topic".into(), topic.into());
    message.insert("Token".into(), Value::Data(token.to_vec()));
    message.insert("PushMagic".into(), push_magic.into());
    to_xml(message)
}

/// `CheckOut`: the device leaves management.
pub fn check_out(udid: &str, topic: &str) -> Vec<u8> {
    let mut message = Dictionary::new();
    message.insert("MessageType".into(), "CheckOut".into());
    message.insert("Topic".into(), topic.into());
    message.insert("UDID".into(), udid.into());
    to_xml(message)
}

/// A `DeclarativeManagement` check-in for `endpoint`, with the status report as `Data`.
pub fn declarative_management(udid: &str, endpoint: &str, data: Option<Vec<u8>>) -> Vec<u8> {
    let mut message = Dictionary::new();
    message.insert("MessageType".into(), "DeclarativeManagement".into());
    message.insert("UDID".into(), udid.into());
    message.insert("Endpoint".into(), endpoint.into());
    if let Some(data) = data {
        message.insert("Data".into(), Value::Data(data));
    }
    to_xml(message)
}

/// How a device answers one command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Acknowledged,
    NotNow,
    Error,
}

impl Answer {
    pub fn status(self) -> &'static str {
        match self {
            Answer::Acknowledged => "Acknowledged",
            Answer::NotNow => "NotNow",
            Answer::Error => "Error",
        }
    }
}

/// The `Idle` report that opens every connect session.
pub fn idle(udid: &str) -> Vec<u8> {
    let mut message = Dictionary::new();
    message.insert("UDID".into(), udid.into());
    message.insert("Status".into(), "Idle".into());
    to_xml(message)
}

/// A command as the device received it.
#[derive(Debug, PartialEq)]
pub struct ReceivedCommand {
    pub command_uuid: String,
    pub request_type: String,
    /// `Queries` of a `DeviceInformation` command.
    pub queries: Vec<String>,
    /// `Data` of a `DeclarativeManagement` command: a TokensResponse.
    pub data: Option<Vec<u8>>,
}

/// Reads a connect response; an empty body means the queue is empty.
pub fn parse_command(body: &[u8]) -> Result<Option<ReceivedCommand>, MessageError> {
    if body.is_empty() {
        return Ok(None);
    }
    let outer: Dictionary = plist::from_bytes(body)?;
    let command_uuid = outer
        .get("CommandUUID")
        .and_then(Value::as_string)
        .ok_or(MessageError::Missing("CommandUUID"))?
        .to_owned();
    let command = outer
        .get("Command")
        .and_then(Value::as_dictionary)
        .ok_or(MessageError::Missing("Command"))?;
    let request_type = command
        .get("RequestType")
        .and_then(Value::as_string)
        .ok_or(MessageError::Missing("RequestType"))?
        .to_owned();
    let queries = command
        .get("Queries")
        .and_then(Value::as_array)
        .map(|queries| {
            queries
                .iter()
                .filter_map(Value::as_string)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let data = command
        .get("Data")
        .and_then(Value::as_data)
        .map(<[u8]>::to_vec);
    Ok(Some(ReceivedCommand {
        command_uuid,
        request_type,
        queries,
        data,
    }))
}

/// The connect report answering `command`: for `Acknowledged`, the result keys a real
/// device returns for that request type.
pub fn command_result(udid: &str, command: &ReceivedCommand, answer: Answer) -> Vec<u8> {
    let mut message = Dictionary::new();
    message.insert("UDID".into(), udid.into());
    message.insert("CommandUUID".into(), command.command_uuid.as_str().into());
    message.insert("Status".into(), answer.status().into());
    match answer {
        Answer::Acknowledged => {
            for (key, value) in result_payload(udid, command) {
                message.insert(key.into(), value);
            }
        }
        Answer::Error => {
            message.insert("ErrorChain".into(), error_chain());
        }
        Answer::NotNow => {}
    }
    to_xml(message)
}

fn error_chain() -> Value {
    let mut error = Dictionary::new();
    error.insert("ErrorCode".into(), Value::Integer(12021.into()));
    error.insert("ErrorDomain".into(), "MCMDMErrorDomain".into());
    error.insert(
        "LocalizedDescription".into(),
        "The device is busy and cannot process this command.".into(),
    );
    error.insert("USEnglishDescription".into(), "Device busy".into());
    Value::Array(vec![Value::Dictionary(error)])
}

fn result_payload(udid: &str, command: &ReceivedCommand) -> Vec<(&'static str, Value)> {
    match command.request_type.as_str() {
        "DeviceInformation" => vec![("QueryResponses", query_responses(udid, &command.queries))],
        "SecurityInfo" => vec![("SecurityInfo", security_info())],
        "InstalledApplicationList" => {
            vec![("InstalledApplicationList", installed_applications())]
        }
        "ProfileList" => vec![("ProfileList", profile_list())],
        _ => Vec::new(),
    }
}

fn dict(entries: &[(&str, Value)]) -> Value {
    Value::Dictionary(
        entries
            .iter()
            .map(|(key, value)| ((*key).to_owned(), value.clone()))
            .collect(),
    )
}

fn query_responses(udid: &str, queries: &[String]) -> Value {
    let responses: Dictionary = queries
        .iter()
        .map(|query| (query.clone(), query_value(udid, query)))
        .collect();
    Value::Dictionary(responses)
}

/// A plausible value per well-known query; unknown queries are answered with a string,
/// as devices do for string-typed keys.
fn query_value(udid: &str, query: &str) -> Value {
    match query {
        "UDID" => udid.into(),
        "SerialNumber" => format!("C02{}", &udid[udid.len().saturating_sub(8)..]).into(),
        "DeviceName" => format!("Device {}", &udid[udid.len().saturating_sub(6)..]).into(),
        "OSVersion" => "17.5.1".into(),
        "BuildVersion" => "21F90".into(),
        "ProductName" | "Model" => "iPhone15,2".into(),
        "ModelName" => "iPhone".into(),
        "IsSupervised" | "IsActivationLockEnabled" => Value::Boolean(true),
        "BatteryLevel" => Value::Real(0.82),
        "DeviceCapacity" => Value::Real(128.0),
        "AvailableDeviceCapacity" => Value::Real(71.5),
        _ => "unknown".into(),
    }
}

fn security_info() -> Value {
    dict(&[
        ("HardwareEncryptionCaps", Value::Integer(3.into())),
        ("PasscodePresent", Value::Boolean(true)),
        ("PasscodeCompliant", Value::Boolean(true)),
        ("PasscodeCompliantWithProfiles", Value::Boolean(true)),
    ])
}

fn installed_applications() -> Value {
    let app = |identifier: &str, name: &str, version: &str| {
        dict(&[
            ("Identifier", identifier.into()),
            ("Name", name.into()),
            ("Version", version.into()),
            ("ShortVersion", version.into()),
            ("BundleSize", Value::Integer(48_234_496.into())),
        ])
    };
    Value::Array(vec![
        app("com.example.mail", "Mail", "4.2"),
        app("com.example.notes", "Notes", "1.9.3"),
    ])
}

fn profile_list() -> Value {
    Value::Array(vec![dict(&[
        ("PayloadIdentifier", "com.example.mdm".into()),
        ("PayloadDisplayName", "Remote Management".into()),
        ("PayloadUUID", "8B3C2D1A-5E4F-4A6B-9C8D-7E6F5A4B3C2D".into()),
        ("PayloadVersion", Value::Integer(1.into())),
        ("IsManaged", Value::Boolean(true)),
    ])])
}

/// A DDM declaration the device holds, as listed in `declaration-items`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestItem {
    /// `activation`, `configuration`, `asset` or `management`: the URL path segment.
    pub category: &'static str,
    pub identifier: String,
    pub server_token: String,
}

/// Manifest keys of `declaration-items`, with the path segment and status-report key.
const CATEGORIES: [(&str, &str, &str); 4] = [
    ("Activations", "activation", "activations"),
    ("Configurations", "configuration", "configurations"),
    ("Assets", "asset", "assets"),
    ("Management", "management", "management"),
];

/// `DeclarationsToken` of a TokensResponse (`tokens` endpoint or the command's `Data`).
pub fn declarations_token(tokens: &[u8]) -> Result<String, MessageError> {
    let tokens: Json = serde_json::from_slice(tokens)?;
    tokens["SyncTokens"]["DeclarationsToken"]
        .as_str()
        .map(str::to_owned)
        .ok_or(MessageError::Missing("SyncTokens.DeclarationsToken"))
}

/// Every declaration listed in a DeclarationItemsResponse.
pub fn manifest(items: &[u8]) -> Result<Vec<ManifestItem>, MessageError> {
    let items: Json = serde_json::from_slice(items)?;
    let declarations = &items["Declarations"];
    let mut manifest = Vec::new();
    for (key, category, _) in CATEGORIES {
        for item in declarations[key].as_array().into_iter().flatten() {
            let identifier = item["Identifier"].as_str();
            let server_token = item["ServerToken"].as_str();
            let (Some(identifier), Some(server_token)) = (identifier, server_token) else {
                return Err(MessageError::Missing("Identifier/ServerToken"));
            };
            manifest.push(ManifestItem {
                category,
                identifier: identifier.to_owned(),
                server_token: server_token.to_owned(),
            });
        }
    }
    Ok(manifest)
}

/// `Payload.Echo` of a declaration body: what the load scenarios change to publish a new
/// revision of their test configuration.
pub fn payload_echo(declaration: &[u8]) -> Result<Option<String>, MessageError> {
    let declaration: Json = serde_json::from_slice(declaration)?;
    Ok(declaration["Payload"]["Echo"].as_str().map(str::to_owned))
}

/// A status report (KMFDDM's real first report) listing `held` as active and valid with
/// their server tokens.
pub fn status_report(held: &[ManifestItem]) -> Vec<u8> {
    let mut report: Json = serde_json::from_slice(STATUS_REPORT).unwrap_or_else(|_| json!({}));
    let declarations = &mut report["StatusItems"]["management"]["declarations"];
    for (_, category, key) in CATEGORIES {
        let listed: Vec<Json> = held
            .iter()
            .filter(|item| item.category == category)
            .map(|item| {
                json!({
                    "identifier": item.identifier,
                    "server-token": item.server_token,
                    "active": true,
                    "valid": "valid",
                })
            })
            .collect();
        declarations[key] = Json::Array(listed);
    }
    serde_json::to_vec(&report).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UDID: &str = "4F52434C-0000-4000-8000-000000000001";
    const TOPIC: &str = "com.apple.mgmt.External.test";

    fn parse(body: &[u8]) -> Dictionary {
        plist::from_bytes(body).expect("a plist dictionary")
    }

    #[test]
    fn enrollment_messages_are_the_real_fixtures_readdressed() {
        let authenticate = parse(&authenticate(UDID, TOPIC));
        assert_eq!(
            authenticate["MessageType"].as_string(),
            Some("Authenticate")
        );
        assert_eq!(authenticate["UDID"].as_string(), Some(UDID));
        assert_eq!(authenticate["Topic"].as_string(), Some(TOPIC));
        let update = parse(&token_update(UDID, TOPIC, &[7; 32], "MAGIC"));
        assert_eq!(update["MessageType"].as_string(), Some("TokenUpdate"));
        assert_eq!(update["Token"].as_data(), Some(&[7u8; 32][..]));
        assert_eq!(update["PushMagic"].as_string(), Some("MAGIC"));
    }

    fn command(request_type: &str, extra: &[(&str, Value)]) -> Vec<u8> {
        let mut inner = Dictionary::new();
        inner.insert("RequestType".into(), request_type.into());
        for (key, value) in extra {
            inner.insert((*key).into(), value.clone());
        }
        let mut outer = Dictionary::new();
        outer.insert("CommandUUID".into(), "C-1".into());
        outer.insert("Command".into(), Value::Dictionary(inner));
        to_xml(outer)
    }

    #[test]
    fn an_empty_connect_response_means_no_command() {
        assert_eq!(parse_command(b"").unwrap(), None);
    }

    #[test]
    fn device_information_is_answered_with_exactly_the_asked_queries() {
        let queries = Value::Array(vec!["SerialNumber".into(), "OSVersion".into()]);
        let received = parse_command(&command("DeviceInformation", &[("Queries", queries)]))
            .unwrap()
            .unwrap();
        let result = parse(&command_result(UDID, &received, Answer::Acknowledged));
        assert_eq!(result["Status"].as_string(), Some("Acknowledged"));
        assert_eq!(result["CommandUUID"].as_string(), Some("C-1"));
        let responses = result["QueryResponses"].as_dictionary().unwrap();
        let mut keys: Vec<&String> = responses.keys().collect();
        keys.sort();
        assert_eq!(keys, ["OSVersion", "SerialNumber"]);
    }

    #[test]
    fn inventory_commands_carry_their_result_keys() {
        for (request_type, key) in [
            ("SecurityInfo", "SecurityInfo"),
            ("InstalledApplicationList", "InstalledApplicationList"),
            ("ProfileList", "ProfileList"),
        ] {
            let received = parse_command(&command(request_type, &[])).unwrap().unwrap();
            let result = parse(&command_result(UDID, &received, Answer::Acknowledged));
            assert!(result.contains_key(key), "{request_type} answers {key}");
        }
    }

    #[test]
    fn errors_carry_an_error_chain_and_not_now_carries_nothing_else() {
        let received = parse_command(&command("DeviceLock", &[])).unwrap().unwrap();
        let error = parse(&command_result(UDID, &received, Answer::Error));
        assert_eq!(error["Status"].as_string(), Some("Error"));
        assert_eq!(error["ErrorChain"].as_array().map(Vec::len), Some(1));
        let not_now = parse(&command_result(UDID, &received, Answer::NotNow));
        assert_eq!(not_now.len(), 3);
    }

    #[test]
    fn declarative_management_data_is_kept_for_the_sync() {
        let data =
            br#"{"SyncTokens":{"DeclarationsToken":"abc","Timestamp":"2024-01-01T00:00:00Z"}}"#;
        let received = parse_command(&command(
            "DeclarativeManagement",
            &[("Data", Value::Data(data.to_vec()))],
        ))
        .unwrap()
        .unwrap();
        assert_eq!(declarations_token(&received.data.unwrap()).unwrap(), "abc");
    }

    #[test]
    fn the_manifest_lists_every_category_and_feeds_the_status_report() {
        let items = br#"{"Declarations":{"Activations":[{"Identifier":"a","ServerToken":"1"}],
            "Assets":[],"Configurations":[{"Identifier":"c","ServerToken":"2"}],"Management":[]},
            "DeclarationsToken":"t"}"#;
        let manifest = manifest(items).unwrap();
        assert_eq!(manifest.len(), 2);
        assert_eq!(manifest[1].category, "configuration");
        let report: Json = serde_json::from_slice(&status_report(&manifest)).unwrap();
        let listed = &report["StatusItems"]["management"]["declarations"];
        assert_eq!(listed["configurations"][0]["server-token"], "2");
        assert_eq!(listed["activations"][0]["active"], true);
        assert!(report["StatusItems"]["management"]["client-capabilities"].is_object());
    }

    #[test]
    fn a_declaration_body_reveals_its_revision_through_the_echo() {
        let body = br#"{"Identifier":"c","ServerToken":"2","Type":"com.apple.configuration.management.test","Payload":{"Echo":"v2"}}"#;
        assert_eq!(payload_echo(body).unwrap().as_deref(), Some("v2"));
    }
}
