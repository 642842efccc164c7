//! Conversation mode: the policy of a conversation's history. Pure (no I/O, no store): the
//! supervisor keeps the records, writes them, and asks this module what the next call carries.
//!
//! A batch in conversation mode (metadata `"mode": "conversation"`, or `--mode conversation`)
//! runs each prefix group as `lanes` conversations: line *i* of a group (in input order) belongs
//! to conversation *i mod lanes*, and a conversation sends its lines one after another, each as
//! one more turn of a growing chat:
//!
//! ```text
//! system prompt (the group's shared prefix)
//! user turn of an earlier line, its answer as the assistant turn   ┐ the history: the lines
//! …                                                                ┘ it holds, oldest first
//! this line's own turn (its messages after the system prompt)
//! ```
//!
//! Only a success enters the history; a failed turn never does. After each success the
//! conversation's [`Record`] (which lines the history holds, and the real token counts the
//! backend reported) is written in the same transaction as the line's result, so after a crash
//! the next call of a conversation is built from exactly the history it would have had.
//!
//! **Trimming.** The history grows turn by turn, so every call reuses the previous call's
//! prompt from the slot's cache. Before a call, [`prepare`] predicts its size from the real
//! count of the last call (prompt + answer tokens) plus this turn (its bytes at the highest
//! tokens-per-byte seen, plus 25 %) plus the answer's reserve (the line's `max_tokens`, or
//! twice the longest answer so far, at least [`MIN_RESERVE`]). When that would pass the budget
//! (`num_ctx` less 10 %), or the history would pass 2.5 × `keep` messages (the prototype's
//! "every 50 requests" for `keep` = 40), the oldest turns are cut until at most `keep`
//! messages remain and the history takes at most half of what the budget leaves beside the
//! system prompt, the turn and its answer. Cutting back deep, rather than one turn at a time,
//! keeps most calls incremental for the prompt cache.

use serde::{Deserialize, Serialize};

/// Tokens kept for the answer when the line sets no `max_tokens` and no answer was seen yet.
pub const MIN_RESERVE: u32 = 256;

/// Tokens per KiB of text assumed before the backend has reported any (a conservative 0.5
/// tokens per byte: English runs near 0.25).
const DEFAULT_TOKENS_PER_KB: u32 = 512;

/// A batch's conversation settings, fixed when the supervisor first takes it on (and stored),
/// so that a restart with other flags runs it the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Conversations per prefix group (the lanes when the batch was taken on).
    pub lanes: u32,
    /// Messages kept after a cut (the prototype's 40).
    pub keep_messages: u32,
    /// The context of one call, in tokens (`--num-ctx`).
    pub num_ctx: u32,
}

impl Plan {
    /// Tokens a call may use: the context less a 10 % margin (at least 32 tokens).
    pub fn budget(&self) -> u32 {
        self.num_ctx - (self.num_ctx / 10).max(32).min(self.num_ctx / 2)
    }

    /// Messages the history may grow to before it is cut back to `keep_messages`.
    pub fn max_messages(&self) -> u32 {
        self.keep_messages.saturating_mul(5) / 2
    }
}

/// One line in a conversation's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Its line number (its turn and answer are read from the store).
    pub line: u32,
    /// Messages it adds: its own turn's messages and the answer.
    pub messages: u32,
    /// Tokens it adds (its turn and answer), from the backend's counts.
    pub tokens: u32,
}

/// A conversation's state after its last success: what the next call carries before its own
/// turn.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The lines whose turns and answers the history holds, oldest first.
    pub history: Vec<Entry>,
    /// Tokens of the system prompt and the history: the last call's prompt + answer tokens as
    /// the backend counted them, less the turns cut since. 0 before the first success.
    pub context_tokens: u32,
    /// The highest tokens per KiB of turn text seen (0: none yet).
    pub tokens_per_kb: u32,
    /// The longest answer so far, in tokens.
    pub max_answer_tokens: u32,
    /// Successful turns so far.
    pub turns: u64,
}

