//! Every change of a request's state, one function per edge of the machine drawn in
//! `domain/request.rs`. Each names the state it expects (and the lease, for edges from
//! `Leased`); the store applies it as one compare-and-swap and refuses it when the record is
//! elsewhere. Nothing else in the crate asks the store to move a request (`tests/boundaries.rs`
//! checks that only this file calls `transition_request`).
//!
//! | edge | from → to | who asks |
//! |---|---|---|
//! | [`lease`] | Queued → Leased (lease + 1, attempts + 1) | the loop, filling a lane |
//! | [`settle`] | Leased → Succeeded / Failed (the call's result) | an outcome: success, permanent failure, attempts used up |
//! | [`retry`] | Leased → Queued, not before a time (attempt kept) | an outcome: transient failure |
//! | [`give_back`] | Leased → Queued (attempt given back) | an outcome: backend unreachable; graceful shutdown |
//! | [`defer`] | Leased → Queued, not before a time (attempt given back) | an outcome: the backend is full (429 / 503) |
//! | [`rescue`] | Leased → Queued (attempt kept) | a lease past its deadline; start-up recovery |
//! | [`fail`] | Leased → Failed (our error, no answer) | an unusable stored body; start-up recovery after too many interrupted tries |
//! | [`reuse`] | Queued → Succeeded (an identical request's answer, no call) | the loop, filling a lane with a line of a batch that reuses answers |

use crate::conversation::Record as ConvRecord;
use crate::domain::{RequestKey, RequestRecord, ResultRecord, Transition};
use crate::store::{Store, TransitionError};

/// What a transition returns: the record as it now is.
pub type Moved = Result<RequestRecord, TransitionError>;

/// `Queued → Leased`: a new lease number and one more attempt.
pub fn lease(store: &Store, key: RequestKey) -> Moved {
    store.transition_request(key, &Transition::Lease)
}

/// `Leased → Succeeded` (or `Failed`): the call's result is stored. A conversation's success is
/// stored in the same transaction as its conversation's record (`conversation`: which one, and
/// the record that now holds this line).
pub fn settle(
    store: &Store,
    key: RequestKey,
    lease: u32,
    succeeded: bool,
    result: ResultRecord,
    conversation: Option<((u64, u32), &ConvRecord)>,
) -> Moved {
    let t = Transition::Settle {
        lease,
        succeeded,
        result,
    };
    match conversation {
        Some((conv, record)) => store.transition_request_in_conversation(key, &t, conv, record),
        None => store.transition_request(key, &t),
    }
}

/// `Leased → Queued` after a transient failure: not sent again before `due_ms` (unix ms, so a
/// restart neither resets nor skips the wait); the attempt stays counted.
pub fn retry(store: &Store, key: RequestKey, lease: u32, due_ms: u64, error: String) -> Moved {
    store.transition_request(
        key,
        &Transition::Retry {
            lease,
            due_ms,
            error,
        },
    )
}

/// `Leased → Queued` with the attempt given back: the call never reached a working backend
/// (unreachable), or a graceful shutdown ended it.
pub fn give_back(store: &Store, key: RequestKey, lease: u32, error: Option<String>) -> Moved {
    store.transition_request(key, &Transition::GiveBack { lease, error })
}

/// `Leased → Queued` not before `due_ms` (unix ms), with the attempt given back: the backend
/// answered that it is full.
pub fn defer(store: &Store, key: RequestKey, lease: u32, due_ms: u64, error: String) -> Moved {
    store.transition_request(
        key,
        &Transition::Defer {
            lease,
            due_ms,
            error,
        },
    )
}

/// `Leased → Queued` with the attempt kept: the lease outlived its deadline, or the process
/// that held it died (then `error` is `None` and the last error is kept).
pub fn rescue(store: &Store, key: RequestKey, lease: u32, error: Option<&str>) -> Moved {
    store.transition_request(
        key,
        &Transition::Rescue {
            lease,
            error: error.map(str::to_string),
        },
    )
}

/// `Leased → Failed` with our own error and no answer.
pub fn fail(store: &Store, key: RequestKey, lease: u32, result: ResultRecord) -> Moved {
    store.transition_request(key, &Transition::Fail { lease, result })
}

