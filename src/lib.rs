//! data_generator: turn prompt batches into training datasets by streaming completions from a
//! local LLM server. The binary (`src/bin/data_generator`) is a thin layer over these modules,
//! one per noun.

pub mod attempt;
pub mod backend;
pub mod config;
pub mod dataset;
pub mod endpoints;
pub mod export;
pub mod framing;
pub mod index;
pub mod input;
pub mod live;
pub mod inspect;
pub mod manifest;
pub mod merge;
pub mod plan;
pub mod progress;
pub mod record;
pub mod request;
pub mod resume;
pub mod schema;
pub mod sse;
pub mod stages;
pub mod template;
pub mod view;
pub mod web;
