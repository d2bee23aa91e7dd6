//! Job slots shared fairly between users.
//!
//! A plain FIFO semaphore lets one user who queues many jobs push everyone else's behind all of
//! them. Here every uid has its own queue and its own limits:
//! - at most `max_jobs` jobs run at once, and at most `max_running_per_uid` of one uid;
//! - at most `max_queued_per_uid` jobs of one uid wait; one more is refused at once
//!   ([`QueueFull`] with [`QueueLimit::PerUid`]). Root's jobs are exempt from this cap (the
//!   operator's scripts must not fail because they queue) but not from the running limit or
//!   the turn order;
//! - at most `max_queued` jobs of all users together wait ([`QueueLimit::Total`]): a queued
//!   detached job holds the descriptors its call passed without any connection, so without
//!   this cap many uids could queue enough of them to empty the daemon's descriptor table.
//!   Root's jobs count towards it; root alone may go past it, by a reserve of
//!   `max_queued_per_uid` places, so users who fill the queue cannot refuse the operator's
//!   jobs (the first few of them). Waiting jobs are therefore never more than
//!   [`Scheduler::queued_bound`], which the server's descriptor budget reserves for;
//! - when a slot frees, the next job is taken round-robin over the uids that have a job waiting
//!   and are under their running limit, starting after the uid served last: each uid's queue is
//!   FIFO, and a uid with many waiting jobs gets one turn per round like every other.
//!
//! A waiting job that is dropped (its client left, the daemon stops) leaves its queue at once.
//!
//! A waiting job's place ([`Queued::position`]) is computed from the same rule: the round-robin
//! order from the uid served last, each uid's queue in turn, as if every freed slot went to the
//! next job in that order (the per-uid running limit can let a later job of another uid start
//! first, so the position is the order of turns, not a promise).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// Limits of a [`Scheduler`].
#[derive(Debug, Clone, Copy)]
pub struct SchedulerLimits {
    /// Jobs running at once, all users together.
    pub max_jobs: usize,
    /// Jobs of one uid running at once.
    pub max_running_per_uid: usize,
    /// Jobs of one uid waiting for a slot (root is exempt).
    pub max_queued_per_uid: usize,
    /// Jobs of all uids together waiting for a slot (root may exceed it by
    /// `max_queued_per_uid`).
    pub max_queued: usize,
}

/// Which queue limit refused a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueLimit {
    /// The uid already has `max_queued_per_uid` jobs waiting.
    PerUid,
    /// All users together have `max_queued` jobs waiting (for root: that plus its reserve).
    Total,
}

/// A job was refused because a queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    /// Which limit.
    pub which: QueueLimit,
    /// The limit in force (for root's [`QueueLimit::Total`], with its reserve).
    pub limit: usize,
}

/// Fair job slots; see the module documentation.
#[derive(Debug)]
pub struct Scheduler {
    limits: SchedulerLimits,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    running: usize,
    running_by_uid: HashMap<u32, usize>,
    /// Waiting jobs by uid, each queue FIFO; a uid's entry is removed when its queue empties.
    queued: BTreeMap<u32, VecDeque<Waiter>>,
    /// The uid whose job started last: the round-robin cursor.
    last_served: Option<u32>,
    next_ticket: u64,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    /// Told when the job has been given a slot (the slot is already counted as running).
    start: oneshot::Sender<()>,
}

/// A running job's slot, released on drop (which starts the next job).
#[derive(Debug)]
pub struct Permit {
    scheduler: Arc<Scheduler>,
    uid: u32,
}

/// Either a slot at once or a place in the queue.
#[derive(Debug)]
pub enum Admission {
    /// A slot was free: run now.
    Running(Permit),
    /// Queued: await [`Queued::start`].
    Queued(Queued),
}

/// A job waiting for a slot. Dropping it leaves the queue (or gives back a slot granted in the
/// meantime).
#[derive(Debug)]
pub struct Queued {
    scheduler: Arc<Scheduler>,
    uid: u32,
    ticket: u64,
    start: Option<oneshot::Receiver<()>>,
}

impl Scheduler {
    /// A scheduler with `limits` (each raised to at least 1; the per-uid running limit lowered
    /// to `max_jobs`).
    pub fn new(limits: SchedulerLimits) -> Arc<Self> {
        let max_jobs = limits.max_jobs.max(1);
        Arc::new(Self {
            limits: SchedulerLimits {
                max_jobs,
                max_running_per_uid: limits.max_running_per_uid.clamp(1, max_jobs),
                max_queued_per_uid: limits.max_queued_per_uid,
                max_queued: limits.max_queued,
            },
            inner: Mutex::new(Inner::default()),
        })
    }

    /// The limits in force (after [`Scheduler::new`]'s adjustments).
    pub fn limits(&self) -> SchedulerLimits {
        self.limits
    }

