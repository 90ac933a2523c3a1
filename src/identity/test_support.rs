//! Shared test fixtures: the `openssl` command line as an independent implementation to
//! cross-check Orchard's certificates, PKCS#12 files and CMS signatures against.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch directory whose files are handed to `openssl` by path.
pub(crate) struct Scratch(tempfile::TempDir);

impl Scratch {
    pub(crate) fn new() -> Self {
        Scratch(tempfile::tempdir().unwrap())
    }

    pub(crate) fn dir(&self) -> &Path {
        self.0.path()
    }

    /// Writes `contents` to `name` and returns the full path as a string for `openssl`.
    pub(crate) fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> String {
        let path = self.path(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    pub(crate) fn path(&self, name: &str) -> String {
        let path: PathBuf = self.0.path().join(name);
        path.to_str().unwrap().to_owned()
    }

    pub(crate) fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }
}

/// Runs `openssl`, failing loudly if the tool is missing: these cross-checks are part of the
/// specification and must not be skipped silently.
pub(crate) fn openssl_output(args: &[&str]) -> Output {
    Command::new("openssl").args(args).output().unwrap_or_else(|err| {
        panic!("the `openssl` command-line tool is required by these tests ({err}); install the openssl package")
    })
}

/// Runs `openssl` and returns its stdout, asserting success.
pub(crate) fn openssl(args: &[&str]) -> String {
    let output = openssl_output(args);
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}
