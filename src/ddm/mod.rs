//! Declarative Device Management: declarations, the manifest a device syncs
//! against, the publish-time reference rules, and status reports.
//!
//! Everything here is pure (no I/O) so the rules can be checked at publish
//! time, answered on the hot DDM endpoints, and tested alone. The wire shapes
//! follow Apple's `declarative/protocol` schemas; tokens are content-derived
//! and deterministic so the `tokens` and `declaration-items` responses of one
//! sync always agree.

pub mod catalog;
mod declaration;
pub mod doctor;
pub mod fleet;
mod json_text;
pub mod kmfddm;
mod manifest;
mod path;
mod status;
pub mod sync;
mod validate;

pub use declaration::{canonical_json, Category, Declaration, Issue, Severity};
pub use manifest::{Manifest, ManifestItem};
pub use status::{
    DeclarationStatus, EnrollmentStatus, Reason, StatusError, StatusReport, Validity,
};
pub use validate::check_references;

use crate::store::StoredCommand;

/// The `RequestType` of the command that starts a sync.
pub const DECLARATIVE_MANAGEMENT: &str = "DeclarativeManagement";

/// A DeclarativeManagement command under a fresh CommandUUID. `tokens` (the SyncTokens
/// JSON) goes in its `Data` when the command is for one enrollment, so the device can skip
/// its `tokens` request.
pub fn sync_command(tokens: Option<Vec<u8>>) -> StoredCommand {
    let mut command = plist::Dictionary::new();
    command.insert("RequestType".into(), DECLARATIVE_MANAGEMENT.into());
    if let Some(tokens) = tokens {
        command.insert("Data".into(), plist::Value::Data(tokens));
    }
    let uuid = uuid::Uuid::new_v4().to_string().to_uppercase();
    StoredCommand {
        body: crate::protocol::command::build_command(&uuid, command),
        command_uuid: uuid,
        request_type: DECLARATIVE_MANAGEMENT.into(),
    }
}

/// Why a DDM input was refused.
#[derive(Debug, thiserror::Error)]
pub enum DdmError {
    /// A declaration broke at least one publish-time rule; `issues` holds
    /// every problem found (warnings included) so one round trip fixes all.
    #[error(
        "declaration {} is invalid: {}",
        .identifier.as_deref().unwrap_or("(without Identifier)"),
        summarize(.issues)
    )]
    Invalid {
        identifier: Option<String>,
        issues: Vec<Issue>,
    },
    /// A status report that is not a JSON object (or whose `StatusItems` is
    /// not one); the caller keeps the raw bytes and still answers 200.
    #[error("status report is unusable: {0}")]
    MalformedStatusReport(String),
}

impl DdmError {
    /// A stable snake_case label for metrics and API error bodies.
    pub fn reason(&self) -> &'static str {
        match self {
            DdmError::Invalid { .. } => "invalid_declaration",
            DdmError::MalformedStatusReport(_) => "malformed_status_report",
        }
    }
}

/// The errors of an issue list, joined for a one-line message.
fn summarize(issues: &[Issue]) -> String {
    let errors: Vec<String> = issues
        .iter()
        .filter(|issue| issue.severity == Severity::Error)
        .map(Issue::to_string)
        .collect();
    errors.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_stable_reasons_and_name_the_declaration() {
        let invalid = Declaration::from_api_json(
            br#"{"Type":"com.apple.activation.simple","Identifier":"com.example.act","Payload":{}}"#,
            0,
        )
        .unwrap_err();
        assert_eq!(invalid.reason(), "invalid_declaration");
        let message = invalid.to_string();
        assert!(message.contains("com.example.act"), "{message}");
        assert!(
            message.contains("$.Payload.StandardConfigurations"),
            "{message}"
        );

        let malformed = StatusReport::parse(b"[]").unwrap_err();
        assert_eq!(malformed.reason(), "malformed_status_report");
    }
}
