//! The client layer's one way to talk to a server: the OpenAI Files and Batches endpoints and
//! the extensions outside `/v1`, over HTTP, as any other client would.

use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

/// A server, its key, and one connection pool.
#[derive(Clone)]
pub struct Server {
    base: String,
    key: Option<crate::config::Secret>,
    http: reqwest::Client,
}

impl Server {
    /// A server at `base` (`http://127.0.0.1:4080`).
    pub fn new(base: &str, key: Option<crate::config::Secret>) -> Result<Server, String> {
        let http = crate::backend::http_client(None)?
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
        Ok(Server {
            base: base.trim_end_matches('/').to_string(),
            key,
            http,
        })
    }

    /// Its base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(k) => r.bearer_auth(k.expose()),
            None => r,
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> String {
        format!(
            "cannot reach the server at {}: {e} (is `ollama-batch serve` running there? --server)",
            self.base
        )
    }

    /// Sends (within 60 s), and reads a JSON answer; a non-2xx answer becomes its error message.
    async fn json(&self, req: reqwest::RequestBuilder) -> Result<Value, String> {
        self.answer(req.timeout(Duration::from_secs(60))).await
    }

    /// Sends, and reads a JSON answer; a non-2xx answer becomes its error message.
    async fn answer(&self, req: reqwest::RequestBuilder) -> Result<Value, String> {
        let r = req.send().await.map_err(|e| self.unreachable(e))?;
        let status = r.status();
        let v: Value = r
            .json()
            .await
            .map_err(|e| format!("the server's answer ({status}) is not JSON: {e}"))?;
        if !status.is_success() {
            return Err(format!(
                "{} ({status})",
                v["error"]["message"]
                    .as_str()
                    .unwrap_or("the server refused")
            ));
        }
        Ok(v)
    }

    /// `GET /health` answers `{"status":"ok"}`.
    pub async fn healthy(&self) -> bool {
        let r = self
            .request(reqwest::Method::GET, "/health")
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        match r {
            Ok(r) => r
                .json::<Value>()
                .await
                .is_ok_and(|v| v["status"].as_str() == Some("ok")),
            Err(_) => false,
        }
    }

