//! Fleet tallies: the fleet view and the fleet diagnosis answered from counts, not from a
//! walk over every enrollment.
//!
//! Both views depend on more than the enrollment: on the catalog (a new revision of a
//! declaration makes every holder of the old one pending) and on the clock (a stall rule
//! fires once its deadline passes). Counting rule hits directly would need a recount on
//! every catalog change and every tick. Instead each enrollment is reduced to
//! [`FleetFacts`]: exactly the inputs the rules read, without the enrollment's identity,
//! with stall deadlines rounded up to the minute. Enrollments in the same situation share
//! one value, so a fleet of millions collapses into a few thousand distinct facts;
//! [`FleetCounts`] counts them, and the views evaluate each distinct value once against
//! the current manifests at the start of the current minute.
//!
//! Pure: no I/O, no clock. The device actors keep the counts current
//! (`device::tally`), and `diagnose` and these views share their predicates, so the fleet
//! answer is the per-enrollment doctor's answer summed.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use super::catalog::ManifestSnapshot;
use super::doctor::{
    fetch_without_status, is_rejected, items_not_held, items_without_fetch, reference_problems,
    EnrollmentFacts, ReportedTokens, SupportedTypes,
};
use super::sync::{DdmState, SyncEvent};
use super::{ManifestItem, Validity};

/// Stall deadlines are kept to the minute: the fleet diagnosis is "as of the start of the
/// current minute", so enrollments that stalled within one minute share their facts.
const DEADLINE_GRANULARITY: i64 = 60;

/// Everything the fleet views need to know about one enrollment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FleetFacts {
    /// The assigned sets: they select the manifest the enrollment should hold.
    pub sets: BTreeSet<String>,
    /// Every reported declaration: its ServerToken and how it stands.
    reported: BTreeMap<String, Reported>,
    /// The device refused at least one declaration (SD-T02).
    rejects_declarations: bool,
    capabilities: Capabilities,
    /// SD-S05's deadline (minute-aligned), while no declaration was fetched after the last
    /// `declaration-items`.
    items_stall_due: Option<i64>,
    /// SD-S07's deadline (minute-aligned), while no status came after the last fetch.
    status_stall_due: Option<i64>,
    enrollment: EnrollmentFacts,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Reported {
    server_token: String,
    standing: Standing,
}

/// How a reported declaration counts in the fleet view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Standing {
    Invalid,
    Active,
    Inactive,
}

