//! `manifest.json`: what an output folder holds and how it came to be: the config (no secrets),
//! versions, counts, and every run into the folder with its start, end and exit reason.
//! Rewritten atomically (temp, fsync, rename) at the start, during and at the end of a run.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::dataset::write_atomic;

pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub manifest_version: u32,
    pub tool: Tool,
    pub name: String,
    pub config_path: String,
    /// The config as written, after command-line overrides; only the NAME of a key's variable.
    pub config: Value,
    pub server: Server,
    pub input: Input,
    /// Counts for the current config (requests whose key matches it).
    pub counts: Counts,
    pub completion_tokens: u64,
    /// Every run into this folder, oldest first; the last is this one.
    pub runs: Vec<RunEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Server {
    pub kind: String,
    pub urls: Vec<String>,
    pub version: Option<String>,
    pub model: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Input {
    pub path: String,
    pub rows: u64,
    pub samples_per_prompt: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counts {
    /// Requests the config asks for: rows x samples.
    pub requests: u64,
    /// Found done in the folder at the start of this run.
    pub already_done: u64,
    /// Skipped because they failed before (`--no-retry-failed`).
    pub skipped_failed: u64,
    /// Done by this run.
    pub done: u64,
    /// Failed in this run after all retries.
    pub failed: u64,
    /// Not yet attempted or interrupted.
    pub remaining: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunEntry {
    pub started_at: String,
    pub ended_at: Option<String>,
    /// `running`, `completed`, `completed_with_failures`, `interrupted`, `aborted`, `error`,
    /// or `killed` for a run that never recorded its end (a crash, SIGKILL, power loss).
    pub status: String,
    pub error: Option<String>,
    pub requests: u64,
    pub already_done: u64,
    pub done: u64,
    pub failed: u64,
    pub completion_tokens: u64,
}

impl Manifest {
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        text.push(b'\n');
        write_atomic(path, &text)
    }

    /// The runs of an existing manifest; a run still marked running never finished.
    pub fn prior_runs(path: &Path) -> Vec<RunEntry> {
        let Ok(bytes) = std::fs::read(path) else { return Vec::new() };
        let Ok(v) = serde_json::from_slice::<Value>(&bytes) else { return Vec::new() };
        let runs: Vec<RunEntry> =
            v.get("runs").cloned().and_then(|r| serde_json::from_value(r).ok()).unwrap_or_default();
        runs.into_iter()
            .map(|mut r| {
                if r.status == "running" {
                    r.status = "killed".into();
                }
                r
            })
            .collect()
    }

    pub fn current_run(&mut self) -> Option<&mut RunEntry> {
        self.runs.last_mut()
    }
}
