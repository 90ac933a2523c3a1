//! `PUT /migration` (API key): NanoMDM's migration route, so a fleet moving from
//! NanoHUB/NanoMDM keeps its devices without re-enrolling them. Each request carries one
//! raw check-in plist (Authenticate, TokenUpdate or SetBootstrapToken) exactly as the
//! old server stored it — what NanoMDM's `nano2nano` tool sends, with HTTP Basic
//! `nanomdm:<API key>` — and is applied by the enrollment's actor like the device's own
//! check-in, without a device identity (`device/migration.rs`).

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};

use super::body::read_body;
use super::rejection::Rejection;
use super::AppState;
use crate::device::messages::ImportCheckin;
use crate::device::DeviceError;
use crate::protocol::checkin::decode_checkin;

/// The check-ins that describe an enrollment (NanoMDM's migration tool sends these).
const IMPORTED: [&str; 3] = ["Authenticate", "TokenUpdate", "SetBootstrapToken"];

/// `PUT /migration`: import one check-in; 200 once it is durable.
pub async fn import(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let body = read_body(&req, payload, &state.settings)
        .await
        .map_err(Rejection::for_api)?;
    let checkin = decode_checkin(&body).map_err(|e| Rejection::protocol(e).for_api())?;
    let message_type = checkin.message.message_type();
    if !IMPORTED.contains(&message_type) {
        return Err(Rejection::api(
            StatusCode::BAD_REQUEST,
            "unimportable_checkin",
            format!("{message_type} is not imported: send the Authenticate, TokenUpdate and SetBootstrapToken check-ins of each enrollment"),
        ));
    }
    let id = checkin.channel.id;
    let imported = ImportCheckin {
        plist: body.to_vec(),
    };
    state
        .registry
        .call_anywhere(&id, imported)
        .await
        .map_err(migration_error)?;
    metrics::counter!("orchard_migrated_checkins_total", "message_type" => message_type)
        .increment(1);
    tracing::info!(enrollment_id = %id, message_type, "check-in imported through /migration");
    Ok(HttpResponse::Ok().finish())
}

/// The device errors an import can meet, as the admin API words them.
fn migration_error(e: DeviceError) -> Rejection {
    let detail = match &e {
        DeviceError::NotAuthenticated(device) => format!(
            "enrollment {device} has no imported Authenticate: import its Authenticate first"
        ),
        _ => e.to_string(),
    };
    let status = Rejection::from_device(e.clone()).status;
    Rejection::api(status, e.reason(), detail)
}
