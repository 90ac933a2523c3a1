//! Raw command plists enqueued through the API (`PUT /api/v1/nanomdm/enqueue/{ids}`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchard::protocol::ids::validate_identifier;
use orchard::protocol::{build_command, inspect_command};
use plist::Value;

fuzz_target!(|raw: &[u8]| {
    let Ok(info) = inspect_command(raw) else {
        return;
    };
    assert!(validate_identifier("CommandUUID", &info.command_uuid).is_ok());
    assert!(!info.request_type.is_empty());
    // Re-enveloping the accepted command reads back as the same command.
    let command = Value::from_reader_xml(raw)
        .ok()
        .and_then(Value::into_dictionary)
        .and_then(|mut envelope| envelope.remove("Command"))
        .and_then(Value::into_dictionary)
        .expect("an accepted command has a Command dictionary");
    let rebuilt = build_command(&info.command_uuid, command);
    assert_eq!(inspect_command(&rebuilt), Ok(info));
});
