//! Scheduling policy: which ready line goes to which lane next. Pure bookkeeping (no I/O, no
//! store): the supervisor owns request state and asks this module only *which* line to lease.
//!
//! A lane is one of the backend's parallel slots (`--concurrency` of them). Every line belongs
//! to a prefix group (the model plus a hash of its leading system/developer messages, computed
//! at intake and stored with the request). Model servers keep a prompt cache per slot, so a slot
//! that keeps receiving lines of one group prefills the shared prefix once instead of every time.
//!
//! [`Policy::Affine`] (the default): each lane serves one queue — the ready lines of one group
//! of one batch — until it is empty, then takes another: of the oldest batch with ready lines,
//! the lane's own group if it has lines there, else a queue no lane serves, else (only when
//! there is enough left to be worth a cold prefill) the queue with the most lines per lane, else,
//! for a lane that holds nothing, a small group (at most `JOIN_MIN_LINES_PER_LANE` lines per
//! lane in all: one slot's cache gains it nothing, so its lines run side by side). A queue that
//! no lane has served for `starve_after` is taken by the next lane that asks, so a small batch
//! behind a 170,000-line one still makes progress.
//!
//! [`Policy::Fifo`]: lines in input order, oldest batch first, to whichever lane asks (the
//! behaviour before prefix groups).
//!
//! **Conversations** (a batch in conversation mode, see `conversation.rs`): line *i* of a group
//! belongs to conversation *i mod lanes*, which runs on lane *i mod lanes*, one line at a time
//! in input order (the next turn needs the previous answer). A lane with a conversation to
//! continue serves it before anything else: it takes the conversation's next line once its
//! other leases are done, and nothing else while that line runs. A conversation whose next line
//! waits for a retry waits with it (the line's turn keeps its place); the lane meanwhile serves
//! its other conversations or other batches. A queue of independent lines that no lane has
//! served for `starve_after` is taken ahead of the conversations by the next free lane, which
//! keeps it until it is empty: a small batch behind a conversation batch still finishes.

use crate::domain::BatchId;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;
// tokio's clock (the supervisor's): a test can pause and advance it. No I/O.
use tokio::time::Instant;

/// How lines are given to lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Each lane keeps to one prefix group (see the module doc).
    Affine,
    /// Input order, oldest batch first.
    Fifo,
}

/// Joining a queue another lane already serves costs the joining slot a cold prefill; it is
/// done only when the queue has at least this many ready lines per lane (counting the new one).
pub const JOIN_MIN_LINES_PER_LANE: usize = 4;

/// Lines in a queue's order, kept as runs of consecutive line numbers: a batch's million
/// fresh lines are one run, not four megabytes.
#[derive(Debug, Default)]
struct Lines {
    /// (first line, how many).
    runs: VecDeque<(u32, u32)>,
    len: usize,
}

impl Lines {
    fn push_back(&mut self, line: u32) {
        match self.runs.back_mut() {
            Some((first, n)) if first.checked_add(*n) == Some(line) => *n += 1,
            _ => self.runs.push_back((line, 1)),
        }
        self.len += 1;
    }

    fn push_front(&mut self, line: u32) {
        match self.runs.front_mut() {
            Some((first, n)) if line.checked_add(1) == Some(*first) => {
                *first = line;
                *n += 1;
            }
            _ => self.runs.push_front((line, 1)),
        }
        self.len += 1;
    }

