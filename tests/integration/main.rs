//! Integration tests: the real `data_generator` binary against a fake Ollama on 127.0.0.1:0.

#[path = "../support/fake_ollama.rs"]
mod fake_ollama;
mod util;

mod browser;
mod errors;
mod faults;
mod inspect;
mod live;
mod memory;
mod overnight;
mod pipeline;
mod real_model;
mod resume;
mod scale;
mod stages;
mod structured;
mod view;