/// What one call of a conversation carries: the history after the cut, and the numbers
/// [`Record::after`] needs when it succeeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Turn {
    /// The history the call carries (the record's, oldest turns cut).
    pub history: Vec<Entry>,
    /// Tokens of the system prompt and that history (estimated after a cut).
    pub context_before: u32,
    /// Whether this is the conversation's first success-to-be (its prompt is the system prompt
    /// and this turn only, with nothing measured before).
    pub first: bool,
    /// Messages of the line's own turn.
    pub turn_messages: u32,
    /// Bytes of the line's own turn and of the system prompt.
    pub turn_bytes: u64,
    /// Bytes of the system prompt.
    pub prefix_bytes: u64,
}

impl Record {
    fn messages(&self) -> u32 {
        self.history.iter().map(|e| e.messages).sum()
    }

    /// Tokens per KiB of turn text: the highest seen, or the conservative default before any.
    fn rate(&self) -> u64 {
        match self.tokens_per_kb {
            0 => DEFAULT_TOKENS_PER_KB as u64,
            n => n as u64,
        }
    }

    /// The record after `turn` succeeded for `line`, with the backend's (prompt, answer) token
    /// counts (`None`: it gave none; then the bytes are counted at the highest rate seen).
    pub fn after(&self, turn: &Turn, line: u32, counts: Option<(u64, u64)>) -> Record {
        let clamp = |n: u64| n.min(u32::MAX as u64) as u32;
        let mut next = Record {
            history: turn.history.clone(),
            context_tokens: self.context_tokens,
            tokens_per_kb: self.tokens_per_kb,
            max_answer_tokens: self.max_answer_tokens,
            turns: self.turns + 1,
        };
        let (own, context) = match counts {
            Some((prompt, answer)) => {
                // The first call's prompt is the system prompt and this turn: split it by bytes.
                let own_prompt = if turn.first {
                    prompt * turn.turn_bytes / (turn.turn_bytes + turn.prefix_bytes).max(1)
                } else {
                    prompt.saturating_sub(turn.context_before as u64)
                };
                let rate = if turn.first {
                    prompt * 1024 / (turn.turn_bytes + turn.prefix_bytes).max(1)
                } else {
                    own_prompt * 1024 / turn.turn_bytes.max(1)
                };
                next.tokens_per_kb = next.tokens_per_kb.max(clamp(rate));
                next.max_answer_tokens = next.max_answer_tokens.max(clamp(answer));
                (clamp(own_prompt + answer), clamp(prompt + answer))
            }
            None => {
                let bytes = turn.turn_bytes + if turn.first { turn.prefix_bytes } else { 0 };
                let own = clamp(bytes * self.rate() / 1024);
                (own, turn.context_before.saturating_add(own))
            }
        };
        next.context_tokens = context;
        next.history.push(Entry {
            line,
            messages: turn.turn_messages + 1,
            tokens: own,
        });
        next
    }
}

/// The call of a line whose own turn has `turn_messages` messages and `turn_bytes` bytes, in a
/// conversation at `record`, keeping `reserve` tokens for the answer: which turns the history
/// keeps (see the module doc).
pub fn prepare(
    record: &Record,
    plan: &Plan,
    turn_messages: u32,
    turn_bytes: u64,
    prefix_bytes: u64,
    reserve: u32,
) -> Turn {
    let own = (turn_bytes * record.rate() / 1024) * 5 / 4 + 1;
    let budget = plan.budget() as u64;
    let fits = |context: u64, messages: u32| {
        context + own + reserve as u64 <= budget && messages + turn_messages <= plan.max_messages()
    };
    let mut context = record.context_tokens as u64;
    let mut messages = record.messages();
    let mut history: u64 = record.history.iter().map(|e| e.tokens as u64).sum();
    // What the history may take after a cut: half of what the budget leaves beside the system
    // prompt, this turn and its answer.
    let room = budget.saturating_sub(context.saturating_sub(history) + own + reserve as u64) / 2;
    let mut cut = 0;
    if !fits(context, messages) {
        while cut < record.history.len()
            && !(messages <= plan.keep_messages && history <= room && fits(context, messages))
        {
            let e = record.history[cut];
            context = context.saturating_sub(e.tokens as u64);
            history = history.saturating_sub(e.tokens as u64);
            messages -= e.messages;
            cut += 1;
        }
    }
    Turn {
        history: record.history[cut..].to_vec(),
        context_before: context.min(u32::MAX as u64) as u32,
        first: record.context_tokens == 0,
        turn_messages,
        turn_bytes,
        prefix_bytes,
    }
}