    fn pop_front(&mut self) -> Option<u32> {
        let (first, n) = self.runs.front_mut()?;
        let line = *first;
        if *n == 1 {
            self.runs.pop_front();
        } else {
            *first += 1;
            *n -= 1;
        }
        self.len -= 1;
        Some(line)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn clear(&mut self) {
        self.runs.clear();
        self.len = 0;
    }
}

/// The ready lines of one group of one batch.
#[derive(Debug)]
struct Queue {
    ready: Lines,
    /// When a line was last taken from it, or when it became ready with no lane serving it.
    since: Instant,
    /// Lanes serving it.
    lanes: usize,
}

/// A batch's lines: which group each is in, and the queues.
#[derive(Debug, Default)]
struct BatchQueues {
    /// The group of most lines (the first registered) and the lines of other groups.
    main_group: Option<u64>,
    other_groups: HashMap<u32, u64>,
    /// Every group seen.
    all_groups: std::collections::HashSet<u64>,
    /// Lines registered per group (to run, at take-on): a small group gains nothing from
    /// keeping to one lane.
    sizes: HashMap<u64, u32>,
    queues: BTreeMap<u64, Queue>,
}

impl BatchQueues {
    fn group_of(&self, line: u32) -> u64 {
        self.other_groups
            .get(&line)
            .copied()
            .or(self.main_group)
            .unwrap_or(0)
    }
}

/// A conversation: (its prefix group, its number within the group).
pub type ConvId = (u64, u32);

/// One conversation's lines not done, in input order; the first is the next turn.
#[derive(Debug, Default)]
struct Conv {
    lines: VecDeque<u32>,
    /// Lines ready to run (not waiting for a retry, not leased).
    ready: HashSet<u32>,
    /// Its first line is leased.
    busy: bool,
}

impl Conv {
    fn available(&self) -> Option<u32> {
        let head = *self.lines.front()?;
        (!self.busy && self.ready.contains(&head)).then_some(head)
    }

    /// `line` is not leased any more: if it is the next turn, the conversation is free.
    fn release(&mut self, line: u32) {
        if self.lines.front() == Some(&line) {
            self.busy = false;
        }
    }
}

/// A batch in conversation mode.
#[derive(Debug, Default)]
struct ConvBatch {
    lanes: u32,
    /// Lines registered per group so far (line *i* of a group goes to conversation i mod lanes).
    registered: HashMap<u64, u32>,
    of_line: HashMap<u32, ConvId>,
    convs: BTreeMap<ConvId, Conv>,
}

/// The scheduler's state.
#[derive(Debug)]
pub struct Scheduler {
    policy: Policy,
    starve_after: Duration,
    /// Per lane: the queue it serves, as (batch, group).
    lanes: Vec<Option<(BatchId, u64)>>,
    /// Ordered by id = creation time: first-come first-served.
    batches: BTreeMap<BatchId, BatchQueues>,
    /// Batches in conversation mode, and per lane the conversation it serves.
    conv_batches: BTreeMap<BatchId, ConvBatch>,
    conv_lanes: Vec<Option<(BatchId, ConvId)>>,
    /// Per lane: it took a starved queue ahead of its conversations and keeps it until empty.
    rescuing: Vec<bool>,
}

impl Scheduler {
    /// A scheduler of `lanes` lanes.
    pub fn new(policy: Policy, lanes: usize, starve_after: Duration) -> Scheduler {
        Scheduler {
            policy,
            starve_after,
            lanes: vec![None; lanes.max(1)],
            batches: BTreeMap::new(),
            conv_batches: BTreeMap::new(),
            conv_lanes: vec![None; lanes.max(1)],
            rescuing: vec![false; lanes.max(1)],
        }
    }

    /// Runs `batch` in conversation mode with `lanes` conversations per group: call it before
    /// registering the batch's lines.
    pub fn conversational(&mut self, batch: BatchId, lanes: u32) {
        self.conv_batches.entry(batch).or_default().lanes = lanes.max(1);
    }

    /// The conversation of a line of a batch in conversation mode.
    pub fn conversation_of(&self, batch: BatchId, line: u32) -> Option<ConvId> {
        self.conv_batches.get(&batch)?.of_line.get(&line).copied()
    }

    /// A line of a conversation is done (succeeded or failed for good): the conversation's next
    /// line is its next turn. Nothing for other batches.
    pub fn finished(&mut self, batch: BatchId, line: u32) {
        let Some(b) = self.conv_batches.get_mut(&batch) else {
            return;
        };
        let Some(c) = b.of_line.remove(&line).and_then(|id| b.convs.get_mut(&id)) else {
            return;
        };
        c.release(line);
        // Turns end in order: the next turn is at the front (no scan of a long conversation).
        if c.lines.front() == Some(&line) {
            c.lines.pop_front();
        } else {
            c.lines.retain(|l| *l != line);
        }
        c.ready.remove(&line);
    }

