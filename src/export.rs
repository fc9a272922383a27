//! `export`: the dataset in the shape a trainer takes (chat `messages`, ShareGPT, Alpaca) or as
//! plain records (JSONL, CSV), filtered. Of several records with the same key (a request re-run
//! with `--redo-truncated`) only the newest is exported; with a config, only the records that
//! match its requests. Written to a file atomically, or to stdout.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::dataset::csv_bytes;
use crate::inspect::{for_each_record, InspectError, Malformed, Source};
use crate::record::{fnv1a64, Record, CSV_COLUMNS};
use crate::resume::parse_key;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// `{"messages":[{"role":"system"|"user"|"assistant","content":...}]}` (OpenAI fine-tuning, TRL, axolotl).
    Messages,
    /// `{"conversations":[{"from":"system"|"human"|"gpt","value":...}]}`.
    Sharegpt,
    /// `{"instruction":...,"input":...,"output":...}`.
    Alpaca,
    /// The records as JSON lines.
    Jsonl,
    /// The records as CSV (header row, RFC 4180).
    Csv,
}

#[derive(Debug, Clone, Default)]
pub struct Filters {
    /// Keep only these done reasons (e.g. `stop`).
    pub done_reasons: Vec<String>,
    pub min_chars: Option<usize>,
    pub max_chars: Option<usize>,
    /// Drop records whose response repeats an earlier one exactly.
    pub dedupe: bool,
    /// Put the thinking text before the answer as `<think>...</think>` (chat formats) or keep it
    /// in the record (JSONL/CSV always keep it).
    pub include_thinking: bool,
    /// Alpaca: the input-row field holding the instruction (default: the rendered prompt).
    pub instruction_field: Option<String>,
    /// Alpaca: the input-row field holding the input (default: empty).
    pub input_field: Option<String>,
    /// Only records whose key is one of these (the current config's requests).
    pub keys: Option<HashSet<u128>>,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ExportStats {
    pub read: u64,
    pub written: u64,
    pub superseded: u64,
    pub other_config: u64,
    pub filtered: u64,
    pub duplicates: u64,
    pub malformed: Vec<Malformed>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Read(#[from] InspectError),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("record {id} (sample {sample}): {message}")]
    Record { id: String, sample: u32, message: String },
}

fn thought(r: &Record, include: bool) -> String {
    match (&r.thinking, include) {
        (Some(t), true) if !t.is_empty() => format!("<think>\n{t}\n</think>\n\n{}", r.response),
        _ => r.response.clone(),
    }
}

fn field_text(r: &Record, field: &str) -> Result<String, ExportError> {
    match r.input.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Null) | None => Err(ExportError::Record {
            id: r.id.clone(),
            sample: r.sample,
            message: format!("its input row has no field `{field}` (a CSV dataset keeps no input rows: export from the JSONL)"),
        }),
        Some(other) => Ok(other.to_string()),
    }
}

/// One exported line (JSON formats) for a record.
fn to_json(r: &Record, format: ExportFormat, f: &Filters) -> Result<Value, ExportError> {
    Ok(match format {
        ExportFormat::Messages => {
            let mut m = Vec::new();
            if let Some(s) = &r.system {
                m.push(json!({"role": "system", "content": s}));
            }
            m.push(json!({"role": "user", "content": r.prompt}));
            m.push(json!({"role": "assistant", "content": thought(r, f.include_thinking)}));
            json!({ "messages": m })
        }
        ExportFormat::Sharegpt => {
            let mut c = Vec::new();
            if let Some(s) = &r.system {
                c.push(json!({"from": "system", "value": s}));
            }
            c.push(json!({"from": "human", "value": r.prompt}));
            c.push(json!({"from": "gpt", "value": thought(r, f.include_thinking)}));
            json!({ "conversations": c })
        }
        ExportFormat::Alpaca => {
            let instruction = match &f.instruction_field {
                Some(field) => field_text(r, field)?,
                None => r.prompt.clone(),
            };
            let input = match &f.input_field {
                Some(field) => field_text(r, field)?,
                None => String::new(),
            };
            json!({"instruction": instruction, "input": input, "output": thought(r, f.include_thinking)})
        }
        ExportFormat::Jsonl => serde_json::to_value(r).map_err(|e| ExportError::Record {
            id: r.id.clone(),
            sample: r.sample,
            message: e.to_string(),
        })?,
        ExportFormat::Csv => Value::Null,
    })
}

