//! Configuration-profile validation, including the enrollment (`com.apple.mdm`) payload.
//!
//! Apple's schema encodes most `com.apple.mdm` rules (required keys, URL and
//! UUID formats, capability names); the rest are stated only in prose in the
//! key descriptions and are checked here explicitly.

use plist::{Dictionary, Value};

use super::model::KeySchema;
use super::validate::{
    best_fit, index_path, member_path, validate_dictionary, Validation, Violation,
};
use super::{profile_payload, profile_payload_variants};

const MDM_PAYLOAD_TYPE: &str = "com.apple.mdm";
/// `PayloadType` of a whole profile, described by `TopLevel.yaml`.
const PROFILE_PAYLOAD_TYPE: &str = "Configuration";
const TOPIC_PREFIX: &str = "com.apple.mgmt.";

/// `AccessRights` bits with a prerequisite bit, and the largest valid value (all 13 rights).
const INSTALL_PROFILES: i64 = 2;
const INSPECT_PROFILES: i64 = 1;
const INSTALL_PROVISIONING: i64 = 128;
const INSPECT_PROVISIONING: i64 = 64;
const ALL_ACCESS_RIGHTS: i64 = 8191;

/// Checks a `com.apple.mdm` payload: the schema's keys and formats plus the
/// rules Apple states only in prose. Keys common to all payloads
/// (`PayloadUUID`, …) are checked by [`validate_profile_payload`].
pub fn validate_mdm_payload(payload: &Dictionary) -> Result<(), Vec<Violation>> {
    let keys = profile_payload(MDM_PAYLOAD_TYPE).map_or(&[][..], |schema| schema.keys.as_slice());
    let mut validation = Validation::default();
    validate_dictionary(&[keys], payload, "$", &mut validation);
    check_mdm_prose_rules(payload, "$", &mut validation);
    if validation.is_valid() {
        Ok(())
    } else {
        Err(validation.errors)
    }
}

/// Validates a profile (`PayloadType` `Configuration`, including every
/// `PayloadContent` item) or a single payload against its `PayloadType`'s
/// schema together with the keys common to all payloads.
///
/// A payload type the snapshot does not know yet only produces a warning.
pub fn validate_profile_payload(payload: &Dictionary) -> Validation {
    let mut validation = Validation::default();
    validate_payload_at(payload, "$", &mut validation);
    validation
}

fn validate_payload_at(payload: &Dictionary, path: &str, validation: &mut Validation) {
    let payload_type = payload.get("PayloadType").and_then(Value::as_string);
    if payload_type == Some(PROFILE_PAYLOAD_TYPE) {
        validate_profile_at(payload, path, validation);
        return;
    }
    let common = schema_keys("CommonPayloadKeys");
    let variants = payload_type.map_or(&[][..], profile_payload_variants);
    if variants.is_empty() {
        if let Some(payload_type) = payload_type {
            validation.warnings.push(Violation::new(
                &member_path(path, "PayloadType"),
                format!("{payload_type:?} is not a payload type the schema knows"),
            ));
        }
        let mut common_only = Validation::default();
        validate_dictionary(&[common], payload, path, &mut common_only);
        // Without the payload's own schema its specific keys are expected, not suspicious.
        validation.errors.extend(common_only.errors);
        return;
    }
    let candidates = variants.iter().map(|variant| {
        let mut candidate = Validation::default();
        validate_dictionary(&[&variant.keys, common], payload, path, &mut candidate);
        (variant.keys.as_slice(), candidate)
    });
    validation.absorb(best_fit(payload, candidates).unwrap_or_default());
    if payload_type == Some(MDM_PAYLOAD_TYPE) {
        check_mdm_prose_rules(payload, path, validation);
    }
}

/// The profile dictionary itself, then each payload it carries.
fn validate_profile_at(profile: &Dictionary, path: &str, validation: &mut Validation) {
    validate_dictionary(&[schema_keys("TopLevel")], profile, path, validation);
    let Some(contents) = profile.get("PayloadContent").and_then(Value::as_array) else {
        return;
    };
    let contents_path = member_path(path, "PayloadContent");
    for (index, content) in contents.iter().enumerate() {
        if let Some(payload) = content.as_dictionary() {
            validate_payload_at(payload, &index_path(&contents_path, index), validation);
        }
    }
    check_identity_reference(contents, &contents_path, validation);
}