    /// The conversation of a line of a batch in conversation mode, to change.
    fn conv_mut(&mut self, batch: BatchId, line: u32) -> Option<&mut Conv> {
        let b = self.conv_batches.get_mut(&batch)?;
        let id = b.of_line.get(&line)?;
        b.convs.get_mut(id)
    }

    /// A leased line waits for a retry: its conversation waits with it, and its lane is free for
    /// other work meanwhile. Nothing for other batches (the line is pushed when it is due).
    pub fn waiting(&mut self, batch: BatchId, line: u32) {
        if let Some(c) = self.conv_mut(batch, line) {
            c.release(line);
            c.ready.remove(&line);
        }
    }

    /// A line of a conversation is ready (or back): whether the batch is in conversation mode.
    fn conv_ready(&mut self, batch: BatchId, line: u32) -> bool {
        if let Some(c) = self.conv_mut(batch, line) {
            c.release(line);
            c.ready.insert(line);
        }
        self.conv_batches.contains_key(&batch)
    }

    /// The conversation lane `lane` should continue: the one it serves while it has its next
    /// line ready, else the first (oldest batch) of its conversations that has.
    fn conv_for(
        &self,
        lane: usize,
        dispatching: &impl Fn(BatchId) -> bool,
    ) -> Option<(BatchId, ConvId)> {
        let lanes = self.lanes.len() as u32;
        if let Some((b, id)) = self.conv_lanes[lane]
            && dispatching(b)
            && self
                .conv_batches
                .get(&b)
                .and_then(|x| x.convs.get(&id))
                .and_then(Conv::available)
                .is_some()
        {
            return Some((b, id));
        }
        self.conv_batches
            .iter()
            .filter(|(b, _)| dispatching(**b))
            .find_map(|(b, x)| {
                x.convs
                    .iter()
                    .find(|(id, c)| id.1 % lanes == lane as u32 && c.available().is_some())
                    .map(|(id, _)| (*b, *id))
            })
    }

    /// Whether the lane has a conversation's line in flight.
    fn conv_busy(&self, lane: usize) -> bool {
        self.conv_lanes[lane].is_some_and(|(b, id)| {
            self.conv_batches
                .get(&b)
                .and_then(|x| x.convs.get(&id))
                .is_some_and(|c| c.busy)
        })
    }

    /// Its policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Lanes in all.
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Records the group of a line (before it is pushed). Under [`Policy::Fifo`] every line is
    /// in one queue per batch, in input order.
    pub fn register(&mut self, batch: BatchId, line: u32, group: u64) {
        if let Some(b) = self.conv_batches.get_mut(&batch) {
            let n = b.registered.entry(group).or_insert(0);
            let id = (group, *n % b.lanes);
            *n += 1;
            b.of_line.insert(line, id);
            b.convs.entry(id).or_default().lines.push_back(line);
            return;
        }
        let group = if self.policy == Policy::Fifo {
            0
        } else {
            group
        };
        let b = self.batches.entry(batch).or_default();
        b.all_groups.insert(group);
        *b.sizes.entry(group).or_default() += 1;
        match b.main_group {
            None => b.main_group = Some(group),
            Some(g) if g == group => {}
            Some(_) => {
                b.other_groups.insert(line, group);
            }
        }
    }

    fn queue(&mut self, batch: BatchId, line: u32, now: Instant) -> &mut Queue {
        let b = self.batches.entry(batch).or_default();
        let group = b.group_of(line);
        let q = b.queues.entry(group).or_insert_with(|| Queue {
            ready: Lines::default(),
            since: now,
            lanes: 0,
        });
        if q.ready.is_empty() && q.lanes == 0 {
            q.since = now;
        }
        q
    }

    /// A line is ready (new, or back after a retry delay or a rescue): at the end of its queue.
    pub fn push_back(&mut self, batch: BatchId, line: u32, now: Instant) {
        if self.conv_ready(batch, line) {
            return;
        }
        self.queue(batch, line, now).ready.push_back(line);
    }

