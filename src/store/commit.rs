//! The one owner of every flush.
//!
//! sled 0.34.7 (its last release) deadlocks when `flush_async` runs concurrently (sled issue
//! #1308, fixed on sled's main branch, never released): each call parks one of sled's pool
//! threads in `make_stable_inner`, waiting for log writes that are queued on the same pool.
//! Parallel API writes hit it and then hung the whole server. The rule here: **nothing calls
//! sled's `flush` or `flush_async` except this thread**. Callers register and wait; the
//! thread takes every request that is waiting, runs one blocking `Db::flush` (which covers
//! every write made before the requests were registered), and answers them all: a group
//! commit. With nothing to answer it still flushes every 500 ms, in place of sled's own
//! background flusher, which the store turns off, so at most one flush runs at any time.

use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;
use tokio::sync::oneshot;

/// How one waiter is answered.
enum Reply {
    Async(oneshot::Sender<Result<(), sled::Error>>),
    Blocking(mpsc::SyncSender<Result<(), sled::Error>>),
}

impl Reply {
    fn send(self, r: Result<(), sled::Error>) {
        // A waiter that went away (a dropped future) needs no answer.
        match self {
            Reply::Async(tx) => {
                let _ = tx.send(r);
            }
            Reply::Blocking(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

/// The handle callers use; the thread stops when the last handle is dropped.
pub(super) struct Committer {
    /// The first failed flush: sled keeps an I/O error for good (its "global error"), so from
    /// then on nothing can be made durable until the store is opened again.
    pub(super) failure: Arc<Mutex<Option<String>>>,
    tx: Option<mpsc::Sender<Reply>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Committer {
    /// Stops the thread after its final flush and waits for it, so that the database is closed
    /// (and its lock released) when the store is dropped.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Background flush period when nobody asks.
const IDLE_FLUSH: Duration = Duration::from_millis(500);

impl Committer {
    /// Starts the flushing thread for `db`.
    pub(super) fn start(db: sled::Db) -> std::io::Result<Committer> {
        let (tx, rx) = mpsc::channel::<Reply>();
        let failure = Arc::new(Mutex::new(None));
        let seen = failure.clone();
        let thread = std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || run(db, rx, seen))?;
        Ok(Committer {
            failure,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn sender(&self) -> Result<&mpsc::Sender<Reply>, sled::Error> {
        self.tx.as_ref().ok_or_else(stopped)
    }

    /// A write outside sled (a results file) failed: from now on the store is failed, as after
    /// a failed flush (nothing more is made durable until a restart; dispatch stops).
    pub(super) fn fail(&self, e: String) {
        record_failure(&self.failure, e);
    }

    /// Waits (blocking) for a flush that started after this call.
    pub(super) fn flush(&self) -> Result<(), sled::Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.sender()?
            .send(Reply::Blocking(tx))
            .map_err(|_| stopped())?;
        rx.recv().unwrap_or_else(|_| Err(stopped()))
    }

    /// Waits (async) for a flush that started after this call.
    pub(super) async fn flush_async(&self) -> Result<(), sled::Error> {
        let (tx, rx) = oneshot::channel();
        self.sender()?
            .send(Reply::Async(tx))
            .map_err(|_| stopped())?;
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// Keeps the first failure for good (and says it once).
fn record_failure(failure: &Mutex<Option<String>>, e: String) {
    let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
    if f.is_none() {
        tracing::error!(error = %e, "the store cannot write (disk full or I/O error): nothing more can be made durable until ollama-batch is restarted; dispatch stops");
        *f = Some(e);
    }
}

fn stopped() -> sled::Error {
    sled::Error::ReportableBug("the store's commit thread stopped".into())
}

fn run(db: sled::Db, rx: mpsc::Receiver<Reply>, failure: Arc<Mutex<Option<String>>>) {
    loop {
        let first = match rx.recv_timeout(IDLE_FLUSH) {
            Ok(r) => Some(r),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut waiting: Vec<Reply> = first.into_iter().collect();
        waiting.extend(rx.try_iter());
        // After a failure sled keeps its error, and a flush may then wait for ever: answer with
        // the error at once.
        let known = failure.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(e) = known {
            for w in waiting {
                w.send(Err(sled::Error::Io(std::io::Error::other(e.clone()))));
            }
            continue;
        }
        let r = db.flush().map(|_| ());
        if let Err(e) = &r {
            record_failure(&failure, e.to_string());
        }
        for w in waiting {
            w.send(r.clone());
        }
    }
    // Last handle gone: one final flush so that a clean stop leaves nothing behind; none after a
    // failure (sled keeps the error, and a flush can then wait for ever).
    let failed = failure.lock().map(|f| f.is_some()).unwrap_or(true);
    if !failed {
        let _ = db.flush();
    }
}
