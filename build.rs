//! Embeds Apple's device-management YAML schemas into the binary.
//!
//! Orchard validates profiles, commands and declarations against Apple's own
//! published schemas rather than hand-maintained key lists, so the snapshot in
//! `schemas/apple-device-management` is compiled in as `(relative path, text)`
//! pairs that `src/schema` parses on first use.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::{env, fs, io};

/// Subfolders of the snapshot that hold schema YAML (`docs/` only describes the format).
const SCHEMA_FOLDERS: &[&str] = &["mdm", "declarative", "other"];

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed=schemas");
    println!("cargo:rerun-if-changed=build.rs");

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or_else(missing_env)?);
    let snapshot = manifest_dir.join("schemas").join("apple-device-management");

    let mut files = Vec::new();
    for folder in SCHEMA_FOLDERS {
        collect_yaml(&snapshot.join(folder), &mut files)?;
    }
    let mut entries = files
        .into_iter()
        .map(|absolute| {
            let relative = absolute
                .strip_prefix(&snapshot)
                .map_err(io::Error::other)?
                .components()
                .map(|part| part.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            Ok((relative, absolute))
        })
        .collect::<io::Result<Vec<_>>>()?;
    entries.sort();

    let mut source = String::from("pub static FILES: &[(&str, &str)] = &[\n");
    for (relative, absolute) in &entries {
        let absolute = absolute.to_str().ok_or_else(|| non_utf8(absolute))?;
        writeln!(source, "    ({relative:?}, include_str!({absolute:?})),")
            .map_err(io::Error::other)?;
    }
    source.push_str("];\n");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(missing_env)?);
    fs::write(out_dir.join("apple_schemas.rs"), source)
}

/// Appends every `*.yaml` file below `dir` (recursively) to `found`.
fn collect_yaml(dir: &Path, found: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_yaml(&path, found)?;
        } else if path.extension().is_some_and(|ext| ext == "yaml") {
            found.push(path);
        }
    }
    Ok(())
}

fn missing_env() -> io::Error {
    io::Error::other("cargo did not set CARGO_MANIFEST_DIR/OUT_DIR")
}

fn non_utf8(path: &Path) -> io::Error {
    io::Error::other(format!("schema path is not UTF-8: {}", path.display()))
}
