//! Properties shared by several fuzz targets: what any value a decoder accepts must
//! satisfy, beyond "does not panic".

use orchard::identity::PushCertificate;
use orchard::protocol::ids::validate_identifier;
use orchard::protocol::Channel;

/// An accepted channel keys storage and URLs: its device part is a safe identifier
/// without `:`, and a user channel's id is `<device id>:<safe user key>`.
pub fn assert_channel_is_well_formed(channel: &Channel) {
    assert!(validate_identifier("device id", &channel.device_id).is_ok());
    assert!(!channel.device_id.contains(':'), "{channel:?}");
    if channel.is_device_channel() {
        assert_eq!(channel.id, channel.device_id);
        assert_eq!(channel.user_id, None);
        return;
    }
    let user_key = channel
        .id
        .strip_prefix(&channel.device_id)
        .and_then(|rest| rest.strip_prefix(':'))
        .unwrap_or_else(|| panic!("user channel id not under its device: {channel:?}"));
    assert!(
        validate_identifier("user key", user_key).is_ok(),
        "{channel:?}"
    );
    assert!(channel.user_id.is_some(), "{channel:?}");
}

/// Splits a fuzz input into a length-prefixed first part and the rest: the first byte
/// is the length of the first part (clamped to what is there).
pub fn split_prefixed(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&length, rest)) = data.split_first() else {
        return (&[], &[]);
    };
    rest.split_at(usize::from(length).min(rest.len()))
}

/// An accepted push certificate is for an MDM topic, and what is stored of it is
/// canonical: reading the stored PEM back gives the same certificate.
pub fn assert_push_certificate_is_canonical(push: PushCertificate) {
    assert!(push.topic.starts_with("com.apple.mgmt."), "{push:?}");
    let stored = format!("{}{}", push.cert_pem, push.key_pem);
    assert_eq!(
        PushCertificate::from_pem(stored.as_bytes()).ok(),
        Some(push)
    );
}
