//! Reading request bodies with a size limit and a deadline, so an oversized or stalled
//! upload costs neither memory nor a worker.

use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::web::{Bytes, BytesMut, Payload};
use actix_web::HttpRequest;
use futures_util::StreamExt;

use super::rejection::Rejection;
use super::HttpSettings;

/// Read a request body under the server's configured limit and deadline.
pub async fn read_body(
    req: &HttpRequest,
    payload: Payload,
    settings: &HttpSettings,
) -> Result<Bytes, Rejection> {
    read_limited(req, payload, settings.max_body_bytes, settings.body_timeout).await
}

/// Read the whole body: 413 past `limit`, 408 if it does not arrive within `deadline`.
pub(super) async fn read_limited(
    req: &HttpRequest,
    mut payload: Payload,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, Rejection> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large(limit));
    }
    let read = async {
        let mut body = BytesMut::with_capacity(declared.unwrap_or(1024).min(limit));
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| {
                Rejection::device(StatusCode::BAD_REQUEST, "body_read_error", e.to_string())
            })?;
            if body.len() + chunk.len() > limit {
                return Err(too_large(limit));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    tokio::time::timeout(deadline, read)
        .await
        .unwrap_or_else(|_| {
            Err(Rejection::device(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("request body not received within {}s", deadline.as_secs()),
            ))
        })
}

fn too_large(limit: usize) -> Rejection {
    Rejection::device(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("request body exceeds the {limit}-byte limit"),
    )
}
