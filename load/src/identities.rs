//! Device identities, issued once and cached on disk.
//!
//! Issuing a P-256 identity costs a key generation and a signature; a million of them take
//! minutes. The cache file is keyed by the issuing CA's fingerprint, so a re-run against the
//! same CA starts a million devices in seconds and a different CA never receives identities
//! it did not issue.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use orchard::identity::{CertificateAuthority, IssuedIdentity};
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"ORCHLID1";

#[derive(Debug, thiserror::Error)]
pub enum IdentityCacheError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("issuing device identity: {0}")]
    Issue(String),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> IdentityCacheError + '_ {
    move |source| IdentityCacheError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The UDID of device number `index`: UUID-shaped like real UDIDs, and stable across runs
/// so cached identities stay bound to the same device.
pub fn udid(index: u32) -> String {
    format!("4F52434C-0000-4000-8000-{index:012X}")
}

/// The cache file for identities issued by `ca` inside `state_dir`.
pub fn cache_path(state_dir: &Path, ca: &CertificateAuthority) -> PathBuf {
    let fingerprint = hex::encode(&Sha256::digest(ca.ca_cert_der().as_ref())[..8]);
    state_dir.join(format!("devices-{fingerprint}.bin"))
}

/// Identities for devices `0..count`, read from the cache and completed (and appended to
/// it) by issuing the missing ones on every core.
pub fn load_or_issue(
    ca: &CertificateAuthority,
    cache: &Path,
    count: u32,
) -> Result<Vec<IssuedIdentity>, IdentityCacheError> {
    let mut identities = read_cache(cache, count)?;
    let cached = u32::try_from(identities.len()).unwrap_or(count);
    if cached < count {
        let fresh = issue_range(ca, cached, count)?;
        append_cache(cache, cached == 0, &fresh)?;
        identities.extend(fresh);
    }
    Ok(identities)
}

fn read_cache(path: &Path, limit: u32) -> Result<Vec<IssuedIdentity>, IdentityCacheError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(io_error(path)(err)),
    };
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    if reader.read_exact(&mut magic).is_err() || &magic != MAGIC {
        return Ok(Vec::new());
    }
    let mut identities = Vec::new();
    while identities.len() < limit as usize {
        match read_record(&mut reader) {
            Ok(identity) => identities.push(identity),
            // A truncated tail (an interrupted run) is simply issued again.
            Err(_) => break,
        }
    }
    Ok(identities)
}

fn read_record(reader: &mut impl Read) -> io::Result<IssuedIdentity> {
    let mut lengths = [0u8; 4];
    reader.read_exact(&mut lengths)?;
    let cert_len = usize::from(u16::from_le_bytes([lengths[0], lengths[1]]));
    let key_len = usize::from(u16::from_le_bytes([lengths[2], lengths[3]]));
    let mut cert_der = vec![0; cert_len];
    reader.read_exact(&mut cert_der)?;
    let mut key_pkcs8_der = vec![0; key_len];
    reader.read_exact(&mut key_pkcs8_der)?;
    Ok(IssuedIdentity {
        cert_der,
        key_pkcs8_der,
    })
}

fn append_cache(
    path: &Path,
    fresh_file: bool,
    identities: &[IssuedIdentity],
) -> Result<(), IdentityCacheError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(!fresh_file)
        .truncate(fresh_file)
        .open(path)
        .map_err(io_error(path))?;
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    let write = |writer: &mut BufWriter<File>| -> io::Result<()> {
        if fresh_file {
            writer.write_all(MAGIC)?;
        }
        for identity in identities {
            let cert_len = u16::try_from(identity.cert_der.len()).map_err(io::Error::other)?;
            let key_len = u16::try_from(identity.key_pkcs8_der.len()).map_err(io::Error::other)?;
            writer.write_all(&cert_len.to_le_bytes())?;
            writer.write_all(&key_len.to_le_bytes())?;
            writer.write_all(&identity.cert_der)?;
            writer.write_all(&identity.key_pkcs8_der)?;
        }
        writer.flush()
    };
    write(&mut writer).map_err(io_error(path))
}

/// Issues identities for devices `start..end`, split across the machine's cores.
fn issue_range(
    ca: &CertificateAuthority,
    start: u32,
    end: u32,
) -> Result<Vec<IssuedIdentity>, IdentityCacheError> {
    let threads = std::thread::available_parallelism().map_or(1, usize::from) as u32;
    let per_thread = (end - start).div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (start..end)
            .step_by(per_thread as usize)
            .map(|first| {
                let last = (first + per_thread).min(end);
                scope.spawn(move || {
                    (first..last)
                        .map(|index| {
                            ca.issue_identity(&udid(index))
                                .map_err(|err| IdentityCacheError::Issue(err.to_string()))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut identities = Vec::with_capacity((end - start) as usize);
        for worker in workers {
            let issued = worker
                .join()
                .map_err(|_| IdentityCacheError::Issue("issuing thread panicked".into()))??;
            identities.extend(issued);
        }
        Ok(identities)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udids_are_stable_and_distinct() {
        assert_eq!(udid(1), "4F52434C-0000-4000-8000-000000000001");
        assert_ne!(udid(1), udid(2));
        assert_eq!(udid(u32::MAX).len(), 36);
    }

    #[test]
    fn a_second_run_reads_the_cache_and_only_issues_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let cache = cache_path(dir.path(), &ca);
        let first = load_or_issue(&ca, &cache, 3).unwrap();
        let again = load_or_issue(&ca, &cache, 2).unwrap();
        assert_eq!(again, first[..2]);
        let more = load_or_issue(&ca, &cache, 5).unwrap();
        assert_eq!(more.len(), 5);
        assert_eq!(more[..3], first[..]);
        assert_eq!(read_cache(&cache, 100).unwrap().len(), 5);
    }

    #[test]
    fn another_ca_gets_its_own_cache() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        let a = CertificateAuthority::load_or_create(first.path()).unwrap();
        let b = CertificateAuthority::load_or_create(second.path()).unwrap();
        assert_ne!(cache_path(first.path(), &a), cache_path(first.path(), &b));
    }
}
