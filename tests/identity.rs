//! Device identity (protocol.md §2.5): every request must present a certificate that
//! chains to the identity CA and is bound to the enrollment it claims. Failures are 400 or
//! 403, never 401, and change nothing.

mod common;

use common::*;
use orchard::identity::{sign_mdm_signature, CertificateAuthority};

const DEVICE_A: &str = "AAAAAAAA-0000-4000-8000-00000000000A";
const DEVICE_B: &str = "BBBBBBBB-0000-4000-8000-00000000000B";

async fn put_with_headers(
    server: &Server,
    content_type: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> u16 {
    let mut request = client()
        .put(server.url("/mdm"))
        .insert_header(("Content-Type", content_type));
    for (name, value) in headers {
        request = request.insert_header((*name, value.clone()));
    }
    request.send_body(body).await.unwrap().status().as_u16()
}

#[actix_rt::test]
async fn a_request_without_any_identity_is_400() {
    let server = Server::start();
    let device = Device::new(&server, DEVICE_A);
    assert_eq!(
        put_with_headers(&server, CHECKIN, &[], device.authenticate()).await,
        400
    );
}

#[actix_rt::test]
async fn a_certificate_from_another_ca_is_403_and_enrolls_nothing() {
    let server = Server::start();
    let foreign_dir = tempfile::tempdir().unwrap();
    let rogue = Device {
        udid: DEVICE_A.into(),
        identity: CertificateAuthority::load_or_create(foreign_dir.path())
            .unwrap()
            .issue_identity("rogue")
            .unwrap(),
    };
    assert_eq!(rogue.checkin(&server, rogue.authenticate()).await.0, 403);
    let (status, _) = api_get(&server, &format!("/api/v1/devices/{DEVICE_A}")).await;
    assert_eq!(status, 404);
}

#[actix_rt::test]
async fn device_b_cannot_act_as_device_a() {
    let server = Server::start();
    let a = Device::new(&server, DEVICE_A);
    let b = Device::new(&server, DEVICE_B);
    a.enroll(&server).await;
    b.enroll(&server).await;
    enqueue(&server, DEVICE_A, "FOR-A", "ProfileList").await;
    let impostor = Device {
        udid: DEVICE_A.into(),
        identity: b.identity.clone(),
    };
    assert_eq!(
        impostor.connect(&server, impostor.idle()).await.0,
        403,
        "B's cert cannot fetch A's commands"
    );
    assert_eq!(
        impostor.checkin(&server, impostor.token_update()).await.0,
        403,
        "nor change A's push token"
    );
    assert_eq!(
        impostor.checkin(&server, impostor.authenticate()).await.0,
        403,
        "nor re-enroll A with a cert bound to B"
    );
    assert_eq!(a.drain(&server).await, ["FOR-A"], "A's queue is untouched");
}

#[actix_rt::test]
async fn nginx_url_escaped_pem_is_accepted_like_rfc_9440() {
    let server = Server::start();
    let device = Device::new(&server, DEVICE_A);
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            &device.identity.cert_der
        )
    );
    let escaped =
        percent_encoding::utf8_percent_encode(&pem, percent_encoding::NON_ALPHANUMERIC).to_string();
    let headers = [(CERT_HEADER, escaped)];
    assert_eq!(
        put_with_headers(&server, CHECKIN, &headers, device.authenticate()).await,
        200
    );
    assert_eq!(
        put_with_headers(&server, CONNECT, &headers, device.idle()).await,
        200
    );
}

#[actix_rt::test]
async fn a_header_with_invalid_base64_is_400() {
    let server = Server::start();
    let device = Device::new(&server, DEVICE_A);
    let headers = [(CERT_HEADER, ":not base64!:".to_string())];
    assert_eq!(
        put_with_headers(&server, CHECKIN, &headers, device.authenticate()).await,
        400
    );
}