    /// A line given back without being tried (backend down, shutdown): at the front.
    pub fn push_front(&mut self, batch: BatchId, line: u32, now: Instant) {
        if self.conv_ready(batch, line) {
            return;
        }
        self.queue(batch, line, now).ready.push_front(line);
    }

    /// Drops a batch's ready lines (cancelled, expiring); its groups stay known.
    pub fn clear(&mut self, batch: BatchId) {
        if let Some(b) = self.conv_batches.get_mut(&batch) {
            b.convs.values_mut().for_each(|c| c.ready.clear());
        }
        if let Some(b) = self.batches.get_mut(&batch) {
            for q in b.queues.values_mut() {
                q.ready.clear();
            }
        }
    }

    /// Forgets a finished batch.
    pub fn forget(&mut self, batch: BatchId) {
        self.batches.remove(&batch);
        self.conv_batches.remove(&batch);
        for lane in self.conv_lanes.iter_mut() {
            if lane.is_some_and(|(b, _)| b == batch) {
                *lane = None;
            }
        }
        for lane in self.lanes.iter_mut() {
            if lane.is_some_and(|(b, _)| b == batch) {
                *lane = None;
            }
        }
    }

    /// Prefix groups of a batch (1 under [`Policy::Fifo`], which does not tell them apart).
    pub fn groups(&self, batch: BatchId) -> usize {
        if let Some(b) = self.conv_batches.get(&batch) {
            return b.registered.len();
        }
        self.batches
            .get(&batch)
            .map(|b| b.all_groups.len())
            .unwrap_or(0)
    }

    /// Ready lines of a batch.
    pub fn ready(&self, batch: BatchId) -> usize {
        if let Some(b) = self.conv_batches.get(&batch) {
            return b.convs.values().map(|c| c.ready.len()).sum();
        }
        self.batches
            .get(&batch)
            .map(|b| b.queues.values().map(|q| q.ready.len()).sum())
            .unwrap_or(0)
    }

    /// Whether any batch that `dispatching` accepts has a ready line.
    pub fn any_ready(&self, dispatching: impl Fn(BatchId) -> bool) -> bool {
        self.batches
            .iter()
            .any(|(id, b)| dispatching(*id) && b.queues.values().any(|q| !q.ready.is_empty()))
            || self.conv_batches.iter().any(|(id, b)| {
                dispatching(*id) && b.convs.values().any(|c| c.available().is_some())
            })
    }

    /// The lane now serves `to` (counts move from its old queue).
    fn assign(&mut self, lane: usize, to: (BatchId, u64)) {
        if self.lanes[lane] == Some(to) {
            return;
        }
        if let Some((b, g)) = self.lanes[lane]
            && let Some(q) = self.batches.get_mut(&b).and_then(|x| x.queues.get_mut(&g))
        {
            q.lanes = q.lanes.saturating_sub(1);
        }
        if let Some(q) = self
            .batches
            .get_mut(&to.0)
            .and_then(|x| x.queues.get_mut(&to.1))
        {
            q.lanes += 1;
        }
        self.lanes[lane] = Some(to);
    }

    fn take(&mut self, lane: usize, at: (BatchId, u64), now: Instant) -> Option<(BatchId, u32)> {
        self.assign(lane, at);
        let q = self.batches.get_mut(&at.0)?.queues.get_mut(&at.1)?;
        let line = q.ready.pop_front()?;
        q.since = now;
        Some((at.0, line))
    }

    /// The queue no lane has served for `starve_after` that has waited longest, if any.
    fn starved(
        &self,
        now: Instant,
        dispatching: &impl Fn(BatchId) -> bool,
    ) -> Option<(BatchId, u64)> {
        self.batches
            .iter()
            .filter(|(id, _)| dispatching(**id))
            .flat_map(|(id, b)| b.queues.iter().map(move |(g, q)| ((*id, *g), q)))
            .filter(|(_, q)| {
                !q.ready.is_empty()
                    && q.lanes == 0
                    && now.saturating_duration_since(q.since) >= self.starve_after
            })
            .min_by_key(|(_, q)| q.since)
            .map(|(at, _)| at)
    }

