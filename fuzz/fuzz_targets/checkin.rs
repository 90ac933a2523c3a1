//! Check-in bodies (`PUT /checkin`, and `PUT /mdm` with the check-in Content-Type).
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchard::protocol::{decode_checkin, CheckinMessage};
use orchard_fuzz::assert_channel_is_well_formed;

fuzz_target!(|body: &[u8]| {
    let Ok(checkin) = decode_checkin(body) else {
        return;
    };
    assert_channel_is_well_formed(&checkin.channel);
    if matches!(checkin.message, CheckinMessage::Authenticate(_)) {
        assert!(checkin.channel.is_device_channel());
    }
});