impl Standing {
    fn label(self) -> &'static str {
        match self {
            Standing::Invalid => "invalid",
            Standing::Active => "active",
            Standing::Inactive => "inactive",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
enum Capabilities {
    /// No client-capabilities received yet (SD-E03).
    #[default]
    Unreported,
    /// Received; the supported declaration types when it lists them (SD-E02).
    Reported(Option<SupportedTypes>),
}

impl ReportedTokens for FleetFacts {
    fn reported_token(&self, identifier: &str) -> Option<&str> {
        self.reported
            .get(identifier)
            .map(|r| r.server_token.as_str())
    }
}

impl FleetFacts {
    /// The facts of an enrollment with DDM state `state` (timeline included).
    pub fn of(state: &DdmState, enrollment: EnrollmentFacts, stall_after_secs: i64) -> FleetFacts {
        FleetFacts::default()
            .with_state(state)
            .with_timeline(&state.timeline, stall_after_secs)
            .with_enrollment(enrollment)
    }

    /// Replace what comes from the DDM state row (sets, status, capabilities).
    pub fn with_state(mut self, state: &DdmState) -> FleetFacts {
        let status = &state.status;
        self.sets = state.sets.clone();
        self.reported = status
            .declarations
            .iter()
            .map(|(identifier, declaration)| {
                let standing = match declaration {
                    d if d.valid == Validity::Invalid => Standing::Invalid,
                    d if d.active => Standing::Active,
                    _ => Standing::Inactive,
                };
                let reported = Reported {
                    server_token: declaration.server_token.clone(),
                    standing,
                };
                (identifier.clone(), reported)
            })
            .collect();
        self.rejects_declarations = status.declarations.values().any(is_rejected);
        self.capabilities = match &status.client_capabilities {
            None => Capabilities::Unreported,
            Some(value) => Capabilities::Reported(SupportedTypes::from_capabilities(value)),
        };
        self
    }

    /// Replace what comes from the timeline row (the stall clocks).
    pub fn with_timeline(
        mut self,
        timeline: &VecDeque<SyncEvent>,
        stall_after_secs: i64,
    ) -> FleetFacts {
        let due = |at: i64| minute_ceiling(at.saturating_add(stall_after_secs));
        self.items_stall_due = items_without_fetch(timeline).map(|(at, _)| due(at));
        self.status_stall_due = fetch_without_status(timeline).map(due);
        self
    }

    /// Replace what comes from the enrollment row.
    pub fn with_enrollment(mut self, enrollment: EnrollmentFacts) -> FleetFacts {
        self.enrollment = enrollment;
        self
    }

    /// One of [`ASSIGNMENT_STATES`]: how the device reports `item` of its manifest.
    fn assignment_state(&self, item: &ManifestItem) -> &'static str {
        match self.reported.get(&item.identifier) {
            None => "pending",
            Some(r) if r.server_token != item.server_token => "old_server_token",
            Some(r) => r.standing.label(),
        }
    }

    /// The doctor rules these facts trigger at `as_of` (a minute boundary) against the
    /// manifest of their sets; `reference_problems` is that manifest's SD-P08 verdict.
    fn rules(
        &self,
        manifest: &ManifestSnapshot,
        reference_problems: bool,
        as_of: i64,
    ) -> impl Iterator<Item = &'static str> {
        let passed = |due: Option<i64>| due.is_some_and(|due| due <= as_of);
        let mut not_held = items_not_held(manifest, self).peekable();
        let expects_fetches = not_held.peek().is_some();
        let stale_tokens = not_held.any(|(_, reported)| reported.is_some());
        let unsupported = match &self.capabilities {
            Capabilities::Reported(Some(supported)) => {
                !supported.unsupported_in(manifest).is_empty()
            }
            _ => false,
        };
        [
            ("SD-S05", passed(self.items_stall_due) && expects_fetches),
            ("SD-S07", passed(self.status_stall_due)),
            ("SD-T01", stale_tokens),
            ("SD-T02", self.rejects_declarations),
            ("SD-P08", reference_problems),
            ("SD-E02", unsupported),
            ("SD-E01", self.enrollment.awaiting_configuration),
            ("SD-A01", self.enrollment.push_token_broken()),
            ("SD-E03", self.capabilities == Capabilities::Unreported),
        ]
        .into_iter()
        .filter_map(|(rule, hit)| hit.then_some(rule))
    }
}

/// `at` rounded up to the next minute boundary.
fn minute_ceiling(at: i64) -> i64 {
    let into_minute = at.rem_euclid(DEADLINE_GRANULARITY);
    if into_minute == 0 {
        at
    } else {
        at - into_minute + DEADLINE_GRANULARITY
    }
}

/// The start of the minute holding `now`: the instant the fleet diagnosis is evaluated at.
pub fn minute_floor(now: i64) -> i64 {
    now - now.rem_euclid(DEADLINE_GRANULARITY)
}

/// Per declaration: enrollments assigned it and how many are in each state.
pub type DeclarationCounts = BTreeMap<String, BTreeMap<&'static str, u64>>;

/// How many enrollments share each distinct [`FleetFacts`].
#[derive(Debug, Default)]
pub struct FleetCounts {
    classes: HashMap<Arc<FleetFacts>, u64>,
    enrollments: u64,
}

impl FleetCounts {
    /// Count one more enrollment with `facts`; the shared copy is returned so that
    /// holders of the same facts share one allocation.
    pub fn add(&mut self, facts: &FleetFacts) -> Arc<FleetFacts> {
        self.add_many(facts, 1)
    }

