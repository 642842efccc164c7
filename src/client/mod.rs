//! The client layer: subcommands that prepare and analyse work for the server. They use the
//! server only as any client does, over HTTP; the server knows nothing of them.

pub mod analyze;
pub mod bench;
pub mod calibrate;
pub mod csv_to_batch;
pub mod engine;
pub mod http;
pub mod plot;
pub mod retry;
pub mod run;
pub mod term;

pub use term::{note, say};