    /// Uploads a file for batch use, streamed from disk (no size limit here: the server's).
    pub async fn upload(&self, path: &Path, name: &str) -> Result<String, String> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .len();
        let body =
            reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20));
        let part = reqwest::multipart::Part::stream_with_length(body, len)
            .file_name(name.to_string())
            .mime_str("application/jsonl")
            .map_err(|e| e.to_string())?;
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part("file", part);
        // No overall timeout: a large upload takes its time (the server cuts off a stalled one).
        let v = self
            .answer(
                self.request(reqwest::Method::POST, "/v1/files")
                    .multipart(form),
            )
            .await
            .map_err(|e| format!("upload of {name}: {e}"))?;
        v["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| "the upload's answer has no id".to_string())
    }

    /// A GET answered with JSON (`/status/batches/{id}`, …).
    pub async fn json_get(&self, path: &str) -> Result<Value, String> {
        self.json(self.request(reqwest::Method::GET, path)).await
    }

    /// A GET answered with text (`/metrics`).
    pub async fn text(&self, path: &str) -> Result<String, String> {
        let r = self
            .request(reqwest::Method::GET, path)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if !r.status().is_success() {
            return Err(format!("GET {path}: {}", r.status()));
        }
        r.text().await.map_err(|e| format!("GET {path}: {e}"))
    }

    /// `POST /v1/batches`.
    pub async fn create_batch(
        &self,
        file_id: &str,
        endpoint: &str,
        metadata: Value,
    ) -> Result<Value, String> {
        self.json(
            self.request(reqwest::Method::POST, "/v1/batches")
                .json(&json!({
                    "input_file_id": file_id,
                    "endpoint": endpoint,
                    "completion_window": "24h",
                    "metadata": metadata,
                })),
        )
        .await
    }

    /// `GET /v1/batches/{id}`.
    pub async fn batch(&self, id: &str) -> Result<Value, String> {
        self.json(self.request(
            reqwest::Method::GET,
            &format!("/v1/batches/{}", segment(id)),
        ))
        .await
    }

    /// `POST /v1/batches/{id}/cancel`.
    pub async fn cancel(&self, id: &str) -> Result<Value, String> {
        self.json(self.request(
            reqwest::Method::POST,
            &format!("/v1/batches/{}/cancel", segment(id)),
        ))
        .await
    }

    /// `POST /batches/{id}/retry` (an extension).
    pub async fn retry(&self, id: &str) -> Result<Value, String> {
        self.json(self.request(
            reqwest::Method::POST,
            &format!("/batches/{}/retry", segment(id)),
        ))
        .await
    }

    /// The newest batch whose metadata has `key` = `value` and that is not a retry batch (no
    /// `retry_of`: one made by an older server copied its original's metadata), walking
    /// `GET /v1/batches` pages (newest first) until one matches or the list ends.
    pub async fn find_batch(&self, key: &str, value: &str) -> Result<Option<Value>, String> {
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(a) => format!("/v1/batches?limit=100&after={a}"),
                None => "/v1/batches?limit=100".to_string(),
            };
            let page = self.json(self.request(reqwest::Method::GET, &path)).await?;
            let data = page["data"].as_array().cloned().unwrap_or_default();
            if let Some(b) = data.iter().find(|b| {
                b["metadata"][key].as_str() == Some(value) && b["metadata"]["retry_of"].is_null()
            }) {
                return Ok(Some(b.clone()));
            }
            match (page["has_more"].as_bool(), data.last()) {
                (Some(true), Some(last)) => after = last["id"].as_str().map(str::to_string),
                _ => return Ok(None),
            }
            if after.is_none() {
                return Ok(None);
            }
        }
    }

    /// Streams a file's content (`GET /v1/files/{id}/content`) to `dest`, written beside it
    /// first and renamed into place, so `dest` is never half-written.
    pub async fn download(&self, file_id: &str, dest: &Path) -> Result<u64, String> {
        self.download_path(&format!("/v1/files/{}/content", segment(file_id)), dest)
            .await
    }

    /// Streams the body of a GET at `path` to `dest` (atomically, as [`Server::download`]).
    pub async fn download_path(&self, path: &str, dest: &Path) -> Result<u64, String> {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let r = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = r.status();
        if !status.is_success() {
            let v: Value = r.json().await.unwrap_or_default();
            return Err(format!(
                "cannot download {path}: {} ({status})",
                v["error"]["message"].as_str().unwrap_or("refused")
            ));
        }
        let tmp = dest.with_extension("part");
        let mut out = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        let mut stream = r.bytes_stream();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("download of {path} cut off: {e}"))?;
            n += chunk.len() as u64;
            out.write_all(&chunk)
                .await
                .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        }
        out.sync_all()
            .await
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        drop(out);
        tokio::fs::rename(&tmp, dest)
            .await
            .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
        Ok(n)
    }
}

/// `id` as one path segment: every byte but the unreserved ones (`A-Z a-z 0-9 - . _ ~`)
/// percent-encoded, so that an id typed by a user (`../v1/batches/X/cancel?`) can only ever
/// name one object, never another path.
pub fn segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    // `.` and `..` alone are path steps even when encoded by some servers: make them plain
    // text that matches no object.
    if out == "." || out == ".." {
        return out.replace('.', "%2E");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::segment;

    #[test]
    fn ids_stay_one_path_segment() {
        assert_eq!(segment("batch_01abc"), "batch_01abc");
        assert_eq!(
            segment("../v1/batches/batch_1/cancel?"),
            "..%2Fv1%2Fbatches%2Fbatch_1%2Fcancel%3F"
        );
        assert_eq!(segment(".."), "%2E%2E");
        assert_eq!(segment("a b#c"), "a%20b%23c");
    }
}