    /// The most jobs that can ever wait at once: `max_queued` and root's reserve above it.
    pub fn queued_bound(&self) -> usize {
        queued_bound(&self.limits)
    }

    /// Admits a job of `uid`: a slot now, a place in its queue, or [`QueueFull`].
    pub fn admit(self: &Arc<Self>, uid: u32) -> Result<Admission, QueueFull> {
        let mut inner = self.lock();
        let waiting = inner.queued.get(&uid).map_or(0, VecDeque::len);
        // Invariant: after every change `dispatch` has run, so a free slot means nobody who
        // could use it is waiting; only this uid's own earlier jobs must go first.
        if waiting == 0
            && inner.running < self.limits.max_jobs
            && self.under_running_limit(&inner, uid)
        {
            inner.start(uid);
            return Ok(Admission::Running(Permit {
                scheduler: self.clone(),
                uid,
            }));
        }
        if uid != 0 && waiting >= self.limits.max_queued_per_uid {
            return Err(QueueFull {
                which: QueueLimit::PerUid,
                limit: self.limits.max_queued_per_uid,
            });
        }
        let total_limit = if uid == 0 {
            self.queued_bound()
        } else {
            self.limits.max_queued
        };
        if inner.queued.values().map(VecDeque::len).sum::<usize>() >= total_limit {
            return Err(QueueFull {
                which: QueueLimit::Total,
                limit: total_limit,
            });
        }
        let ticket = inner.next_ticket;
        inner.next_ticket += 1;
        let (start, started) = oneshot::channel();
        inner
            .queued
            .entry(uid)
            .or_default()
            .push_back(Waiter { ticket, start });
        Ok(Admission::Queued(Queued {
            scheduler: self.clone(),
            uid,
            ticket,
            start: Some(started),
        }))
    }

    /// Jobs holding a slot now.
    pub fn running(&self) -> usize {
        self.lock().running
    }

    /// Jobs waiting for a slot now, all uids together.
    pub fn queued(&self) -> usize {
        self.lock().queued.values().map(VecDeque::len).sum()
    }

    /// `(uid, running, queued)` of every uid with a job running or waiting, by uid.
    pub fn by_uid(&self) -> Vec<(u32, usize, usize)> {
        let inner = self.lock();
        let mut uids: Vec<u32> = inner
            .running_by_uid
            .keys()
            .chain(inner.queued.keys())
            .copied()
            .collect();
        uids.sort_unstable();
        uids.dedup();
        uids.into_iter()
            .map(|uid| {
                (
                    uid,
                    inner.running_by_uid.get(&uid).copied().unwrap_or(0),
                    inner.queued.get(&uid).map_or(0, VecDeque::len),
                )
            })
            .collect()
    }

    /// The 1-based place of `uid`'s waiting job `ticket` in dispatch order (see the module
    /// documentation), or `None` if it waits no more.
    fn position(&self, uid: u32, ticket: u64) -> Option<u32> {
        let inner = self.lock();
        let own = inner.queued.get(&uid)?;
        let index = own.iter().position(|waiter| waiter.ticket == ticket)?;
        // Uids served before `uid` in this round: those after the cursor and before `uid` in
        // rotation order.
        let comes_before = |other: u32| match inner.last_served {
            Some(last) if uid > last => other > last && other < uid,
            Some(last) => other > last || other < uid,
            None => other < uid,
        };
        let ahead: usize = inner
            .queued
            .iter()
            .filter(|(other, _)| **other != uid)
            .map(|(other, queue)| queue.len().min(index + usize::from(comes_before(*other))))
            .sum();
        u32::try_from(ahead + index + 1).ok()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The critical sections cannot panic half-way; a poisoned lock still holds sound counts.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn under_running_limit(&self, inner: &Inner, uid: u32) -> bool {
        inner.running_by_uid.get(&uid).copied().unwrap_or(0) < self.limits.max_running_per_uid
    }

    /// Starts waiting jobs while slots are free, round-robin over uids.
    fn dispatch(&self, inner: &mut Inner) {
        while inner.running < self.limits.max_jobs {
            let after = inner.last_served;
            let next = {
                let eligible = |(uid, queue): (&u32, &VecDeque<Waiter>)| {
                    (!queue.is_empty() && self.under_running_limit(inner, *uid)).then_some(*uid)
                };
                let (later, earlier) = match after {
                    Some(last) => (
                        inner
                            .queued
                            .range((Bound::Excluded(last), Bound::Unbounded)),
                        inner.queued.range(..=last),
                    ),
                    None => (inner.queued.range(..), inner.queued.range(..0)),
                };
                later.chain(earlier).find_map(eligible)
            };
            let Some(uid) = next else { break };
            let queue = inner
                .queued
                .get_mut(&uid)
                .expect("eligible uid has a queue");
            let waiter = queue.pop_front().expect("eligible queue is not empty");
            if queue.is_empty() {
                inner.queued.remove(&uid);
            }
            inner.start(uid);
            // A receiver is only dropped under this lock after leaving the queue, so this
            // cannot fail; if it ever did, the slot is given back.
            if waiter.start.send(()).is_err() {
                inner.finish(uid);
            }
        }
    }
}

/// [`Scheduler::queued_bound`] of `limits` as given (the server sizes its descriptor budget
/// from it before the scheduler exists).
pub fn queued_bound(limits: &SchedulerLimits) -> usize {
    limits.max_queued.saturating_add(limits.max_queued_per_uid)
}

impl Inner {
    fn start(&mut self, uid: u32) {
        self.running += 1;
        *self.running_by_uid.entry(uid).or_default() += 1;
        self.last_served = Some(uid);
    }

