//! JSON-path style locations (`$.Payload.Items[0]["odd name"]`), spelled the
//! way `crate::schema` spells the paths of its violations so that schema and
//! reference problems read alike.

/// The path of member `name` of the object at `parent`.
pub(crate) fn member(parent: &str, name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        format!("{parent}.{name}")
    } else {
        format!("{parent}[{name:?}]")
    }
}

/// The path of element `index` of the array at `parent`.
pub(crate) fn index(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// Re-roots a path relative to a value (`$…`) under `root`, e.g. a payload
/// violation `$.Echo` under `$.Payload` becomes `$.Payload.Echo`.
pub(crate) fn rebase(root: &str, relative: &str) -> String {
    match relative.strip_prefix('$') {
        Some(rest) => format!("{root}{rest}"),
        None => format!("{root}.{relative}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_use_dots_and_others_are_quoted() {
        assert_eq!(member("$", "Payload"), "$.Payload");
        assert_eq!(member("$.A", "SMIME.Signing"), r#"$.A["SMIME.Signing"]"#);
        assert_eq!(index("$.Items", 3), "$.Items[3]");
    }

    #[test]
    fn relative_paths_move_under_a_new_root() {
        assert_eq!(rebase("$.Payload", "$"), "$.Payload");
        assert_eq!(rebase("$.Payload", "$.Echo[2]"), "$.Payload.Echo[2]");
    }
}