/// Payload types that can carry the device identity an MDM payload points at.
const IDENTITY_PAYLOAD_TYPES: [&str; 3] = [
    "com.apple.security.pkcs12",
    "com.apple.security.scep",
    "com.apple.security.acme",
];

/// An MDM payload's `IdentityCertificateUUID` must be the `PayloadUUID` of an identity
/// payload in the same profile: the device has no other identity to present.
fn check_identity_reference(contents: &[Value], contents_path: &str, validation: &mut Validation) {
    let payloads: Vec<&Dictionary> = contents.iter().filter_map(Value::as_dictionary).collect();
    let identities: Vec<&str> = payloads
        .iter()
        .filter(|p| {
            p.get("PayloadType")
                .and_then(Value::as_string)
                .is_some_and(|t| IDENTITY_PAYLOAD_TYPES.contains(&t))
        })
        .filter_map(|p| p.get("PayloadUUID").and_then(Value::as_string))
        .collect();
    for (index, content) in contents.iter().enumerate() {
        let Some(payload) = content.as_dictionary() else {
            continue;
        };
        if payload.get("PayloadType").and_then(Value::as_string) != Some(MDM_PAYLOAD_TYPE) {
            continue;
        }
        let Some(reference) = payload
            .get("IdentityCertificateUUID")
            .and_then(Value::as_string)
        else {
            continue;
        };
        if !identities.contains(&reference) {
            validation.error(
                &member_path(&index_path(contents_path, index), "IdentityCertificateUUID"),
                format!("{reference:?} is not the PayloadUUID of an identity payload (PKCS#12, SCEP or ACME) in this profile"),
            );
        }
    }
}

fn schema_keys(payload_type: &str) -> &'static [KeySchema] {
    profile_payload(payload_type).map_or(&[], |schema| schema.keys.as_slice())
}

/// The `com.apple.mdm` rules that exist only in Apple's descriptions.
fn check_mdm_prose_rules(payload: &Dictionary, path: &str, validation: &mut Validation) {
    if let Some(topic) = payload.get("Topic").and_then(Value::as_string) {
        if !topic.starts_with(TOPIC_PREFIX) {
            validation.error(
                &member_path(path, "Topic"),
                format!("{topic:?} must begin with {TOPIC_PREFIX:?}"),
            );
        }
    }
    if let Some(rights) = payload
        .get("AccessRights")
        .and_then(Value::as_signed_integer)
    {
        let rights_path = member_path(path, "AccessRights");
        for problem in access_rights_problems(rights) {
            validation.error(&rights_path, problem);
        }
    }
    if let Some(capabilities) = payload.get("ServerCapabilities").and_then(Value::as_array) {
        let capabilities_path = member_path(path, "ServerCapabilities");
        for (index, capability) in capabilities.iter().enumerate() {
            if capabilities[..index].contains(capability) {
                validation.error(
                    &index_path(&capabilities_path, index),
                    "capabilities must be unique",
                );
            }
        }
    }
}

