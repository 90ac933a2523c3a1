//! DDM status reports: the JSON `Data` of a `DeclarativeManagement` check-in on the
//! `status` endpoint, merged into the enrollment's stored DDM state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchard::ddm::sync::DdmState;
use orchard::ddm::StatusReport;
use orchard::store::DdmRecord;

fuzz_target!(|json: &[u8]| {
    let Ok(report) = StatusReport::parse(json) else {
        return;
    };
    let mut state = DdmState::default();
    state.ingest(&report, 1);
    // A device resending the same report changes nothing.
    let once = state.status.clone();
    state.ingest(&report, 1);
    assert_eq!(state.status, once);
    // The merged state survives its storage encoding.
    let record = DdmRecord {
        state: Some(state.encode()),
        timeline: Some(state.encode_timeline()),
    };
    let decoded = DdmState::decode(&record).expect("stored DDM state decodes");
    assert_eq!(decoded.status, state.status);
    assert_eq!(decoded.timeline, state.timeline);
});
