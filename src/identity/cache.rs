//! A bounded map of successful verification verdicts.

use dashmap::DashMap;

use super::CertFingerprint;

/// A successful verification: which certificate, and until when the verdict holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub fingerprint: CertFingerprint,
    /// Unix seconds after which the certificate (or a CA above it) has expired.
    pub expires_at: u64,
}

/// Verdicts keyed by a 32-byte digest, never holding more than `capacity` entries (give or
/// take one per concurrent inserter). When full, an arbitrary entry is evicted: the cost of
/// a wrong choice is one re-verification, so picking cheaply beats tracking recency on
/// every hit.
pub(crate) struct VerdictCache {
    entries: DashMap<[u8; 32], Verdict>,
    capacity: usize,
}

impl VerdictCache {
    pub(crate) fn new(capacity: usize) -> Self {
        VerdictCache {
            entries: DashMap::new(),
            capacity,
        }
    }

    /// The verdict for `key` if it still holds at `now`; an expired one is dropped.
    pub(crate) fn get(&self, key: &[u8; 32], now: u64) -> Option<Verdict> {
        let verdict = *self.entries.get(key)?;
        if now < verdict.expires_at {
            return Some(verdict);
        }
        self.entries.remove(key);
        None
    }

    pub(crate) fn insert(&self, key: [u8; 32], verdict: Verdict) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.evict_one();
        }
        self.entries.insert(key, verdict);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    fn evict_one(&self) {
        let victim = self.entries.iter().next().map(|entry| *entry.key());
        if let Some(victim) = victim {
            self.entries.remove(&victim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(byte: u8, expires_at: u64) -> Verdict {
        Verdict {
            fingerprint: [byte; 32],
            expires_at,
        }
    }

    #[test]
    fn returns_what_was_stored_until_it_expires() {
        let cache = VerdictCache::new(10);
        cache.insert([1; 32], verdict(9, 100));
        assert_eq!(cache.get(&[1; 32], 99), Some(verdict(9, 100)));
        assert_eq!(cache.get(&[1; 32], 100), None);
        assert_eq!(cache.len(), 0, "an expired verdict is dropped on lookup");
    }

    #[test]
    fn never_grows_past_its_capacity() {
        let cache = VerdictCache::new(3);
        for byte in 0..50 {
            cache.insert([byte; 32], verdict(byte, u64::MAX));
            assert!(cache.len() <= 3);
        }
        assert!(
            cache.get(&[49; 32], 0).is_some(),
            "the newest entry is kept"
        );
    }

    #[test]
    fn replacing_an_entry_when_full_evicts_nothing() {
        let cache = VerdictCache::new(2);
        cache.insert([1; 32], verdict(1, u64::MAX));
        cache.insert([2; 32], verdict(2, u64::MAX));
        cache.insert([2; 32], verdict(2, 5));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn zero_capacity_disables_caching() {
        let cache = VerdictCache::new(0);
        cache.insert([1; 32], verdict(1, u64::MAX));
        assert_eq!(cache.get(&[1; 32], 0), None);
    }
}
