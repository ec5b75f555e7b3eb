//! All integration tests in one binary: each suite links the whole engine
//! (candle, the language detector's models, arrow), so one link instead of
//! eight saves minutes and gigabytes on a small CI machine.
//! Run one suite with `cargo test --test it engagement_grpc::`.

mod common;

mod cli;
mod encoder;
mod engine;
mod engagement_grpc;
mod health_reflection;
mod intent_grpc;
mod metrics;
mod models;
mod score_cli;
mod summarize_grpc;