#[actix_rt::test]
async fn mdm_signature_over_the_exact_body_identifies_the_device() {
    let server = Server::start();
    let device = Device::new(&server, DEVICE_A);
    let body = device.authenticate();
    let signature = sign_mdm_signature(
        &device.identity.cert_der,
        &device.identity.key_pkcs8_der,
        &body,
    )
    .unwrap();
    assert_eq!(
        put_with_headers(
            &server,
            CHECKIN,
            &[("Mdm-Signature", signature.clone())],
            body.clone()
        )
        .await,
        200
    );
    let mut tampered = body.clone();
    tampered.extend_from_slice(b"\n");
    assert_eq!(
        put_with_headers(&server, CHECKIN, &[("Mdm-Signature", signature)], tampered).await,
        400
    );
    let idle = device.idle();
    let signature = sign_mdm_signature(
        &device.identity.cert_der,
        &device.identity.key_pkcs8_der,
        &idle,
    )
    .unwrap();
    assert_eq!(
        put_with_headers(&server, CONNECT, &[("Mdm-Signature", signature)], idle).await,
        200
    );
}

mod tls {
    use super::*;
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    fn server_certificate(
        dir: &std::path::Path,
    ) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
        let (cert_path, key_path) = (dir.join("tls.pem"), dir.join("tls.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path, cert.der().to_vec())
    }

    fn tls_client(server_cert: &[u8], device: Option<&Device>) -> awc::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(server_cert.to_vec()))
            .unwrap();
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let config = match device {
            Some(device) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from(device.identity.cert_der.clone())],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                        device.identity.key_pkcs8_der.clone(),
                    )),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        awc::Client::builder()
            .connector(awc::Connector::new().rustls_0_23(Arc::new(config)))
            .finish()
    }

    #[actix_rt::test]
    async fn over_https_the_tls_client_certificate_is_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path, server_cert) = server_certificate(dir.path());
        let server = Server::start_with(&[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ]);
        assert!(server.base.starts_with("https://"));
        let device = Device::new(&server, DEVICE_A);
        let with_cert = tls_client(&server_cert, Some(&device));
        let status = |r: awc::ClientResponse<_>| r.status().as_u16();
        let auth = with_cert
            .put(server.url("/mdm"))
            .insert_header(("Content-Type", CHECKIN))
            .send_body(device.authenticate())
            .await
            .unwrap();
        assert_eq!(status(auth), 200);
        let idle = with_cert
            .put(server.url("/mdm"))
            .insert_header(("Content-Type", CONNECT))
            .send_body(device.idle())
            .await
            .unwrap();
        assert_eq!(status(idle), 200);

        let without_cert = tls_client(&server_cert, None);
        let anonymous = without_cert
            .put(server.url("/mdm"))
            .insert_header(("Content-Type", CONNECT))
            .send_body(device.idle())
            .await
            .unwrap();
        assert_eq!(
            status(anonymous),
            400,
            "no certificate: 400, not a TLS failure"
        );
        let health = without_cert
            .get(server.url("/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            status(health),
            200,
            "operations endpoints need no client certificate"
        );
    }
}

/// protocol.md §2.5 across nodes: two devices presenting one certificate to two Orchard
/// nodes on one CQL keyspace at the same moment — exactly one is enrolled, the other is
/// refused with 403, and the winner alone keeps working through either node.
#[actix_rt::test]
async fn one_certificate_binds_one_device_even_through_two_nodes() {
    let Some(cql) = cql::server() else {
        cql::skip("binding race through two nodes");
        return;
    };
    let store = StoreUnderTest::Cql {
        nodes: vec![cql],
        keyspace: cql::fresh_keyspace(),
    };
    let first = Server::start_on(store.clone(), &[]);
    // The second node trusts the first node's identity CA (one fleet, one CA).
    let ca = first.data_dir.join("identity-ca.pem");
    let second = Server::start_on(store, &["--identity-ca", ca.to_str().unwrap()]);
    for server in [&first, &second] {
        upload_push_cert(server).await;
    }
    let a = Device::new(&first, DEVICE_A);
    let b = Device {
        udid: DEVICE_B.into(),
        identity: a.identity.clone(),
    };

    let ((status_a, _), (status_b, _)) = futures_util::join!(
        a.checkin(&first, a.authenticate()),
        b.checkin(&second, b.authenticate()),
    );

    let mut statuses = [status_a, status_b];
    statuses.sort();
    assert_eq!(
        statuses,
        [200, 403],
        "exactly one device binds the certificate"
    );
    let (winner, loser) = if status_a == 200 { (&a, &b) } else { (&b, &a) };
    for server in [&first, &second] {
        assert_eq!(winner.checkin(server, winner.token_update()).await.0, 200);
        assert_eq!(loser.checkin(server, loser.token_update()).await.0, 403);
    }
}
