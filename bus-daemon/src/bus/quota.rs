//! Fair sharing of bounded resources among uids. Plain data.
//!
//! A [`FairPool`] has a fixed capacity (bytes a receiver may have queued,
//! fds the daemon may hold, ...) and records how much of it each uid
//! currently uses. A uid may take `amount` more only if, afterwards, it
//! holds no more than an `1/(n+1)`-th of what is left for it, where `n` is
//! the number of uids using the pool (itself included):
//!
//! ```text
//!   (n + 1) * (share + amount) - share <= remaining
//! ```
//!
//! `share` is the uid's current use and `remaining` the unused capacity.
//! So no uid can ever take the last of a pool: whoever comes next always
//! finds room, and with `n` uids competing each is guaranteed between
//! `1/n` and `1/n^2` of the capacity (the same bound dbus-broker gives).
//! A pool may name one exempt uid (a receiver's own uid on its own queue),
//! which is only held to the capacity.

use crate::config::Limit;

/// The fair-share rule: may a uid holding `share`, one of `holders` uids
/// (itself included) using a pool with `remaining` units free, take
/// `amount` more?
fn fair_share_allows(remaining: u64, holders: u64, share: u64, amount: u64) -> Result<(), Refusal> {
    let allowed = (holders + 1)
        .checked_mul(share + amount)
        .is_some_and(|needed| needed - share <= remaining);
    if allowed {
        Ok(())
    } else {
        Err(Refusal::FairShare)
    }
}

/// A capacity shared fairly among uids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FairPool {
    capacity: u64,
    used: u64,
    /// Current use per uid; few entries, so a vector beats a map.
    shares: Vec<(u32, u64)>,
    exempt: Option<u32>,
}

/// Why a charge was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The pool as a whole has no room.
    Full,
    /// The pool has room, but not within this uid's fair share.
    FairShare,
}

impl FairPool {
    /// A pool of `capacity` units; `exempt` is held only to the capacity.
    pub fn new(capacity: u64, exempt: Option<u32>) -> Self {
        Self {
            capacity,
            used: 0,
            shares: Vec::new(),
            exempt,
        }
    }

    /// The capacity.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Units in use.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Units `uid` uses.
    pub fn share_of(&self, uid: u32) -> u64 {
        self.shares
            .iter()
            .find(|(holder, _)| *holder == uid)
            .map_or(0, |(_, share)| *share)
    }

    /// Every uid's use.
    pub fn shares(&self) -> &[(u32, u64)] {
        &self.shares
    }

    /// Could `uid` take `amount` more?
    pub fn check(&self, uid: u32, amount: u64) -> Result<(), Refusal> {
        if amount == 0 {
            return Ok(());
        }
        let remaining = self.capacity - self.used;
        if amount > remaining {
            return Err(Refusal::Full);
        }
        if self.exempt == Some(uid) {
            return Ok(());
        }
        let share = self.share_of(uid);
        let holders = self.shares.len() as u64 + u64::from(share == 0);
        fair_share_allows(remaining, holders, share, amount)
    }

    /// Records that `uid` took `amount` (after a successful [`check`](Self::check)).
    pub fn charge(&mut self, uid: u32, amount: u64) {
        if amount == 0 {
            return;
        }
        self.used += amount;
        match self.shares.iter_mut().find(|(holder, _)| *holder == uid) {
            Some((_, share)) => *share += amount,
            None => self.shares.push((uid, amount)),
        }
    }

    /// Gives back `amount` taken by `uid`.
    pub fn release(&mut self, uid: u32, amount: u64) {
        if amount == 0 {
            return;
        }
        let Some(index) = self.shares.iter().position(|(holder, _)| *holder == uid) else {
            debug_assert!(false, "release by uid {uid} without a charge");
            return;
        };
        let share = &mut self.shares[index].1;
        debug_assert!(*share >= amount, "uid {uid} releases more than it holds");
        let amount = amount.min(*share);
        *share -= amount;
        self.used -= amount;
        if *share == 0 {
            self.shares.swap_remove(index);
            if self.shares.is_empty() {
                // An idle pool keeps no allocation (many idle peers).
                self.shares = Vec::new();
            }
        }
    }

