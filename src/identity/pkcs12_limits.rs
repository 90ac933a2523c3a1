//! The key-derivation work a PKCS#12 file asks of its reader, checked before it is opened.
//!
//! A PKCS#12 names its own cost: its MAC and each encrypted part carry an iteration count
//! for the password-based key derivation, and PBES2 may name scrypt with any memory cost.
//! A file asking for 2^31 iterations kept a worker busy for minutes; one naming scrypt
//! with a large cost would abort the process on allocation. Only what can be read
//! without the password is checked: the MAC, every encrypted SafeContents, and every
//! shrouded key in a plain one (where exports put it).

use cms::content_info::ContentInfo;
use cms::encrypted_data::EncryptedData;
use const_oid::db::rfc5911;
use const_oid::ObjectIdentifier;
use der::asn1::{ContextSpecific, OctetString};
use der::{Decode, Encode};
use pkcs12::pbe_params::{EncryptedPrivateKeyInfo, Pkcs12PbeParams};
use pkcs12::pfx::Pfx;
use pkcs12::safe_bag::SafeContents;
use pkcs5::pbes2;
use x509_cert::spki::AlgorithmIdentifierOwned;

use super::IdentityError;

/// The iterations all derivations of one file may ask for together. OpenSSL's exports ask
/// for 6,144 (2,048 each for the MAC, the key and the certificates); a million iterations
/// take about a third of a second.
pub(crate) const MAX_TOTAL_ITERATIONS: u64 = 3_000_000;