    /// Count `n` more enrollments with `facts` (a shard's counts joining the total).
    pub fn add_many(&mut self, facts: &FleetFacts, n: u64) -> Arc<FleetFacts> {
        self.insert(facts, n, || Arc::new(facts.clone()))
    }

    /// Count `n` more enrollments with `facts`, keeping this copy if the value is new here
    /// (a shard's counts hold the copies of the node's total).
    pub fn add_shared(&mut self, facts: &Arc<FleetFacts>, n: u64) -> Arc<FleetFacts> {
        self.insert(facts, n, || Arc::clone(facts))
    }

    fn insert(
        &mut self,
        facts: &FleetFacts,
        n: u64,
        copy: impl FnOnce() -> Arc<FleetFacts>,
    ) -> Arc<FleetFacts> {
        self.enrollments += n;
        if let Some((shared, count)) = self.classes.get_key_value(facts) {
            let shared = Arc::clone(shared);
            *self.classes.get_mut(facts).expect("present") = count + n;
            return shared;
        }
        let shared = copy();
        self.classes.insert(Arc::clone(&shared), n);
        shared
    }

    /// Count one enrollment with `facts` less. Returns false (and changes nothing) when no
    /// enrollment is counted with them, which would be a bookkeeping bug.
    pub fn remove(&mut self, facts: &FleetFacts) -> bool {
        self.remove_many(facts, 1)
    }

    /// Count `n` enrollments with `facts` less (a shard's counts leaving the total);
    /// false, changing nothing, when fewer are counted.
    pub fn remove_many(&mut self, facts: &FleetFacts, n: u64) -> bool {
        let Some(count) = self.classes.get_mut(facts) else {
            return false;
        };
        if *count < n {
            return false;
        }
        *count -= n;
        if *count == 0 {
            self.classes.remove(facts);
        }
        self.enrollments -= n;
        true
    }

    /// Every distinct facts value counted, with how many share it.
    pub fn classes(&self) -> impl Iterator<Item = (&Arc<FleetFacts>, u64)> {
        self.classes.iter().map(|(facts, &n)| (facts, n))
    }

    /// Enrollments counted.
    pub fn enrollments(&self) -> u64 {
        self.enrollments
    }

    /// Distinct facts counted (the cost of answering a view).
    pub fn distinct(&self) -> usize {
        self.classes.len()
    }

    /// The fleet view: per declaration of each enrollment's manifest, `assigned` and one
    /// of [`ASSIGNMENT_STATES`].
    pub fn declarations(&self, manifests: &mut ManifestLookup<'_>) -> DeclarationCounts {
        let mut fleet = DeclarationCounts::new();
        for (facts, &count) in &self.classes {
            let (manifest, _) = manifests.get(&facts.sets);
            for item in manifest.manifest.items() {
                let counts = fleet.entry(item.identifier.clone()).or_default();
                *counts.entry("assigned").or_default() += count;
                *counts.entry(facts.assignment_state(item)).or_default() += count;
            }
        }
        fleet
    }

    /// The fleet diagnosis at `as_of` (a minute boundary): enrollments per doctor rule.
    pub fn findings(
        &self,
        manifests: &mut ManifestLookup<'_>,
        as_of: i64,
    ) -> BTreeMap<&'static str, u64> {
        self.summary(manifests, as_of).findings
    }

    /// The fleet in a few numbers at `as_of` (a minute boundary): convergence, assignments
    /// per state and the diagnosis.
    pub fn summary(&self, manifests: &mut ManifestLookup<'_>, as_of: i64) -> FleetSummary {
        let mut summary = FleetSummary {
            enrollments: self.enrollments,
            ..FleetSummary::default()
        };
        for (facts, &count) in &self.classes {
            let (manifest, reference_problems) = manifests.get(&facts.sets);
            let mut converged = true;
            for item in manifest.manifest.items() {
                let state = facts.assignment_state(item);
                converged &= CONVERGED_STATES.contains(&state);
                *summary.assignments.entry(state).or_default() += count;
            }
            if converged {
                summary.converged += count;
            }
            for rule in facts.rules(&manifest, reference_problems, as_of) {
                *summary.findings.entry(rule).or_default() += count;
            }
        }
        summary
    }
}