    /// Whether a queue has ready lines.
    fn has_ready(&self, (b, g): (BatchId, u64)) -> bool {
        self.batches
            .get(&b)
            .and_then(|x| x.queues.get(&g))
            .is_some_and(|q| !q.ready.is_empty())
    }

    /// The next line for `lane` (`idle`: it holds no lease now), of a batch `dispatching`
    /// accepts; `None` when the lane should stay idle (or finish what it holds first).
    pub fn next(
        &mut self,
        lane: usize,
        now: Instant,
        idle: bool,
        dispatching: impl Fn(BatchId) -> bool,
    ) -> Option<(BatchId, u32)> {
        let lane = lane.min(self.lanes.len() - 1);
        // A conversation's line runs alone on its lane.
        if self.conv_busy(lane) {
            return None;
        }
        // Beside conversations (which a lane would otherwise always continue), a starved queue
        // is taken first, and its lane keeps it until it is empty.
        if self.rescuing[lane] {
            match self.lanes[lane] {
                Some(at) if dispatching(at.0) && self.has_ready(at) => {
                    return self.take(lane, at, now);
                }
                _ => self.rescuing[lane] = false,
            }
        }
        if self.policy == Policy::Affine
            && !self.conv_batches.is_empty()
            && let Some(at) = self.starved(now, &dispatching)
        {
            self.rescuing[lane] = true;
            return self.take(lane, at, now);
        }
        // A conversation to continue comes next.
        if let Some((b, id)) = self.conv_for(lane, &dispatching) {
            if !idle {
                return None;
            }
            let c = self.conv_batches.get_mut(&b)?.convs.get_mut(&id)?;
            let line = c.available()?;
            c.busy = true;
            c.ready.remove(&line);
            self.conv_lanes[lane] = Some((b, id));
            // It no longer serves an independent queue.
            if let Some((qb, g)) = self.lanes[lane].take()
                && let Some(q) = self.batches.get_mut(&qb).and_then(|x| x.queues.get_mut(&g))
            {
                q.lanes = q.lanes.saturating_sub(1);
            }
            return Some((b, line));
        }
        if self.policy == Policy::Fifo {
            let at = self.batches.iter().find_map(|(id, b)| {
                (dispatching(*id) && b.queues.values().any(|q| !q.ready.is_empty()))
                    .then_some((*id, 0u64))
            })?;
            return self.take(lane, at, now);
        }
        // A queue nobody has served for too long comes first (the longest wait first).
        if let Some(at) = self.starved(now, &dispatching) {
            return self.take(lane, at, now);
        }
        // Its own queue while it has lines.
        if let Some(at) = self.lanes[lane]
            && dispatching(at.0)
            && self.has_ready(at)
        {
            return self.take(lane, at, now);
        }
        let own_group = self.lanes[lane].map(|(_, g)| g);
        let lanes = self.lanes.len();
        // Batches oldest first: the lane's group there, else a queue no lane serves, else the
        // queue with the most lines per lane if that is worth a cold prefill. A batch that has
        // nothing for this lane leaves it to the next batch (no lane idles while work waits
        // that it may take).
        let has = |q: &Queue| !q.ready.is_empty();
        let (id, pick) = self
            .batches
            .iter()
            .filter(|(id, _)| dispatching(**id))
            .find_map(|(id, b)| {
                own_group
                    .filter(|g| b.queues.get(g).is_some_and(has))
                    .or_else(|| {
                        b.queues
                            .iter()
                            .filter(|(_, q)| has(q) && q.lanes == 0)
                            .max_by_key(|(g, q)| (q.ready.len(), std::cmp::Reverse(**g)))
                            .map(|(g, _)| *g)
                    })
                    .or_else(|| {
                        b.queues
                            .iter()
                            .filter(|(_, q)| {
                                has(q) && q.ready.len() / (q.lanes + 1) >= JOIN_MIN_LINES_PER_LANE
                            })
                            .max_by_key(|(g, q)| {
                                (q.ready.len() / (q.lanes + 1), std::cmp::Reverse(**g))
                            })
                            .map(|(g, _)| *g)
                    })
                    .or_else(|| {
                        // An idle lane with nothing else to do joins a small group (one the
                        // rule above could never spread: a retry batch, a handful of lines):
                        // one cold prefill per lane instead of the lines one after another.
                        let small = JOIN_MIN_LINES_PER_LANE as u32 * lanes as u32;
                        idle.then(|| {
                            b.queues
                                .iter()
                                .filter(|(g, q)| {
                                    has(q) && b.sizes.get(g).is_some_and(|n| *n <= small)
                                })
                                .max_by_key(|(g, q)| (q.ready.len(), std::cmp::Reverse(**g)))
                                .map(|(g, _)| *g)
                        })
                        .flatten()
                    })
                    .map(|g| (*id, g))
            })?;
        self.take(lane, (id, pick), now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: u128) -> BatchId {
        BatchId(uuid::Uuid::from_u128(n))
    }

    #[test]
    fn ready_lines_keep_their_order_as_runs() {
        let mut q = Lines::default();
        let mut model = VecDeque::new();
        // Fresh lines (one run), a gap, a retry at the back, a requeue at the front.
        for line in (1..=1000).chain(1002..=1500) {
            q.push_back(line);
            model.push_back(line);
        }
        assert_eq!(q.runs.len(), 2, "two runs, not 1,499 entries");
        for (back, line) in [(true, 7), (false, 3), (false, 2), (true, 8), (false, 5000)] {
            if back {
                q.push_back(line);
                model.push_back(line);
            } else {
                q.push_front(line);
                model.push_front(line);
            }
        }
        assert_eq!(q.len(), model.len());
        let mut out = Vec::new();
        while let Some(l) = q.pop_front() {
            out.push(l);
        }
        assert_eq!(out, Vec::from(model));
        assert!(q.is_empty() && q.runs.is_empty());
        q.push_back(u32::MAX);
        q.push_back(0);
        q.push_front(u32::MAX);
        assert_eq!(q.runs.len(), 3, "no run wraps around");
        q.clear();
        assert_eq!((q.len(), q.pop_front()), (0, None));
    }

    /// Registers and pushes lines 1..=n of `b`, line i in group `group(i)`.
    fn fill(s: &mut Scheduler, b: BatchId, n: u32, group: impl Fn(u32) -> u64, now: Instant) {
        for line in 1..=n {
            s.register(b, line, group(line));
            s.push_back(b, line, now);
        }
    }

    /// Drains with `lanes` lanes taking turns; returns per lane the groups it served in order.
    fn drain(s: &mut Scheduler, lanes: usize, group: impl Fn(u32) -> u64) -> Vec<Vec<u64>> {
        let now = Instant::now();
        let mut served = vec![Vec::new(); lanes];
        loop {
            let mut any = false;
            for (lane, seen) in served.iter_mut().enumerate() {
                if let Some((_, line)) = s.next(lane, now, true, |_| true) {
                    any = true;
                    seen.push(group(line));
                }
            }
            if !any {
                return served;
            }
        }
    }

    fn switches(served: &[Vec<u64>]) -> usize {
        served
            .iter()
            .map(|l| 1 + l.windows(2).filter(|w| w[0] != w[1]).count())
            .sum()
    }

    #[test]
    fn one_group_costs_one_prefill_per_lane() {
        let mut s = Scheduler::new(Policy::Affine, 4, Duration::from_secs(30));
        fill(&mut s, batch(1), 400, |_| 7, Instant::now());
        assert_eq!(s.groups(batch(1)), 1);
        let served = drain(&mut s, 4, |_| 7);
        assert_eq!(served.iter().map(Vec::len).sum::<usize>(), 400);
        assert_eq!(switches(&served), 4);
    }

    #[test]
    fn shuffled_groups_keep_each_lane_on_one_group_at_a_time() {
        // 8 groups of 100 lines, shuffled.
        let mut order: Vec<u32> = (1..=800).collect();
        fastrand::Rng::with_seed(8).shuffle(&mut order);
        let group = |line: u32| (line % 8) as u64;
        let mut s = Scheduler::new(Policy::Affine, 4, Duration::from_secs(30));
        let now = Instant::now();
        for &line in &order {
            s.register(batch(1), line, group(line));
            s.push_back(batch(1), line, now);
        }
        assert_eq!(s.groups(batch(1)), 8);
        let served = drain(&mut s, 4, group);
        assert_eq!(served.iter().map(Vec::len).sum::<usize>(), 800);
        // 8 groups need at least 8 cold prefills; a few more at the tail at most.
        let sw = switches(&served);
        assert!((8..=12).contains(&sw), "{sw} switches");
        // Input order would switch on almost every line.
        let mut fifo = Scheduler::new(Policy::Fifo, 4, Duration::from_secs(30));
        for &line in &order {
            fifo.register(batch(1), line, group(line));
            fifo.push_back(batch(1), line, now);
        }
        assert!(switches(&drain(&mut fifo, 4, group)) > 500);
    }

    #[test]
    fn a_starved_queue_is_served_and_then_kept() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Policy::Affine, 2, Duration::from_secs(10));
        fill(&mut s, batch(1), 1000, |_| 1, t0);
        for lane in 0..2 {
            assert_eq!(
                s.next(lane, t0, true, |_| true).map(|x| x.0),
                Some(batch(1))
            );
        }
        fill(&mut s, batch(2), 5, |_| 1, t0);
        // Before the bound: the big batch, first come first served.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(s.next(0, t1, true, |_| true).map(|x| x.0), Some(batch(1)));
        // After: a lane moves to the small batch and stays until it is done.
        let t2 = t0 + Duration::from_secs(11);
        let mut small = 0;
        for _ in 0..5 {
            let got = s.next(0, t2, true, |_| true).expect("work");
            if got.0 == batch(2) {
                small += 1;
            }
            assert_eq!(s.next(1, t2, true, |_| true).map(|x| x.0), Some(batch(1)));
        }
        assert_eq!(small, 5, "lane 0 drained the small batch");
        assert_eq!(s.ready(batch(2)), 0);
    }

