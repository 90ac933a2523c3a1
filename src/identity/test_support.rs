//! Shared test fixtures: the `openssl` command line as an independent implementation to
//! cross-check Orchard's certificates, PKCS#12 files and CMS signatures against.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::ber::write_element;

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

/// Re-encodes DER with every constructed element in BER indefinite-length form, the way
/// streaming CMS encoders (Apple's among them) write their outer layers.
pub(crate) fn with_indefinite_lengths(der: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < der.len() {
        let tag = der[pos];
        assert_ne!(tag & 0x1f, 0x1f, "high tag numbers are not used in CMS");
        let (len, length_octets) = match der[pos + 1] {
            short if short < 0x80 => (usize::from(short), 1),
            long => {
                let count = usize::from(long & 0x7f);
                let len = der[pos + 2..pos + 2 + count]
                    .iter()
                    .fold(0usize, |len, byte| (len << 8) | usize::from(*byte));
                (len, 1 + count)
            }
        };
        let start = pos + 1 + length_octets;
        let contents = &der[start..start + len];
        if tag & 0x20 != 0 {
            out.extend([tag, 0x80]);
            out.extend(with_indefinite_lengths(contents));
            out.extend([0, 0]);
        } else {
            out.extend(&der[pos..start + len]);
        }
        pos = start + len;
    }
    out
}

/// The `X-Ssl-Client-Cert` value (nginx `$ssl_client_escaped_cert`) recorded in a NanoHUB
/// transcript fixture.
pub(crate) fn recorded_client_cert_header(transcript: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/nanohub-transcripts/{transcript}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("X-Ssl-Client-Cert: "))
        .unwrap()
        .to_owned()
}

/// A DER SET of `count` distinct `SEQUENCE { OID 2.5.4.<n>, NULL }` in descending order:
/// it reads as AttributeTypeAndValues or AlgorithmIdentifiers, and is the worst case for a
/// decoder that sorts a SET OF by insertion.
pub(crate) fn descending_set(count: usize) -> Vec<u8> {
    let mut elements = Vec::new();
    for n in (128..128 + count).rev() {
        let mut oid = Vec::new();
        // 2.5.4.<n>, n in 128..16384: two base-128 digits.
        write_element(
            &mut oid,
            &[0x06],
            &[0x55, 0x04, 0x80 | (n >> 7) as u8, (n & 0x7f) as u8],
        );
        oid.extend([0x05, 0x00]);
        write_element(&mut elements, &[0x30], &oid);
    }
    element(0x31, &elements)
}

/// One DER element.
pub(crate) fn element(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_element(&mut out, &[tag], contents);
    out
}