/// Tokens to keep for the answer: the line's own limit (`max_completion_tokens`, `max_tokens`,
/// Ollama's `options.num_predict`), else twice the longest answer so far, at least
/// [`MIN_RESERVE`].
pub fn reserve(body: &serde_json::Value, record: &Record) -> u32 {
    ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| body.get(*k).and_then(serde_json::Value::as_u64))
        .or_else(|| body["options"]["num_predict"].as_u64())
        .map(|n| n.min(u32::MAX as u64) as u32)
        .unwrap_or_else(|| record.max_answer_tokens.saturating_mul(2).max(MIN_RESERVE))
}

/// Bytes of text in messages (contents, and the rest of each message as JSON when not a
/// string).
pub fn bytes(messages: &[serde_json::Value]) -> u64 {
    messages
        .iter()
        .map(|m| match m.get("content") {
            Some(serde_json::Value::String(s)) => s.len() as u64 + 8,
            Some(other) => other.to_string().len() as u64 + 8,
            None => m.to_string().len() as u64,
        })
        .sum()
}

pub use crate::domain::prefix_len;

/// The assistant message of a chat completion's answer body (its `choices[0].message`, with
/// only role and content kept), for the history.
pub fn answer_message(body: &str) -> serde_json::Value {
    let content = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v["choices"][0]["message"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .unwrap_or_default();
    serde_json::json!({"role": "assistant", "content": content})
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: Plan = Plan {
        lanes: 2,
        keep_messages: 40,
        num_ctx: 4096,
    };

    fn grow(record: &Record, line: u32, prompt: u64, answer: u64) -> (Turn, Record) {
        let turn = prepare(record, &PLAN, 1, 400, 4000, 64);
        let next = record.after(&turn, line, Some((prompt, answer)));
        (turn, next)
    }

    #[test]
    fn the_first_turn_splits_its_prompt_by_bytes_and_later_turns_are_measured() {
        let r = Record::default();
        let (t, r1) = grow(&r, 1, 1100, 20);
        assert!(t.first && t.history.is_empty());
        // 400 of 4400 bytes: 100 of the 1100 prompt tokens are the turn's own.
        assert_eq!(
            r1.history,
            vec![Entry {
                line: 1,
                messages: 2,
                tokens: 120
            }]
        );
        assert_eq!(r1.context_tokens, 1120);
        assert_eq!(r1.tokens_per_kb, 1100 * 1024 / 4400);
        // The second call carries 1120 and measured 1230: its own turn is 110 tokens.
        let (t2, r2) = grow(&r1, 3, 1230, 30);
        assert!(!t2.first);
        assert_eq!(t2.context_before, 1120);
        assert_eq!(
            r2.history[1],
            Entry {
                line: 3,
                messages: 2,
                tokens: 140
            }
        );
        assert_eq!(r2.context_tokens, 1260);
        assert_eq!(r2.max_answer_tokens, 30);
        assert_eq!(r2.turns, 2);
    }

    #[test]
    fn the_history_is_cut_back_deep_when_the_next_call_would_not_fit() {
        // 30 turns of 120 tokens on a 1000-token prompt: 4600 tokens, past the 3687 budget.
        let record = Record {
            history: (1..=30)
                .map(|line| Entry {
                    line,
                    messages: 2,
                    tokens: 120,
                })
                .collect(),
            context_tokens: 1000 + 30 * 120,
            tokens_per_kb: 256,
            max_answer_tokens: 20,
            turns: 30,
        };
        let t = prepare(&record, &PLAN, 1, 400, 4000, 64);
        // The system prompt is 1000 tokens, the turn 126 and its answer 64: the history may
        // keep half of the 2497 left, 1248: 10 turns.
        assert_eq!(t.history.len(), 10);
        assert_eq!(t.history[0].line, 21, "the most recent turns stay");
        assert_eq!(t.context_before, 2200);
        assert!(t.context_before as u64 + 64 + 126 <= PLAN.budget() as u64);
    }

    #[test]
    fn a_history_under_the_budget_is_kept_whole_until_it_passes_two_and_a_half_keeps() {
        let mut record = Record {
            history: (1..=49)
                .map(|line| Entry {
                    line,
                    messages: 2,
                    tokens: 10,
                })
                .collect(),
            context_tokens: 500 + 490,
            tokens_per_kb: 256,
            max_answer_tokens: 5,
            turns: 49,
        };
        // 98 messages + 1 = 99 ≤ 100: no cut (the cache keeps serving the whole prefix).
        assert_eq!(prepare(&record, &PLAN, 1, 100, 4000, 64).history.len(), 49);
        record.history.push(Entry {
            line: 50,
            messages: 2,
            tokens: 10,
        });
        record.context_tokens += 10;
        let t = prepare(&record, &PLAN, 1, 100, 4000, 64);
        assert_eq!(t.history.len(), 20, "cut back to the last 40 messages");
        assert_eq!(t.history[0].line, 31);
        assert_eq!(t.context_before, 500 + 200);
    }

    #[test]
    fn a_turn_too_large_for_any_history_is_sent_alone() {
        let record = Record {
            history: vec![Entry {
                line: 1,
                messages: 2,
                tokens: 100,
            }],
            context_tokens: 1100,
            tokens_per_kb: 1024,
            max_answer_tokens: 5,
            turns: 1,
        };
        let t = prepare(&record, &PLAN, 1, 8000, 4000, 64);
        assert!(t.history.is_empty());
        assert_eq!(t.context_before, 1000);
    }

    #[test]
    fn without_counts_the_bytes_are_counted_at_the_rate_seen() {
        let r = Record::default();
        let t = prepare(&r, &PLAN, 1, 1024, 1024, 64);
        let r1 = r.after(&t, 1, None);
        assert_eq!(
            r1.history[0].tokens, 1024,
            "2 KiB at the default 512 per KiB"
        );
        assert_eq!(r1.context_tokens, 1024);
        assert_eq!(r1.tokens_per_kb, 0, "nothing was measured");
    }

    #[test]
    fn the_reserve_is_the_lines_limit_else_twice_the_longest_answer() {
        let r = Record {
            max_answer_tokens: 300,
            ..Record::default()
        };
        assert_eq!(reserve(&serde_json::json!({"max_tokens": 50}), &r), 50);
        assert_eq!(
            reserve(
                &serde_json::json!({"max_completion_tokens": 70, "max_tokens": 50}),
                &r
            ),
            70
        );
        assert_eq!(reserve(&serde_json::json!({}), &r), 600);
        assert_eq!(
            reserve(&serde_json::json!({}), &Record::default()),
            MIN_RESERVE
        );
    }

    #[test]
    fn answers_and_prefixes_are_read_from_chat_shapes() {
        let m = answer_message(r#"{"choices":[{"message":{"role":"assistant","content":"7"}}]}"#);
        assert_eq!(m, serde_json::json!({"role": "assistant", "content": "7"}));
        assert_eq!(answer_message("not json")["content"], "");
        let ms = vec![
            serde_json::json!({"role": "system", "content": "a"}),
            serde_json::json!({"role": "developer", "content": "b"}),
            serde_json::json!({"role": "user", "content": "c"}),
        ];
        assert_eq!(prefix_len(&ms), 2);
        assert_eq!(bytes(&ms[2..]), 9);
    }
}
