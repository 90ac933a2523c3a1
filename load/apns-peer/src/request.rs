//! APNs request validation: the checks Apple applies before a push is considered at all.
//!
//! A sender that only ever talks to a permissive fake can ship malformed pushes that the real
//! service rejects; validating first means every Orchard bug in path, headers or payload
//! surfaces as the same `4xx` reason APNs would give.

use http::{HeaderMap, Method};
use uuid::Uuid;

/// Largest payload APNs accepts for a regular (non-VoIP) push.
pub const MAX_PAYLOAD_BYTES: usize = 4096;

/// Push types APNs knows; anything else in `apns-push-type` is `InvalidPushType`.
const KNOWN_PUSH_TYPES: &[&str] = &[
    "alert",
    "background",
    "complication",
    "controls",
    "fileprovider",
    "liveactivity",
    "location",
    "mdm",
    "pushtotalk",
    "voip",
    "widgets",
];

const DEVICE_PATH_PREFIX: &str = "/3/device/";

/// A request that passed validation, as handed to [`crate::Behavior`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushRequest {
    /// The device token exactly as it appeared in the path.
    pub token_hex: String,
    /// `apns-topic` header.
    pub topic: Option<String>,
    /// `apns-push-type` header.
    pub push_type: Option<String>,
    /// `apns-priority` header.
    pub priority: Option<String>,
    /// `apns-expiration` header.
    pub expiration: Option<String>,
    /// `apns-id` header sent by the client, if any.
    pub apns_id: Option<String>,
    /// The JSON payload.
    pub body: Vec<u8>,
    /// UID attribute of the client certificate's subject: the topic the push certificate
    /// is bound to.
    pub client_topic: Option<String>,
}

impl PushRequest {
    /// The `mdm` value of the payload: the PushMagic the device checks before waking up.
    pub fn push_magic(&self) -> Option<String> {
        push_magic(&self.body)
    }
}

/// The `mdm` string of a JSON payload, if it has one.
pub(crate) fn push_magic(body: &[u8]) -> Option<String> {
    let payload: serde_json::Value = serde_json::from_slice(body).ok()?;
    payload.get("mdm")?.as_str().map(str::to_owned)
}

/// The token part of a request path, or `""` when the path is not the device endpoint.
pub(crate) fn token_in_path(path: &str) -> &str {
    path.strip_prefix(DEVICE_PATH_PREFIX).unwrap_or_default()
}

/// An APNs error answer: HTTP status plus the `reason` string of the JSON body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub(crate) status: u16,
    pub(crate) reason: &'static str,
}

impl Rejection {
    const fn bad_request(reason: &'static str) -> Self {
        Self {
            status: 400,
            reason,
        }
    }
}

/// The certificate-level rejection every request on an untrusted connection receives.
pub(crate) const BAD_CERTIFICATE: Rejection = Rejection {
    status: 403,
    reason: "BadCertificate",
};

/// Checks a request the way APNs does, in the order APNs reports problems: method, path,
/// token, headers, then payload.
///
/// `body` may be truncated to `MAX_PAYLOAD_BYTES + 1` bytes; anything longer than the
/// limit is rejected without looking further.
pub(crate) fn validate(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
    client_topic: Option<&str>,
) -> Result<PushRequest, Rejection> {
    if method != Method::POST {
        return Err(Rejection {
            status: 405,
            reason: "MethodNotAllowed",
        });
    }
    let token_hex = device_token(path)?;
    let push_type = single_header(headers, "apns-push-type", "InvalidPushType")?;
    if push_type
        .as_deref()
        .is_some_and(|kind| !KNOWN_PUSH_TYPES.contains(&kind))
    {
        return Err(Rejection::bad_request("InvalidPushType"));
    }
    let topic = single_header(headers, "apns-topic", "BadTopic")?;
    check_topic(topic.as_deref(), client_topic)?;
    let priority = single_header(headers, "apns-priority", "BadPriority")?;
    if priority
        .as_deref()
        .is_some_and(|value| !matches!(value, "1" | "5" | "10"))
    {
        return Err(Rejection::bad_request("BadPriority"));
    }
    let expiration = single_header(headers, "apns-expiration", "BadExpirationDate")?;
    if expiration
        .as_deref()
        .is_some_and(|value| value.parse::<u64>().is_err())
    {
        return Err(Rejection::bad_request("BadExpirationDate"));
    }
    let apns_id = single_header(headers, "apns-id", "BadMessageId")?;
    if apns_id.as_deref().is_some_and(|id| !is_canonical_uuid(id)) {
        return Err(Rejection::bad_request("BadMessageId"));
    }
    check_payload(body)?;
    Ok(PushRequest {
        token_hex: token_hex.to_owned(),
        topic,
        push_type,
        priority,
        expiration,
        apns_id,
        body: body.to_vec(),
        client_topic: client_topic.map(str::to_owned),
    })
}

