//! palaver: agent assist for helpdesks — multilingual thread summaries over gRPC,
//! on local models.
//!
//! Layers, each with its own error type: `models` (fetching and preparing
//! weights), `llm` (the model thread), `summarize` (the pipeline, no gRPC),
//! `intent` (taxonomies and classification), `sendtime` (engagement store and
//! send windows), `server` (gRPC adapters, admission, health; the one place errors become
//! `tonic::Status`). `metrics` sums what responses report, for Prometheus.

pub mod attend;
pub mod cli;
pub mod config;
pub mod cpu;
pub mod encoder;
pub mod eval;
pub mod intent;
pub mod llm;
pub mod lru;
pub mod metrics;
pub mod models;
pub mod sendtime;
pub mod server;
pub mod summarize;

pub mod proto {
    // Generated: a oneof's variants are as large as their messages.
    #[allow(clippy::large_enum_variant)]
    pub mod v1 {
        tonic::include_proto!("palaver.v1");
    }
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("palaver_descriptor");
}
