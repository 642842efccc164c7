//! `GET /events`: Server-Sent Events. A `status` event carries the live snapshot (the part of
//! `/status` that needs no store read) when it changed, at most once a second, the first one at
//! once; discrete events (`batch_created`, `batch_validated`, `batch_failed`,
//! `batch_finished`, `backend_down`, `backend_up`, `out_of_memory`) come as they happen; a
//! reader too slow for them gets `lagged` (with how many it missed) and should refetch. Streams
//! end when the server stops, so they never hold up the graceful drain.

use super::AppState;
use super::status::live_snapshot;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

struct Reader {
    st: AppState,
    notices: tokio::sync::broadcast::Receiver<crate::live::Notice>,
    tick: tokio::time::Interval,
    last: Option<String>,
}

/// `GET /events`
pub async fn events(
    State(st): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reader = Reader {
        notices: st.supervisor.notices.subscribe(),
        st: st.clone(),
        tick,
        last: None,
    };
    let stream = futures_util::stream::unfold(reader, |mut r| async move {
        loop {
            tokio::select! {
                _ = r.st.stop.cancelled() => return None,
                _ = r.tick.tick() => {
                    let mut snap = live_snapshot(&r.st);
                    let text = snap.to_string();
                    if r.last.as_deref() == Some(text.as_str()) {
                        continue;
                    }
                    r.last = Some(text);
                    snap["at"] = serde_json::json!(crate::domain::unix_now());
                    let ev = Event::default().event("status").data(snap.to_string());
                    return Some((Ok(ev), r));
                }
                n = r.notices.recv() => {
                    let ev = match n {
                        Ok(n) => {
                            let v = serde_json::to_value(&n).unwrap_or_default();
                            let kind = v["type"].as_str().unwrap_or("event").to_string();
                            Event::default().event(kind).data(v.to_string())
                        }
                        Err(RecvError::Lagged(k)) => Event::default()
                            .event("lagged")
                            .data(serde_json::json!({"missed": k}).to_string()),
                        Err(RecvError::Closed) => return None,
                    };
                    return Some((Ok(ev), r));
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
