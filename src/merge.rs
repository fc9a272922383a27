//! `merge`: shard folders (or any output folders of one config) into one dataset. Records are
//! streamed; of several with the same key only the newest is kept, so a row run twice counts
//! once. The CSV is written from the same records, failures that no record answers are carried
//! over, and a manifest says where everything came from.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::OutputFormat;
use crate::dataset::{Dataset, DatasetError, JsonlReader, OutputLock, OutputPaths, LOCK_FILE};
use crate::inspect::{for_each_record, InspectError, Source};
use crate::record::{fnv1a64, now_rfc3339, Failure, Record};
use crate::resume::parse_key;

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Read(#[from] InspectError),
    #[error(transparent)]
    Write(#[from] DatasetError),
    #[error("{0} is not empty: merge into a new folder")]
    NotEmpty(PathBuf),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct MergeStats {
    pub records: u64,
    pub duplicates_dropped: u64,
    pub failures: u64,
    pub malformed_lines: u64,
}

/// The identity of a record for de-duplication: its key, or (id, sample) when it has none.
fn identity(r: &Record) -> u64 {
    match parse_key(&r.key) {
        Some(k) => k as u64,
        None => fnv1a64(&[r.id.as_bytes(), &r.sample.to_le_bytes()]),
    }
}

pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<MergeStats, MergeError> {
    OutputLock::check_free(out)?;
    if let Ok(entries) = std::fs::read_dir(out) {
        if entries.flatten().any(|e| e.file_name() != LOCK_FILE) {
            return Err(MergeError::NotEmpty(out.to_owned()));
        }
    }
    OutputPaths::new(out).create_dir()?;
    // Held until the merge is written: no run may start writing here meanwhile.
    let _lock = OutputLock::acquire(out)?;
    let sources: Vec<Source> = dirs.iter().map(|d| Source::locate(d)).collect::<Result<_, _>>()?;

    // First pass: identities seen more than once, with where their newest record is.
    let mut seen: HashSet<u64> = HashSet::new();
    let mut newest: HashMap<u64, (usize, u64)> = HashMap::new();
    // Records of a run with a schema carry `parsed`: the merged CSV then has its columns too.
    let mut schema = false;
    for (i, src) in sources.iter().enumerate() {
        for_each_record(
            src,
            |r, line| {
                schema |= r.parsed.is_some();
                let id = identity(&r);
                if !seen.insert(id) {
                    newest.insert(id, (i, line));
                }
                true
            },
            |_| {},
        )?;
    }
    drop(seen);

    let paths = OutputPaths::new(out);
    let mut dataset = Dataset::open(&paths, &[OutputFormat::Jsonl, OutputFormat::Csv], schema)?;
    let mut stats = MergeStats::default();
    let mut keys: HashSet<u128> = HashSet::new();
    let mut write_error = None;
    for (i, src) in sources.iter().enumerate() {
        for_each_record(
            src,
            |r, line| {
                let id = identity(&r);
                if newest.get(&id).is_some_and(|pos| *pos != (i, line)) {
                    stats.duplicates_dropped += 1;
                    return true;
                }
                if let Some(k) = parse_key(&r.key) {
                    keys.insert(k);
                }
                match dataset.write_record(&r) {
                    Ok(()) => {
                        stats.records += 1;
                        true
                    }
                    Err(e) => {
                        write_error = Some(e);
                        false
                    }
                }
            },
            |_| stats.malformed_lines += 1,
        )?;
        if let Some(e) = write_error.take() {
            return Err(e.into());
        }
    }

    // Failures no record answers, once each.
    let mut failed: HashSet<u128> = HashSet::new();
    for src in &sources {
        let Some(f) = &src.failures else { continue };
        for item in JsonlReader::<Failure>::open(f).map_err(|e| MergeError::Io(f.clone(), e))? {
            let (_, Ok(fail)) = item.map_err(|e| MergeError::Io(f.clone(), e))? else { continue };
            let k = parse_key(&fail.key);
            if k.is_some_and(|k| keys.contains(&k) || !failed.insert(k)) {
                continue;
            }
            dataset.write_failure(&fail)?;
            stats.failures += 1;
        }
    }
    dataset.sync()?;

    // The manifest: the first source's config, every source's runs, where it all came from.
    let mut config = Value::Null;
    let mut runs = Vec::new();
    let mut from = Vec::new();
    for (dir, src) in dirs.iter().zip(&sources) {
        let m: Value = std::fs::read(src.dataset.with_file_name("manifest.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        if config.is_null() {
            config = m.get("config").cloned().unwrap_or(Value::Null);
        }
        for r in m.get("runs").and_then(Value::as_array).into_iter().flatten() {
            let mut r = r.clone();
            r["folder"] = json!(dir.display().to_string());
            runs.push(r);
        }
        from.push(json!({"folder": dir.display().to_string(), "dataset": src.dataset.display().to_string()}));
    }
    let manifest = json!({
        "manifest_version": crate::manifest::MANIFEST_VERSION,
        "tool": {"name": env!("CARGO_PKG_NAME"), "version": env!("CARGO_PKG_VERSION")},
        "merged_at": now_rfc3339(),
        "merged_from": from,
        "config": config,
        "counts": stats,
        "runs": runs,
    });
    let mut text = serde_json::to_vec_pretty(&manifest).map_err(|e| MergeError::Io(paths.manifest.clone(), e.into()))?;
    text.push(b'\n');
    crate::dataset::write_atomic(&paths.manifest, &text).map_err(|e| MergeError::Io(paths.manifest.clone(), e))?;
    Ok(stats)
}
