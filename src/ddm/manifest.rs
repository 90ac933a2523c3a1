//! The manifest of one enrollment's declarations and the two responses built
//! from it: `tokens` (TokensResponse) and `declaration-items`
//! (DeclarationItemsResponse).
//!
//! Both endpoints are hit by every device on every sync, so everything that
//! does not depend on the clock is computed once when the manifest is built:
//! `items_json` is a reference-counted clone and `tokens_json` only formats
//! the timestamp into a preformatted prefix.

use bytes::Bytes;
use sha2::{Digest, Sha256};
use time::{OffsetDateTime, UtcOffset};

use super::declaration::{write_json_string, Category, Declaration};

/// Hex characters of SHA-256 kept in a DeclarationsToken (same width as a ServerToken).
const DECLARATIONS_TOKEN_HEX_CHARS: usize = 32;

/// One `{Identifier, ServerToken}` entry of the declaration-items response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestItem {
    pub category: Category,
    pub identifier: String,
    pub server_token: String,
}

/// The declarations one enrollment receives, sorted by (category, Identifier).
#[derive(Debug, Clone)]
pub struct Manifest {
    items: Vec<ManifestItem>,
    declarations_token: String,
    items_json: Bytes,
    /// `{"SyncTokens":{"DeclarationsToken":"…","Timestamp":"` — everything before the clock.
    tokens_prefix: Box<[u8]>,
}

impl Manifest {
    /// Builds the manifest of a set of declarations.
    ///
    /// Only Apple declaration Types (`com.apple.<category>.…`) are listed. A
    /// declaration reached through several sets appears once; should two
    /// different declarations share an Identifier (a conflict that
    /// [`check_references`](super::check_references) reports as SD-P12), the
    /// one with the smaller ServerToken is listed, so the choice does not
    /// depend on the order the declarations arrive in.
    pub fn new<'a>(declarations: impl IntoIterator<Item = &'a Declaration>) -> Manifest {
        let mut listed: Vec<ManifestItem> = declarations
            .into_iter()
            .filter_map(|declaration| {
                Some(ManifestItem {
                    category: declaration.category()?,
                    identifier: declaration.identifier.clone(),
                    server_token: declaration.server_token.clone(),
                })
            })
            .collect();
        listed.sort_unstable_by(|left, right| {
            (&left.identifier, &left.server_token).cmp(&(&right.identifier, &right.server_token))
        });
        listed.dedup_by(|later, earlier| later.identifier == earlier.identifier);
        listed.sort_unstable_by(|left, right| {
            (left.category, &left.identifier).cmp(&(right.category, &right.identifier))
        });

        let declarations_token = declarations_token(&listed);
        let items_json = Bytes::from(items_json(&listed, &declarations_token));
        let mut tokens_prefix = String::from("{\"SyncTokens\":{\"DeclarationsToken\":");
        write_json_string(&mut tokens_prefix, &declarations_token);
        tokens_prefix.push_str(",\"Timestamp\":\"");
        Manifest {
            items: listed,
            declarations_token,
            items_json,
            tokens_prefix: tokens_prefix.into_bytes().into_boxed_slice(),
        }
    }

    /// Every listed item, sorted by (category, Identifier).
    pub fn items(&self) -> &[ManifestItem] {
        &self.items
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The item a device fetches as `declaration/<category>/<identifier>`;
    /// `None` means the endpoint answers 404 (the device then drops its copy).
    pub fn item(&self, category: Category, identifier: &str) -> Option<&ManifestItem> {
        self.items
            .binary_search_by(|item| {
                (item.category, item.identifier.as_str()).cmp(&(category, identifier))
            })
            .ok()
            .map(|index| &self.items[index])
    }

    /// `hex(SHA-256(for each item: category ‖ 0x00 ‖ Identifier ‖ 0x00 ‖ ServerToken ‖ 0x0A))[..32]`.
    ///
    /// Never empty (an empty manifest hashes the empty input), identical in
    /// both responses, and different exactly when the item set is.
    pub fn declarations_token(&self) -> &str {
        &self.declarations_token
    }

    /// The TokensResponse: `{"SyncTokens":{"DeclarationsToken":…,"Timestamp":"YYYY-MM-DDTHH:MM:SSZ"}}`.
    /// The timestamp is `now` in UTC, truncated to whole seconds.
    pub fn tokens_json(&self, now: OffsetDateTime) -> Vec<u8> {
        const TIMESTAMP_AND_CLOSE: usize = "YYYY-MM-DDTHH:MM:SSZ\"}}".len();
        let mut out = Vec::with_capacity(self.tokens_prefix.len() + TIMESTAMP_AND_CLOSE);
        out.extend_from_slice(&self.tokens_prefix);
        push_timestamp(&mut out, now.to_offset(UtcOffset::UTC));
        out.extend_from_slice(b"\"}}");
        out
    }

    /// The DeclarationItemsResponse, with all four arrays always present.
    pub fn items_json(&self) -> Bytes {
        self.items_json.clone()
    }
}

