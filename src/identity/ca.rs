//! Orchard's own device identity CA.
//!
//! Enrollment profiles carry an identity (certificate + key in a PKCS#12) issued here, so a
//! fresh Orchard can enroll devices without an external SCEP server. The CA lives in the
//! data directory and must survive restarts: every enrolled device's identity chains to it.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use super::pem::{self, PemBlock};
use super::x509::parse_certificate;
use super::IdentityError;

/// Subject common name of the CA Orchard generates.
pub const CA_COMMON_NAME: &str = "Orchard Device Identity CA";
/// CA certificate file in the data directory.
pub const CA_CERT_FILE: &str = "identity-ca.pem";
/// CA private key file (PKCS#8 PEM, mode 0600) in the data directory.
pub const CA_KEY_FILE: &str = "identity-ca.key";

const CA_LIFETIME: Duration = Duration::days(3650);
const IDENTITY_LIFETIME: Duration = Duration::days(730);
/// Devices with a slightly slow clock must not see a freshly issued identity as "not yet
/// valid".
const BACKDATE: Duration = Duration::hours(1);
const SERIAL_BYTES: usize = 16;

/// A device identity: certificate and its P-256 private key.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedIdentity {
    pub cert_der: Vec<u8>,
    pub key_pkcs8_der: Vec<u8>,
}

impl std::fmt::Debug for IssuedIdentity {
    /// Never prints the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedIdentity")
            .field("cert_der_len", &self.cert_der.len())
            .finish_non_exhaustive()
    }
}

/// The identity CA, loaded from or created in the data directory.
pub struct CertificateAuthority {
    /// Rebuilt from the stored key on every start; rcgen only takes the subject name and
    /// the key identifier from it, both of which match the stored certificate.
    issuer: rcgen::Certificate,
    key: KeyPair,
    /// The certificate as stored: what devices and verifiers trust.
    cert_der: CertificateDer<'static>,
}

impl CertificateAuthority {
    /// Loads `identity-ca.pem` and `identity-ca.key` from `dir`, or creates both when
    /// neither exists. One without the other is an error rather than a silent new CA,
    /// because a new CA orphans every identity the old one issued.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => Self::load(&cert_path, &key_path),
            (false, false) => Self::create(dir, &cert_path, &key_path),
            (true, false) => Err(half_present(&cert_path, &key_path)),
            (false, true) => Err(half_present(&key_path, &cert_path)),
        }
    }

    /// The CA certificate, DER encoded, exactly as stored.
    pub fn ca_cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate as PEM.
    pub fn ca_cert_pem(&self) -> String {
        pem::encode("CERTIFICATE", &self.cert_der)
    }

    /// Issues a client-auth identity for a device, with a fresh P-256 key.
    pub fn issue_identity(&self, common_name: &str) -> Result<IssuedIdentity, IdentityError> {
        let key = generate_key()?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_only(common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(random_serial()?);
        params.not_before = now - BACKDATE;
        params.not_after = now + IDENTITY_LIFETIME;
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(generation_error)?;
        Ok(IssuedIdentity {
            cert_der: cert.der().to_vec(),
            key_pkcs8_der: key.serialize_der(),
        })
    }

    fn create(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<Self, IdentityError> {
        let ca = Self::generate()?;
        fs::create_dir_all(dir).map_err(|err| IdentityError::io(dir, err))?;
        ca.save_new(cert_path, key_path)?;
        Ok(ca)
    }

    /// A new CA, in memory only.
    pub fn generate() -> Result<Self, IdentityError> {
        let key = generate_key()?;
        let issuer = ca_params(OffsetDateTime::now_utc())?
            .self_signed(&key)
            .map_err(generation_error)?;
        let cert_der = issuer.der().clone();
        Ok(Self {
            issuer,
            key,
            cert_der,
        })
    }

    /// Whether `dir` holds a CA (either of its files).
    pub fn exists_in(dir: &Path) -> Result<bool, IdentityError> {
        Ok(exists(&dir.join(CA_CERT_FILE))? || exists(&dir.join(CA_KEY_FILE))?)
    }

    /// Write this CA into `dir`, which must not hold one.
    pub fn save_in(&self, dir: &Path) -> Result<(), IdentityError> {
        fs::create_dir_all(dir).map_err(|err| IdentityError::io(dir, err))?;
        self.save_new(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE))
    }

    fn save_new(&self, cert_path: &Path, key_path: &Path) -> Result<(), IdentityError> {
        write_new_file(key_path, self.key_pem().as_bytes(), 0o600)?;
        write_new_file(cert_path, self.ca_cert_pem().as_bytes(), 0o644)
    }

    fn key_pem(&self) -> String {
        pem::encode("PRIVATE KEY", &self.key.serialize_der())
    }

    /// Certificate and key in one PEM text: how a cluster's store keeps the CA.
    pub fn to_pem_bundle(&self) -> String {
        format!("{}{}", self.ca_cert_pem(), self.key_pem())
    }

    /// The CA from [`CertificateAuthority::to_pem_bundle`]'s text; `origin` names it in
    /// errors.
    pub fn from_pem_bundle(text: &str, origin: &Path) -> Result<Self, IdentityError> {
        let blocks = pem::decode_blocks(text).map_err(|err| corrupt(origin, &err.to_string()))?;
        let block = |label: &str| {
            blocks
                .iter()
                .find(|block| block.label == label)
                .map(|block| block.der.clone())
                .ok_or_else(|| corrupt(origin, &format!("no {label} block")))
        };
        Self::from_der(block("CERTIFICATE")?, block("PRIVATE KEY")?, origin, origin)
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, IdentityError> {
        let key_der = read_single_block(key_path, "PRIVATE KEY")?;
        let cert_der = read_single_block(cert_path, "CERTIFICATE")?;
        Self::from_der(cert_der, key_der, cert_path, key_path)
    }

    fn from_der(
        cert_der: Vec<u8>,
        key_der: Vec<u8>,
        cert_origin: &Path,
        key_origin: &Path,
    ) -> Result<Self, IdentityError> {
        let key = KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(key_der),
            &PKCS_ECDSA_P256_SHA256,
        )
        .map_err(|err| corrupt(key_origin, &format!("not a P-256 PKCS#8 key: {err}")))?;
        let cert_der = CertificateDer::from(cert_der);
        let issuer = ca_params(OffsetDateTime::now_utc())?
            .self_signed(&key)
            .map_err(generation_error)?;
        ensure_same_identity(&cert_der, issuer.der(), cert_origin)?;
        Ok(Self {
            issuer,
            key,
            cert_der,
        })
    }
}

