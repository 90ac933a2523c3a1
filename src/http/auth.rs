//! Admin API authentication: the API key as `Authorization: Bearer <key>`, or HTTP Basic
//! with any user name and the key as password (so NanoHUB tooling works unchanged).

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse};
use base64::Engine;
use sha2::{Digest, Sha256};

use super::AppState;

/// The admin secret, kept only as a digest so comparisons take constant time.
pub struct ApiKey {
    digest: [u8; 32],
}

impl ApiKey {
    pub fn new(key: &str) -> Self {
        ApiKey {
            digest: Sha256::digest(key.as_bytes()).into(),
        }
    }

    /// Constant-time check of a presented `Authorization` header value.
    pub fn accepts(&self, authorization: &str) -> bool {
        presented_key(authorization).is_some_and(|presented| {
            let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
            digest
                .iter()
                .zip(self.digest.iter())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
        })
    }
}

fn presented_key(authorization: &str) -> Option<String> {
    let (scheme, value) = authorization.trim().split_once(' ')?;
    match scheme.to_ascii_lowercase().as_str() {
        "bearer" => Some(value.trim().to_string()),
        "basic" => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(value.trim())
                .ok()?;
            let credentials = String::from_utf8(decoded).ok()?;
            credentials
                .split_once(':')
                .map(|(_, password)| password.to_string())
        }
        _ => None,
    }
}

pub async fn require_api_key(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let authorized = req
        .app_data::<web::Data<AppState>>()
        .zip(req.headers().get(header::AUTHORIZATION))
        .and_then(|(state, value)| value.to_str().ok().map(|v| state.api_key.accepts(v)))
        .unwrap_or(false);
    if authorized {
        return Ok(next.call(req).await?.map_into_boxed_body());
    }
    metrics::counter!("orchard_rejected_requests_total", "reason" => "unauthorized").increment(1);
    tracing::warn!(path = %req.path(), "admin request without valid API key");
    let response = HttpResponse::Unauthorized()
        .insert_header((header::WWW_AUTHENTICATE, "Basic realm=\"Orchard API\""))
        .json(serde_json::json!({
            "error": "unauthorized",
            "detail": "send the API key as 'Authorization: Bearer <key>' or as the HTTP Basic password",
        }));
    Ok(req.into_response(response))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_basic_with_any_user_are_accepted() {
        let key = ApiKey::new("s3cret");
        assert!(key.accepts("Bearer s3cret"));
        let basic = base64::engine::general_purpose::STANDARD.encode("nanohub:s3cret");
        assert!(key.accepts(&format!("Basic {basic}")));
        let other_user = base64::engine::general_purpose::STANDARD.encode("anyone:s3cret");
        assert!(key.accepts(&format!("Basic {other_user}")));
    }

    #[test]
    fn wrong_or_malformed_credentials_are_refused() {
        let key = ApiKey::new("s3cret");
        assert!(!key.accepts("Bearer wrong"));
        assert!(!key.accepts("Basic !!!"));
        assert!(!key.accepts("Digest s3cret"));
        assert!(!key.accepts("s3cret"));
    }
}