    #[test]
    fn not_dispatching_batches_are_skipped_and_requeues_go_back() {
        let now = Instant::now();
        let mut s = Scheduler::new(Policy::Affine, 1, Duration::from_secs(30));
        fill(&mut s, batch(1), 3, |_| 1, now);
        fill(&mut s, batch(2), 3, |_| 2, now);
        assert_eq!(
            s.next(0, now, true, |b| b != batch(1)).map(|x| x.0),
            Some(batch(2))
        );
        let (b, line) = s.next(0, now, true, |_| true).expect("work");
        s.push_front(b, line, now);
        assert_eq!(s.next(0, now, true, |_| true), Some((b, line)));
        s.clear(batch(1));
        assert_eq!(s.ready(batch(1)), 0);
        s.forget(batch(2));
        assert!(!s.any_ready(|_| true));
    }

    #[test]
    fn conversations_run_one_line_at_a_time_on_their_own_lane() {
        let now = Instant::now();
        let mut s = Scheduler::new(Policy::Affine, 2, Duration::from_secs(30));
        let b = batch(1);
        s.conversational(b, 2);
        // Group 1: lines 1, 3, 5, 7; group 2: lines 2, 4, 6.
        fill(&mut s, b, 7, |l| (l % 2) as u64 + 1, now);
        assert_eq!(s.groups(b), 2);
        assert_eq!(s.conversation_of(b, 1), Some((2, 0)));
        assert_eq!(s.conversation_of(b, 3), Some((2, 1)));
        assert_eq!(s.conversation_of(b, 5), Some((2, 0)));
        assert_eq!(s.conversation_of(b, 2), Some((1, 0)));
        assert_eq!(s.conversation_of(b, 4), Some((1, 1)));
        // Lane 0 serves conversations (1, 0) then (2, 0): the first of its own that is ready.
        assert_eq!(s.next(0, now, true, |_| true), Some((b, 2)));
        assert_eq!(s.next(0, now, false, |_| true), None, "one turn at a time");
        assert_eq!(s.next(0, now, true, |_| true), None, "its line still runs");
        assert_eq!(s.next(1, now, true, |_| true), Some((b, 4)));
        s.finished(b, 2);
        assert_eq!(
            s.next(0, now, true, |_| true),
            Some((b, 6)),
            "same conversation"
        );
        // A line given back (backend down, rescue) is the conversation's next turn again.
        s.push_front(b, 6, now);
        assert_eq!(s.next(0, now, true, |_| true), Some((b, 6)));
        s.finished(b, 6);
        // A retry: the line goes back later; meanwhile the lane takes its other conversation.
        assert_eq!(s.next(0, now, true, |_| true), Some((b, 1)));
        s.waiting(b, 1);
        assert_eq!(
            s.next(0, now, true, |_| true),
            None,
            "the conversation waits for its line's retry"
        );
        s.push_back(b, 1, now); // the retry came due
        assert_eq!(s.next(0, now, true, |_| true), Some((b, 1)));
        s.finished(b, 1);
        assert_eq!(s.next(0, now, true, |_| true), Some((b, 5)));
        s.finished(b, 5);
        assert_eq!(
            s.next(0, now, true, |_| true),
            None,
            "lane 0's turns are done"
        );
        assert_eq!(s.ready(b), 2, "lines 3 and 7 on lane 1");
        assert!(s.any_ready(|_| true));
    }