/// Extracts the token from `/3/device/<token>`; APNs tokens are hex strings of whole bytes.
fn device_token(path: &str) -> Result<&str, Rejection> {
    if path == DEVICE_PATH_PREFIX.trim_end_matches('/') {
        return Err(Rejection::bad_request("MissingDeviceToken"));
    }
    let Some(token) = path.strip_prefix(DEVICE_PATH_PREFIX) else {
        return Err(Rejection {
            status: 404,
            reason: "BadPath",
        });
    };
    if token.is_empty() {
        return Err(Rejection::bad_request("MissingDeviceToken"));
    }
    if token.len() % 2 != 0 || !token.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        return Err(Rejection::bad_request("BadDeviceToken"));
    }
    Ok(token)
}

/// Reads an optional header that must appear at most once and be text; `bad_value` is the
/// reason APNs gives when the value itself is unusable.
fn single_header(
    headers: &HeaderMap,
    name: &str,
    bad_value: &'static str,
) -> Result<Option<String>, Rejection> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Rejection::bad_request("DuplicateHeaders"));
    }
    value
        .to_str()
        .map(|text| Some(text.to_owned()))
        .map_err(|_| Rejection::bad_request(bad_value))
}

/// A certificate bound to a topic may only push to that topic; a certificate without one
/// gives APNs nothing to fall back on when the header is missing.
fn check_topic(topic: Option<&str>, client_topic: Option<&str>) -> Result<(), Rejection> {
    match (topic, client_topic) {
        (Some(requested), Some(allowed)) if requested != allowed => {
            Err(Rejection::bad_request("TopicDisallowed"))
        }
        (None, None) => Err(Rejection::bad_request("MissingTopic")),
        _ => Ok(()),
    }
}

/// APNs echoes `apns-id` verbatim, so it only accepts the canonical hyphenated form.
pub(crate) fn is_canonical_uuid(id: &str) -> bool {
    id.len() == 36 && Uuid::try_parse(id).is_ok()
}

