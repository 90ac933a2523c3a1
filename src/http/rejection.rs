//! Every refused request goes through [`Rejection`]: a precise 4xx/5xx with a reason, a
//! count in `orchard_rejected_requests_total{reason}` and a log line.

use std::fmt;

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};

use crate::device::DeviceError;
use crate::enroll::EnrollError;
use crate::identity::IdentityError;
use crate::protocol::ProtocolError;

/// Device endpoints answer `text/plain`; admin routes answer JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    Device,
    Api,
}

#[derive(Debug)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: &'static str,
    pub detail: String,
    pub audience: Audience,
}

impl Rejection {
    pub fn device(status: StatusCode, reason: &'static str, detail: impl Into<String>) -> Self {
        Rejection {
            status,
            reason,
            detail: detail.into(),
            audience: Audience::Device,
        }
    }

    pub fn api(status: StatusCode, reason: &'static str, detail: impl Into<String>) -> Self {
        Rejection {
            audience: Audience::Api,
            ..Rejection::device(status, reason, detail)
        }
    }

    /// The store could not answer: 503, the client may retry.
    pub fn store_failure(e: impl fmt::Display) -> Self {
        Rejection::api(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_failure",
            e.to_string(),
        )
    }

    pub fn for_api(self) -> Self {
        Rejection {
            audience: Audience::Api,
            ..self
        }
    }

    pub fn protocol(e: ProtocolError) -> Self {
        Rejection::device(StatusCode::BAD_REQUEST, e.reason(), e.to_string())
    }

    /// Identity failures are 400 (nothing usable presented) or 403 (presented, refused);
    /// never 401, which can make a device unenroll.
    pub fn identity(e: IdentityError) -> Self {
        let status = match e.reason() {
            "untrusted" | "expired" => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_REQUEST,
        };
        Rejection::device(status, e.reason(), e.to_string())
    }

    /// 409 while the server is not yet able to enroll (no push certificate, no https URL).
    pub fn enrollment(e: EnrollError) -> Self {
        let (status, reason) = match &e {
            EnrollError::NoServerUrl => (StatusCode::CONFLICT, "no_server_url"),
            EnrollError::NoPushCertificate => (StatusCode::CONFLICT, "no_push_certificate"),
            EnrollError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_failure"),
            EnrollError::Identity(_) | EnrollError::InvalidProfile(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "profile_generation_failed",
            ),
        };
        Rejection::device(status, reason, e.to_string())
    }

    pub fn from_device(e: DeviceError) -> Self {
        let status = match &e {
            DeviceError::UnknownEnrollment(_)
            | DeviceError::CertificateMismatch(_)
            | DeviceError::CertificateBoundElsewhere
            | DeviceError::ImportedUnbound(_) => StatusCode::FORBIDDEN,
            DeviceError::NotAuthenticated(_)
            | DeviceError::DeviceChannelOnly(_)
            | DeviceError::NoTokenService(_)
            | DeviceError::NotPushable(_)
            | DeviceError::Unimportable(_) => StatusCode::BAD_REQUEST,
            DeviceError::AlreadyEnrolled(_) => StatusCode::CONFLICT,
            DeviceError::UserAuthenticateDeclined => StatusCode::GONE,
            DeviceError::DeclarationNotFound(_) | DeviceError::UnknownDdmEndpoint(_) => {
                StatusCode::NOT_FOUND
            }
            // A shard moving between nodes: the device retries after Retry-After.
            DeviceError::NotLocal | DeviceError::Store(_) | DeviceError::Unavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        Rejection::device(status, e.reason(), e.to_string())
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// Seconds a client is asked to wait before retrying a 503.
const RETRY_AFTER_SECS: u32 = 2;

impl ResponseError for Rejection {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        metrics::counter!("orchard_rejected_requests_total", "reason" => self.reason).increment(1);
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), reason = self.reason, detail = %self.detail, "request failed");
        } else {
            tracing::warn!(status = self.status.as_u16(), reason = self.reason, detail = %self.detail, "request rejected");
        }
        let mut response = HttpResponse::build(self.status);
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // The store (or an actor) could not answer in time: nothing was written, and
            // a retry after a short pause normally succeeds.
            response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS.to_string()));
        }
        match self.audience {
            Audience::Device => response
                .insert_header((header::CONTENT_TYPE, "text/plain; charset=utf-8"))
                .body(format!("{self}\n")),
            Audience::Api => response.json(serde_json::json!({
                "error": self.reason,
                "detail": self.detail,
            })),
        }
    }
}
