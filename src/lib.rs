//! ollama-batch: a durable, OpenAI-compatible Batch API server in front of local model servers
//! (one Ollama or llama.cpp, or several, each with its own slots).
//!
//! ```text
//!  client ──HTTP──▶ api (axum) ──▶ store (sled) ◀── supervisor ──leases──▶ worker ──HTTP──▶ backend
//!                      │  upload, create,    ▲          │  single writer of     │  up to N calls
//!                      │  cancel, status     │          │  request state        │  in flight
//!                      └──── intake ─────────┘          └──◀── outcomes ────────┘
//! ```
//! See `docs/architecture.md` for the data flow and state machines and `docs/guarantees.md`
//! for what is durable when.
#![warn(missing_docs)]

pub mod answer;
pub mod api;
pub mod backend;
pub mod cli;
pub mod client;
pub mod config;
pub mod conversation;
pub mod domain;
pub mod gpu;
pub mod intake;
pub mod live;
pub mod metrics;
pub mod schedule;
pub mod server;
pub mod store;
pub mod supervisor;
pub mod webhook;
pub mod wire;

#[cfg(test)]
mod proptests;
pub mod worker;