    #[test]
    fn a_lane_with_a_conversation_takes_nothing_else_while_it_runs() {
        let now = Instant::now();
        let mut s = Scheduler::new(Policy::Affine, 1, Duration::from_secs(30));
        fill(&mut s, batch(1), 10, |_| 1, now);
        s.conversational(batch(2), 1);
        fill(&mut s, batch(2), 2, |_| 1, now);
        // The lane holds an independent line: the conversation waits for it to end.
        assert_eq!(s.next(0, now, false, |_| true), None);
        assert_eq!(s.next(0, now, true, |_| true), Some((batch(2), 1)));
        assert_eq!(s.next(0, now, false, |_| true), None);
        s.finished(batch(2), 1);
        assert_eq!(s.next(0, now, true, |_| true), Some((batch(2), 2)));
        s.finished(batch(2), 2);
        assert_eq!(s.next(0, now, false, |_| true).map(|x| x.0), Some(batch(1)));
        // A cancelled conversation batch: nothing of it is ready.
        s.conversational(batch(3), 1);
        fill(&mut s, batch(3), 2, |_| 1, now);
        s.clear(batch(3));
        assert_eq!(s.ready(batch(3)), 0);
        assert_eq!(s.next(0, now, true, |_| true).map(|x| x.0), Some(batch(1)));
        s.forget(batch(3));
        assert_eq!(s.conversation_of(batch(3), 1), None);
    }

    #[test]
    fn a_small_batch_behind_conversations_is_rescued_and_drained() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Policy::Affine, 2, Duration::from_secs(10));
        s.conversational(batch(1), 2);
        fill(&mut s, batch(1), 1000, |_| 1, t0);
        fill(&mut s, batch(2), 4, |_| 2, t0);
        // Conversations come first while the small batch has not waited long.
        let (b, line) = s.next(0, t0, true, |_| true).expect("work");
        assert_eq!(b, batch(1));
        s.finished(b, line);
        // Past the bound, the next idle lane takes the small batch and keeps it until empty,
        // though its conversation has its next line ready.
        let t1 = t0 + Duration::from_secs(11);
        let mut small = Vec::new();
        for idle in [true, false, true, true] {
            let (b, line) = s.next(0, t1, idle, |_| true).expect("work");
            assert_eq!(b, batch(2), "line {line}");
            small.push(line);
        }
        assert_eq!(small, [1, 2, 3, 4]);
        assert_eq!(s.next(0, t1, true, |_| true).map(|x| x.0), Some(batch(1)));
    }
}
