//! Enrollment profiles (protocol.md §1): a configuration profile carrying a freshly issued
//! device identity (PKCS#12, from Orchard's CA) and the `com.apple.mdm` payload. The
//! profile is checked against Apple's schema before it leaves the server, so a
//! misconfiguration is an error here, not a silent enrollment failure on a device.

use std::sync::Arc;

use base64::Engine;
use plist::{Dictionary, Value};

use crate::identity::{pkcs12, CertificateAuthority, IdentityError};
use crate::schema::{self, Violation};
use crate::store::{Store, StoreError};

/// The server capabilities Orchard implements.
const SERVER_CAPABILITIES: [&str; 2] = [
    "com.apple.mdm.per-user-connections",
    "com.apple.mdm.bootstraptoken",
];

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(
        "no https server URL is known: start Orchard with --server-url https://... (or serve TLS)"
    )]
    NoServerUrl,
    #[error("no push certificate has been uploaded yet: PUT one to /api/v1/nanomdm/pushcert (the profile's Topic comes from it)")]
    NoPushCertificate,
    #[error("could not read push certificates: {0}")]
    Store(#[from] StoreError),
    #[error("could not issue a device identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("the generated profile violates Apple's schema: {}", describe(.0))]
    InvalidProfile(Vec<Violation>),
}

fn describe(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.path, v.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Builds enrollment profiles for this server.
pub struct EnrollmentProfiles {
    server_url: Option<String>,
    ca: Arc<CertificateAuthority>,
    /// Ask devices to sign every request when no TLS client certificate can reach Orchard.
    sign_message: bool,
    access_rights: u64,
    organization: String,
}

impl EnrollmentProfiles {
    pub fn new(
        server_url: Option<String>,
        ca: Arc<CertificateAuthority>,
        sign_message: bool,
        access_rights: u64,
        organization: String,
    ) -> Self {
        EnrollmentProfiles {
            server_url: server_url.map(|u| u.trim_end_matches('/').to_string()),
            ca,
            sign_message,
            access_rights,
            organization,
        }
    }

    /// A new profile (XML plist bytes) with its own identity certificate.
    pub async fn build(&self, store: &dyn Store) -> Result<Vec<u8>, EnrollError> {
        let base = self.server_url.as_deref().ok_or(EnrollError::NoServerUrl)?;
        let topic = store
            .push_certs()
            .await?
            .into_iter()
            .max_by_key(|c| c.uploaded_at)
            .map(|c| c.topic)
            .ok_or(EnrollError::NoPushCertificate)?;
        let identity_uuid = new_uuid();
        let identity_payload = self.identity_payload(&identity_uuid)?;
        let mdm_payload = self.mdm_payload(base, &topic, &identity_uuid);
        schema::validate_mdm_payload(&mdm_payload).map_err(EnrollError::InvalidProfile)?;
        let profile = self.profile(vec![identity_payload, mdm_payload]);
        let validation = schema::validate_profile_payload(&profile);
        if !validation.errors.is_empty() {
            return Err(EnrollError::InvalidProfile(validation.errors));
        }
        let mut xml = Vec::new();
        Value::Dictionary(profile)
            .to_writer_xml(&mut xml)
            .map_err(|e| {
                EnrollError::InvalidProfile(vec![Violation {
                    path: "$".into(),
                    message: e.to_string(),
                }])
            })?;
        Ok(xml)
    }

    fn identity_payload(&self, payload_uuid: &str) -> Result<Dictionary, EnrollError> {
        let identity = self
            .ca
            .issue_identity(&format!("Orchard device {payload_uuid}"))?;
        let password = random_password();
        let p12 = pkcs12(
            &identity,
            self.ca.ca_cert_der(),
            &password,
            "Orchard device identity",
        )?;
        let mut payload = common_payload(
            "com.apple.security.pkcs12",
            "com.orchard.enroll.identity",
            payload_uuid,
            "Device identity",
        );
        payload.insert("PayloadContent".into(), Value::Data(p12));
        payload.insert("Password".into(), Value::String(password));
        payload.insert(
            "PayloadCertificateFileName".into(),
            Value::String("orchard-identity.p12".into()),
        );
        Ok(payload)
    }

    fn mdm_payload(&self, base: &str, topic: &str, identity_uuid: &str) -> Dictionary {
        let mut payload = common_payload(
            "com.apple.mdm",
            "com.orchard.enroll.mdm",
            &new_uuid(),
            "Device management",
        );
        let entries: [(&str, Value); 8] = [
            ("IdentityCertificateUUID", identity_uuid.into()),
            ("Topic", topic.into()),
            ("ServerURL", format!("{base}/mdm").into()),
            ("CheckInURL", format!("{base}/checkin").into()),
            ("SignMessage", self.sign_message.into()),
            ("AccessRights", Value::Integer(self.access_rights.into())),
            ("CheckOutWhenRemoved", true.into()),
            (
                "ServerCapabilities",
                Value::Array(SERVER_CAPABILITIES.iter().map(|c| (*c).into()).collect()),
            ),
        ];
        for (key, value) in entries {
            payload.insert(key.into(), value);
        }
        payload
    }

    fn profile(&self, content: Vec<Dictionary>) -> Dictionary {
        let mut profile = common_payload(
            "Configuration",
            "com.orchard.enroll",
            &new_uuid(),
            &format!("{} device management", self.organization),
        );
        profile.insert(
            "PayloadOrganization".into(),
            self.organization.clone().into(),
        );
        profile.insert(
            "PayloadContent".into(),
            Value::Array(content.into_iter().map(Value::Dictionary).collect()),
        );
        profile
    }
}

fn common_payload(
    payload_type: &str,
    identifier: &str,
    uuid: &str,
    display_name: &str,
) -> Dictionary {
    let mut payload = Dictionary::new();
    payload.insert("PayloadType".into(), payload_type.into());
    payload.insert("PayloadVersion".into(), Value::Integer(1.into()));
    payload.insert("PayloadIdentifier".into(), identifier.into());
    payload.insert("PayloadUUID".into(), uuid.into());
    payload.insert("PayloadDisplayName".into(), display_name.into());
    payload
}

fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string().to_uppercase()
}

/// The PKCS#12 travels inside the same profile, so its password only has to defeat
/// casual extraction from a saved profile; it is random per profile all the same.
fn random_password() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 18]>())
}
