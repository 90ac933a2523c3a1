//! The declaration catalog: declarations and named sets, held in memory (a fleet has
//! hundreds of declarations, not millions) with every change written through to the
//! store before it is acknowledged. Manifests are cached per distinct combination of
//! sets, so a million enrollments sharing a few hundred combinations cost one manifest
//! (and one DeclarationsToken hash) per combination; every manifest served stays
//! retrievable by its DeclarationsToken, so a device fetching bodies from the manifest it
//! was shown never sees a body from a newer revision.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::RwLock;

use super::{check_references, Category, DdmError, Declaration, Issue, Manifest, Severity};
use crate::store::{DeclarationRecord, DeclarationSet, Mutation, Store, StoreError};

/// Manifests kept retrievable by token after the catalog moved on.
const SNAPSHOTS_KEPT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Invalid(#[from] DdmError),
    #[error("declaration {identifier} references {missing}, which is not in the catalog ({path})")]
    MissingReference {
        identifier: String,
        missing: String,
        path: String,
    },
    #[error("declaration {0} is still in set(s) {1}; remove it from them first")]
    InUse(String, String),
    #[error("no declaration {0}")]
    UnknownDeclaration(String),
    #[error("no set {0}")]
    UnknownSet(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CatalogError {
    pub fn reason(&self) -> &'static str {
        match self {
            CatalogError::Invalid(e) => e.reason(),
            CatalogError::MissingReference { .. } => "missing_reference",
            CatalogError::InUse(..) => "declaration_in_use",
            CatalogError::UnknownDeclaration(_) => "unknown_declaration",
            CatalogError::UnknownSet(_) => "unknown_set",
            CatalogError::Store(_) => "store_failure",
        }
    }
}

/// A manifest together with the declaration bodies it lists.
pub struct ManifestSnapshot {
    pub manifest: Manifest,
    bodies: HashMap<(Category, String), Arc<Declaration>>,
}

impl ManifestSnapshot {
    /// The manifest of exactly these declarations.
    pub fn from_declarations(declarations: Vec<Arc<Declaration>>) -> ManifestSnapshot {
        let manifest = Manifest::new(declarations.iter().map(|d| d.as_ref()));
        let bodies = declarations
            .into_iter()
            .filter_map(|d| {
                Category::from_type(&d.declaration_type).map(|c| ((c, d.identifier.clone()), d))
            })
            .collect();
        ManifestSnapshot { manifest, bodies }
    }

    /// The body of a listed declaration, exactly at the revision the manifest lists.
    pub fn body(&self, category: Category, identifier: &str) -> Option<&Arc<Declaration>> {
        self.bodies.get(&(category, identifier.to_string()))
    }

    pub fn declarations(&self) -> impl Iterator<Item = &Arc<Declaration>> {
        self.bodies.values()
    }
}

/// What a catalog write changed.
#[derive(Debug, Default)]
pub struct Change {
    /// False when the write left everything as it was (KMFDDM's 304).
    pub changed: bool,
    /// Sets whose manifests changed: their members need a sync.
    pub affected_sets: Vec<String>,
    pub warnings: Vec<Issue>,
}

/// Declarations and sets as the store holds them.
async fn read_state(store: &dyn Store) -> Result<CatalogState, CatalogError> {
    let mut state = CatalogState::default();
    for record in store.declarations().await? {
        let declaration = declaration_from_record(&record)?;
        state
            .declarations
            .insert(record.identifier.clone(), Arc::new(declaration));
    }
    for set in store.sets().await? {
        state
            .sets
            .insert(set.name, set.declarations.into_iter().collect());
    }
    Ok(state)
}

#[derive(Default)]
struct CatalogState {
    declarations: BTreeMap<String, Arc<Declaration>>,
    sets: BTreeMap<String, BTreeSet<String>>,
}

pub struct Catalog {
    store: Arc<dyn Store>,
    state: RwLock<CatalogState>,
    /// Serialises writers: each change is computed against the state it replaces.
    writer: tokio::sync::Mutex<()>,
    by_combination: DashMap<Vec<String>, Arc<ManifestSnapshot>>,
    by_token: DashMap<String, Arc<ManifestSnapshot>>,
    /// The store's catalog version the state was read at.
    version: parking_lot::Mutex<Vec<u8>>,
}

impl Catalog {
    /// Load the catalog from the store.
    pub async fn load(store: Arc<dyn Store>) -> Result<Catalog, CatalogError> {
        let version = store.shared_versions().await?.catalog;
        let state = read_state(&*store).await?;
        Ok(Catalog {
            version: parking_lot::Mutex::new(version),
            store,
            state: RwLock::new(state),
            writer: tokio::sync::Mutex::new(()),
            by_combination: DashMap::new(),
            by_token: DashMap::new(),
        })
    }

    /// Take in changes another node made, if the store's catalog `version` (as the
    /// caller just read it) differs from the one this catalog was read at: read the whole
    /// catalog again and drop the manifests cached per set combination. Manifests cached
    /// by token stay: a token names one content, so what a device was shown can still be
    /// served. Answers whether it reloaded.
    pub async fn refresh_to(&self, version: Vec<u8>) -> Result<bool, CatalogError> {
        let _writing = self.writer.lock().await;
        self.reload_unless_at(version).await
    }

    /// Take in every change the store holds now, without waiting for the next poll: the
    /// nodes answering one fleet view each evaluate their counts against the same catalog.
    pub async fn catch_up(&self) -> Result<bool, CatalogError> {
        let _writing = self.writer.lock().await;
        self.refresh_locked().await
    }

    /// For a writer already holding the lock: every change is computed against the
    /// catalog as the store holds it, wherever it was last changed.
    async fn refresh_locked(&self) -> Result<bool, CatalogError> {
        let version = self.store.shared_versions().await?.catalog;
        self.reload_unless_at(version).await
    }

    async fn reload_unless_at(&self, version: Vec<u8>) -> Result<bool, CatalogError> {
        if *self.version.lock() == version {
            return Ok(false);
        }
        let state = read_state(&*self.store).await?;
        *self.state.write() = state;
        *self.version.lock() = version;
        self.invalidate();
        Ok(true)
    }

    pub fn declaration(&self, identifier: &str) -> Option<Arc<Declaration>> {
        self.state.read().declarations.get(identifier).cloned()
    }

    pub fn declaration_ids(&self) -> Vec<String> {
        self.state.read().declarations.keys().cloned().collect()
    }

    pub fn set_names(&self) -> Vec<String> {
        self.state.read().sets.keys().cloned().collect()
    }

    pub fn set_declarations(&self, set: &str) -> Option<Vec<String>> {
        self.state
            .read()
            .sets
            .get(set)
            .map(|ids| ids.iter().cloned().collect())
    }

    /// Sets that contain `identifier`.
    pub fn sets_containing(&self, identifier: &str) -> Vec<String> {
        self.state
            .read()
            .sets
            .iter()
            .filter(|(_, ids)| ids.contains(identifier))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Publish (create or replace) a declaration from the API's JSON.
    pub async fn put_declaration(&self, json: &[u8]) -> Result<Change, CatalogError> {
        let _writing = self.writer.lock().await;
        self.refresh_locked().await?;
        let touch = 0;
        let (mut declaration, warnings) = Declaration::from_api_json(json, touch)?;
        if let Some(existing) = self.declaration(&declaration.identifier) {
            // Same content keeps its token; a touch counter survives content-equal uploads.
            let (again, _) = Declaration::from_api_json(json, existing.touch)?;
            if again.server_token == existing.server_token {
                return Ok(Change {
                    changed: false,
                    affected_sets: Vec::new(),
                    warnings,
                });
            }
            declaration = again;
        }
        self.check_references_exist(&declaration)?;
        self.store_declaration(declaration, warnings).await
    }

    /// Force a new ServerToken without a content change.
    pub async fn touch(&self, identifier: &str) -> Result<Change, CatalogError> {
        let _writing = self.writer.lock().await;
        self.refresh_locked().await?;
        let existing = self
            .declaration(identifier)
            .ok_or_else(|| CatalogError::UnknownDeclaration(identifier.to_string()))?;
        let (touched, warnings) =
            Declaration::from_api_json(&existing.to_device_json(), existing.touch + 1)?;
        self.store_declaration(touched, warnings).await
    }

    /// Delete a declaration that no set contains any more.
    pub async fn delete_declaration(&self, identifier: &str) -> Result<bool, CatalogError> {
        let _writing = self.writer.lock().await;
        self.refresh_locked().await?;
        if self.declaration(identifier).is_none() {
            return Ok(false);
        }
        let in_sets = self.sets_containing(identifier);
        if !in_sets.is_empty() {
            return Err(CatalogError::InUse(
                identifier.to_string(),
                in_sets.join(", "),
            ));
        }
        self.store
            .apply(vec![Mutation::DeleteDeclaration {
                identifier: identifier.to_string(),
            }])
            .await?;
        self.state.write().declarations.remove(identifier);
        Ok(true)
    }

    /// Add a declaration to a set (creating the set), or remove it.
    pub async fn change_set(
        &self,
        set: &str,
        identifier: &str,
        add: bool,
    ) -> Result<Change, CatalogError> {
        let _writing = self.writer.lock().await;
        self.refresh_locked().await?;
        if add && self.declaration(identifier).is_none() {
            return Err(CatalogError::UnknownDeclaration(identifier.to_string()));
        }
        let mut members = self.state.read().sets.get(set).cloned().unwrap_or_default();
        let changed = if add {
            members.insert(identifier.to_string())
        } else {
            members.remove(identifier)
        };
        if !changed {
            return Ok(Change::default());
        }
        let record = DeclarationSet {
            name: set.to_string(),
            declarations: members.iter().cloned().collect(),
        };
        self.store.apply(vec![Mutation::PutSet(record)]).await?;
        self.state.write().sets.insert(set.to_string(), members);
        self.invalidate();
        Ok(Change {
            changed: true,
            affected_sets: vec![set.to_string()],
            warnings: Vec::new(),
        })
    }

    /// The manifest for an enrollment assigned `sets` (cached per combination).
    pub fn manifest(&self, sets: &BTreeSet<String>) -> Arc<ManifestSnapshot> {
        let key: Vec<String> = sets.iter().cloned().collect();
        if let Some(snapshot) = self.by_combination.get(&key) {
            return Arc::clone(&snapshot);
        }
        let snapshot = Arc::new(self.build_manifest(sets));
        self.by_combination.insert(key, Arc::clone(&snapshot));
        if self.by_token.len() >= SNAPSHOTS_KEPT {
            self.by_token.clear();
        }
        self.by_token.insert(
            snapshot.manifest.declarations_token().to_string(),
            Arc::clone(&snapshot),
        );
        snapshot
    }

    /// A manifest served earlier, by its DeclarationsToken.
    pub fn snapshot(&self, declarations_token: &str) -> Option<Arc<ManifestSnapshot>> {
        self.by_token
            .get(declarations_token)
            .map(|s| Arc::clone(&s))
    }

    /// Problems of the combined declarations of `sets` (references across categories).
    pub fn check_combination(&self, sets: &BTreeSet<String>) -> Vec<Issue> {
        let snapshot = self.manifest(sets);
        let declarations: Vec<&Declaration> = snapshot.declarations().map(|d| d.as_ref()).collect();
        check_references(&declarations)
    }

    fn build_manifest(&self, sets: &BTreeSet<String>) -> ManifestSnapshot {
        let state = self.state.read();
        let declarations: BTreeMap<&str, &Arc<Declaration>> = sets
            .iter()
            .filter_map(|set| state.sets.get(set))
            .flatten()
            .filter_map(|id| state.declarations.get(id).map(|d| (id.as_str(), d)))
            .collect();
        ManifestSnapshot::from_declarations(declarations.into_values().cloned().collect())
    }

    /// References from a new declaration must name declarations that exist (their
    /// category is checked per enrollment manifest by the sync doctor).
    fn check_references_exist(&self, declaration: &Declaration) -> Result<(), CatalogError> {
        let state = self.state.read();
        let mut universe: Vec<&Declaration> = state
            .declarations
            .values()
            .filter(|d| d.identifier != declaration.identifier)
            .map(|d| d.as_ref())
            .collect();
        universe.push(declaration);
        let missing = check_references(&universe).into_iter().find(|issue| {
            issue.severity == Severity::Error
                && issue
                    .path
                    .starts_with(&format!("{}:", declaration.identifier))
                && (issue.rule == "SD-P08" || issue.rule == "SD-P09")
        });
        match missing {
            Some(issue) => Err(CatalogError::MissingReference {
                identifier: declaration.identifier.clone(),
                missing: issue.message.clone(),
                path: issue.path.clone(),
            }),
            None => Ok(()),
        }
    }

    async fn store_declaration(
        &self,
        declaration: Declaration,
        warnings: Vec<Issue>,
    ) -> Result<Change, CatalogError> {
        let record = record_of(&declaration);
        self.store
            .apply(vec![Mutation::PutDeclaration(record)])
            .await?;
        let identifier = declaration.identifier.clone();
        self.state
            .write()
            .declarations
            .insert(identifier.clone(), Arc::new(declaration));
        self.invalidate();
        Ok(Change {
            changed: true,
            affected_sets: self.sets_containing(&identifier),
            warnings,
        })
    }

    /// Manifests are rebuilt on next use; snapshots by token stay for in-flight syncs.
    fn invalidate(&self) {
        self.by_combination.clear();
    }
}

fn record_of(declaration: &Declaration) -> DeclarationRecord {
    DeclarationRecord {
        identifier: declaration.identifier.clone(),
        declaration_type: declaration.declaration_type.clone(),
        payload_json: serde_json::Value::Object(declaration.payload.clone()).to_string(),
        server_token: declaration.server_token.clone(),
        touch: declaration.touch,
        updated_at: crate::device::now_secs(),
    }
}

fn declaration_from_record(record: &DeclarationRecord) -> Result<Declaration, CatalogError> {
    let payload: serde_json::Value = serde_json::from_str(&record.payload_json)
        .map_err(|e| StoreError::Corrupt(format!("declaration {}: {e}", record.identifier)))?;
    let json = serde_json::json!({
        "Type": record.declaration_type,
        "Identifier": record.identifier,
        "Payload": payload,
    });
    let (declaration, _) = Declaration::from_api_json(json.to_string().as_bytes(), record.touch)?;
    Ok(declaration)
}
