//! Per-enrollment DDM state, owned by the enrollment's actor: the assigned sets, the
//! merged status, and a bounded timeline of the sync exchanges that the sync doctor
//! reads. Raw reports are not part of it: they go straight to the store's report history,
//! so a resident actor does not carry kilobytes of JSON it never reads.

use std::collections::{BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::{Category, EnrollmentStatus, StatusReport};
use crate::store::DdmRecord;

/// Sync events kept per enrollment (the last few syncs). Resident actors hold their
/// state in memory, so these bounds are per-device memory.
pub const TIMELINE_LENGTH: usize = 32;
/// Raw status reports kept per enrollment (in the store, not in memory).
pub const REPORTS_KEPT: usize = 2;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DdmState {
    pub sets: BTreeSet<String>,
    pub status: EnrollmentStatus,
    /// The DeclarationsToken of the manifest last shown to the device: bodies are served
    /// from that manifest.
    pub last_token_served: Option<String>,
    /// Stored in its own row ([`DdmState::encode_timeline`]): it changes on every DDM
    /// request, the rest only on assignments and reports.
    #[serde(skip)]
    pub timeline: VecDeque<SyncEvent>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncEvent {
    /// Unix seconds.
    pub at: i64,
    pub kind: SyncEventKind,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SyncEventKind {
    /// A DeclarativeManagement command was queued for the device.
    CommandQueued {
        command_uuid: String,
        with_data: bool,
    },
    Tokens {
        token: String,
    },
    Items {
        token: String,
        items: Vec<ServedItem>,
    },
    /// A body was fetched (`served: false`: answered 404).
    Declaration {
        category: String,
        identifier: String,
        served: bool,
    },
    Status {
        full_report: bool,
        declarations: usize,
        errors: usize,
    },
    /// The report could not be parsed; it was stored raw.
    StatusUnparseable {
        reason: String,
    },
    /// Re-enrollment wiped the device's DDM state.
    Reset,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServedItem {
    pub category: String,
    pub identifier: String,
    pub server_token: String,
}

impl DdmState {
    pub fn record(&mut self, at: i64, kind: SyncEventKind) {
        if self.timeline.len() == TIMELINE_LENGTH {
            self.timeline.pop_front();
        }
        self.timeline.push_back(SyncEvent { at, kind });
    }

    /// Merge a parsed report (the caller keeps the raw one in the store's history).
    pub fn ingest(&mut self, report: &StatusReport, at: i64) {
        self.status.apply(report, at);
        self.record(
            at,
            SyncEventKind::Status {
                full_report: report.full_report,
                declarations: report.declarations.as_ref().map_or(0, Vec::len),
                errors: report.errors.len(),
            },
        );
    }

    /// Re-enrollment wiped the device: forget what it reported, keep the assignments.
    pub fn reset(&mut self, at: i64) {
        self.status = EnrollmentStatus::default();
        self.last_token_served = None;
        self.record(at, SyncEventKind::Reset);
    }

    /// The state row: everything but the timeline.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn encode_timeline(&self) -> Vec<u8> {
        serde_json::to_vec(&self.timeline).unwrap_or_default()
    }

    /// Rebuild the state from its stored rows (either may be absent).
    pub fn decode(record: &DdmRecord) -> Result<DdmState, serde_json::Error> {
        let mut state: DdmState = match &record.state {
            Some(bytes) => serde_json::from_slice(bytes)?,
            None => DdmState::default(),
        };
        if let Some(bytes) = &record.timeline {
            state.timeline = serde_json::from_slice(bytes)?;
        }
        Ok(state)
    }
}

/// The item list of a manifest, for the timeline.
pub fn served_items(manifest: &super::Manifest) -> Vec<ServedItem> {
    manifest
        .items()
        .iter()
        .map(|item| ServedItem {
            category: item.category.as_str().to_string(),
            identifier: item.identifier.clone(),
            server_token: item.server_token.clone(),
        })
        .collect()
}

/// `declaration/<category>/<identifier>` → its parts.
pub fn parse_declaration_endpoint(endpoint: &str) -> Option<(Category, &str)> {
    let rest = endpoint.strip_prefix("declaration/")?;
    let (category, identifier) = rest.split_once('/')?;
    Some((Category::parse(category)?, identifier))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_keeps_only_the_last_events() {
        let mut state = DdmState::default();
        for n in 0..(TIMELINE_LENGTH as i64 + 10) {
            state.record(
                n,
                SyncEventKind::Tokens {
                    token: n.to_string(),
                },
            );
        }
        assert_eq!(state.timeline.len(), TIMELINE_LENGTH);
        assert_eq!(state.timeline.front().unwrap().at, 10);
    }

    #[test]
    fn declaration_endpoints_name_a_category_and_an_identifier() {
        let (category, id) =
            parse_declaration_endpoint("declaration/configuration/com.example.su").unwrap();
        assert_eq!((category, id), (Category::Configuration, "com.example.su"));
        assert!(parse_declaration_endpoint("declaration/widget/x").is_none());
        assert!(parse_declaration_endpoint("tokens").is_none());
    }

    #[test]
    fn state_round_trips_through_its_encoding() {
        let mut state = DdmState::default();
        state.sets.insert("default".into());
        state.record(5, SyncEventKind::Reset);
        let record = DdmRecord {
            state: Some(state.encode()),
            timeline: Some(state.encode_timeline()),
        };
        let decoded = DdmState::decode(&record).unwrap();
        assert_eq!(decoded.sets, state.sets);
        assert_eq!(decoded.timeline, state.timeline);
    }

    /// A device's numbers come back from storage exactly as it reported them: the JSON
    /// parser rounds every decimal correctly (serde_json's `float_roundtrip`), or a
    /// long integer read as a float could come back one unit in the last place off.
    #[test]
    fn reported_numbers_survive_the_storage_encoding_exactly() {
        let report = br#"{"StatusItems": {"test": {"values": [
            3300000000000000000001122366456666,
            3300000000000000000000000000331666666666666666,
            0.1, 2.2250738585072014e-308, 1.7976931348623157e308, 33333333331666666666666666
        ]}}}"#;
        let mut state = DdmState::default();
        state.ingest(&StatusReport::parse(report).unwrap(), 1);
        let record = DdmRecord {
            state: Some(state.encode()),
            timeline: None,
        };
        assert_eq!(DdmState::decode(&record).unwrap().status, state.status);
    }

    #[test]
    fn the_state_row_leaves_the_timeline_to_its_own_row() {
        let mut state = DdmState::default();
        state.record(5, SyncEventKind::Reset);
        let record = DdmRecord {
            state: Some(state.encode()),
            timeline: None,
        };
        assert!(DdmState::decode(&record).unwrap().timeline.is_empty());
    }
}
