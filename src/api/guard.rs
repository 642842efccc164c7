//! Keeps web pages out. A server on the loopback address with no key is reachable by any page
//! the user's browser opens: through DNS rebinding (a page's own host name made to resolve to
//! 127.0.0.1, so that the browser lets it read the answers) and through "simple" cross-site
//! requests (a form upload, a `text/plain` POST, a bodiless cancel), which a browser sends
//! without asking. Ollama had this class of bug and now checks `Host` and origins; so do we:
//!
//! - on a loopback listen address, only requests whose `Host` names this server are served:
//!   `localhost`, a loopback IP literal (`127.0.0.1`, `[::1]`), the listen address, or a name
//!   given with `--allowed-host` (a reverse proxy's); any other name is a rebinding attempt
//!   and gets 403. (On another address the operator chose to be reachable: use `--api-key`.)
//! - a write (any method but GET, HEAD, OPTIONS) that carries an `Origin` is refused with 403
//!   unless that origin is this server itself (the same host and port as `Host`, as the
//!   dashboard's own calls are) or a `--allowed-host` name. Clients that are not browsers
//!   send no `Origin`.
//! - `POST /v1/batches` needs a JSON content type (415 otherwise; the handler's check).

use super::{ApiError, AppState};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The host part of an authority (`host[:port]`, `[v6]:port`), lower-cased.
fn host_of(authority: &str) -> String {
    let a = authority.trim().to_ascii_lowercase();
    if a.starts_with('[') {
        return a
            .split_once(']')
            .map_or(a.clone(), |(h, _)| format!("{h}]"));
    }
    match a.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h.to_string(),
        _ => a,
    }
}

/// Whether `host` (no port) names this server on its loopback address.
fn local_name(host: &str, st: &AppState) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip == st.cfg.listen.ip())
        || extra(host, st)
}

/// A `--allowed-host` name.
fn extra(host: &str, st: &AppState) -> bool {
    st.cfg.allowed_hosts.iter().any(|h| h == host)
}

fn forbidden(message: String) -> Response {
    ApiError {
        status: StatusCode::FORBIDDEN,
        message,
        kind: "permission_error",
        param: None,
    }
    .into_response()
}

/// The middleware; see the module doc.
pub async fn browsers(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if st.cfg.listen.ip().is_loopback()
        && let Some(a) = &authority
        && !local_name(&host_of(a), &st)
    {
        return forbidden(format!(
            "this server answers requests for localhost, not for '{}': a web page may be trying to reach it through DNS rebinding. Behind a reverse proxy, name the proxy's host with --allowed-host",
            crate::domain::clip(a, 100)
        ));
    }
    let write = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if write && let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("null");
        let origin_authority = origin
            .split_once("://")
            .map(|(_, rest)| rest.trim_end_matches('/').to_ascii_lowercase());
        let same = match (&origin_authority, &authority) {
            (Some(o), Some(a)) => *o == a.to_ascii_lowercase(),
            _ => false,
        };
        let allowed = same || origin_authority.is_some_and(|o| extra(&host_of(&o), &st));
        if !allowed {
            return forbidden(format!(
                "a write from the web page at '{}' is refused: only this server's own pages (and --allowed-host names) may change it",
                crate::domain::clip(origin, 100)
            ));
        }
    }
    next.run(req).await
}