    fn finish(&mut self, uid: u32) {
        // Saturating: a miscount must never panic the daemon (it would only lend a slot).
        self.running = self.running.saturating_sub(1);
        if let Some(count) = self.running_by_uid.get_mut(&uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.running_by_uid.remove(&uid);
            }
        }
    }
}

impl Queued {
    /// This job's place in dispatch order (1: next), `None` once it has been given a slot.
    pub fn position(&self) -> Option<u32> {
        self.scheduler.position(self.uid, self.ticket)
    }

    /// Waits for the slot.
    pub async fn start(mut self) -> Permit {
        self.started().await
    }

    /// Waits for the slot without giving up the place: cancel-safe, so it can be raced
    /// against a timer that reads [`Queued::position`] meanwhile. Once it has returned, the
    /// slot belongs to the permit and dropping `self` does nothing.
    pub async fn started(&mut self) -> Permit {
        if let Some(started) = self.start.as_mut() {
            // The sender lives in the queue until it is used; the queue entry is only removed
            // by dispatch (which sends) or by our own drop.
            let _ = started.await;
        }
        self.start = None;
        // Ours now: the drop must neither leave the queue nor give the slot back.
        self.ticket = u64::MAX;
        Permit {
            scheduler: self.scheduler.clone(),
            uid: self.uid,
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if self.ticket == u64::MAX {
            return;
        }
        let mut inner = self.scheduler.lock();
        let before = inner.queued.get(&self.uid).map_or(0, VecDeque::len);
        if let Some(queue) = inner.queued.get_mut(&self.uid) {
            queue.retain(|waiter| waiter.ticket != self.ticket);
            if queue.is_empty() {
                inner.queued.remove(&self.uid);
            }
        }
        let after = inner.queued.get(&self.uid).map_or(0, VecDeque::len);
        if before == after {
            // Not queued any more: dispatch gave us a slot we will never use.
            inner.finish(self.uid);
            self.scheduler.dispatch(&mut inner);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut inner = self.scheduler.lock();
        inner.finish(self.uid);
        self.scheduler.dispatch(&mut inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(max_jobs: usize, per_uid: usize, queued: usize) -> Arc<Scheduler> {
        Scheduler::new(SchedulerLimits {
            max_jobs,
            max_running_per_uid: per_uid,
            max_queued_per_uid: queued,
            max_queued: 64,
        })
    }

    fn running(admission: Admission) -> Permit {
        match admission {
            Admission::Running(permit) => permit,
            Admission::Queued(_) => panic!("expected to run at once"),
        }
    }

    fn queued(admission: Admission) -> Queued {
        match admission {
            Admission::Queued(queued) => queued,
            Admission::Running(_) => panic!("expected to queue"),
        }
    }

    fn has_started(queued: &mut Queued) -> bool {
        queued.start.as_mut().unwrap().try_recv().is_ok()
    }

    #[test]
    fn a_crowded_uid_gets_one_turn_per_round() {
        let scheduler = scheduler(1, 1, 8);
        let first = running(scheduler.admit(1000).unwrap());
        let mut attacker: Vec<Queued> = (0..4)
            .map(|_| queued(scheduler.admit(1000).unwrap()))
            .collect();
        let mut victim = queued(scheduler.admit(2000).unwrap());
        drop(first);
        assert!(has_started(&mut victim), "the other uid goes next");
        assert!(!attacker.iter_mut().any(has_started));
    }

    #[test]
    fn per_uid_running_limit_leaves_slots_to_others() {
        let scheduler = scheduler(4, 2, 8);
        let _a = running(scheduler.admit(1000).unwrap());
        let _b = running(scheduler.admit(1000).unwrap());
        let _third = queued(scheduler.admit(1000).unwrap());
        let _other = running(scheduler.admit(2000).unwrap());
    }

    #[test]
    fn queued_limit_refuses_at_once_but_not_root() {
        let scheduler = scheduler(1, 1, 2);
        let _running = running(scheduler.admit(1000).unwrap());
        let _q1 = queued(scheduler.admit(1000).unwrap());
        let _q2 = queued(scheduler.admit(1000).unwrap());
        assert_eq!(
            scheduler.admit(1000).unwrap_err(),
            QueueFull {
                which: QueueLimit::PerUid,
                limit: 2
            }
        );
        let _root: Vec<_> = (0..5).map(|_| scheduler.admit(0).unwrap()).collect();
    }

    #[test]
    fn the_total_queue_is_bounded_for_every_uid_and_root_has_a_reserve() {
        let scheduler = Scheduler::new(SchedulerLimits {
            max_jobs: 1,
            max_running_per_uid: 1,
            max_queued_per_uid: 2,
            max_queued: 3,
        });
        assert_eq!(scheduler.queued_bound(), 5);
        let _running = running(scheduler.admit(1000).unwrap());
        // Three uids, each under its own cap, fill the total.
        let _a = queued(scheduler.admit(1000).unwrap());
        let _b = queued(scheduler.admit(1001).unwrap());
        let _root_first = queued(scheduler.admit(0).unwrap());
        let total_full = QueueFull {
            which: QueueLimit::Total,
            limit: 3,
        };
        assert_eq!(scheduler.admit(1002).unwrap_err(), total_full);
        assert_eq!(scheduler.admit(1001).unwrap_err(), total_full);
        // Root goes on into its reserve, up to the bound, and no further.
        let _root: Vec<_> = (0..2)
            .map(|_| queued(scheduler.admit(0).unwrap()))
            .collect();
        assert_eq!(scheduler.queued(), scheduler.queued_bound());
        assert_eq!(
            scheduler.admit(0).unwrap_err(),
            QueueFull {
                which: QueueLimit::Total,
                limit: 5
            }
        );
        // A place freed is a place for a user again.
        drop(_a);
        drop(_root);
        let _c = queued(scheduler.admit(1002).unwrap());
    }

    #[test]
    fn counts_running_and_queued_by_uid() {
        let slots = scheduler(2, 1, 8);
        let _a = running(slots.admit(1000).unwrap());
        let _b = running(slots.admit(1001).unwrap());
        let _c = queued(slots.admit(1000).unwrap());
        let d = queued(slots.admit(1000).unwrap());
        let _e = queued(slots.admit(1002).unwrap());
        assert_eq!((slots.running(), slots.queued()), (2, 3));
        assert_eq!(
            slots.by_uid(),
            vec![(1000, 1, 2), (1001, 1, 0), (1002, 0, 1)]
        );
        drop(d);
        assert_eq!(slots.queued(), 2);
    }

    #[test]
    fn a_dropped_waiter_leaves_the_queue() {
        let scheduler = scheduler(1, 1, 1);
        let running_job = running(scheduler.admit(1000).unwrap());
        let waiting = queued(scheduler.admit(1000).unwrap());
        assert!(scheduler.admit(1000).is_err());
        drop(waiting);
        let mut next = queued(scheduler.admit(1000).unwrap());
        drop(running_job);
        assert!(has_started(&mut next));
    }

    #[test]
    fn positions_follow_the_round_robin_and_move_up() {
        let scheduler = scheduler(1, 1, 8);
        let first = running(scheduler.admit(1000).unwrap()); // cursor: uid 1000
        let a1 = queued(scheduler.admit(1000).unwrap());
        let a2 = queued(scheduler.admit(1000).unwrap());
        let b1 = queued(scheduler.admit(2000).unwrap());
        let c1 = queued(scheduler.admit(500).unwrap());
        // After 1000 come 2000, then (wrapping) 500, then 1000's own.
        assert_eq!(b1.position(), Some(1));
        assert_eq!(c1.position(), Some(2));
        assert_eq!(a1.position(), Some(3));
        assert_eq!(a2.position(), Some(4));
        drop(first); // b1 starts; cursor 2000.
        assert_eq!(b1.position(), None);
        assert_eq!(c1.position(), Some(1));
        assert_eq!(a1.position(), Some(2));
        drop(c1);
        assert_eq!(a1.position(), Some(1));
        assert_eq!(a2.position(), Some(2));
    }

    #[test]
    fn a_slot_granted_to_a_dropped_waiter_goes_to_the_next() {
        let scheduler = scheduler(1, 1, 4);
        let running_job = running(scheduler.admit(1000).unwrap());
        let granted_but_gone = queued(scheduler.admit(1000).unwrap());
        let mut next = queued(scheduler.admit(1000).unwrap());
        drop(running_job); // uid 1000's waiter gets the slot...
        drop(granted_but_gone); // ...but leaves before using it.
        assert!(has_started(&mut next));
    }
}