/// Fails when `der` asks for more key-derivation work than [`MAX_TOTAL_ITERATIONS`], or for
/// a derivation other than PBKDF2 or PKCS#12's own. Parts this check cannot read are left
/// to the PKCS#12 reader, which refuses them on its own.
pub(crate) fn check_key_derivations(der: &[u8]) -> Result<(), IdentityError> {
    let pfx = Pfx::from_der(der).map_err(|err| unreadable("PFX", err))?;
    let mut work = Work::default();
    if let Some(mac) = &pfx.mac_data {
        work.add("MAC", i64::from(mac.iterations))?;
    }
    if pfx.auth_safe.content_type != rfc5911::ID_DATA {
        return Ok(());
    }
    let safes = pfx
        .auth_safe
        .content
        .decode_as::<OctetString>()
        .map_err(|err| unreadable("authenticated safe", err))?;
    let safes = Vec::<ContentInfo>::from_der(safes.as_bytes())
        .map_err(|err| unreadable("authenticated safe", err))?;
    for safe in &safes {
        match safe.content_type {
            rfc5911::ID_ENCRYPTED_DATA => {
                let encrypted = safe
                    .content
                    .decode_as::<EncryptedData>()
                    .map_err(|err| unreadable("encrypted safe", err))?;
                work.add_algorithm(&encrypted.enc_content_info.content_enc_alg)?;
            }
            rfc5911::ID_DATA => {
                let bags = safe
                    .content
                    .decode_as::<OctetString>()
                    .and_then(|octets| SafeContents::from_der(octets.as_bytes()))
                    .map_err(|err| unreadable("safe contents", err))?;
                for bag in bags
                    .iter()
                    .filter(|bag| bag.bag_id == pkcs12::PKCS_12_PKCS8_KEY_BAG_OID)
                {
                    // The bag value as read still has its `[0] EXPLICIT` wrapping.
                    let key = ContextSpecific::<EncryptedPrivateKeyInfo>::from_der(&bag.bag_value)
                        .map_err(|err| unreadable("shrouded key", err))?
                        .value;
                    work.add_algorithm(&key.encryption_algorithm)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The iterations asked for so far.
#[derive(Default)]
struct Work(u64);

impl Work {
    fn add(&mut self, what: &str, iterations: i64) -> Result<(), IdentityError> {
        let iterations = u64::try_from(iterations)
            .ok()
            .filter(|iterations| *iterations >= 1)
            .ok_or_else(|| {
                IdentityError::BadPushCert(format!("the {what} asks for {iterations} iterations"))
            })?;
        self.0 = self.0.saturating_add(iterations);
        if self.0 > MAX_TOTAL_ITERATIONS {
            return Err(IdentityError::BadPushCert(format!(
                "the PKCS#12 asks for more than {MAX_TOTAL_ITERATIONS} key-derivation iterations"
            )));
        }
        Ok(())
    }

    /// Adds the iterations of a password-based encryption algorithm: PBES2 with PBKDF2, or
    /// one of PKCS#12's own schemes. Others are left to the reader to refuse.
    fn add_algorithm(&mut self, algorithm: &AlgorithmIdentifierOwned) -> Result<(), IdentityError> {
        let Some(parameters) = &algorithm.parameters else {
            return Ok(());
        };
        let parameters = parameters
            .to_der()
            .map_err(|err| unreadable("encryption parameters", err))?;
        if algorithm.oid == pbes2::PBES2_OID {
            let pbes2 = pbes2::Parameters::from_der(&parameters)
                .map_err(|err| unreadable("PBES2 parameters", err))?;
            return match pbes2.kdf {
                pbes2::Kdf::Pbkdf2(pbkdf2) => self.add("PBKDF2", i64::from(pbkdf2.iteration_count)),
                _ => Err(IdentityError::BadPushCert(
                    "the PKCS#12 derives its keys with a function other than PBKDF2 (scrypt?); export it with PBKDF2".into(),
                )),
            };
        }
        if PKCS12_PBE.contains(&algorithm.oid) {
            let pbe = Pkcs12PbeParams::from_der(&parameters)
                .map_err(|err| unreadable("PBE parameters", err))?;
            return self.add("PBE", i64::from(pbe.iterations));
        }
        Ok(())
    }
}

/// PKCS#12's own password-based encryption schemes (`pkcs-12PbeIds`, RFC 7292 Appendix C).
const PKCS12_PBE: [ObjectIdentifier; 6] = [
    pkcs12::PKCS_12_PBE_WITH_SHAAND128_BIT_RC4,
    pkcs12::PKCS_12_PBE_WITH_SHAAND40_BIT_RC4,
    pkcs12::PKCS_12_PBE_WITH_SHAAND3_KEY_TRIPLE_DES_CBC,
    pkcs12::PKCS_12_PBE_WITH_SHAAND2_KEY_TRIPLE_DES_CBC,
    pkcs12::PKCS_12_PBE_WITH_SHAAND128_BIT_RC2_CBC,
    pkcs12::PKCS_12_PBEWITH_SHAAND40_BIT_RC2_CBC,
];

fn unreadable(what: &str, err: der::Error) -> IdentityError {
    IdentityError::BadPushCert(format!("cannot read the PKCS#12 {what}: {err}"))
}

#[cfg(test)]
mod tests {
    use cms::content_info::CmsVersion;
    use cms::enveloped_data::EncryptedContentInfo;
    use der::Any;
    use pkcs12::pfx::Version;
    use pkcs12::safe_bag::SafeBag;

    use super::*;
    use crate::identity::ca::{pkcs12, CertificateAuthority};
    use crate::identity::test_support::Scratch;
    use crate::identity::PushCertificate;

    const SALT: [u8; 8] = [7; 8];
    const IV: [u8; 16] = [9; 16];

    fn algorithm(oid: ObjectIdentifier, parameters: Vec<u8>) -> AlgorithmIdentifierOwned {
        AlgorithmIdentifierOwned {
            oid,
            parameters: Some(Any::from_der(&parameters).unwrap()),
        }
    }

    fn pbkdf2(iterations: u32) -> AlgorithmIdentifierOwned {
        let parameters = pbes2::Parameters::pbkdf2_sha256_aes256cbc(iterations, &SALT, &IV);
        algorithm(pbes2::PBES2_OID, parameters.unwrap().to_der().unwrap())
    }

    fn pkcs12_pbe(iterations: i32) -> AlgorithmIdentifierOwned {
        let parameters = Pkcs12PbeParams {
            salt: OctetString::new(SALT).unwrap(),
            iterations,
        };
        algorithm(PKCS12_PBE[2], parameters.to_der().unwrap())
    }

    fn content(content_type: ObjectIdentifier, value: impl Encode) -> ContentInfo {
        ContentInfo {
            content_type,
            content: Any::from_der(&value.to_der().unwrap()).unwrap(),
        }
    }

    /// An encrypted SafeContents whose key derivation is `algorithm`.
    fn encrypted_safe(algorithm: AlgorithmIdentifierOwned) -> ContentInfo {
        let encrypted = EncryptedData {
            version: CmsVersion::V0,
            enc_content_info: EncryptedContentInfo {
                content_type: rfc5911::ID_DATA,
                content_enc_alg: algorithm,
                encrypted_content: Some(OctetString::new([0; 16]).unwrap()),
            },
            unprotected_attrs: None,
        };
        content(rfc5911::ID_ENCRYPTED_DATA, encrypted)
    }

    /// A plain SafeContents holding one shrouded key encrypted with `algorithm`.
    fn shrouded_key_safe(algorithm: AlgorithmIdentifierOwned) -> ContentInfo {
        let key = EncryptedPrivateKeyInfo {
            encryption_algorithm: algorithm,
            encrypted_data: OctetString::new([0; 16]).unwrap(),
        };
        let bags: SafeContents = vec![SafeBag {
            bag_id: pkcs12::PKCS_12_PKCS8_KEY_BAG_OID,
            bag_value: key.to_der().unwrap(),
            bag_attributes: None,
        }];
        content(
            rfc5911::ID_DATA,
            OctetString::new(bags.to_der().unwrap()).unwrap(),
        )
    }

    fn pfx(safes: Vec<ContentInfo>, mac_iterations: Option<i32>) -> Vec<u8> {
        let auth_safe = OctetString::new(safes.to_der().unwrap()).unwrap();
        let mut pfx = Pfx::from_der(&orchard_pkcs12()).unwrap();
        pfx.version = Version::V3;
        pfx.auth_safe = content(rfc5911::ID_DATA, auth_safe);
        match (mac_iterations, &mut pfx.mac_data) {
            (Some(iterations), Some(mac)) => mac.iterations = iterations,
            _ => pfx.mac_data = None,
        }
        pfx.to_der().unwrap()
    }

    /// A real PKCS#12 as Orchard's CA writes them for devices (password `secret`).
    fn orchard_pkcs12() -> Vec<u8> {
        let scratch = Scratch::new();
        let ca = CertificateAuthority::load_or_create(&scratch.dir().join("ca")).unwrap();
        let identity = ca.issue_identity("device1").unwrap();
        pkcs12(&identity, &identity.cert_der, "secret", "device1").unwrap()
    }

    fn refusal(der: &[u8]) -> String {
        check_key_derivations(der).unwrap_err().to_string()
    }

    #[test]
    fn real_exports_ask_for_little_work() {
        check_key_derivations(&orchard_pkcs12()).unwrap();
        let reasonable = pfx(
            vec![
                encrypted_safe(pbkdf2(10_000)),
                shrouded_key_safe(pkcs12_pbe(2048)),
            ],
            Some(2048),
        );
        check_key_derivations(&reasonable).unwrap();
    }

    /// A MAC asking for 2^31 - 1 iterations kept the upload busy for minutes (fuzzing,
    /// `fuzz/`); it is refused before anything is derived.
    #[test]
    fn a_mac_asking_for_billions_of_iterations_is_refused_at_once() {
        let mut pfx = Pfx::from_der(&orchard_pkcs12()).unwrap();
        pfx.mac_data.as_mut().unwrap().iterations = i32::MAX;
        let started = std::time::Instant::now();
        let err = PushCertificate::from_pkcs12(&pfx.to_der().unwrap(), "secret").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid push certificate: the PKCS#12 asks for more than 3000000 key-derivation iterations"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn iterations_add_up_across_the_file() {
        let one_million = || encrypted_safe(pbkdf2(1_000_000));
        let at_budget = pfx(vec![one_million(), one_million(), one_million()], None);
        check_key_derivations(&at_budget).unwrap();
        let over_budget = pfx(vec![one_million(), one_million(), one_million()], Some(1));
        assert!(refusal(&over_budget).contains("more than 3000000"));
    }

    #[test]
    fn every_place_a_derivation_is_named_counts() {
        let heavy_key = pfx(vec![shrouded_key_safe(pbkdf2(3_000_001))], None);
        let heavy_safe = pfx(vec![encrypted_safe(pkcs12_pbe(3_000_001))], None);
        for der in [heavy_key, heavy_safe] {
            assert!(refusal(&der).contains("more than 3000000"));
        }
    }

    #[test]
    fn counts_below_one_are_refused() {
        for iterations in [0, -1, i32::MIN] {
            let der = pfx(vec![], Some(iterations));
            assert_eq!(
                refusal(&der),
                format!("invalid push certificate: the MAC asks for {iterations} iterations")
            );
        }
        let der = pfx(vec![encrypted_safe(pkcs12_pbe(-5))], None);
        assert!(refusal(&der).contains("the PBE asks for -5 iterations"));
    }

    #[test]
    fn scrypt_is_refused_whatever_its_cost() {
        let params = pkcs5::scrypt::Params::new(20, 8, 1, 32).unwrap();
        let scrypt = pbes2::Parameters::scrypt_aes256cbc(params, &SALT, &IV).unwrap();
        let der = pfx(
            vec![encrypted_safe(algorithm(
                pbes2::PBES2_OID,
                scrypt.to_der().unwrap(),
            ))],
            None,
        );
        assert!(refusal(&der).contains("other than PBKDF2"));
    }

    #[test]
    fn what_is_not_a_pkcs12_is_refused_as_unreadable() {
        assert!(refusal(b"\x30\x03\x02\x01\x03")
            .starts_with("invalid push certificate: cannot read the PKCS#12 PFX"));
    }
}