/// Whether a write error is the reader going away (`| head`): not a failure.
pub fn is_broken_pipe(e: &ExportError) -> bool {
    matches!(e, ExportError::Write { source, .. } if source.kind() == io::ErrorKind::BrokenPipe)
}

/// Exports `src` to `out`. `out_name` names the destination in errors.
pub fn export(src: &Source, format: ExportFormat, filters: &Filters, out: &mut dyn Write, out_name: &Path) -> Result<ExportStats, ExportError> {
    // First pass: the keys that occur more than once, with the line of their newest record.
    // (Keys are hashes already: their low 64 bits tell a million records apart.)
    let mut seen: HashSet<u64> = HashSet::new();
    let mut newest: HashMap<u64, u64> = HashMap::new();
    for_each_record(
        src,
        |r, line| {
            if let Some(k) = parse_key(&r.key) {
                if !seen.insert(k as u64) {
                    newest.insert(k as u64, line);
                }
            }
            true
        },
        |_| {},
    )?;
    drop(seen);

    let mut stats = ExportStats::default();
    let mut seen_responses: HashSet<u64> = HashSet::new();
    let werr = |source: io::Error| ExportError::Write { path: out_name.to_owned(), source };
    if format == ExportFormat::Csv {
        out.write_all(&csv_bytes(CSV_COLUMNS).map_err(werr)?).map_err(werr)?;
    }
    let mut failure: Option<ExportError> = None;
    let mut buf = Vec::with_capacity(4096);
    for_each_record(
        src,
        |r, line| {
            stats.read += 1;
            let key = parse_key(&r.key);
            if let Some(k) = key {
                if newest.get(&(k as u64)).is_some_and(|l| *l != line) {
                    stats.superseded += 1;
                    return true;
                }
            }
            if let Some(keys) = &filters.keys {
                if !key.is_some_and(|k| keys.contains(&k)) {
                    stats.other_config += 1;
                    return true;
                }
            }
            let chars = r.response.chars().count();
            let reason_ok = filters.done_reasons.is_empty()
                || r.done_reason.as_ref().is_some_and(|d| filters.done_reasons.iter().any(|w| w == d));
            if !reason_ok || filters.min_chars.is_some_and(|m| chars < m) || filters.max_chars.is_some_and(|m| chars > m) {
                stats.filtered += 1;
                return true;
            }
            if filters.dedupe && !seen_responses.insert(fnv1a64(&[r.response.as_bytes()])) {
                stats.duplicates += 1;
                return true;
            }
            buf.clear();
            let result = match format {
                ExportFormat::Csv => csv_bytes(r.csv_row()).map(|b| buf = b).map_err(werr),
                _ => to_json(&r, format, filters).and_then(|v| {
                    serde_json::to_writer(&mut buf, &v).map_err(|e| werr(io::Error::other(e)))?;
                    buf.push(b'\n');
                    Ok(())
                }),
            };
            match result.and_then(|_| out.write_all(&buf).map_err(werr)) {
                Ok(()) => {
                    stats.written += 1;
                    true
                }
                Err(e) => {
                    failure = Some(e);
                    false
                }
            }
        },
        |m| stats.malformed.push(m),
    )?;
    if let Some(e) = failure {
        return Err(e);
    }
    out.flush().map_err(werr)?;
    Ok(stats)
}