/// How a declaration assigned to an enrollment stands in the fleet view: not reported at
/// all, reported at an older ServerToken, or reported at the current one as invalid,
/// active or inactive.
pub const ASSIGNMENT_STATES: [&str; 5] = [
    "pending",
    "old_server_token",
    "invalid",
    "active",
    "inactive",
];

/// The states in which the device holds the declaration the server serves now.
const CONVERGED_STATES: [&str; 2] = ["active", "inactive"];

/// What the DDM gauges export (see [`FleetCounts::summary`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FleetSummary {
    pub enrollments: u64,
    /// Enrollments whose device reports every declaration of its manifest at its current
    /// ServerToken, none of them invalid.
    pub converged: u64,
    /// Per [`ASSIGNMENT_STATES`] value: (enrollment, declaration) pairs, over all
    /// declarations.
    pub assignments: BTreeMap<&'static str, u64>,
    /// Per doctor rule: enrollments it finds.
    pub findings: BTreeMap<&'static str, u64>,
}

/// The manifest of each set combination (and its SD-P08 verdict), looked up once per view.
pub struct ManifestLookup<'a> {
    manifest_of: &'a dyn Fn(&BTreeSet<String>) -> Arc<ManifestSnapshot>,
    seen: HashMap<BTreeSet<String>, (Arc<ManifestSnapshot>, bool)>,
}

impl<'a> ManifestLookup<'a> {
    pub fn new(manifest_of: &'a dyn Fn(&BTreeSet<String>) -> Arc<ManifestSnapshot>) -> Self {
        ManifestLookup {
            manifest_of,
            seen: HashMap::new(),
        }
    }

