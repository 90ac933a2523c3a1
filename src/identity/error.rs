use std::path::PathBuf;

/// Why a certificate, signature or key was refused or could not be produced.
///
/// The messages are meant for logs; [`IdentityError::reason`] gives a stable, low-cardinality
/// label for metrics.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no certificate presented: {0}")]
    MissingCertificate(&'static str),
    #[error("invalid base64: {0}")]
    BadBase64(String),
    #[error("invalid PEM: {0}")]
    BadPem(String),
    #[error("invalid DER: {0}")]
    BadDer(String),
    #[error("{what} is larger than {limit} bytes")]
    TooLarge { what: &'static str, limit: usize },
    #[error("certificate is not trusted: {0}")]
    Untrusted(String),
    #[error("certificate has expired")]
    Expired,
    #[error("certificate is not valid yet")]
    NotYetValid,
    #[error("signature does not verify: {0}")]
    BadSignature(String),
    #[error("unsupported algorithm: {0}")]
    UnsupportedAlgorithm(String),
    #[error("invalid push certificate: {0}")]
    BadPushCert(String),
    #[error("identity CA files in the data directory are inconsistent: {0}")]
    CorruptCa(String),
    #[error("cannot generate certificate material: {0}")]
    Generation(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl IdentityError {
    /// Short snake_case label for metrics; one per variant, never derived from input.
    pub fn reason(&self) -> &'static str {
        match self {
            IdentityError::MissingCertificate(_) => "missing_certificate",
            IdentityError::BadBase64(_) => "bad_base64",
            IdentityError::BadPem(_) => "bad_pem",
            IdentityError::BadDer(_) => "bad_der",
            IdentityError::TooLarge { .. } => "too_large",
            IdentityError::Untrusted(_) => "untrusted",
            IdentityError::Expired => "expired",
            IdentityError::NotYetValid => "not_yet_valid",
            IdentityError::BadSignature(_) => "bad_signature",
            IdentityError::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            IdentityError::BadPushCert(_) => "bad_push_cert",
            IdentityError::CorruptCa(_) => "corrupt_ca",
            IdentityError::Generation(_) => "generation",
            IdentityError::Io { .. } => "io",
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IdentityError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn bad_der(what: &str, err: impl std::fmt::Display) -> Self {
        IdentityError::BadDer(format!("{what}: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_snake_case_labels() {
        let errors = [
            IdentityError::MissingCertificate("empty header"),
            IdentityError::BadBase64("x".into()),
            IdentityError::Expired,
            IdentityError::io("/x", std::io::Error::other("boom")),
        ];
        let reasons: Vec<_> = errors.iter().map(IdentityError::reason).collect();
        assert_eq!(
            reasons,
            ["missing_certificate", "bad_base64", "expired", "io"]
        );
    }

    #[test]
    fn io_errors_name_the_path() {
        let err = IdentityError::io("/data/identity-ca.key", std::io::Error::other("denied"));
        assert_eq!(err.to_string(), "/data/identity-ca.key: denied");
    }
}
