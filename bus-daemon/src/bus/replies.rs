//! Pending method calls: which caller waits for which callee, until when.
//! A reply is only accepted if it answers a call recorded here, from the
//! peer the call went to. Plain data with an explicit clock (`Instant`
//! arguments), so tests need no timers.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Instant;

use super::{ClientKeyHash, IdHash, PeerId};

/// A call is identified by its caller and the caller's serial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallKey {
    /// Who made the call.
    pub caller: PeerId,
    /// The caller's serial for it.
    pub serial: u64,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    callee: PeerId,
    deadline: Instant,
    /// The timeout the call was given, for the error message.
    timeout_ms: u32,
}

/// Every call waiting for an answer.
#[derive(Debug, Default)]
pub struct PendingCalls {
    calls: HashMap<CallKey, Pending, ClientKeyHash>,
    deadlines: BTreeSet<(Instant, CallKey)>,
    by_callee: HashMap<PeerId, HashSet<CallKey, ClientKeyHash>, IdHash>,
    by_caller: HashMap<PeerId, HashSet<u64, ClientKeyHash>, IdHash>,
}

impl PendingCalls {
    /// Records a call. Returns false if the caller already has a pending
    /// call with this serial (the new one is not recorded).
    pub fn insert(
        &mut self,
        key: CallKey,
        callee: PeerId,
        deadline: Instant,
        timeout_ms: u32,
    ) -> bool {
        if self.calls.contains_key(&key) {
            return false;
        }
        self.calls.insert(
            key,
            Pending {
                callee,
                deadline,
                timeout_ms,
            },
        );
        self.deadlines.insert((deadline, key));
        self.by_callee.entry(callee).or_default().insert(key);
        self.by_caller
            .entry(key.caller)
            .or_default()
            .insert(key.serial);
        true
    }

    /// Removes the call if `callee` is the peer it was sent to; that is the
    /// only way a reply is accepted.
    pub fn take_reply(&mut self, key: CallKey, callee: PeerId) -> bool {
        match self.calls.get(&key) {
            Some(pending) if pending.callee == callee => {
                self.remove(key);
                true
            }
            _ => false,
        }
    }

    fn remove(&mut self, key: CallKey) -> Option<Pending> {
        let pending = self.calls.remove(&key)?;
        self.deadlines.remove(&(pending.deadline, key));
        if let Some(set) = self.by_callee.get_mut(&pending.callee) {
            set.remove(&key);
            if set.is_empty() {
                self.by_callee.remove(&pending.callee);
            }
        }
        if let Some(set) = self.by_caller.get_mut(&key.caller) {
            set.remove(&key.serial);
            if set.is_empty() {
                self.by_caller.remove(&key.caller);
            }
        }
        Some(pending)
    }

    /// Forgets a call without answering it (e.g. it could not be queued).
    pub fn cancel(&mut self, key: CallKey) {
        self.remove(key);
    }

    /// Calls `caller` is waiting on.
    pub fn count_for_caller(&self, caller: PeerId) -> usize {
        self.by_caller.get(&caller).map_or(0, HashSet::len)
    }

    /// Calls made to `callee` that it has not answered yet.
    pub fn count_for_callee(&self, callee: PeerId) -> usize {
        self.by_callee.get(&callee).map_or(0, HashSet::len)
    }

    /// Total pending calls.
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// The earliest deadline, for the timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(deadline, _)| *deadline)
    }

    /// Removes and returns every call whose deadline is at or before `now`,
    /// with the timeout it had.
    pub fn expire(&mut self, now: Instant) -> Vec<(CallKey, u32)> {
        let mut expired = Vec::new();
        while let Some(&(deadline, key)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            if let Some(pending) = self.remove(key) {
                expired.push((key, pending.timeout_ms));
            }
        }
        expired
    }

    /// A peer disconnected: drops the calls it made and returns those it
    /// was supposed to answer, so their callers can be told.
    pub fn remove_peer(&mut self, peer: PeerId) -> Vec<CallKey> {
        if let Some(serials) = self.by_caller.remove(&peer) {
            for serial in serials {
                self.remove(CallKey {
                    caller: peer,
                    serial,
                });
            }
        }
        let owed: Vec<CallKey> = self
            .by_callee
            .remove(&peer)
            .map(|set| set.into_iter().collect())
            .unwrap_or_default();
        for key in &owed {
            self.remove(*key);
        }
        let mut owed = owed;
        owed.sort();
        owed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const A: PeerId = PeerId(1);
    const B: PeerId = PeerId(2);
    const C: PeerId = PeerId(3);

    fn key(caller: PeerId, serial: u64) -> CallKey {
        CallKey { caller, serial }
    }

    #[test]
    fn only_the_callee_can_answer_once() {
        let now = Instant::now();
        let mut calls = PendingCalls::default();
        assert!(calls.insert(key(A, 1), B, now, 0));
        assert!(!calls.insert(key(A, 1), B, now, 0), "duplicate serial");
        assert!(
            !calls.take_reply(key(A, 1), C),
            "spoofed reply from a third peer"
        );
        assert!(!calls.take_reply(key(A, 2), B), "unknown serial");
        assert!(calls.take_reply(key(A, 1), B));
        assert!(!calls.take_reply(key(A, 1), B), "second reply");
        assert!(calls.is_empty());
    }

    #[test]
    fn expiry_is_in_deadline_order() {
        let now = Instant::now();
        let mut calls = PendingCalls::default();
        calls.insert(key(A, 1), B, now + Duration::from_secs(3), 0);
        calls.insert(key(A, 2), B, now + Duration::from_secs(1), 0);
        calls.insert(key(C, 1), B, now + Duration::from_secs(2), 0);
        assert_eq!(calls.next_deadline(), Some(now + Duration::from_secs(1)));
        assert_eq!(
            calls
                .expire(now + Duration::from_secs(2))
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>(),
            vec![key(A, 2), key(C, 1)]
        );
        assert_eq!(calls.count_for_caller(A), 1);
        assert_eq!(
            calls.expire(now + Duration::from_secs(10)),
            vec![(key(A, 1), 0)]
        );
        assert!(calls.next_deadline().is_none());
    }

    #[test]
    fn disconnect_fails_owed_calls_and_drops_own() {
        let now = Instant::now();
        let mut calls = PendingCalls::default();
        calls.insert(key(A, 1), B, now, 0);
        calls.insert(key(C, 7), B, now, 0);
        calls.insert(key(B, 3), A, now, 0);
        assert_eq!(calls.remove_peer(B), vec![key(A, 1), key(C, 7)]);
        assert!(calls.is_empty());
    }

    /// Serials that differ only above bit 20 (what a client choosing them
    /// would send to crowd one probe chain) still spread over the buckets:
    /// grouped by the low 12 bits of their hashes (hashbrown's bucket index
    /// in a table of 4,096), no group holds more than a few dozen. The old
    /// xor-multiply hash put all 4,096 in one.
    #[test]
    fn adversarial_serials_do_not_share_a_bucket() {
        use std::hash::BuildHasher;
        for _ in 0..8 {
            let hasher = ClientKeyHash::default();
            let mut buckets = std::collections::HashMap::<u64, u32>::new();
            for k in 0..4096u64 {
                let hash = hasher.hash_one(CallKey {
                    caller: PeerId(7),
                    serial: k << 20,
                });
                *buckets.entry(hash & 0xfff).or_default() += 1;
            }
            let fullest = buckets.values().copied().max().unwrap_or(0);
            assert!(fullest <= 32, "{fullest} serials share one bucket");
        }
    }
}