fn declarations_token(items: &[ManifestItem]) -> String {
    let mut hasher = Sha256::new();
    for item in items {
        hasher.update(item.category.as_str().as_bytes());
        hasher.update([0]);
        hasher.update(item.identifier.as_bytes());
        hasher.update([0]);
        hasher.update(item.server_token.as_bytes());
        hasher.update([b'\n']);
    }
    let mut token = hex::encode(hasher.finalize());
    token.truncate(DECLARATIONS_TOKEN_HEX_CHARS);
    token
}

/// Serializes the DeclarationItemsResponse; `items` must be sorted by category.
fn items_json(items: &[ManifestItem], declarations_token: &str) -> String {
    let mut out = String::with_capacity(96 + items.len() * 96);
    out.push_str("{\"Declarations\":{");
    for (position, category) in Category::ALL.into_iter().enumerate() {
        if position > 0 {
            out.push(',');
        }
        write_json_string(&mut out, category.plural());
        out.push_str(":[");
        let in_category = items.iter().filter(|item| item.category == category);
        for (index, item) in in_category.enumerate() {
            if index > 0 {
                out.push(',');
            }
            out.push_str("{\"Identifier\":");
            write_json_string(&mut out, &item.identifier);
            out.push_str(",\"ServerToken\":");
            write_json_string(&mut out, &item.server_token);
            out.push('}');
        }
        out.push(']');
    }
    out.push_str("},\"DeclarationsToken\":");
    write_json_string(&mut out, declarations_token);
    out.push('}');
    out
}

/// Appends `YYYY-MM-DDTHH:MM:SSZ`. RFC 3339 has four-digit years only; years
/// outside 0–9999 (which `OffsetDateTime` can represent) are clamped.
fn push_timestamp(out: &mut Vec<u8>, utc: OffsetDateTime) {
    let year = u32::try_from(utc.year().clamp(0, 9999)).unwrap_or(0);
    push_digits(out, year, 4);
    out.push(b'-');
    push_digits(out, u32::from(u8::from(utc.month())), 2);
    out.push(b'-');
    push_digits(out, u32::from(utc.day()), 2);
    out.push(b'T');
    push_digits(out, u32::from(utc.hour()), 2);
    out.push(b':');
    push_digits(out, u32::from(utc.minute()), 2);
    out.push(b':');
    push_digits(out, u32::from(utc.second()), 2);
    out.push(b'Z');
}

