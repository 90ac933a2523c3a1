//! Which certificate a device request presents, and whether Orchard trusts it
//! (protocol.md §2.5): the TLS client certificate, then the trusted proxy's header, then
//! a verified `Mdm-Signature` over the exact body.

use std::any::Any;

use actix_web::dev::Extensions;
use actix_web::http::StatusCode;
use actix_web::HttpRequest;
use rustls_pki_types::CertificateDer;

use super::rejection::Rejection;
use super::AppState;
use crate::identity::{verify_mdm_signature, CertFingerprint};

/// The client certificate of a TLS connection, captured when the connection opens.
#[derive(Clone, Debug)]
pub struct PeerCertificate(pub CertificateDer<'static>);

/// `HttpServer::on_connect` hook: remember the device's TLS client certificate.
pub fn capture_peer_certificate(connection: &dyn Any, extensions: &mut Extensions) {
    type Tls = actix_tls::accept::rustls_0_23::TlsStream<actix_web::rt::net::TcpStream>;
    let Some(tls) = connection.downcast_ref::<Tls>() else {
        return;
    };
    let (_, session) = tls.get_ref();
    if let Some(leaf) = session.peer_certificates().and_then(|chain| chain.first()) {
        extensions.insert(PeerCertificate(leaf.clone().into_owned()));
    }
}

/// The verified identity of the device sending this request.
pub fn device_identity(
    req: &HttpRequest,
    body: &[u8],
    state: &AppState,
) -> Result<CertFingerprint, Rejection> {
    if let Some(peer) = req.conn_data::<PeerCertificate>() {
        return state.verifier.verify(&peer.0).map_err(Rejection::identity);
    }
    if let Some(name) = &state.settings.client_cert_header {
        if let Some(value) = req.headers().get(name.as_str()) {
            let value = value.to_str().map_err(|_| {
                Rejection::device(
                    StatusCode::BAD_REQUEST,
                    "bad_certificate_header",
                    format!("{name} is not printable ASCII"),
                )
            })?;
            return state
                .verifier
                .verify_header(value)
                .map_err(Rejection::identity);
        }
    }
    if let Some(signature) = req.headers().get("Mdm-Signature") {
        let signature = signature.to_str().map_err(|_| {
            Rejection::device(
                StatusCode::BAD_REQUEST,
                "bad_signature_header",
                "Mdm-Signature is not printable ASCII",
            )
        })?;
        let signer = verify_mdm_signature(signature, body).map_err(Rejection::identity)?;
        return state.verifier.verify(&signer).map_err(Rejection::identity);
    }
    Err(Rejection::device(
        StatusCode::BAD_REQUEST,
        "missing_identity",
        "no device identity: present a TLS client certificate, the proxy certificate header, or Mdm-Signature",
    ))
}
