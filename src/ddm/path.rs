//! JSON-path style locations (`$.Payload.Items[0]["odd name"]`), spelled the
//! way `crate::schema` spells the paths of its violations so that schema and
//! reference problems read alike.

pub(crate) use crate::schema::{index_path as index, member_path as member};

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
