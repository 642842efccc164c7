//! Conversation mode inside the supervisor: builds each call of a conversation from its
//! record and the store, and keeps the records it wrote (a cache: the store has the truth, and
//! after a restart every record is read back from it). The policy (what the history keeps) is
//! `crate::conversation`; which line runs next is `crate::schedule`.

use crate::conversation::{self, Plan, Record, Turn};
use crate::domain::{BatchId, RequestKey, Usage};
use crate::intake;
use crate::schedule::ConvId;
use crate::store::Store;
use serde_json::Value;
use std::collections::HashMap;

/// What a leased line of a conversation carries, kept with its lease until it is answered.
#[derive(Debug)]
pub struct Leased {
    /// Its conversation.
    pub conv: ConvId,
    /// The history it was sent with and the numbers its success is recorded with.
    pub turn: Turn,
    /// The line's own turn (its messages after the system prompt).
    own: Vec<Value>,
}

/// One conversation: its record and the texts of the turns in its history.
#[derive(Debug, Default)]
struct Conv {
    record: Record,
    /// Per line in the history: its turn's messages and its answer as an assistant message.
    texts: HashMap<u32, (Vec<Value>, Value)>,
}

/// The conversations of the batches in conversation mode.
#[derive(Debug, Default)]
pub struct Turns {
    convs: HashMap<(BatchId, ConvId), Conv>,
}

impl Turns {
    fn conv(&mut self, store: &Store, batch: BatchId, id: ConvId) -> Result<&mut Conv, String> {
        use std::collections::hash_map::Entry;
        Ok(match self.convs.entry((batch, id)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => v.insert(Conv {
                record: store
                    .get_conversation(batch, id)
                    .map_err(|e| e.to_string())?
                    .unwrap_or_default(),
                texts: HashMap::new(),
            }),
        })
    }

    /// The body of `key`'s call in conversation `id`: its system prompt, the history the record
    /// keeps (cut by [`conversation::prepare`]), its own turn. Returns it with what its success
    /// will record.
    pub fn prepare(
        &mut self,
        store: &Store,
        key: RequestKey,
        id: ConvId,
        plan: &Plan,
        mut body: Value,
    ) -> Result<(Value, Leased), String> {
        let messages = body
            .get("messages")
            .and_then(Value::as_array)
            .cloned()
            .ok_or("a conversation line needs messages")?;
        let split = conversation::prefix_len(&messages);
        let (prefix, own) = messages.split_at(split);
        let c = self.conv(store, key.batch, id)?;
        let reserve = conversation::reserve(&body, &c.record);
        let turn = conversation::prepare(
            &c.record,
            plan,
            own.len() as u32,
            conversation::bytes(own),
            conversation::bytes(prefix),
            reserve,
        );
        let mut out = prefix.to_vec();
        for e in &turn.history {
            let (msgs, answer) = match c.texts.entry(e.line) {
                std::collections::hash_map::Entry::Occupied(t) => t.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(read_turn(
                    store,
                    RequestKey {
                        batch: key.batch,
                        line: e.line,
                    },
                )?),
            };
            out.extend(msgs.iter().cloned());
            out.push(answer.clone());
        }
        out.extend(own.iter().cloned());
        body["messages"] = Value::Array(out);
        Ok((
            body,
            Leased {
                conv: id,
                turn,
                own: own.to_vec(),
            },
        ))
    }

    /// The conversation's record after `line` succeeded with `usage` (not yet stored).
    pub fn after(
        &self,
        batch: BatchId,
        line: u32,
        leased: &Leased,
        usage: Option<&Usage>,
    ) -> Option<Record> {
        let c = self.convs.get(&(batch, leased.conv))?;
        let counts = usage.map(|u| (u.input_tokens, u.output_tokens));
        Some(c.record.after(&leased.turn, line, counts))
    }

    /// `record` (with `line` answered by `answer`, an answer body) is stored: it is the
    /// conversation's record now.
    pub fn stored(
        &mut self,
        batch: BatchId,
        line: u32,
        leased: Leased,
        answer: &str,
        record: Record,
    ) {
        let Some(c) = self.convs.get_mut(&(batch, leased.conv)) else {
            return;
        };
        c.texts
            .insert(line, (leased.own, conversation::answer_message(answer)));
        c.texts
            .retain(|l, _| record.history.iter().any(|e| e.line == *l));
        c.record = record;
    }

    /// Forgets a finished batch's conversations.
    pub fn forget(&mut self, batch: BatchId) {
        self.convs.retain(|(b, _), _| *b != batch);
    }
}

/// A history line's turn (its messages after the system prompt) and answer, from the store.
fn read_turn(store: &Store, key: RequestKey) -> Result<(Vec<Value>, Value), String> {
    let stored = store
        .get_body(key)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("the body of line {} is missing", key.line))?;
    let body = intake::materialize(store, &stored, None)?;
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let own = messages[conversation::prefix_len(&messages)..].to_vec();
    let answer = store
        .get_request(key)
        .map_err(|e| e.to_string())?
        .and_then(|r| r.result)
        .and_then(|r| r.body)
        .ok_or_else(|| format!("the answer of line {} is missing", key.line))?;
    Ok((own, conversation::answer_message(&answer)))
}
