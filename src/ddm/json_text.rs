//! Serde adapters that store `serde_json::Value`s as their compact JSON text.
//!
//! Stored DDM state is encoded with postcard, which is not self-describing
//! and so cannot carry a `Value` (deserializing one needs `deserialize_any`).
//! Status values are arbitrary device JSON, so they travel as strings.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

fn parse<E: serde::de::Error>(text: &str) -> Result<Value, E> {
    serde_json::from_str(text).map_err(E::custom)
}

/// For `Option<Value>` fields.
pub(crate) mod option {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(
        value: &Option<Value>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value.as_ref().map(Value::to_string).serialize(serializer)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Value>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| parse(&text))
            .transpose()
    }
}

/// For `BTreeMap<String, Value>` fields.
pub(crate) mod map {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(
        values: &BTreeMap<String, Value>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_map(values.iter().map(|(path, value)| (path, value.to_string())))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<String, Value>, D::Error> {
        BTreeMap::<String, String>::deserialize(deserializer)?
            .into_iter()
            .map(|(path, text)| parse(&text).map(|value| (path, value)))
            .collect()
    }
}
