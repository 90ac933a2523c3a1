//! Connect reports (`PUT /mdm`): `Idle`, and every command result a device sends back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchard::protocol::ids::validate_identifier;
use orchard::protocol::{decode_connect, ReportStatus};
use orchard_fuzz::assert_channel_is_well_formed;

fuzz_target!(|body: &[u8]| {
    let Ok(report) = decode_connect(body) else {
        return;
    };
    assert_channel_is_well_formed(&report.channel);
    match (&report.status, &report.command_uuid) {
        (ReportStatus::Idle, None) => {}
        (ReportStatus::Idle, Some(_)) => panic!("an Idle report names a command: {report:?}"),
        (_, Some(uuid)) => assert!(validate_identifier("CommandUUID", uuid).is_ok()),
        (_, None) => panic!("a result without its CommandUUID: {report:?}"),
    }
});