fn access_rights_problems(rights: i64) -> Vec<&'static str> {
    if rights == 0 {
        return vec!["must not be 0"];
    }
    let mut problems = Vec::new();
    if !(1..=ALL_ACCESS_RIGHTS).contains(&rights) {
        problems.push("must be within 1..=8191");
    }
    if rights & INSTALL_PROFILES != 0 && rights & INSPECT_PROFILES == 0 {
        problems.push("profile installation (2) requires profile inspection (1)");
    }
    if rights & INSTALL_PROVISIONING != 0 && rights & INSPECT_PROVISIONING == 0 {
        problems.push(
            "provisioning profile installation (128) requires provisioning profile inspection (64)",
        );
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dictionary(value: serde_json::Value) -> Dictionary {
        plist::to_value(&value).unwrap().into_dictionary().unwrap()
    }

    fn mdm_payload() -> serde_json::Value {
        json!({
            "IdentityCertificateUUID": "7F3E2A10-AAAA-4BBB-8CCC-0123456789AB",
            "Topic": "com.apple.mgmt.External.5a4c3b2a-1111-2222-3333-444455556666",
            "ServerURL": "https://mdm.example.com/mdm",
            "CheckInURL": "https://mdm.example.com/checkin",
            "SignMessage": true,
            "AccessRights": 8191,
            "ServerCapabilities": ["com.apple.mdm.per-user-connections", "com.apple.mdm.bootstraptoken"],
        })
    }

    fn with(key: &str, value: serde_json::Value) -> Dictionary {
        let mut payload = mdm_payload();
        payload[key] = value;
        dictionary(payload)
    }

    fn without(key: &str) -> Dictionary {
        let mut payload = mdm_payload();
        payload.as_object_mut().unwrap().remove(key);
        dictionary(payload)
    }

    fn error_paths(result: Result<(), Vec<Violation>>) -> Vec<String> {
        result
            .unwrap_err()
            .into_iter()
            .map(|violation| violation.path)
            .collect()
    }

    #[test]
    fn a_valid_mdm_payload_passes() {
        assert_eq!(validate_mdm_payload(&dictionary(mdm_payload())), Ok(()));
        assert_eq!(
            validate_mdm_payload(&with("AccessRights", json!(1 | 64 | 128 | 16))),
            Ok(())
        );
    }

    #[test]
    fn topic_is_required_and_must_use_the_mgmt_prefix() {
        assert_eq!(
            error_paths(validate_mdm_payload(&without("Topic"))),
            ["$.Topic"]
        );
        assert_eq!(
            error_paths(validate_mdm_payload(&with(
                "Topic",
                json!("com.example.push")
            ))),
            ["$.Topic"]
        );
    }

    #[test]
    fn server_and_checkin_urls_must_be_https() {
        assert_eq!(
            error_paths(validate_mdm_payload(&with(
                "ServerURL",
                json!("http://mdm.example.com")
            ))),
            ["$.ServerURL"]
        );
        assert_eq!(
            error_paths(validate_mdm_payload(&with(
                "CheckInURL",
                json!("http://mdm.example.com")
            ))),
            ["$.CheckInURL"]
        );
        assert_eq!(
            error_paths(validate_mdm_payload(&without("ServerURL"))),
            ["$.ServerURL"]
        );
    }

    #[test]
    fn identity_certificate_uuid_must_look_like_a_uuid() {
        let result = validate_mdm_payload(&with("IdentityCertificateUUID", json!("not-a-uuid")));
        assert_eq!(error_paths(result), ["$.IdentityCertificateUUID"]);
    }

    #[test]
    fn access_rights_follow_apples_bit_rules() {
        for bad in [0, 2, 128, 2 | 64 | 128, 8192, -1] {
            let result = validate_mdm_payload(&with("AccessRights", json!(bad)));
            assert_eq!(
                error_paths(result),
                ["$.AccessRights"],
                "AccessRights {bad}"
            );
        }
        let message = validate_mdm_payload(&with("AccessRights", json!(128 | 1))).unwrap_err()[0]
            .message
            .clone();
        assert!(message.contains("(64)"), "{message}");
    }

    #[test]
    fn server_capabilities_must_be_known_and_unique() {
        let unknown = with(
            "ServerCapabilities",
            json!(["com.apple.mdm.token", "com.example.magic"]),
        );
        assert_eq!(
            error_paths(validate_mdm_payload(&unknown)),
            ["$.ServerCapabilities[1]"]
        );
        let repeated = with(
            "ServerCapabilities",
            json!(["com.apple.mdm.token", "com.apple.mdm.token"]),
        );
        let violations = validate_mdm_payload(&repeated).unwrap_err();
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].path, "$.ServerCapabilities[1]");
        assert!(violations[0].message.contains("unique"));
    }

    fn common_keys(payload_type: &str, suffix: &str) -> serde_json::Value {
        json!({
            "PayloadType": payload_type,
            "PayloadVersion": 1,
            "PayloadIdentifier": format!("com.example.enroll.{suffix}"),
            "PayloadUUID": "7F3E2A10-AAAA-4BBB-8CCC-0123456789AB",
        })
    }

    fn enrollment_profile(mdm: serde_json::Value) -> Dictionary {
        let mut identity = common_keys("com.apple.security.pkcs12", "identity");
        identity["Password"] = json!("secret");
        let mut mdm_payload = common_keys(MDM_PAYLOAD_TYPE, "mdm");
        mdm_payload["PayloadUUID"] = json!("11111111-2222-3333-4444-555555555555");
        for (key, value) in mdm.as_object().unwrap() {
            mdm_payload[key] = value.clone();
        }
        let mut profile = dictionary(json!({
            "PayloadType": "Configuration",
            "PayloadVersion": 1,
            "PayloadIdentifier": "com.example.enroll",
            "PayloadUUID": "99999999-2222-3333-4444-555555555555",
            "PayloadDisplayName": "Example MDM",
            "ConsentText": {"default": "Enroll this device?"},
        }));
        let mut identity = dictionary(identity);
        identity.insert("PayloadContent".into(), Value::Data(b"pkcs12".to_vec()));
        profile.insert(
            "PayloadContent".into(),
            Value::Array(vec![
                Value::Dictionary(identity),
                Value::Dictionary(dictionary(mdm_payload)),
            ]),
        );
        profile
    }

    #[test]
    fn the_mdm_payload_must_reference_an_identity_payload_of_the_profile() {
        let mut mdm = mdm_payload();
        mdm["IdentityCertificateUUID"] = json!("00000000-0000-0000-0000-000000000000");
        let validation = validate_profile_payload(&enrollment_profile(mdm));
        assert_eq!(
            sorted_error_paths(&validation),
            ["$.PayloadContent[1].IdentityCertificateUUID"]
        );
    }

    #[test]
    fn a_whole_enrollment_profile_validates() {
        let validation = validate_profile_payload(&enrollment_profile(mdm_payload()));
        assert_eq!(validation, Validation::default());
    }

    fn sorted_error_paths(validation: &Validation) -> Vec<&str> {
        let mut paths: Vec<&str> = validation
            .errors
            .iter()
            .map(|error| error.path.as_str())
            .collect();
        paths.sort_unstable();
        paths
    }

    #[test]
    fn payload_problems_are_located_inside_the_profile() {
        let mut broken = mdm_payload();
        broken["Topic"] = json!("com.example.push");
        broken.as_object_mut().unwrap().remove("ServerURL");
        let mut profile = enrollment_profile(broken);
        profile.remove("PayloadUUID");
        let validation = validate_profile_payload(&profile);
        let paths = sorted_error_paths(&validation);
        assert_eq!(
            paths,
            [
                "$.PayloadContent[1].ServerURL",
                "$.PayloadContent[1].Topic",
                "$.PayloadUUID"
            ]
        );
    }

    #[test]
    fn common_payload_keys_are_required_on_each_payload() {
        let mut payload = dictionary(mdm_payload());
        payload.insert("PayloadType".into(), Value::String(MDM_PAYLOAD_TYPE.into()));
        let validation = validate_profile_payload(&payload);
        let paths = sorted_error_paths(&validation);
        assert_eq!(
            paths,
            ["$.PayloadIdentifier", "$.PayloadUUID", "$.PayloadVersion"]
        );
    }

    #[test]
    fn payload_types_unknown_to_the_schema_only_warn() {
        let payload = dictionary(json!({
            "PayloadType": "com.apple.future.payload",
            "PayloadVersion": 1,
            "PayloadIdentifier": "com.example.future",
            "PayloadUUID": "11111111-2222-3333-4444-555555555555",
            "FutureKey": true,
        }));
        let validation = validate_profile_payload(&payload);
        assert!(validation.is_valid(), "{validation:?}");
        assert_eq!(validation.warnings.len(), 1);
        assert_eq!(validation.warnings[0].path, "$.PayloadType");
    }

    #[test]
    fn the_best_matching_variant_of_a_payload_type_is_used() {
        let mut kerberos = common_keys("com.apple.extensiblesso", "sso");
        for (key, value) in json!({
            "ExtensionIdentifier": "com.apple.AppSSOKerberos.KerberosExtension",
            "TeamIdentifier": "apple",
            "Type": "Credential",
            "Realm": "EXAMPLE.COM",
        })
        .as_object()
        .unwrap()
        {
            kerberos[key] = value.clone();
        }
        let validation = validate_profile_payload(&dictionary(kerberos));
        assert!(validation.is_valid(), "{validation:?}");
    }
}
