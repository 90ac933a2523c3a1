//! A depth-bounded YAML document tree.
//!
//! Apple's schemas reuse structures through YAML anchors, and a few of them are
//! self-referential (`com.apple.applicationaccess.new` nests `subApps` whose
//! `subkeys` alias the enclosing list). A plain `serde_yaml::Value` would expand
//! such an alias forever and fail, so this tree stops descending after
//! [`MAX_DEPTH`] containers and records [`Node::Truncated`] instead. The deepest
//! non-recursive schema nests 15 containers, so only recursive structures are
//! cut, after having been unrolled several levels deep.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Containers deeper than this are replaced by [`Node::Truncated`].
const MAX_DEPTH: usize = 40;

/// One YAML value; mappings keep their document order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Null,
    Bool(bool),
    Integer(i64),
    Real(f64),
    String(String),
    Sequence(Vec<Node>),
    Mapping(Vec<(String, Node)>),
    /// A container beyond [`MAX_DEPTH`] (only reached through recursive aliases).
    Truncated,
}

impl Node {
    /// Parses one YAML document.
    pub(crate) fn parse(text: &str) -> Result<Node, serde_yaml::Error> {
        NodeSeed {
            remaining_depth: MAX_DEPTH,
        }
        .deserialize(serde_yaml::Deserializer::from_str(text))
    }

    /// The value stored under `key` when this node is a mapping.
    pub(crate) fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Mapping(entries) => entries
                .iter()
                .find(|(name, _)| name == key)
                .map(|(_, value)| value),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Node::String(text) => Some(text),
            _ => None,
        }
    }

    pub(crate) fn as_bool(&self) -> Option<bool> {
        match self {
            Node::Bool(flag) => Some(*flag),
            _ => None,
        }
    }

    pub(crate) fn as_f64(&self) -> Option<f64> {
        match self {
            // Schema bounds are small; the widening conversion is exact for them.
            Node::Integer(number) => Some(*number as f64),
            Node::Real(number) => Some(*number),
            _ => None,
        }
    }

    /// Any scalar rendered as text, so that an unquoted version number such as
    /// `introduced: 10.0` reads the same as the quoted `'10.0'`.
    pub(crate) fn scalar_text(&self) -> Option<String> {
        match self {
            Node::String(text) => Some(text.clone()),
            Node::Integer(number) => Some(number.to_string()),
            Node::Real(number) => Some(format!("{number:?}")),
            Node::Bool(flag) => Some(flag.to_string()),
            Node::Null | Node::Sequence(_) | Node::Mapping(_) | Node::Truncated => None,
        }
    }
}

#[derive(Clone, Copy)]
struct NodeSeed {
    remaining_depth: usize,
}

impl<'de> DeserializeSeed<'de> for NodeSeed {
    type Value = Node;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_any(NodeVisitor {
            remaining_depth: self.remaining_depth,
        })
    }
}

/// Builds a [`Node`]; containers are built while `remaining_depth` lasts and
/// are drained with [`IgnoredAny`] (which never follows aliases) after that.
struct NodeVisitor {
    remaining_depth: usize,
}

impl NodeVisitor {
    fn child_seed(&self) -> Option<NodeSeed> {
        self.remaining_depth
            .checked_sub(1)
            .map(|remaining_depth| NodeSeed { remaining_depth })
    }
}

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a YAML value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Node, E> {
        Ok(Node::Bool(value))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Node, E> {
        Ok(Node::Integer(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Node, E> {
        Ok(i64::try_from(value).map_or(Node::Real(value as f64), Node::Integer))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Node, E> {
        Ok(Node::Real(value))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Node, E> {
        Ok(Node::String(value.to_owned()))
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<Node, E> {
        Ok(Node::String(value))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let Some(seed) = self.child_seed() else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(Node::Truncated);
        };
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(seed)? {
            items.push(item);
        }
        Ok(Node::Sequence(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let Some(seed) = self.child_seed() else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Node::Truncated);
        };
        let mut entries = Vec::new();
        while let Some(key) = map.next_key_seed(seed)? {
            let value = map.next_value_seed(seed)?;
            let name = key
                .scalar_text()
                .ok_or_else(|| de::Error::custom("mapping keys must be scalars"))?;
            entries.push((name, value));
        }
        Ok(Node::Mapping(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_and_containers_keep_their_shape_and_order() {
        let node = Node::parse("b: 1\na: [x, 2.5, true, ~]\n").unwrap();
        assert_eq!(
            node,
            Node::Mapping(vec![
                ("b".into(), Node::Integer(1)),
                (
                    "a".into(),
                    Node::Sequence(vec![
                        Node::String("x".into()),
                        Node::Real(2.5),
                        Node::Bool(true),
                        Node::Null
                    ])
                ),
            ])
        );
    }

    #[test]
    fn shared_anchors_are_expanded_at_each_use() {
        let node = Node::parse("one: &shared {k: v}\ntwo: *shared\n").unwrap();
        assert_eq!(node.get("one"), node.get("two"));
    }

    #[test]
    fn recursive_aliases_are_cut_instead_of_failing() {
        let text = "list: &items\n- key: child\n  subkeys: *items\n";
        let node = Node::parse(text).unwrap();
        let mut depth = 0;
        let mut current = node.get("list").unwrap();
        while let Node::Sequence(items) = current {
            depth += 1;
            current = items[0].get("subkeys").unwrap_or(&items[0]);
        }
        assert_eq!(current, &Node::Truncated);
        assert!(depth > 5, "recursion unrolled only {depth} levels");
    }

    #[test]
    fn unquoted_versions_read_like_quoted_ones() {
        assert_eq!(Node::Real(10.0).scalar_text().as_deref(), Some("10.0"));
        assert_eq!(Node::Integer(9).scalar_text().as_deref(), Some("9"));
    }
}