/// Wraps an issued identity and the CA certificate in a PKCS#12 that Apple devices import
/// (PBE-SHA1-3DES for the key, PBE-SHA1-RC2-40 for the certificates, SHA-1 MAC: the only
/// combination every iOS and macOS release accepts).
pub fn pkcs12(
    identity: &IssuedIdentity,
    ca_der: &[u8],
    password: &str,
    friendly_name: &str,
) -> Result<Vec<u8>, IdentityError> {
    p12::PFX::new(
        &identity.cert_der,
        &identity.key_pkcs8_der,
        Some(ca_der),
        password,
        friendly_name,
    )
    .map(|pfx| pfx.to_der())
    .ok_or_else(|| IdentityError::Generation("PKCS#12 encoding failed".into()))
}

/// The CA's certificate parameters; deterministic apart from the validity window so a
/// restart can rebuild the same issuer name from the stored key.
fn ca_params(now: OffsetDateTime) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name_only(CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial()?);
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_LIFETIME;
    Ok(params)
}

fn common_name_only(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

fn generate_key() -> Result<KeyPair, IdentityError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generation_error)
}

/// A positive, non-zero 128-bit serial (RFC 5280 allows up to 20 octets).
fn random_serial() -> Result<SerialNumber, IdentityError> {
    let mut bytes = [0u8; SERIAL_BYTES];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| IdentityError::Generation("system random source failed".into()))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Refuses a stored certificate whose key or subject differ from what the stored key and
/// Orchard's CA parameters produce: issuing under it would yield unverifiable identities.
fn ensure_same_identity(
    stored: &[u8],
    rebuilt: &[u8],
    cert_path: &Path,
) -> Result<(), IdentityError> {
    let stored = parse_certificate(stored).map_err(|err| corrupt(cert_path, &err.to_string()))?;
    let rebuilt = parse_certificate(rebuilt)?;
    let stored_tbs = &stored.tbs_certificate;
    let rebuilt_tbs = &rebuilt.tbs_certificate;
    if stored_tbs.subject_public_key_info != rebuilt_tbs.subject_public_key_info {
        return Err(corrupt(
            cert_path,
            "its public key does not match identity-ca.key",
        ));
    }
    if stored_tbs.subject != rebuilt_tbs.subject {
        return Err(corrupt(
            cert_path,
            &format!("its subject is not CN={CA_COMMON_NAME}"),
        ));
    }
    Ok(())
}

