//! The body codec: a line's body is stored with its long message contents (a system prompt,
//! a rubric) taken out and kept once in `blobs` under their SHA-256, and put back for dispatch.
//! Storing a body also gives the line's prefix group (the model and the leading system /
//! developer messages, `domain::prefix_len`), which the scheduler keeps lanes on.

use crate::store::{Store, StoreError, StoredBody};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Message contents at least this long are stored once, by hash.
pub const SHARED_CONTENT_MIN: usize = 256;

/// Remembers the last few shared contents so a repeated system prompt is compared, not hashed
/// and written again, on every line.
#[derive(Default)]
pub(super) struct SharedContents {
    recent: Vec<(String, [u8; 32])>,
}

impl SharedContents {
    pub(super) fn hash_of(
        &mut self,
        store: &Store,
        content: String,
    ) -> Result<[u8; 32], StoreError> {
        if let Some((_, h)) = self.recent.iter().find(|(c, _)| *c == content) {
            return Ok(*h);
        }
        let h: [u8; 32] = Sha256::digest(content.as_bytes()).into();
        store.put_blob(&h, content.as_bytes())?;
        if self.recent.len() == 8 {
            self.recent.remove(0);
        }
        self.recent.push((content, h));
        Ok(h)
    }
}

/// Takes long message contents out of a chat body and into `blobs`; returns the stored body
/// and the line's prefix group: a hash of the model and the leading system/developer messages
/// (lines with the same group share the prompt prefix a model server can cache).
pub(super) fn store_body(
    store: &Store,
    shared: &mut SharedContents,
    mut body: Value,
) -> Result<(StoredBody, u64), StoreError> {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same group in every process (the value is stored anyway).
    let mut group = std::collections::hash_map::DefaultHasher::new();
    body.get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .hash(&mut group);
    let mut refs = Vec::new();
    if let Some(messages) = body.get_mut("messages").and_then(Value::as_array_mut) {
        let prefix = crate::domain::prefix_len(messages);
        for (i, m) in messages.iter_mut().enumerate() {
            let leading = i < prefix;
            if let Some(content) = m.get_mut("content")
                && content
                    .as_str()
                    .is_some_and(|s| s.len() >= SHARED_CONTENT_MIN)
            {
                let Value::String(text) = content.take() else {
                    continue;
                };
                *content = Value::String(String::new());
                let h = shared.hash_of(store, text)?;
                if leading {
                    h.hash(&mut group);
                }
                refs.push((i as u32, h));
            } else if leading {
                m.to_string().hash(&mut group);
            }
        }
    }
    Ok((
        StoredBody {
            json: body.to_string(),
            refs,
        },
        group.finish(),
    ))
}

/// Rebuilds a line's body for dispatch: shared contents put back, the model mapped.
pub fn materialize(
    store: &Store,
    stored: &StoredBody,
    model: Option<&str>,
) -> Result<Value, String> {
    let mut body: Value =
        serde_json::from_str(&stored.json).map_err(|e| format!("stored body is not JSON: {e}"))?;
    for (idx, hash) in &stored.refs {
        let blob = store
            .get_blob(hash)
            .map_err(|e| e.to_string())?
            .ok_or("a shared content is missing from the store")?;
        let text = String::from_utf8(blob).map_err(|_| "a shared content is not UTF-8")?;
        if let Some(m) = body
            .get_mut("messages")
            .and_then(|ms| ms.get_mut(*idx as usize))
        {
            m["content"] = Value::String(text);
        }
    }
    if let Some(model) = model {
        body["model"] = Value::String(model.to_string());
    }
    Ok(body)
}
