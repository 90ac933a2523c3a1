//! The wake-up loop: a push certificate for Orchard, and the local APNs peer that receives
//! Orchard's pushes and hands them to the simulated fleet.
//!
//! The peer runs on its own runtime thread so that answering Orchard's HTTP/2 streams never
//! waits behind the fleet's request traffic on the client thread.

use std::io;

use apns_peer::{ApnsPeer, PeerConfig, RecordedPush};
use rustls_pki_types::CertificateDer;
use tokio::sync::mpsc;

/// An MDM push certificate as Apple issues it: the topic in the subject UID.
pub struct PushCertificate {
    pub topic: String,
    /// Certificate followed by its private key, the body `PUT /api/v1/nanomdm/pushcert` takes.
    pub pem_bundle: String,
    pub der: CertificateDer<'static>,
}

/// OID 0.9.2342.19200300.100.1.1 (`UID`), where Apple puts the push topic.
const UID_OID: [u64; 7] = [0, 9, 2342, 19_200_300, 100, 1, 1];

impl PushCertificate {
    pub fn generate() -> Result<Self, rcgen::Error> {
        let topic = format!("com.apple.mgmt.External.{}", uuid::Uuid::new_v4());
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(
            rcgen::DnType::CustomDnType(UID_OID.to_vec()),
            topic.as_str(),
        );
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("APSP:{topic}"));
        let key = rcgen::KeyPair::generate()?;
        let certificate = params.self_signed(&key)?;
        Ok(Self {
            pem_bundle: format!("{}{}", certificate.pem(), key.serialize_pem()),
            der: certificate.der().clone(),
            topic,
        })
    }
}

/// The running peer and its runtime.
pub struct Peer {
    pub peer: ApnsPeer,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Peer {
    /// Starts a peer that trusts only `push_certificate`, on a one-worker runtime of its own.
    pub fn start(push_certificate: &PushCertificate) -> io::Result<Self> {
        let config = PeerConfig {
            trusted_client_certs: vec![push_certificate.der.clone()],
            ..PeerConfig::default()
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("apns-peer")
            .enable_all()
            .build()?;
        let peer = runtime.block_on(ApnsPeer::start(config))?;
        Ok(Self {
            peer,
            runtime: Some(runtime),
        })
    }

    pub fn subscribe(&self) -> mpsc::Receiver<RecordedPush> {
        self.peer.subscribe()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_push_certificate_names_an_mdm_topic_orchard_accepts() {
        let certificate = PushCertificate::generate().unwrap();
        assert!(certificate.topic.starts_with("com.apple.mgmt.External."));
        assert!(certificate.pem_bundle.contains("BEGIN CERTIFICATE"));
        assert!(certificate.pem_bundle.contains("PRIVATE KEY"));
        let parsed =
            orchard::identity::PushCertificate::from_pem(certificate.pem_bundle.as_bytes())
                .unwrap();
        assert_eq!(parsed.topic, certificate.topic);
    }
}