fn read_single_block(path: &Path, label: &str) -> Result<Vec<u8>, IdentityError> {
    let text = fs::read_to_string(path).map_err(|err| IdentityError::io(path, err))?;
    let blocks = pem::decode_blocks(&text).map_err(|err| corrupt(path, &err.to_string()))?;
    blocks
        .into_iter()
        .find_map(|PemBlock { label: found, der }| (found == label).then_some(der))
        .ok_or_else(|| corrupt(path, &format!("no {label} block")))
}

/// Creates `path` with `mode` from the start (no window where a key is world-readable) and
/// refuses to overwrite anything.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|err| IdentityError::io(path, err))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|err| IdentityError::io(path, err))
}

fn exists(path: &Path) -> Result<bool, IdentityError> {
    path.try_exists()
        .map_err(|err| IdentityError::io(path, err))
}

fn half_present(present: &Path, missing: &Path) -> IdentityError {
    IdentityError::CorruptCa(format!(
        "{} exists but {} is missing; restore it, or remove both to create a new CA \
         (devices enrolled under the old CA must then re-enroll)",
        present.display(),
        missing.display()
    ))
}

fn corrupt(path: &Path, why: &str) -> IdentityError {
    IdentityError::CorruptCa(format!("{}: {why}", path.display()))
}