/// `Queued → Succeeded` without a call: `result` is the stored answer of an identical request.
pub fn reuse(store: &Store, key: RequestKey, result: ResultRecord) -> Moved {
    store.transition_request(key, &Transition::Reuse { result })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{BatchId, RequestState};
    use crate::store::StoredBody;

    /// A store holding one queued line.
    fn one_line() -> (tempfile::TempDir, Store, RequestKey) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8 << 20).expect("open");
        let key = RequestKey {
            batch: BatchId::new(),
            line: 1,
        };
        let body = StoredBody {
            json: "{}".into(),
            refs: vec![],
        };
        store
            .put_requests(&[(key, RequestRecord::queued("c".into()), body)])
            .expect("put");
        (dir, store, key)
    }

    /// Each function, as (name, the state it ends in, the call on the current lease).
    type Edge = (
        &'static str,
        RequestState,
        fn(&Store, RequestKey, u32) -> Moved,
    );

    fn edges() -> Vec<Edge> {
        vec![
            ("lease", RequestState::Leased, |s, k, _| lease(s, k)),
            ("settle ok", RequestState::Succeeded, |s, k, l| {
                settle(s, k, l, true, ResultRecord::error("a", "b"), None)
            }),
            ("settle failed", RequestState::Failed, |s, k, l| {
                settle(s, k, l, false, ResultRecord::error("a", "b"), None)
            }),
            ("retry", RequestState::Queued, |s, k, l| {
                retry(s, k, l, 1, "503".into())
            }),
            ("give_back", RequestState::Queued, |s, k, l| {
                give_back(s, k, l, None)
            }),
            ("defer", RequestState::Queued, |s, k, l| {
                defer(s, k, l, 9, "429".into())
            }),
            ("rescue", RequestState::Queued, |s, k, l| {
                rescue(s, k, l, Some("late"))
            }),
            ("fail", RequestState::Failed, |s, k, l| {
                fail(s, k, l, ResultRecord::error("internal_error", "x"))
            }),
            ("reuse", RequestState::Succeeded, |s, k, _| {
                reuse(s, k, ResultRecord::error("a", "b"))
            }),
        ]
    }

    /// Brings the line to `state` through the transitions themselves; its lease number.
    fn bring(store: &Store, key: RequestKey, state: RequestState) -> u32 {
        if state == RequestState::Queued {
            return 0;
        }
        let l = lease(store, key).expect("lease").lease;
        match state {
            RequestState::Succeeded => {
                settle(store, key, l, true, ResultRecord::error("a", "b"), None).expect("settle");
            }
            RequestState::Failed => {
                fail(store, key, l, ResultRecord::error("a", "b")).expect("fail");
            }
            _ => {}
        }
        l
    }

    /// The table: from every state, every edge through the real store, on the current lease
    /// and on a stale one. Allowed: exactly the edges the machine draws.
    #[test]
    fn every_edge_of_the_machine_is_taken_and_every_other_refused() {
        let states = [
            RequestState::Queued,
            RequestState::Leased,
            RequestState::Succeeded,
            RequestState::Failed,
        ];
        for from in states {
            for (name, to, call) in edges() {
                for stale in [false, true] {
                    let (_dir, store, key) = one_line();
                    let current = bring(&store, key, from);
                    let before = store.get_request(key).expect("get").expect("some");
                    let lease = if stale { current + 1 } else { current };
                    let allowed = if name == "lease" || name == "reuse" {
                        from == RequestState::Queued
                    } else {
                        from == RequestState::Leased && !stale
                    };
                    match call(&store, key, lease) {
                        Ok(rec) => {
                            assert!(allowed, "{from:?} --{name} (stale {stale})--> taken");
                            assert_eq!(rec.state, to, "{name}");
                            assert_eq!(
                                store.get_request(key).expect("get").expect("some"),
                                rec,
                                "stored"
                            );
                        }
                        Err(TransitionError::Refused(r)) => {
                            assert!(!allowed, "{from:?} --{name} (stale {stale})--> refused");
                            assert_eq!(r.state, from);
                            assert_eq!(
                                store.get_request(key).expect("get").expect("some"),
                                before,
                                "a refused edge changes nothing"
                            );
                        }
                        Err(e) => panic!("{name}: {e}"),
                    }
                }
            }
        }
    }

    #[test]
    fn attempts_follow_the_edge() {
        let (_dir, store, key) = one_line();
        let l = lease(&store, key).expect("lease").lease;
        let r = give_back(&store, key, l, Some("unreachable".into())).expect("give back");
        assert_eq!(r.attempts, 0, "given back");
        let l = lease(&store, key).expect("lease").lease;
        let r = retry(&store, key, l, 42, "HTTP 503".into()).expect("retry");
        assert_eq!(
            (r.attempts, r.not_before_ms),
            (1, 42),
            "kept, with its time"
        );
        let l = lease(&store, key).expect("lease").lease;
        let r = rescue(&store, key, l, Some("late")).expect("rescue");
        assert_eq!(r.attempts, 2, "kept");
        assert_eq!(r.lease, 3, "lease numbers never go back");
    }
}
