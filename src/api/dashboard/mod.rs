//! The dashboard: one page served from the binary (its three files are in this folder and
//! embedded with `include_str!`; nothing comes from a CDN, it works offline). The page is
//! plain HTML, CSS and JavaScript, no build step: it fetches `/status` and `/v1/batches` once,
//! then follows `/events`. The files carry no data, so they are served without the API key;
//! the page sends the key (`?key=` in its URL) with every call.

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
            ),
            // No page may frame the dashboard (clickjacking its cancel buttons).
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        body,
    )
        .into_response()
}

/// `GET /`
pub async fn index() -> Response {
    file("text/html; charset=utf-8", INDEX)
}

/// `GET /dashboard/{file}`
pub async fn asset(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "app.js" => file("text/javascript; charset=utf-8", SCRIPT),
        "style.css" => file("text/css; charset=utf-8", STYLE),
        _ => super::ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "no dashboard file '{}'",
                name.chars().take(64).collect::<String>()
            ),
            kind: "invalid_request_error",
            param: None,
        }
        .into_response(),
    }
}