    /// Changes the capacity (config reload); current use is kept.
    pub fn set_capacity(&mut self, capacity: u64) {
        self.capacity = capacity.max(self.used);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes as much as `uid` may, in steps of `step`.
    fn fill(pool: &mut FairPool, uid: u32, step: u64) -> u64 {
        let mut taken = 0;
        while pool.check(uid, step).is_ok() {
            pool.charge(uid, step);
            taken += step;
        }
        taken
    }

    #[test]
    fn a_lone_uid_gets_half_and_never_the_last_unit() {
        let mut pool = FairPool::new(1000, None);
        assert_eq!(fill(&mut pool, 1, 1), 500);
        assert_eq!(pool.check(1, 1), Err(Refusal::FairShare));
        assert_eq!(pool.check(1, 501), Err(Refusal::Full));
    }

    #[test]
    fn a_flooding_uid_cannot_starve_later_ones() {
        let mut pool = FairPool::new(1_000_000, None);
        let first = fill(&mut pool, 1, 1000);
        let second = fill(&mut pool, 2, 1000);
        let third = fill(&mut pool, 3, 1000);
        assert!(first >= 1_000_000 / 2 - 1000, "{first}");
        // Each newcomer still gets a real share: at least 1/n^2 of the total.
        assert!(second >= 1_000_000 / 9, "{second}");
        assert!(third >= 1_000_000 / 16, "{third}");
        assert!(pool.used() < pool.capacity());
    }

    #[test]
    fn the_exempt_uid_may_fill_the_pool() {
        let mut pool = FairPool::new(100, Some(7));
        assert_eq!(fill(&mut pool, 7, 1), 100);
        assert_eq!(pool.check(8, 1), Err(Refusal::Full));
    }

    #[test]
    fn release_returns_the_share() {
        let mut pool = FairPool::new(100, None);
        pool.charge(1, 30);
        pool.charge(2, 10);
        assert_eq!(pool.share_of(1), 30);
        pool.release(1, 30);
        assert_eq!(pool.share_of(1), 0);
        assert_eq!(pool.used(), 10);
        assert_eq!(pool.shares(), &[(2, 10)]);
        pool.release(2, 10);
        assert!(pool.shares().is_empty());
        assert_eq!(pool.used(), 0);
    }

    #[test]
    fn huge_amounts_do_not_overflow() {
        let pool = FairPool::new(u64::MAX, None);
        assert_eq!(pool.check(1, u64::MAX / 2 + 1), Err(Refusal::FairShare));
    }
}

/// One queued frame's charges, released once it is written.
#[derive(Debug, Clone, Copy)]
struct QueuedFrame {
    /// Stream offset just past the frame in the receiver's queue.
    end: u64,
    /// The uid charged (the sender's; the receiver's own for bus frames).
    actor: u32,
    /// Also charged to the daemon-wide pools.
    global: bool,
    bytes: u64,
    fds: u32,
}

/// A charge that was released, for the daemon-wide pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// The uid that was charged.
    pub actor: u32,
    /// Bytes given back.
    pub bytes: u64,
    /// Fds given back.
    pub fds: u64,
}

/// The resources of a receiver's queue, in the order of [`QueueUse`].
const RESOURCES: [Limit; 3] = [
    Limit::MaxQueuedBytesPerReceiver,
    Limit::MaxQueuedFdsPerReceiver,
    Limit::MaxQueuedMessagesPerReceiver,
];

/// Bytes, fds and messages: use of (or caps on) a receiver's queue.
pub type QueueUse = [u64; 3];

/// The bytes, fds and messages queued for one receiver, shared fairly
/// among the uids that sent them (the same rule as [`FairPool`]); the
/// receiver's own uid is exempt from the share (only held to the caps).
///
/// Kept compact (the caps come from the configuration at each check, one
/// vector holds every uid's use of all three), since every peer has one.
#[derive(Debug)]
pub struct ReceiverQuota {
    owner: u32,
    used: QueueUse,
    shares: Vec<(u32, QueueUse)>,
    frames: std::collections::VecDeque<QueuedFrame>,
}

impl ReceiverQuota {
    /// An empty quota for a receiver of uid `owner`.
    pub fn new(owner: u32) -> Self {
        Self {
            owner,
            used: [0; 3],
            shares: Vec::new(),
            frames: std::collections::VecDeque::new(),
        }
    }

    /// What `actor` holds.
    pub fn share_of(&self, actor: u32) -> QueueUse {
        self.shares
            .iter()
            .find(|(holder, _)| *holder == actor)
            .map_or([0; 3], |(_, share)| *share)
    }

