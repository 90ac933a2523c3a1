//! App-wide settings of actix's extractors, so a query string, path or JSON body that does
//! not parse is refused like every other request: through [`Rejection`], as the JSON
//! error object under `/api/v1` and `/migration` (actix's own answers are plain text).

use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest};

use super::rejection::{Audience, Rejection};

/// The largest JSON body an admin route reads.
pub const JSON_LIMIT: usize = 1024 * 1024;

/// Register the query, path and JSON error handlers for the whole app.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::QueryConfig::default().error_handler(query_error))
        .app_data(web::PathConfig::default().error_handler(path_error))
        .app_data(
            web::JsonConfig::default()
                .limit(JSON_LIMIT)
                .error_handler(json_error),
        );
}

/// Admin callers (`/api/…`, `/migration`) read JSON errors; devices read text.
pub fn audience_of(req: &HttpRequest) -> Audience {
    let path = req.path();
    if path.starts_with("/api/") || path == "/migration" {
        Audience::Api
    } else {
        Audience::Device
    }
}

fn refuse(
    req: &HttpRequest,
    status: StatusCode,
    reason: &'static str,
    detail: String,
) -> actix_web::Error {
    Rejection {
        audience: audience_of(req),
        ..Rejection::api(status, reason, detail)
    }
    .into()
}

fn query_error(err: QueryPayloadError, req: &HttpRequest) -> actix_web::Error {
    refuse(req, StatusCode::BAD_REQUEST, "bad_query", err.to_string())
}

fn path_error(err: PathError, req: &HttpRequest) -> actix_web::Error {
    refuse(req, StatusCode::BAD_REQUEST, "bad_path", err.to_string())
}

/// 413 past [`JSON_LIMIT`], 415 for a body that is not declared JSON, else 400.
fn json_error(err: JsonPayloadError, req: &HttpRequest) -> actix_web::Error {
    let (status, reason) = match &err {
        JsonPayloadError::Overflow { .. } | JsonPayloadError::OverflowKnownLength { .. } => {
            (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
        }
        JsonPayloadError::ContentType => {
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
        }
        _ => (StatusCode::BAD_REQUEST, "bad_json"),
    };
    refuse(req, status, reason, err.to_string())
}
