//! `manifest.json`: what an output folder holds and how it came to be: the config (no secrets),
//! versions, counts, and every run into the folder with its start, end and exit reason.
//! Rewritten atomically (temp, fsync, rename) at the start, during and at the end of a run.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backend::ServerInfo;
use crate::config::Config;
use crate::dataset::write_atomic;
use crate::plan::Plan;
use crate::record;

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
    /// Multi-stage runs: the counts of each stage, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageCounts>,
    /// Multi-stage runs: the records of `dataset.jsonl` (rows that went through every stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_rows: Option<u64>,
    /// Set by a run that left nothing to do (every request done, none failed): what its answer
    /// depended on (see [`fingerprint`]). While it holds, a re-run has nothing to do, and says so
    /// without reading the input or the dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// What a finished one-stage run's "nothing left to do" depends on, hashed: the tool's version,
/// the config after overrides with its prompt texts and schema, the shard, and the size,
/// modification time and inode of the input and of every file of the output (a file edited,
/// replaced, cut or appended to changes it). None when a file cannot be looked at.
pub fn fingerprint(cfg: &Config, paths: &crate::dataset::OutputPaths) -> Option<String> {
    hash_of(cfg, &[&cfg.input_path, &paths.jsonl, &paths.csv, &paths.failures])
}

/// What the requests the input asks for (their keys, the rows' lines) depend on: [`fingerprint`]
/// without the output files.
pub fn input_fingerprint(cfg: &Config) -> Option<String> {
    hash_of(cfg, &[&cfg.input_path])
}

/// The config (as [`fingerprint`] says) and the size, modification time and inode of `files`, hashed.
fn hash_of(cfg: &Config, files: &[&std::path::PathBuf]) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let mut parts: Vec<Vec<u8>> = vec![
        env!("CARGO_PKG_VERSION").as_bytes().to_vec(),
        serde_json::to_vec(&cfg.raw).ok()?,
        cfg.template.as_bytes().to_vec(),
        cfg.system.clone().unwrap_or_default().into_bytes(),
        cfg.schema.as_ref().map(|s| s.value.to_string()).unwrap_or_default().into_bytes(),
        format!("{:?} {}", cfg.shard, cfg.input_path.display()).into_bytes(),
    ];
    for p in files {
        parts.push(match std::fs::metadata(p) {
            Ok(m) => format!("{} {} {} {} {}", p.display(), m.len(), m.mtime(), m.mtime_nsec(), m.ino()).into_bytes(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => format!("{} none", p.display()).into_bytes(),
            Err(_) => return None,
        });
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let a = record::fnv1a64(&refs);
    let mut salted = vec![b"fingerprint".as_slice()];
    salted.extend(refs);
    let b = record::fnv1a64(&salted);
    Some(format!("{a:016x}{b:016x}"))
}

/// One stage's share of a multi-stage run (the current config's requests).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageCounts {
    pub name: String,
    pub model: String,
    /// Requests the rows that reached the stage asked for.
    pub requested: u64,
    /// Answered by earlier runs (read back, not asked again).
    pub already_done: u64,
    pub skipped_failed: u64,
    /// Answered in this run.
    pub done: u64,
    /// Failed in this run.
    pub failed: u64,
    /// Rows its `keep` stopped.
    pub dropped: u64,
    /// Rows its `explode` made, and replies whose array was empty (the row ended there).
    pub exploded_into: u64,
    pub exploded_empty: u64,
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
    /// The server was the test suite's fake: the text is made up; do not train on it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fake: bool,
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
    /// `running`, `completed`, `completed_with_failures`, `interrupted`, `aborted`, `failed`
    /// (a fatal error, in `error`), or `killed` for a run that never recorded its end (a crash,
    /// SIGKILL, power loss; its counts are then read back from the dataset).
    pub status: String,
    pub error: Option<String>,
    pub requests: u64,
    pub already_done: u64,
    pub done: u64,
    pub failed: u64,
    pub completion_tokens: u64,
}

impl Manifest {
    /// The manifest of a run that starts now, after the `runs` before it in the folder.
    pub fn for_run(cfg: &Config, server: Option<&ServerInfo>, plan: &Plan, runs: Vec<RunEntry>) -> Manifest {
        let mut runs = runs;
        runs.push(RunEntry {
            started_at: record::now_rfc3339(),
            ended_at: None,
            status: "running".into(),
            error: None,
            requests: plan.to_run,
            already_done: plan.already_done,
            done: 0,
            failed: 0,
            completion_tokens: 0,
        });
        Manifest {
            manifest_version: MANIFEST_VERSION,
            tool: Tool { name: env!("CARGO_PKG_NAME").into(), version: env!("CARGO_PKG_VERSION").into() },
            name: cfg.name().to_owned(),
            config_path: cfg.path.display().to_string(),
            config: crate::config::snapshot(cfg),
            server: Server {
                kind: format!("{:?}", cfg.backend().kind).to_lowercase(),
                urls: cfg.endpoints.iter().map(|e| e.url.clone()).collect(),
                version: server.and_then(|s| s.version.clone()),
                model: cfg.backend().model.clone(),
                fake: server.is_some_and(|s| s.fake),
            },
            input: Input {
                path: cfg.input_path.display().to_string(),
                rows: plan.rows,
                samples_per_prompt: cfg.run().samples_per_prompt,
            },
            counts: Counts {
                requests: plan.requests,
                already_done: plan.already_done,
                skipped_failed: plan.skipped_failed,
                done: 0,
                failed: 0,
                remaining: plan.to_run,
            },
            completion_tokens: 0,
            runs,
            stages: Vec::new(),
            dataset_rows: None,
            fingerprint: None,
        }
    }

    /// Counts this run's progress into the manifest.
    pub fn tally(&mut self, plan: &Plan, done: u64, failed: u64, tokens: u64) {
        self.counts.done = done;
        self.counts.failed = failed;
        self.counts.remaining = plan.to_run.saturating_sub(done + failed);
        self.completion_tokens = tokens;
        if let Some(r) = self.current_run() {
            r.done = done;
            r.failed = failed;
            r.completion_tokens = tokens;
        }
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        text.push(b'\n');
        write_atomic(path, &text)
    }

    /// The runs of an existing manifest, oldest first. A manifest that cannot be read as one is
    /// moved aside to `manifest.json.corrupt-N` (returned, for a warning) and the history
    /// starts afresh; the dataset itself is untouched.
    pub fn prior_runs(path: &Path) -> std::io::Result<(Vec<RunEntry>, Option<std::path::PathBuf>)> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), None)),
            Err(e) => return Err(e),
        };
        let runs = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("runs").cloned())
            .and_then(|r| serde_json::from_value::<Vec<RunEntry>>(r).ok());
        match runs {
            Some(runs) => Ok((runs, None)),
            None => {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("manifest.json");
                for n in 1.. {
                    let to = path.with_file_name(format!("{name}.corrupt-{n}"));
                    if !to.exists() {
                        std::fs::rename(path, &to)?;
                        return Ok((Vec::new(), Some(to)));
                    }
                }
                unreachable!("an unbounded range always yields")
            }
        }
    }

    /// The manifest in the folder, when it reads whole.
    pub fn read(path: &Path) -> Option<Manifest> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    pub fn current_run(&mut self) -> Option<&mut RunEntry> {
        self.runs.last_mut()
    }
}