/// Appends the last `width` decimal digits of `value`, zero-padded.
fn push_digits(out: &mut Vec<u8>, value: u32, width: u32) {
    for place in (0..width).rev() {
        let digit = (value / 10u32.pow(place)) % 10;
        out.push(b'0' + digit as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ddm::declaration::tests::{declaration, transcript_body};
    use serde_json::{json, Value};
    use time::macros::datetime;

    fn test_configuration(identifier: &str, echo: &str) -> Declaration {
        declaration(json!({
            "Type": "com.apple.configuration.management.test",
            "Identifier": identifier,
            "Payload": {"Echo": echo}
        }))
    }

    fn activation(identifier: &str, configurations: &[&str]) -> Declaration {
        declaration(json!({
            "Type": "com.apple.activation.simple",
            "Identifier": identifier,
            "Payload": {"StandardConfigurations": configurations}
        }))
    }

    fn parse(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn the_recorded_nanohub_pair_makes_a_two_item_manifest() {
        let configuration = Declaration::from_api_json(
            transcript_body("12-api-put-declaration-config.txt", "REQUEST").as_bytes(),
            0,
        )
        .unwrap()
        .0;
        let activation = Declaration::from_api_json(
            transcript_body("14-api-put-declaration-activation.txt", "REQUEST").as_bytes(),
            0,
        )
        .unwrap()
        .0;
        let manifest = Manifest::new([&configuration, &activation]);
        let items = parse(&manifest.items_json());
        assert_eq!(
            items["Declarations"]["Activations"],
            json!([{"Identifier": "com.example.act", "ServerToken": activation.server_token}])
        );
        assert_eq!(
            items["Declarations"]["Configurations"],
            json!([{"Identifier": "com.example.test", "ServerToken": configuration.server_token}])
        );
        assert_eq!(items["Declarations"]["Assets"], json!([]));
        assert_eq!(items["Declarations"]["Management"], json!([]));
    }

    #[test]
    fn an_empty_manifest_still_has_a_token_and_all_four_arrays() {
        let manifest = Manifest::new([]);
        assert!(!manifest.declarations_token().is_empty());
        assert!(manifest.is_empty());
        let items = parse(&manifest.items_json());
        assert_eq!(
            items,
            json!({
                "Declarations": {"Activations": [], "Configurations": [], "Assets": [], "Management": []},
                "DeclarationsToken": manifest.declarations_token()
            })
        );
    }

    #[test]
    fn the_tokens_response_has_the_token_and_a_whole_second_utc_timestamp() {
        let manifest = Manifest::new([&test_configuration("c", "x")]);
        let now = datetime!(2026-11-23 10:00:40.987654 +01:00);
        let tokens = manifest.tokens_json(now);
        assert_eq!(
            String::from_utf8(tokens).unwrap(),
            format!(
                r#"{{"SyncTokens":{{"DeclarationsToken":"{}","Timestamp":"2026-11-23T09:00:40Z"}}}}"#,
                manifest.declarations_token()
            )
        );
        let live = parse(&manifest.tokens_json(OffsetDateTime::now_utc()));
        let timestamp = live["SyncTokens"]["Timestamp"].as_str().unwrap();
        let pattern = regex_lite::Regex::new(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$").unwrap();
        assert!(pattern.is_match(timestamp), "{timestamp}");
    }

    #[test]
    fn both_responses_carry_the_same_token() {
        let pool = [
            test_configuration("b", "1"),
            test_configuration("a", "2"),
            activation("act", &["a", "b"]),
        ];
        let manifest = Manifest::new(&pool);
        let tokens = parse(&manifest.tokens_json(OffsetDateTime::now_utc()));
        let items = parse(&manifest.items_json());
        assert_eq!(
            tokens["SyncTokens"]["DeclarationsToken"],
            items["DeclarationsToken"]
        );
        assert_eq!(items["DeclarationsToken"], manifest.declarations_token());
    }

    #[test]
    fn items_are_sorted_and_hold_exactly_identifier_and_server_token() {
        let pool = [
            test_configuration("zeta", "1"),
            test_configuration("alpha", "2"),
            activation("act", &["alpha", "zeta"]),
        ];
        let manifest = Manifest::new(pool.iter().rev());
        let listed: Vec<(Category, &str)> = manifest
            .items()
            .iter()
            .map(|item| (item.category, item.identifier.as_str()))
            .collect();
        assert_eq!(
            listed,
            [
                (Category::Activation, "act"),
                (Category::Configuration, "alpha"),
                (Category::Configuration, "zeta")
            ]
        );
        let items = parse(&manifest.items_json());
        for entry in items["Declarations"]["Configurations"].as_array().unwrap() {
            let keys: Vec<&String> = entry.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["Identifier", "ServerToken"]);
        }
    }

    #[test]
    fn the_token_changes_exactly_when_the_item_set_changes() {
        let first = test_configuration("a", "1");
        let second = test_configuration("b", "2");
        let base = Manifest::new([&first, &second]);

        let reordered = Manifest::new([&second, &first, &first]);
        assert_eq!(reordered.declarations_token(), base.declarations_token());
        assert_eq!(reordered.items_json(), base.items_json());

        let fewer = Manifest::new([&first]);
        assert_ne!(fewer.declarations_token(), base.declarations_token());

        let touched = Declaration::from_api_json(
            br#"{"Type":"com.apple.configuration.management.test","Identifier":"a","Payload":{"Echo":"1"}}"#,
            1,
        )
        .unwrap()
        .0;
        let retouched = Manifest::new([&touched, &second]);
        assert_ne!(retouched.declarations_token(), base.declarations_token());
    }

    #[test]
    fn only_apple_declaration_types_are_listed() {
        let mut foreign = test_configuration("foreign", "x");
        foreign.declaration_type = "com.example.storage.shard".to_owned();
        let listed = test_configuration("listed", "y");
        let manifest = Manifest::new([&foreign, &listed]);
        assert_eq!(manifest.len(), 1);
        assert!(manifest.item(Category::Configuration, "foreign").is_none());
    }

    #[test]
    fn an_identifier_claimed_twice_is_listed_once_whatever_the_order() {
        let one = test_configuration("same", "1");
        let other = test_configuration("same", "2");
        let forward = Manifest::new([&one, &other]);
        let backward = Manifest::new([&other, &one]);
        assert_eq!(forward.len(), 1);
        assert_eq!(forward.items(), backward.items());
    }

    #[test]
    fn items_are_found_by_category_and_identifier() {
        let configuration = test_configuration("c", "x");
        let manifest = Manifest::new([&configuration, &activation("a", &["c"])]);
        let item = manifest.item(Category::Configuration, "c").unwrap();
        assert_eq!(item.server_token, configuration.server_token);
        assert!(manifest.item(Category::Activation, "c").is_none());
        assert!(manifest.item(Category::Configuration, "missing").is_none());
    }
}