fn generation_error(err: rcgen::Error) -> IdentityError {
    IdentityError::Generation(err.to_string())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::identity::test_support::{openssl, openssl_output, Scratch};
    use crate::identity::x509::{not_after_unix, KeyType};
    use crate::identity::IdentityVerifier;

    fn verifier_for(ca: &CertificateAuthority) -> IdentityVerifier {
        IdentityVerifier::new(vec![ca.ca_cert_der().clone()]).unwrap()
    }

    fn now_unix() -> u64 {
        OffsetDateTime::now_utc().unix_timestamp().unsigned_abs()
    }

    #[test]
    fn first_start_creates_the_ca_files_with_a_private_key_mode() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();

        let key_mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let key_pem = fs::read_to_string(dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let cert_pem = fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap();
        assert_eq!(cert_pem, ca.ca_cert_pem());

        let cert = parse_certificate(ca.ca_cert_der()).unwrap();
        assert_eq!(
            cert.tbs_certificate.subject.to_string(),
            "CN=Orchard Device Identity CA"
        );
        let ten_years = 3650 * 86_400;
        assert!(not_after_unix(&cert).abs_diff(now_unix() + ten_years) < 60);
    }

    #[test]
    fn identities_issued_before_and_after_a_restart_chain_to_the_stored_ca() {
        let dir = tempfile::tempdir().unwrap();
        let before = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let issued_before = before.issue_identity("device-before").unwrap();
        drop(before);

        let after = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let issued_after = after.issue_identity("device-after").unwrap();
        let stored_pem = fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap();
        assert_eq!(after.ca_cert_pem(), stored_pem);

        let verifier = verifier_for(&after);
        for issued in [issued_before, issued_after] {
            verifier
                .verify(&CertificateDer::from(issued.cert_der))
                .unwrap();
        }
    }

    #[test]
    fn identities_from_another_ca_are_untrusted() {
        let (ours_dir, foreign_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ours = CertificateAuthority::load_or_create(ours_dir.path()).unwrap();
        let foreign = CertificateAuthority::load_or_create(foreign_dir.path()).unwrap();
        let issued = foreign.issue_identity("intruder").unwrap();
        let err = verifier_for(&ours)
            .verify(&CertificateDer::from(issued.cert_der))
            .unwrap_err();
        assert_eq!(err.reason(), "untrusted");
    }

    #[test]
    fn issued_identity_is_a_two_year_client_auth_p256_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let first = ca
            .issue_identity("66ADE930-5FDF-5EC4-8429-15640684C489")
            .unwrap();
        let second = ca
            .issue_identity("66ADE930-5FDF-5EC4-8429-15640684C489")
            .unwrap();

        let cert = parse_certificate(&first.cert_der).unwrap();
        let tbs = &cert.tbs_certificate;
        assert_eq!(
            tbs.subject.to_string(),
            "CN=66ADE930-5FDF-5EC4-8429-15640684C489"
        );
        assert_eq!(tbs.issuer.to_string(), "CN=Orchard Device Identity CA");
        assert_eq!(
            KeyType::of(&tbs.subject_public_key_info).unwrap(),
            KeyType::EcP256
        );
        let not_before = tbs.validity.not_before.to_unix_duration().as_secs();
        assert!(not_before.abs_diff(now_unix() - 3600) < 60);
        assert!(not_after_unix(&cert).abs_diff(now_unix() + 730 * 86_400) < 60);
        assert_ne!(
            tbs.serial_number,
            parse_certificate(&second.cert_der)
                .unwrap()
                .tbs_certificate
                .serial_number
        );

        let text = openssl_text(&first.cert_der);
        assert!(text.contains("TLS Web Client Authentication"), "{text}");
        assert!(text.contains("Digital Signature"), "{text}");
        assert!(text.contains("CA:FALSE"), "{text}");

        ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &first.key_pkcs8_der,
            &SystemRandom::new(),
        )
        .unwrap();
    }

    #[test]
    fn a_lone_certificate_or_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path()).unwrap();
        fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        let err = CertificateAuthority::load_or_create(dir.path())
            .err()
            .unwrap();
        assert_eq!(err.reason(), "corrupt_ca");
        assert!(
            err.to_string().contains("identity-ca.key is missing"),
            "{err}"
        );
    }

    #[test]
    fn a_key_that_does_not_match_the_certificate_is_refused() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(first.path()).unwrap();
        CertificateAuthority::load_or_create(second.path()).unwrap();
        fs::copy(
            second.path().join(CA_KEY_FILE),
            first.path().join(CA_KEY_FILE),
        )
        .unwrap();
        let err = CertificateAuthority::load_or_create(first.path())
            .err()
            .unwrap();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn pkcs12_is_readable_by_openssl_and_carries_identity_and_ca() {
        let scratch = Scratch::new();
        let ca = CertificateAuthority::load_or_create(scratch.dir()).unwrap();
        let identity = ca.issue_identity("device1").unwrap();
        let p12 = pkcs12(&identity, ca.ca_cert_der(), "s3cret", "Orchard identity").unwrap();
        let p12_path = scratch.write("identity.p12", p12);
        let read_back = |selection: &str| {
            openssl(&[
                "pkcs12",
                "-in",
                &p12_path,
                "-passin",
                "pass:s3cret",
                selection,
                "-nodes",
                "-legacy",
            ])
        };

        let certs = read_back("-nokeys");
        let cert_ders: Vec<_> = pem::decode_blocks(&certs)
            .unwrap()
            .into_iter()
            .map(|block| block.der)
            .collect();
        assert!(cert_ders.contains(&identity.cert_der));
        assert!(cert_ders.contains(&ca.ca_cert_der().to_vec()));
        assert!(certs.contains("friendlyName: Orchard identity"), "{certs}");

        let key_block = pem::decode_blocks(&read_back("-nocerts"))
            .unwrap()
            .remove(0);
        assert_eq!(key_block.label, "PRIVATE KEY");
        assert_eq!(key_block.der, identity.key_pkcs8_der);
    }

    #[test]
    fn pkcs12_with_a_wrong_password_is_rejected_by_openssl() {
        let scratch = Scratch::new();
        let ca = CertificateAuthority::load_or_create(scratch.dir()).unwrap();
        let identity = ca.issue_identity("device1").unwrap();
        let p12 = pkcs12(&identity, ca.ca_cert_der(), "right", "x").unwrap();
        let p12_path = scratch.write("identity.p12", p12);
        let output = openssl_output(&[
            "pkcs12",
            "-in",
            &p12_path,
            "-passin",
            "pass:wrong",
            "-nokeys",
            "-legacy",
        ]);
        assert!(!output.status.success());
    }

    fn openssl_text(cert_der: &[u8]) -> String {
        let scratch = Scratch::new();
        let path = scratch.write("cert.der", cert_der);
        openssl(&["x509", "-inform", "DER", "-in", &path, "-noout", "-text"])
    }
}