fn check_payload(body: &[u8]) -> Result<(), Rejection> {
    if body.len() > MAX_PAYLOAD_BYTES {
        return Err(Rejection {
            status: 413,
            reason: "PayloadTooLarge",
        });
    }
    if body.is_empty() {
        return Err(Rejection::bad_request("PayloadEmpty"));
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        _ => Err(Rejection::bad_request("BadPayload")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const TOKEN: &str = "0a1b2c3d4e5f";
    const TOPIC: &str = "com.apple.mgmt.External.test";
    const MDM_BODY: &[u8] = br#"{"mdm":"magic-1"}"#;

    fn mdm_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("apns-topic", HeaderValue::from_static(TOPIC));
        headers.insert("apns-push-type", HeaderValue::from_static("mdm"));
        headers.insert("apns-priority", HeaderValue::from_static("10"));
        headers.insert("apns-expiration", HeaderValue::from_static("0"));
        headers
    }

    fn device_path() -> String {
        format!("{DEVICE_PATH_PREFIX}{TOKEN}")
    }

    fn reason_for(method: Method, path: &str, headers: &HeaderMap, body: &[u8]) -> Rejection {
        validate(&method, path, headers, body, Some(TOPIC)).expect_err("request must be rejected")
    }

    fn with_header(name: &'static str, value: &'static str) -> HeaderMap {
        let mut headers = mdm_headers();
        headers.insert(name, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn a_well_formed_mdm_push_is_accepted_with_every_header_captured() {
        let request = validate(
            &Method::POST,
            &device_path(),
            &mdm_headers(),
            MDM_BODY,
            Some(TOPIC),
        )
        .expect("valid push");
        assert_eq!(request.token_hex, TOKEN);
        assert_eq!(request.topic.as_deref(), Some(TOPIC));
        assert_eq!(request.push_type.as_deref(), Some("mdm"));
        assert_eq!(request.priority.as_deref(), Some("10"));
        assert_eq!(request.expiration.as_deref(), Some("0"));
        assert_eq!(request.apns_id, None);
        assert_eq!(request.client_topic.as_deref(), Some(TOPIC));
        assert_eq!(request.push_magic().as_deref(), Some("magic-1"));
    }

    #[test]
    fn the_topic_header_may_be_omitted_when_the_certificate_names_one() {
        let mut headers = mdm_headers();
        headers.remove("apns-topic");
        assert!(validate(
            &Method::POST,
            &device_path(),
            &headers,
            MDM_BODY,
            Some(TOPIC)
        )
        .is_ok());
    }

    #[test]
    fn only_post_is_allowed() {
        let rejection = reason_for(Method::GET, &device_path(), &mdm_headers(), MDM_BODY);
        assert_eq!(rejection.status, 405);
        assert_eq!(rejection.reason, "MethodNotAllowed");
    }

    #[test]
    fn paths_outside_the_device_endpoint_are_bad_paths() {
        for path in ["/", "/3/devices/00ff", "/2/device/00ff"] {
            let rejection = reason_for(Method::POST, path, &mdm_headers(), MDM_BODY);
            assert_eq!(
                (rejection.status, rejection.reason),
                (404, "BadPath"),
                "{path}"
            );
        }
    }

    #[test]
    fn a_missing_token_is_reported_as_such() {
        for path in ["/3/device", "/3/device/"] {
            let rejection = reason_for(Method::POST, path, &mdm_headers(), MDM_BODY);
            assert_eq!(rejection.reason, "MissingDeviceToken", "{path}");
        }
    }

    #[test]
    fn tokens_must_be_whole_bytes_of_hex() {
        for token in ["abc", "zz", "00ff/00", "00 f"] {
            let path = format!("{DEVICE_PATH_PREFIX}{token}");
            let rejection = reason_for(Method::POST, &path, &mdm_headers(), MDM_BODY);
            assert_eq!(
                (rejection.status, rejection.reason),
                (400, "BadDeviceToken")
            );
        }
    }

    #[test]
    fn unknown_push_types_are_invalid() {
        let headers = with_header("apns-push-type", "wakeup");
        let rejection = reason_for(Method::POST, &device_path(), &headers, MDM_BODY);
        assert_eq!(rejection.reason, "InvalidPushType");
    }

    #[test]
    fn a_topic_other_than_the_certificate_uid_is_disallowed() {
        let headers = with_header("apns-topic", "com.apple.mgmt.External.other");
        let rejection = reason_for(Method::POST, &device_path(), &headers, MDM_BODY);
        assert_eq!(rejection.reason, "TopicDisallowed");
    }

    #[test]
    fn without_a_certificate_topic_the_header_is_mandatory() {
        let mut headers = mdm_headers();
        headers.remove("apns-topic");
        let rejection = validate(&Method::POST, &device_path(), &headers, MDM_BODY, None)
            .expect_err("no topic anywhere");
        assert_eq!(rejection.reason, "MissingTopic");
    }

    #[test]
    fn any_topic_is_allowed_for_a_certificate_without_uid() {
        assert!(validate(
            &Method::POST,
            &device_path(),
            &mdm_headers(),
            MDM_BODY,
            None
        )
        .is_ok());
    }

    #[test]
    fn repeated_apns_headers_are_duplicates() {
        let mut headers = mdm_headers();
        headers.append("apns-priority", HeaderValue::from_static("5"));
        let rejection = reason_for(Method::POST, &device_path(), &headers, MDM_BODY);
        assert_eq!(rejection.reason, "DuplicateHeaders");
    }

    #[test]
    fn priority_expiration_and_id_must_be_well_formed() {
        let cases = [
            ("apns-priority", "7", "BadPriority"),
            ("apns-expiration", "tomorrow", "BadExpirationDate"),
            ("apns-id", "not-a-uuid", "BadMessageId"),
            (
                "apns-id",
                "0123456789abcdef0123456789abcdef",
                "BadMessageId",
            ),
        ];
        for (name, value, reason) in cases {
            let headers = with_header(name, value);
            let rejection = reason_for(Method::POST, &device_path(), &headers, MDM_BODY);
            assert_eq!(rejection.reason, reason, "{name}: {value}");
        }
    }

    #[test]
    fn a_canonical_apns_id_is_kept() {
        let headers = with_header("apns-id", "123E4567-E89B-12D3-A456-426614174000");
        let request = validate(
            &Method::POST,
            &device_path(),
            &headers,
            MDM_BODY,
            Some(TOPIC),
        )
        .expect("valid push");
        assert_eq!(
            request.apns_id.as_deref(),
            Some("123E4567-E89B-12D3-A456-426614174000")
        );
    }

    #[test]
    fn payloads_must_be_non_empty_json_objects_within_the_size_limit() {
        let oversized = vec![b' '; MAX_PAYLOAD_BYTES + 1];
        let cases: [(&[u8], u16, &str); 4] = [
            (b"", 400, "PayloadEmpty"),
            (b"[1,2]", 400, "BadPayload"),
            (b"{\"mdm\":", 400, "BadPayload"),
            (&oversized, 413, "PayloadTooLarge"),
        ];
        for (body, status, reason) in cases {
            let rejection = reason_for(Method::POST, &device_path(), &mdm_headers(), body);
            assert_eq!((rejection.status, rejection.reason), (status, reason));
        }
    }

    #[test]
    fn a_payload_without_push_magic_has_none() {
        let request = validate(
            &Method::POST,
            &device_path(),
            &mdm_headers(),
            br#"{"aps":{}}"#,
            Some(TOPIC),
        )
        .expect("valid payload");
        assert_eq!(request.push_magic(), None);
    }
}