    /// Could `actor` queue a frame of `bytes` with `fds`, under `caps`? On
    /// refusal, names the configuration key of the limit that was hit.
    pub fn check(
        &self,
        caps: QueueUse,
        actor: u32,
        bytes: u64,
        fds: u64,
    ) -> Result<(), (Limit, Refusal)> {
        let amounts = [bytes, fds, 1];
        let share = self.share_of(actor);
        let holders = self.shares.len() as u64 + u64::from(share == [0; 3]);
        // Messages first: the most telling limit for a flood of small frames.
        for resource in [2, 0, 1] {
            let amount = amounts[resource];
            if amount == 0 {
                continue;
            }
            let remaining = caps[resource].saturating_sub(self.used[resource]);
            if amount > remaining {
                return Err((RESOURCES[resource], Refusal::Full));
            }
            if actor != self.owner {
                fair_share_allows(remaining, holders, share[resource], amount)
                    .map_err(|refusal| (RESOURCES[resource], refusal))?;
            }
        }
        Ok(())
    }

    /// Records a queued frame ending at stream offset `end`.
    pub fn charge(&mut self, actor: u32, bytes: u64, fds: u64, end: u64, global: bool) {
        let amounts = [bytes, fds, 1];
        match self.shares.iter_mut().find(|(holder, _)| *holder == actor) {
            Some((_, share)) => (0..3).for_each(|r| share[r] += amounts[r]),
            None => self.shares.push((actor, amounts)),
        }
        (0..3).for_each(|r| self.used[r] += amounts[r]);
        self.frames.push_back(QueuedFrame {
            end,
            actor,
            global,
            bytes,
            fds: fds as u32,
        });
    }

    /// Releases every frame that ends at or before `written` (the queue's
    /// written offset); calls `on_global` for charges of daemon-wide pools.
    pub fn release_written(&mut self, written: u64, mut on_global: impl FnMut(Released)) {
        while let Some(frame) = self.frames.front().copied() {
            if frame.end > written {
                break;
            }
            self.frames.pop_front();
            self.release(frame, &mut on_global);
        }
        if self.frames.is_empty() {
            // Idle peers keep no allocation.
            self.frames = std::collections::VecDeque::new();
        }
    }

    /// Releases everything (the receiver is gone).
    pub fn release_all(&mut self, mut on_global: impl FnMut(Released)) {
        while let Some(frame) = self.frames.pop_front() {
            self.release(frame, &mut on_global);
        }
    }

    fn release(&mut self, frame: QueuedFrame, on_global: &mut impl FnMut(Released)) {
        let amounts = [frame.bytes, u64::from(frame.fds), 1];
        if let Some(index) = self
            .shares
            .iter()
            .position(|(holder, _)| *holder == frame.actor)
        {
            let share = &mut self.shares[index].1;
            (0..3).for_each(|r| share[r] -= amounts[r]);
            if *share == [0; 3] {
                self.shares.swap_remove(index);
                if self.shares.is_empty() {
                    self.shares = Vec::new();
                }
            }
        }
        (0..3).for_each(|r| self.used[r] -= amounts[r]);
        if frame.global {
            on_global(Released {
                actor: frame.actor,
                bytes: frame.bytes,
                fds: u64::from(frame.fds),
            });
        }
    }

    /// Queued messages.
    pub fn messages(&self) -> u64 {
        self.used[2]
    }

    /// Queued bytes, fds and messages.
    pub fn used(&self) -> QueueUse {
        self.used
    }

    /// Every sender uid's use (bytes, fds, messages).
    pub fn shares(&self) -> &[(u32, QueueUse)] {
        &self.shares
    }
}

#[cfg(test)]
mod receiver_tests {
    use super::*;

    #[test]
    fn frames_are_released_as_they_are_written() {
        let caps = [1000, 10, 3];
        let mut quota = ReceiverQuota::new(0);
        quota.charge(5, 100, 1, 100, true);
        quota.charge(5, 50, 0, 150, false);
        // Uid 5 holds 2 of 3 messages: a third would leave nothing.
        assert_eq!(
            quota.check(caps, 5, 10, 0).unwrap_err(),
            (Limit::MaxQueuedMessagesPerReceiver, Refusal::FairShare)
        );
        // The owner is held only to the caps.
        assert!(quota.check(caps, 0, 10, 0).is_ok());
        assert_eq!(quota.share_of(5), [150, 1, 2]);
        let mut released = Vec::new();
        quota.release_written(120, |r| released.push(r));
        assert_eq!(
            released,
            vec![Released {
                actor: 5,
                bytes: 100,
                fds: 1
            }]
        );
        assert_eq!(quota.messages(), 1);
        quota.release_all(|r| released.push(r));
        assert_eq!(
            released.len(),
            1,
            "the second frame was not globally charged"
        );
        assert_eq!(quota.used(), [0, 0, 0]);
        assert!(quota.shares().is_empty());
    }
}