    fn get(&mut self, sets: &BTreeSet<String>) -> (Arc<ManifestSnapshot>, bool) {
        if let Some((manifest, problems)) = self.seen.get(sets) {
            return (Arc::clone(manifest), *problems);
        }
        let manifest = (self.manifest_of)(sets);
        let problems = !reference_problems(&manifest).is_empty();
        self.seen
            .insert(sets.clone(), (Arc::clone(&manifest), problems));
        (manifest, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ddm::doctor::{diagnose, RULES};
    use crate::ddm::sync::{ServedItem, SyncEventKind};
    use crate::ddm::{Declaration, StatusReport};
    use serde_json::json;

    fn declaration(identifier: &str, echo: &str) -> Arc<Declaration> {
        let json = json!({"Type": "com.apple.configuration.management.test",
            "Identifier": identifier, "Payload": {"Echo": echo}});
        Arc::new(
            Declaration::from_api_json(json.to_string().as_bytes(), 0)
                .unwrap()
                .0,
        )
    }

    fn activation(targets: &[&str]) -> Arc<Declaration> {
        let json = json!({"Type": "com.apple.activation.simple", "Identifier": "act",
            "Payload": {"StandardConfigurations": targets}});
        Arc::new(
            Declaration::from_api_json(json.to_string().as_bytes(), 0)
                .unwrap()
                .0,
        )
    }

    fn fixture_report(name: &str) -> StatusReport {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        StatusReport::parse(&std::fs::read(&path).unwrap()).unwrap()
    }

    /// Enrollment states that exercise every rule: fixture reports, stalls at several
    /// points of a sync, gates.
    fn states() -> Vec<(DdmState, EnrollmentFacts)> {
        let healthy = EnrollmentFacts {
            enabled: true,
            push_token_valid: true,
            awaiting_configuration: false,
        };
        let mut states = Vec::new();
        // An old revision of `cfg`, from a device that supports no configuration type.
        let stale = json!({"StatusItems": {"management": {
            "declarations": {"activations": [], "assets": [], "management": [],
                "configurations": [{"identifier": "cfg", "server-token": "old",
                    "active": true, "valid": "valid"}]},
            "client-capabilities": {"supported-payloads": {"declarations": {
                "activations": ["com.apple.activation.simple"], "configurations": []}}}}},
            "Errors": []})
        .to_string();
        let stale = StatusReport::parse(stale.as_bytes()).unwrap();
        for reports in [
            vec![],
            vec![fixture_report("kmfddm/status.1st.json")],
            vec![
                fixture_report("kmfddm/status.1st.json"),
                fixture_report("kmfddm/status.D0.error.json"),
            ],
            vec![fixture_report("kmfddm/status.device-report.json")],
            vec![stale],
        ] {
            for (step, at) in [(0, 1000), (1, 1000), (2, 1059), (3, 1061)] {
                let mut state = DdmState::default();
                state.sets.insert("base".into());
                for (n, report) in reports.iter().enumerate() {
                    state.ingest(report, 100 + n as i64);
                }
                if step >= 1 {
                    let items = vec![ServedItem {
                        category: "configuration".into(),
                        identifier: "cfg".into(),
                        server_token: "t".into(),
                    }];
                    let token = "tok".to_string();
                    state.record(at, SyncEventKind::Items { token, items });
                }
                if step >= 2 {
                    let kind = SyncEventKind::Declaration {
                        category: "configuration".into(),
                        identifier: "cfg".into(),
                        served: true,
                    };
                    state.record(at + 5, kind);
                }
                let gates = [
                    healthy.clone(),
                    EnrollmentFacts {
                        push_token_valid: false,
                        ..healthy.clone()
                    },
                    EnrollmentFacts {
                        awaiting_configuration: true,
                        ..healthy.clone()
                    },
                ];
                for gate in gates {
                    states.push((state.clone(), gate));
                }
            }
        }
        states
    }

    fn manifests() -> Vec<ManifestSnapshot> {
        vec![
            ManifestSnapshot::from_declarations(vec![]),
            ManifestSnapshot::from_declarations(vec![
                declaration("cfg", "a"),
                activation(&["cfg"]),
            ]),
            ManifestSnapshot::from_declarations(vec![
                declaration("cfg", "b"),
                activation(&["cfg"]),
            ]),
            ManifestSnapshot::from_declarations(vec![activation(&["missing"])]),
        ]
    }

    #[test]
    fn the_fleet_diagnosis_is_the_doctor_summed_at_every_minute() {
        let stall_after = 120;
        let mut rules_seen = BTreeSet::new();
        for manifest in manifests() {
            let manifest = Arc::new(manifest);
            let manifest_of = |_: &BTreeSet<String>| Arc::clone(&manifest);
            let mut counts = FleetCounts::default();
            let states = states();
            for (state, gate) in &states {
                counts.add(&FleetFacts::of(state, gate.clone(), stall_after));
            }
            for as_of in (900..1400).step_by(60) {
                let mut expected: BTreeMap<&'static str, u64> = BTreeMap::new();
                for (state, gate) in &states {
                    for finding in diagnose(state, &manifest, gate, as_of, stall_after) {
                        *expected.entry(finding.rule).or_default() += 1;
                    }
                }
                let tallied = counts.findings(&mut ManifestLookup::new(&manifest_of), as_of);
                assert_eq!(tallied, expected, "at {as_of}");
                rules_seen.extend(expected.into_keys());
            }
        }
        assert_eq!(
            rules_seen,
            BTreeSet::from(RULES),
            "the states exercise every rule"
        );
    }

    #[test]
    fn enrollments_in_the_same_situation_share_one_entry() {
        let (state, gate) = states().remove(10);
        let mut counts = FleetCounts::default();
        let first = counts.add(&FleetFacts::of(&state, gate.clone(), 120));
        let second = counts.add(&FleetFacts::of(&state, gate, 120));
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!((counts.enrollments(), counts.distinct()), (2, 1));
        assert!(counts.remove(&first) && counts.remove(&second));
        assert!(!counts.remove(&first), "nothing left to remove");
        assert_eq!((counts.enrollments(), counts.distinct()), (0, 0));
    }

    #[test]
    fn stall_deadlines_round_up_to_the_minute() {
        assert_eq!(minute_ceiling(120), 120);
        assert_eq!(minute_ceiling(121), 180);
        assert_eq!(minute_ceiling(-1), 0);
        assert_eq!(minute_floor(179), 120);
    }

    /// A DDM state whose device reports `cfg` at `server_token` as `valid`.
    fn reporting_cfg(server_token: &str, valid: &str) -> DdmState {
        let report = json!({"StatusItems": {"management": {"declarations": {
            "activations": [], "assets": [], "management": [],
            "configurations": [{"identifier": "cfg", "server-token": server_token,
                "active": true, "valid": valid}]}}}, "Errors": []});
        let mut state = DdmState::default();
        state.ingest(
            &StatusReport::parse(report.to_string().as_bytes()).unwrap(),
            1,
        );
        state
    }

    #[test]
    fn a_new_revision_makes_holders_of_the_old_one_count_on_an_old_token() {
        let old = ManifestSnapshot::from_declarations(vec![declaration("cfg", "a")]);
        let item = &old.manifest.items()[0];
        let state = reporting_cfg(&item.server_token, "valid");
        let mut counts = FleetCounts::default();
        counts.add(&FleetFacts::of(&state, EnrollmentFacts::default(), 120));
        counts.add(&FleetFacts::of(
            &DdmState::default(),
            EnrollmentFacts::default(),
            120,
        ));
        let old = Arc::new(old);
        let view = counts.declarations(&mut ManifestLookup::new(&|_| Arc::clone(&old)));
        assert_eq!(view["cfg"]["assigned"], 2);
        assert_eq!((view["cfg"]["active"], view["cfg"]["pending"]), (1, 1));

        let new = Arc::new(ManifestSnapshot::from_declarations(vec![declaration(
            "cfg", "b",
        )]));
        let view = counts.declarations(&mut ManifestLookup::new(&|_| Arc::clone(&new)));
        assert_eq!(view["cfg"]["old_server_token"], 1);
        assert!(!view["cfg"].contains_key("active"));
    }

    #[test]
    fn an_enrollment_converges_once_it_reports_every_declaration_at_its_current_token() {
        let manifest = ManifestSnapshot::from_declarations(vec![declaration("cfg", "a")]);
        let current = manifest.manifest.items()[0].server_token.clone();
        let mut counts = FleetCounts::default();
        for state in [
            reporting_cfg(&current, "valid"),
            reporting_cfg(&current, "valid"),
            reporting_cfg(&current, "invalid"),
            reporting_cfg("an older token", "valid"),
            DdmState::default(),
        ] {
            counts.add(&FleetFacts::of(&state, EnrollmentFacts::default(), 120));
        }
        let manifest = Arc::new(manifest);
        let summary = counts.summary(&mut ManifestLookup::new(&|_| Arc::clone(&manifest)), 0);
        assert_eq!((summary.enrollments, summary.converged), (5, 2));
        let assignments = BTreeMap::from([
            ("active", 2),
            ("invalid", 1),
            ("old_server_token", 1),
            ("pending", 1),
        ]);
        assert_eq!(summary.assignments, assignments);
        assert!(summary
            .assignments
            .keys()
            .all(|state| ASSIGNMENT_STATES.contains(state)));

        let nothing_assigned = Arc::new(ManifestSnapshot::from_declarations(vec![]));
        let summary = counts.summary(
            &mut ManifestLookup::new(&|_| Arc::clone(&nothing_assigned)),
            0,
        );
        assert_eq!(
            summary.converged, 5,
            "nothing to hold: every enrollment holds it"
        );
    }
}
