//! `data_generator view OUTPUT_DIR`: a browser for a run's output, finished or still running.
//!
//! Nothing is loaded into memory but an index: one 24-byte [`Entry`] per record (its file and
//! byte offset, and the few fields the filters need: stage, done_reason, kept, tokens, re-asks,
//! failed). The index is built by a thread of its own, from the start of the files while the page
//! is already served (the first records show at once; the counts grow as it goes), then follows
//! the files as a run appends to them (a file replaced or cut is indexed again). A page reads
//! records by offset, one line each; a search streams the candidate lines from the files, with a
//! raw-bytes prefilter before any JSON is decoded, and keeps its hits (4 bytes each) for the next
//! pages. The `inspect` report of each file is made in the background and kept until the file
//! changes.
//!
//! Read-only and fixed routes: the page can name a record only by its number in the index, a
//! stage only by its name; no path comes from a URL.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::inspect::{self, InspectOptions, Source};
use crate::record::fnv1a64;
use crate::web::{self, ServeOptions, Server};

/// No value (no done_reason, no stage).
const NONE: u8 = u8::MAX;
const FAILED: u8 = 1;
/// A failure whose request has a record since (a later attempt succeeded).
const RESOLVED: u8 = 2;
/// Entries appended to the shared index at once while indexing (the lock is held that long).
const CHUNK: usize = 16 * 1024;
/// How often the files are looked at for what a running run appended.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// Searches whose hits are kept (the last ones used).
const KEEP_SEARCHES: usize = 8;
/// How often the summary of a file that keeps changing is made again.
const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// Characters of prompt and response a table row shows.
const HEAD_CHARS: usize = 240;
pub const MAX_PER_PAGE: usize = 500;
/// Stages are numbered in a byte of each entry (255 is "none").
const MAX_STAGES: usize = 250;

/// One line of a dataset, stage or failures file.
#[derive(Debug, Clone, Copy)]
struct Entry {
    off: u64,
    len: u32,
    tokens: u32,
    file: u8,
    stage: u8,
    done: u8,
    /// 0: not judged; 1: dropped by `keep`; 2: kept.
    kept: u8,
    invalid: u16,
    flags: u8,
}

/// A file the view reads.
#[derive(Debug, Clone)]
struct FileSpec {
    path: PathBuf,
    /// How the page names it (`dataset.jsonl`, `stages/judge.jsonl`, `failures.jsonl`).
    label: String,
    /// The stage its records belong to (records files).
    stage: u8,
    failures: bool,
}

/// How far a file is indexed.
#[derive(Debug, Clone, Default)]
struct FileState {
    ino: u64,
    /// Bytes indexed: the end of the last complete line.
    upto: u64,
    /// Its size when last looked at.
    len: u64,
    lines: u64,
    malformed: u64,
    first_malformed: Option<(u64, String)>,
    /// The hash of the file's first bytes (up to 4 KB) as first indexed, and how many: a file
    /// rewritten in place (same inode, as long or longer) shows as a different start.
    head: (u64, u64),
}

/// Bytes of a file's start that tell a rewritten file from the one indexed.
const HEAD_BYTES: u64 = 4096;

/// A file's first `n` bytes, hashed.
fn head_hash(path: &Path, n: u64) -> Option<u64> {
    let f = File::open(path).ok()?;
    let mut buf = vec![0u8; n as usize];
    f.read_exact_at(&mut buf, 0).ok()?;
    Some(fnv1a64(&[&buf]))
}

/// Whether the file still starts as it did, and its last indexed line still ends where it did.
fn same_start(path: &Path, st: &FileState) -> bool {
    let Ok(f) = File::open(path) else { return false };
    let mut last = [0u8; 1];
    if f.read_exact_at(&mut last, st.upto - 1).is_err() || last[0] != b'\n' {
        return false;
    }
    head_hash(path, st.head.1) == Some(st.head.0)
}

#[derive(Default)]
struct Index {
    /// Bumped when the index is rebuilt (a file was replaced or cut): record numbers change.
    generation: u64,
    entries: Vec<Entry>,
    files: Vec<FileState>,
    done_reasons: Vec<String>,
    /// The first pass over every file is done.
    complete: bool,
    /// Requests with a failure line (several runs may each have failed one), and those of them
    /// with no record since.
    failed_requests: u64,
    unresolved_requests: u64,
    error: Option<String>,
}

/// What the indexer alone keeps: failures by key (resolved yet, their entries), and the keys of
/// every record (8 bytes each), for a failure that comes after the record that resolved it.
#[derive(Default)]
struct FailureKeys {
    by_key: HashMap<u64, (bool, Vec<u32>)>,
    records: Vec<u64>,
}

/// A field of the wrong type reads as absent: one odd value does not hide a record.
fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either<T> {
        Value(T),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Option::<Either<T>>::deserialize(d)? {
        Some(Either::Value(v)) => Some(v),
        _ => None,
    })
}

/// The fields of a line the index keeps (borrowed: the texts are skipped, not copied).
#[derive(Deserialize, Default)]
#[serde(default)]
struct Light<'a> {
    #[serde(borrow)]
    done_reason: Option<Cow<'a, str>>,
    #[serde(deserialize_with = "lenient")]
    completion_tokens: Option<u64>,
    #[serde(deserialize_with = "lenient")]
    invalid: Option<u64>,
    #[serde(deserialize_with = "lenient")]
    kept: Option<bool>,
    #[serde(borrow)]
    key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    stage: Option<Cow<'a, str>>,
}

/// The texts of a line: what a search looks in, and what a table row shows (borrowed: an
/// unescaped text is not copied).
#[derive(Deserialize, Default)]
#[serde(default)]
struct Texts<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(deserialize_with = "lenient")]
    sample: Option<u64>,
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow)]
    prompt: Option<Cow<'a, str>>,
    #[serde(borrow)]
    response: Option<Cow<'a, str>>,
    #[serde(borrow)]
    thinking: Option<Cow<'a, str>>,
    #[serde(borrow)]
    error: Option<Cow<'a, str>>,
    #[serde(borrow)]
    last_reply: Option<Cow<'a, str>>,
    #[serde(borrow)]
    finished_at: Option<Cow<'a, str>>,
    #[serde(borrow)]
    when: Option<Cow<'a, str>>,
    #[serde(borrow)]
    parent: Option<Cow<'a, str>>,
}

/// The output folder being viewed: what it is, its index, and the searches and reports kept.
pub struct Dataset {
    dir: PathBuf,
    name: String,
    /// Multi-stage runs: the stages in run order; empty for a one-stage run.
    stages: Vec<String>,
    files: Vec<FileSpec>,
    index: RwLock<Index>,
    searches: Mutex<Vec<Search>>,
    summaries: Mutex<HashMap<String, Summary>>,
    /// The indexer's own: held through a pass.
    keys: Mutex<FailureKeys>,
    stop: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("{path}: no such folder")]
    NoFolder { path: PathBuf },
    #[error("{path}: no dataset here yet (expected dataset.jsonl, or stages/ of a multi-stage run)")]
    NotADataset { path: PathBuf },
    #[error("{path}: {n} stages; view shows at most 250")]
    TooManyStages { path: PathBuf, n: usize },
    #[error("{path}: this folder has only dataset.csv; view reads dataset.jsonl (add \"jsonl\" to output.formats, or open the CSV in a spreadsheet)")]
    CsvOnly { path: PathBuf },
}

impl Dataset {
    /// The output folder at `dir`: a one-stage run's (`dataset.jsonl`) or a multi-stage run's
    /// (`stages/<name>.jsonl`), with `failures.jsonl` when there is one (or when one appears).
    pub fn open(dir: &Path) -> Result<Arc<Dataset>, ViewError> {
        if !dir.is_dir() {
            return Err(ViewError::NoFolder { path: dir.to_owned() });
        }
        let mut files = Vec::new();
        let stages = crate::stages::stage_names(dir).unwrap_or_default();
        if stages.len() > MAX_STAGES {
            return Err(ViewError::TooManyStages { path: dir.to_owned(), n: stages.len() });
        }
        if stages.is_empty() {
            let jsonl = dir.join("dataset.jsonl");
            if !jsonl.is_file() {
                return Err(if dir.join("dataset.csv").is_file() {
                    ViewError::CsvOnly { path: dir.to_owned() }
                } else {
                    ViewError::NotADataset { path: dir.to_owned() }
                });
            }
            files.push(FileSpec { path: jsonl, label: "dataset.jsonl".into(), stage: 0, failures: false });
        } else {
            for (i, s) in stages.iter().enumerate() {
                files.push(FileSpec { path: crate::stages::stage_jsonl(dir, s), label: format!("stages/{s}.jsonl"), stage: i as u8, failures: false });
            }
        }
        files.push(FileSpec { path: dir.join("failures.jsonl"), label: "failures.jsonl".into(), stage: NONE, failures: true });
        let name = dir.canonicalize().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| dir.display().to_string());
        let index = Index { files: vec![FileState::default(); files.len()], ..Index::default() };
        Ok(Arc::new(Dataset {
            dir: dir.to_owned(),
            name,
            stages,
            files,
            index: RwLock::new(index),
            searches: Mutex::new(Vec::new()),
            summaries: Mutex::new(HashMap::new()),
            keys: Mutex::new(FailureKeys::default()),
            stop: AtomicBool::new(false),
        }))
    }

    fn read_index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_index(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Indexes the files to their ends once (what [`Dataset::follow`] does first).
    pub fn index_now(&self) -> io::Result<()> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh(&mut keys)?;
        self.write_index().complete = true;
        Ok(())
    }

    /// Starts the indexer: the whole files first, then what is appended to them, every second,
    /// until [`Dataset::shut_down`].
    pub fn follow(self: &Arc<Self>) {
        let ds = self.clone();
        std::thread::spawn(move || {
            while !ds.stop.load(Ordering::Relaxed) {
                let r = {
                    let mut keys = ds.keys.lock().unwrap_or_else(|p| p.into_inner());
                    ds.refresh(&mut keys)
                };
                {
                    let mut ix = ds.write_index();
                    ix.complete = true;
                    ix.error = r.err().map(|e| e.to_string());
                }
                std::thread::sleep(FOLLOW_EVERY);
            }
        });
    }

    pub fn shut_down(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// One pass: a file replaced, cut or rewritten since the last pass sends the index back to
    /// the start; then the new complete lines of every file (failures first: a record of the
    /// same key, before or after, marks them resolved; they are listed last).
    fn refresh(&self, keys: &mut FailureKeys) -> io::Result<()> {
        let metas: Vec<Option<(u64, u64)>> = self.files.iter().map(|f| std::fs::metadata(&f.path).ok().map(|m| (m.ino(), m.len()))).collect();
        let rebuild = {
            let ix = self.read_index();
            metas.iter().zip(&ix.files).zip(&self.files).any(|((m, st), spec)| match m {
                Some((ino, len)) => st.upto > 0 && (*ino != st.ino || *len < st.upto || !same_start(&spec.path, st)),
                None => st.upto > 0,
            })
        };
        if rebuild {
            let mut ix = self.write_index();
            let generation = ix.generation + 1;
            *ix = Index { generation, files: vec![FileState::default(); self.files.len()], ..Index::default() };
            *keys = FailureKeys::default();
            self.searches.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
        {
            let mut ix = self.write_index();
            for (st, m) in ix.files.iter_mut().zip(&metas) {
                if let Some((ino, len)) = m {
                    st.ino = *ino;
                    st.len = *len;
                }
            }
        }
        let fail_file = self.files.len() - 1;
        let before = self.read_index().files[fail_file].clone();
        let mut failures = Vec::new();
        self.scan_new(fail_file, |e, light, _| {
            let h = light.key.as_deref().map(|k| fnv1a64(&[k.as_bytes()]));
            failures.push((e, h));
        })?;
        // New failures whose record came in an earlier pass: resolved already.
        let fresh: std::collections::HashSet<u64> = failures.iter().filter_map(|(_, h)| *h).filter(|h| !keys.by_key.contains_key(h)).collect();
        for h in &fresh {
            keys.by_key.insert(*h, (false, Vec::new()));
        }
        if !fresh.is_empty() {
            for h in &keys.records {
                if fresh.contains(h) {
                    if let Some(slot) = keys.by_key.get_mut(h) {
                        slot.0 = true;
                    }
                }
            }
        }
        let records = self.scan_records(fail_file, keys);
        let mut ix = self.write_index();
        if records.is_err() {
            // Read again next pass, with the records.
            ix.files[fail_file] = FileState { ino: ix.files[fail_file].ino, len: ix.files[fail_file].len, ..before };
            return records;
        }
        ix.failed_requests = keys.by_key.len() as u64;
        ix.unresolved_requests = keys.by_key.values().filter(|(done, _)| !done).count() as u64;
        for (mut e, h) in failures {
            let n = ix.entries.len() as u32;
            if let Some(h) = h {
                let slot = keys.by_key.entry(h).or_default();
                if slot.0 {
                    e.flags |= RESOLVED;
                } else {
                    slot.1.push(n);
                }
            }
            ix.entries.push(e);
        }
        Ok(())
    }

    /// The new lines of the record files (all but the last, the failures), into the index in
    /// chunks; a record whose key has a failure marks it resolved.
    fn scan_records(&self, files: usize, keys: &mut FailureKeys) -> io::Result<()> {
        for f in 0..files {
            let mut pending: Vec<Entry> = Vec::new();
            let mut resolved: Vec<u32> = Vec::new();
            let mut first_chunk = true;
            let r = self.scan_new(f, |e, light, flush| {
                if let Some(k) = light.key.as_deref() {
                    let h = fnv1a64(&[k.as_bytes()]);
                    keys.records.push(h);
                    if let Some((done, at)) = keys.by_key.get_mut(&h) {
                        *done = true;
                        resolved.append(at);
                    }
                }
                pending.push(e);
                // Small chunks first: the first page shows at once.
                if pending.len() >= CHUNK || pending.len() >= 512 && first_chunk {
                    first_chunk = false;
                    *flush = Some(std::mem::take(&mut pending));
                }
            });
            let mut ix = self.write_index();
            ix.entries.extend(pending);
            for n in resolved {
                if let Some(e) = ix.entries.get_mut(n as usize) {
                    e.flags |= RESOLVED;
                }
            }
            r?;
        }
        Ok(())
    }

    /// Reads the complete lines file `f` gained since the last pass and hands each one's entry
    /// to `each` (with a slot to flush a chunk of entries into the shared index early). A last
    /// line without its newline is left for the next pass: a run may be writing it.
    fn scan_new(&self, f: usize, mut each: impl FnMut(Entry, &Light, &mut Option<Vec<Entry>>)) -> io::Result<()> {
        let spec = &self.files[f];
        let (start, mut line_no) = {
            let ix = self.read_index();
            (ix.files[f].upto, ix.files[f].lines)
        };
        let file = match File::open(&spec.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", spec.path.display()))),
        };
        let mut r = BufReader::with_capacity(1 << 20, file);
        r.seek(SeekFrom::Start(start))?;
        let mut pos = start;
        let mut buf = Vec::new();
        let (mut malformed, mut first_bad) = (0u64, None);
        let mut flush: Option<Vec<Entry>> = None;
        let mut seen_done: Vec<(String, u8)> = Vec::new();
        loop {
            buf.clear();
            let n = r.read_until(b'\n', &mut buf)?;
            if n == 0 || buf.last() != Some(&b'\n') {
                break;
            }
            line_no += 1;
            let body = &buf[..n - 1];
            if body.iter().all(u8::is_ascii_whitespace) {
                pos += n as u64;
                continue;
            }
            match serde_json::from_slice::<Light>(body) {
                Ok(light) if n - 1 <= u32::MAX as usize => {
                    // The few done reasons, looked up here first: the shared table only for a new one.
                    let done = match light.done_reason.as_deref() {
                        Some(d) => match seen_done.iter().find(|(x, _)| x == d) {
                            Some((_, i)) => *i,
                            None => {
                                let i = self.intern_done(d);
                                seen_done.push((d.to_owned(), i));
                                i
                            }
                        },
                        None => NONE,
                    };
                    let stage = if spec.failures {
                        light.stage.as_deref().and_then(|s| self.stages.iter().position(|x| x == s)).map_or(if self.stages.is_empty() { 0 } else { NONE }, |i| i as u8)
                    } else {
                        spec.stage
                    };
                    let e = Entry {
                        off: pos,
                        len: (n - 1) as u32,
                        tokens: light.completion_tokens.unwrap_or(0).min(u64::from(u32::MAX)) as u32,
                        file: f as u8,
                        stage,
                        done,
                        kept: match light.kept {
                            None => 0,
                            Some(false) => 1,
                            Some(true) => 2,
                        },
                        invalid: light.invalid.unwrap_or(0).min(u64::from(u16::MAX)) as u16,
                        flags: if spec.failures { FAILED } else { 0 },
                    };
                    each(e, &light, &mut flush);
                }
                Ok(_) => {
                    malformed += 1;
                    first_bad.get_or_insert((line_no, "line longer than 4 GB".to_owned()));
                }
                Err(err) => {
                    malformed += 1;
                    first_bad.get_or_insert((line_no, err.to_string()));
                }
            }
            pos += n as u64;
            if let Some(chunk) = flush.take() {
                let mut ix = self.write_index();
                ix.entries.extend(chunk);
                let st = &mut ix.files[f];
                st.upto = pos;
                st.lines = line_no;
            }
        }
        let head = if start == 0 && pos > 0 { head_hash(&spec.path, pos.min(HEAD_BYTES)).map(|h| (h, pos.min(HEAD_BYTES))) } else { None };
        let mut ix = self.write_index();
        let st = &mut ix.files[f];
        if let Some(h) = head {
            st.head = h;
        }
        st.upto = pos;
        st.lines = line_no;
        st.malformed += malformed;
        if st.first_malformed.is_none() {
            st.first_malformed = first_bad;
        }
        Ok(())
    }

    fn intern_done(&self, d: &str) -> u8 {
        {
            let ix = self.read_index();
            if let Some(i) = ix.done_reasons.iter().position(|x| x == d) {
                return i as u8;
            }
        }
        let mut ix = self.write_index();
        if let Some(i) = ix.done_reasons.iter().position(|x| x == d) {
            return i as u8;
        }
        if ix.done_reasons.len() >= NONE as usize {
            return NONE;
        }
        ix.done_reasons.push(d.to_owned());
        (ix.done_reasons.len() - 1) as u8
    }

    /// The line of an entry, read at its offset.
    fn line(&self, e: &Entry) -> io::Result<Vec<u8>> {
        let f = File::open(&self.files[e.file as usize].path)?;
        let mut buf = vec![0u8; e.len as usize];
        f.read_exact_at(&mut buf, e.off)?;
        Ok(buf)
    }

    /// The folder, its stages and files, how far the index is, and what the filters can offer.
    pub fn info(&self) -> Value {
        let manifest: Value = std::fs::read(self.dir.join("manifest.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null);
        let ix = self.read_index();
        let mut done_counts = vec![0u64; ix.done_reasons.len()];
        let (mut records, mut failures, mut unresolved, mut no_done, mut judged) = (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut per_stage = vec![0u64; self.stages.len().max(1)];
        for e in &ix.entries {
            if e.flags & FAILED != 0 {
                failures += 1;
                unresolved += u64::from(e.flags & RESOLVED == 0);
                continue;
            }
            records += 1;
            match e.done {
                NONE => no_done += 1,
                d => done_counts[d as usize] += 1,
            }
            judged += u64::from(e.kept != 0);
            if let Some(c) = per_stage.get_mut(e.stage as usize) {
                *c += 1;
            }
        }
        let mut done: Vec<Value> = ix.done_reasons.iter().zip(&done_counts).map(|(d, c)| json!([d, c])).collect();
        if no_done > 0 {
            done.push(json!(["(none)", no_done]));
        }
        let files: Vec<Value> = self
            .files
            .iter()
            .zip(&ix.files)
            .map(|(spec, st)| {
                json!({
                    "file": spec.label,
                    "bytes": st.len,
                    "indexed_bytes": st.upto,
                    "lines": st.lines,
                    "malformed": st.malformed,
                    "first_malformed": st.first_malformed.as_ref().map(|(l, e)| json!({"line": l, "error": e})),
                })
            })
            .collect();
        let last_run = manifest["runs"].as_array().and_then(|r| r.last()).cloned();
        json!({
            "name": self.name,
            "stages": self.stages,
            "per_stage": if self.stages.is_empty() { Value::Null } else { json!(per_stage) },
            "files": files,
            "indexing": !ix.complete,
            "generation": ix.generation,
            "error": ix.error,
            "records": records,
            "failures": failures,
            "unresolved_failures": unresolved,
            "failed_requests": ix.failed_requests,
            "unresolved_requests": ix.unresolved_requests,
            "done_reasons": done,
            "judged": judged,
            "model": manifest["config"]["backend"]["model"],
            "dataset_rows": manifest["dataset_rows"],
            "last_run": last_run,
        })
    }
}

/// Which entries a page asks for: filters from the URL, and the search text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Query {
    pub q: String,
    /// `finished`, `failed` (unresolved failures), `failures` (every failure), or any.
    pub status: Option<String>,
    pub stage: Option<String>,
    pub done_reason: Option<String>,
    /// `yes`, `no`, `unjudged`.
    pub kept: Option<String>,
    pub newest_first: bool,
    /// Only the records of this id (exactly).
    pub id: Option<String>,
    /// From 1.
    pub page: usize,
    pub per: usize,
}

impl Query {
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<Query, String> {
        let mut q = Query { page: 1, per: 50, ..Query::default() };
        for (k, v) in pairs {
            let v = v.trim();
            let opt = || (!v.is_empty() && v != "any").then(|| v.to_owned());
            match k.as_str() {
                "q" => q.q = v.to_owned(),
                "status" => {
                    q.status = opt();
                    if let Some(s) = &q.status {
                        if !["finished", "failed", "failures"].contains(&s.as_str()) {
                            return Err(format!("status={s}: expected finished, failed, failures or any"));
                        }
                    }
                }
                "stage" => q.stage = opt(),
                "done_reason" => q.done_reason = opt(),
                "kept" => {
                    q.kept = opt();
                    if let Some(s) = &q.kept {
                        if !["yes", "no", "unjudged"].contains(&s.as_str()) {
                            return Err(format!("kept={s}: expected yes, no, unjudged or any"));
                        }
                    }
                }
                "order" => {
                    q.newest_first = match v {
                        "newest" => true,
                        "" | "oldest" => false,
                        _ => return Err(format!("order={v}: expected newest or oldest")),
                    }
                }
                "id" => q.id = (!v.is_empty()).then(|| v.to_owned()),
                "page" => q.page = v.parse::<usize>().map_err(|_| format!("page={v}: expected a number from 1"))?.max(1),
                "per" => q.per = v.parse::<usize>().map_err(|_| format!("per={v}: expected a number"))?.clamp(1, MAX_PER_PAGE),
                _ => {}
            }
        }
        Ok(q)
    }

    /// What the hits of a search depend on (not the page).
    fn search_key(&self) -> String {
        format!("{:?}|{:?}|{:?}|{:?}|{:?}|{}", self.status, self.stage, self.done_reason, self.kept, self.id, self.q)
    }
}

/// The filters, resolved against the index's tables (a name it does not have matches nothing).
struct Filter {
    status: Option<String>,
    stage: Option<Option<u8>>,
    done: Option<Option<u8>>,
    kept: Option<u8>,
}

impl Filter {
    fn new(q: &Query, ds: &Dataset, ix: &Index) -> Filter {
        let stage = q.stage.as_ref().map(|s| ds.stages.iter().position(|x| x == s).map(|i| i as u8));
        let done = q.done_reason.as_ref().map(|d| if d == "(none)" { Some(NONE) } else { ix.done_reasons.iter().position(|x| x == d).map(|i| i as u8) });
        let kept = q.kept.as_deref().map(|k| match k {
            "yes" => 2,
            "no" => 1,
            _ => 0,
        });
        Filter { status: q.status.clone(), stage, done, kept }
    }

    fn matches(&self, e: &Entry) -> bool {
        let failed = e.flags & FAILED != 0;
        match self.status.as_deref() {
            Some("finished") if failed => return false,
            Some("failed") if !failed || e.flags & RESOLVED != 0 => return false,
            Some("failures") if !failed => return false,
            _ => {}
        }
        if let Some(s) = self.stage {
            if s != Some(e.stage) {
                return false;
            }
        }
        if let Some(d) = self.done {
            if failed || d != Some(e.done) {
                return false;
            }
        }
        if let Some(k) = self.kept {
            if failed || k != e.kept {
                return false;
            }
        }
        true
    }
}

/// Search terms: words (or "quoted phrases"), each of which must appear, in any letter case,
/// in the id, prompt, response or thinking (a failure: its error and last reply).
struct Needle {
    terms: Vec<String>,
    /// Only lines of this id.
    id: Option<String>,
    /// The terms that can be looked for in the JSON text as it is: the prefilter.
    raw: Option<Vec<Vec<u8>>>,
    ascii: bool,
}

impl Needle {
    fn new(q: &str, id: Option<&str>) -> Needle {
        let mut terms = Vec::new();
        let mut rest = q.trim();
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix('"') {
                let (t, after) = r.split_once('"').unwrap_or((r, ""));
                if !t.is_empty() {
                    terms.push(t.to_lowercase());
                }
                rest = after.trim_start();
            } else {
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                terms.push(rest[..end].to_lowercase());
                rest = rest[end..].trim_start();
            }
        }
        terms.retain(|t| !t.contains('\0'));
        // The terms that can be looked for in the raw line (printable ASCII but for the quote and
        // backslash that JSON escapes): a line without them all is skipped undecoded.
        let plain = |t: &str| t.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
        let mut raw: Vec<Vec<u8>> = terms.iter().filter(|t| plain(t)).map(|t| t.as_bytes().to_vec()).collect();
        raw.extend(id.filter(|i| plain(i)).map(|i| i.to_ascii_lowercase().into_bytes()));
        let raw = (!raw.is_empty()).then_some(raw);
        let ascii = terms.iter().all(|t| t.is_ascii());
        Needle { terms, id: id.map(str::to_owned), raw, ascii }
    }

    fn is_empty(&self) -> bool {
        self.terms.is_empty() && self.id.is_none()
    }

    fn matches(&self, line: &[u8], scratch: &mut Vec<u8>) -> bool {
        if let Some(raw) = &self.raw {
            scratch.clear();
            scratch.extend(line.iter().map(u8::to_ascii_lowercase));
            if !raw.iter().all(|t| memchr::memmem::find(scratch, t).is_some()) {
                return false;
            }
        }
        let Ok(t) = serde_json::from_slice::<Texts>(line) else { return false };
        if self.id.as_deref().is_some_and(|id| id != t.id) {
            return false;
        }
        // The fields lowercased into one buffer, apart by NULs (no term holds one): ASCII
        // lowercasing when every term is ASCII (fast), Unicode's otherwise.
        scratch.clear();
        for f in [Some(&t.id), t.prompt.as_ref(), t.response.as_ref(), t.thinking.as_ref(), t.error.as_ref(), t.last_reply.as_ref()].into_iter().flatten() {
            if self.ascii {
                scratch.extend(f.bytes().map(|b| b.to_ascii_lowercase()));
            } else {
                push_lowercase(scratch, f);
            }
            scratch.push(0);
        }
        self.terms.iter().all(|term| memchr::memmem::find(scratch, term.as_bytes()).is_some())
    }
}

/// `s` lowercased onto `out`: ASCII bytes at once, other characters by Unicode's rules (what
/// `str::to_lowercase` does but for the final-sigma context, at several times its speed).
fn push_lowercase(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] < 0x80 {
            out.push(b[i].to_ascii_lowercase());
            i += 1;
        } else {
            let Some(c) = s[i..].chars().next() else { break };
            let mut buf = [0u8; 4];
            for l in c.to_lowercase() {
                out.extend_from_slice(l.encode_utf8(&mut buf).as_bytes());
            }
            i += c.len_utf8();
        }
    }
}

/// A search's hits so far: entries `0..scanned` of index generation `generation` were looked at.
struct Search {
    key: String,
    generation: u64,
    scanned: usize,
    hits: Vec<u32>,
    used: Instant,
}

/// Reads lines of the files in the order of their offsets, through one buffer per file.
struct LineReader<'a> {
    ds: &'a Dataset,
    open: Vec<Option<(BufReader<File>, u64)>>,
}

impl<'a> LineReader<'a> {
    fn new(ds: &'a Dataset) -> LineReader<'a> {
        LineReader { ds, open: (0..ds.files.len()).map(|_| None).collect() }
    }

    fn read(&mut self, e: &Entry, buf: &mut Vec<u8>) -> io::Result<()> {
        let slot = &mut self.open[e.file as usize];
        if slot.is_none() {
            let f = File::open(&self.ds.files[e.file as usize].path)?;
            *slot = Some((BufReader::with_capacity(1 << 20, f), 0));
        }
        let Some((r, pos)) = slot.as_mut() else { unreachable!() };
        let read = (|| {
            if *pos != e.off {
                r.seek_relative(e.off as i64 - *pos as i64)?;
            }
            buf.resize(e.len as usize, 0);
            r.read_exact(buf)
        })();
        match read {
            Ok(()) => *pos = e.off + u64::from(e.len),
            // Where the reader is is unknown now: open afresh next time.
            Err(_) => *slot = None,
        }
        read
    }
}

impl Dataset {
    /// The entries a query selects, in file order: from the index alone without search text;
    /// with it, by reading the candidates' lines (the hits are kept for the next pages and
    /// extended as the index grows).
    fn select(&self, q: &Query) -> io::Result<(u64, Vec<u32>)> {
        let needle = Needle::new(&q.q, q.id.as_deref());
        if needle.is_empty() {
            let ix = self.read_index();
            let filter = Filter::new(q, self, &ix);
            let hits = ix.entries.iter().enumerate().filter(|(_, e)| filter.matches(e)).map(|(i, _)| i as u32).collect();
            return Ok((ix.generation, hits));
        }
        let key = q.search_key();
        let (generation, mut scanned, mut hits) = {
            let ix = self.read_index();
            let mut searches = self.searches.lock().unwrap_or_else(|p| p.into_inner());
            match searches.iter_mut().find(|s| s.key == key && s.generation == ix.generation) {
                Some(s) => {
                    s.used = Instant::now();
                    (ix.generation, s.scanned, s.hits.clone())
                }
                None => (ix.generation, 0, Vec::new()),
            }
        };
        let mut reader = LineReader::new(self);
        let (mut line, mut scratch) = (Vec::new(), Vec::new());
        loop {
            // A chunk of candidates at a time: the indexer is never kept waiting long.
            let chunk: Vec<(u32, Entry)> = {
                let ix = self.read_index();
                if ix.generation != generation {
                    break;
                }
                let filter = Filter::new(q, self, &ix);
                let end = (scanned + 64 * 1024).min(ix.entries.len());
                let c = ix.entries[scanned..end].iter().enumerate().filter(|(_, e)| filter.matches(e)).map(|(i, e)| ((scanned + i) as u32, *e)).collect();
                if end == scanned {
                    break;
                }
                scanned = end;
                c
            };
            for (n, e) in chunk {
                if reader.read(&e, &mut line).is_ok() && needle.matches(&line, &mut scratch) {
                    hits.push(n);
                }
            }
        }
        {
            let mut searches = self.searches.lock().unwrap_or_else(|p| p.into_inner());
            searches.retain(|s| s.key != key);
            searches.push(Search { key, generation, scanned, hits: hits.clone(), used: Instant::now() });
            if searches.len() > KEEP_SEARCHES {
                searches.sort_by_key(|s| std::cmp::Reverse(s.used));
                searches.truncate(KEEP_SEARCHES);
            }
        }
        // What can change after a line was looked at (a failure resolved since) is checked again.
        let ix = self.read_index();
        let filter = Filter::new(q, self, &ix);
        hits.retain(|n| ix.entries.get(*n as usize).is_some_and(|e| filter.matches(e)));
        Ok((generation, hits))
    }

    /// One page of a query: the total it matches and its rows (heads of the texts).
    pub fn records(&self, q: &Query) -> io::Result<Value> {
        let (generation, hits) = self.select(q)?;
        let total = hits.len();
        let pages = total.div_ceil(q.per).max(1);
        let page = q.page.min(pages);
        let start = (page - 1) * q.per;
        let picked: Vec<u32> = if q.newest_first {
            hits.iter().rev().skip(start).take(q.per).copied().collect()
        } else {
            hits.iter().skip(start).take(q.per).copied().collect()
        };
        let (entries, done_reasons, indexing) = {
            let ix = self.read_index();
            if ix.generation != generation {
                // Indexed again meanwhile: the numbers are another index's.
                return Ok(json!({"total": 0, "page": 1, "pages": 1, "per": q.per, "generation": ix.generation, "indexing": true, "rows": []}));
            }
            let entries: Vec<(u32, Entry)> = picked.iter().filter_map(|n| ix.entries.get(*n as usize).map(|e| (*n, *e))).collect();
            (entries, ix.done_reasons.clone(), !ix.complete)
        };
        let mut rows = Vec::with_capacity(entries.len());
        for (n, e) in entries {
            let line = self.line(&e)?;
            rows.push(self.row(n, &e, &line, &done_reasons));
        }
        Ok(json!({"total": total, "page": page, "pages": pages, "per": q.per, "generation": generation, "indexing": indexing, "rows": rows}))
    }

    fn row(&self, n: u32, e: &Entry, line: &[u8], done_reasons: &[String]) -> Value {
        let f: Texts = serde_json::from_slice(line).unwrap_or_default();
        let failed = e.flags & FAILED != 0;
        json!({
            "n": n,
            "loc": format!("{}:{}", e.file, e.off),
            "failed": failed,
            "resolved": e.flags & RESOLVED != 0,
            "id": f.id,
            "sample": f.sample,
            "stage": self.stages.get(e.stage as usize),
            "parent": f.parent,
            "model": f.model,
            "prompt": f.prompt.as_deref().map(head),
            "response": f.response.as_deref().map(head),
            "error": f.error.as_deref().map(head),
            "tokens": (!failed).then_some(e.tokens),
            "done_reason": done_reasons.get(e.done as usize),
            "invalid": e.invalid,
            "kept": match e.kept { 1 => Some(false), 2 => Some(true), _ => None },
            "at": f.finished_at.or(f.when),
        })
    }

    /// The record at `loc` (`FILE:OFFSET`: the number of its file among the folder's, and the
    /// byte its line starts at; what a table row gives as `loc`), whole, as its file holds it.
    /// A link keeps naming the same record across restarts of the view and as the run goes on.
    pub fn record(&self, loc: &str) -> io::Result<Option<String>> {
        let Some((file, off)) = loc.split_once(':').and_then(|(f, o)| Some((f.parse::<u8>().ok()?, o.parse::<u64>().ok()?))) else { return Ok(None) };
        let (n, e) = {
            let ix = self.read_index();
            match ix.entries.iter().position(|e| e.file == file && e.off == off) {
                Some(n) => (n, ix.entries[n]),
                None => return Ok(None),
            }
        };
        let line = self.line(&e)?;
        let value: Value = match serde_json::from_slice(&line) {
            Ok(v) => v,
            // The file changed under the index (it is indexed again within a second).
            Err(_) => return Ok(None),
        };
        let out = json!({
            "n": n,
            "loc": loc,
            "failed": e.flags & FAILED != 0,
            "resolved": e.flags & RESOLVED != 0,
            "file": self.files[e.file as usize].label,
            "offset": e.off,
            "stage": self.stages.get(e.stage as usize),
            "record": value,
        });
        Ok(Some(out.to_string()))
    }
}

/// The first [`HEAD_CHARS`] characters of a text, on one line.
fn head(s: &str) -> String {
    let mut out: String = s.chars().take(HEAD_CHARS).map(|c| if c.is_control() { ' ' } else { c }).collect();
    if s.chars().nth(HEAD_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// An `inspect` report of one file, kept until the file changes.
struct Summary {
    /// The file's size and inode when the report was made.
    made_for: (u64, u64),
    made_at: Option<Instant>,
    json: Option<Arc<str>>,
    running: bool,
    error: Option<String>,
}

impl Dataset {
    /// The `inspect` report of the dataset (or of a stage): ready, or being made (in the
    /// background; the page asks again). A file that changed gets a new one; the old one is
    /// shown meanwhile, marked stale.
    pub fn summary(self: &Arc<Self>, stage: Option<&str>) -> Result<Value, String> {
        let (path, key) = match stage {
            Some(s) if self.stages.iter().any(|x| x == s) => (crate::stages::stage_jsonl(&self.dir, s), s.to_owned()),
            Some(s) if self.stages.is_empty() => return Err(format!("stage={s}: this is a one-stage run (ask without stage=)")),
            Some(s) => return Err(format!("stage={s}: no such stage (the stages: {})", self.stages.join(", "))),
            None if !self.stages.is_empty() => return Err(format!("a multi-stage run: give stage=NAME (the stages: {})", self.stages.join(", "))),
            None => (self.dir.join("dataset.jsonl"), String::new()),
        };
        let now = std::fs::metadata(&path).map(|m| (m.len(), m.ino())).unwrap_or_default();
        let mut sums = self.summaries.lock().unwrap_or_else(|p| p.into_inner());
        let entry = sums.entry(key.clone()).or_insert(Summary { made_for: (u64::MAX, 0), made_at: None, json: None, running: false, error: None });
        let fresh = entry.made_for == now;
        // A file a run is writing changes all the time: a new report at most every 10 s.
        let due = entry.made_at.is_none_or(|t| t.elapsed() >= SUMMARY_EVERY);
        if !fresh && !entry.running && due {
            entry.running = true;
            let ds = self.clone();
            let stage = stage.map(str::to_owned);
            std::thread::spawn(move || {
                let failures = Some(ds.dir.join("failures.jsonl")).filter(|f| f.is_file());
                let src = Source { dataset: path, csv: false, failures, stage };
                let result = inspect::inspect(&src, &InspectOptions::default()).map_err(|e| e.to_string()).and_then(|r| serde_json::to_string(&r).map_err(|e| e.to_string()));
                let mut sums = ds.summaries.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(s) = sums.get_mut(&key) {
                    s.running = false;
                    s.made_for = now;
                    s.made_at = Some(Instant::now());
                    match result {
                        Ok(j) => {
                            s.json = Some(Arc::from(j));
                            s.error = None;
                        }
                        Err(e) => s.error = Some(e),
                    }
                }
            });
        }
        let report = entry.json.as_deref().map(|j| serde_json::from_str::<Value>(j).unwrap_or(Value::Null));
        Ok(json!({"stage": stage, "ready": report.is_some(), "stale": !fresh, "running": entry.running, "error": entry.error, "report": report}))
    }
}

const VIEW_HTML: &str = include_str!("live/view.html");
const VIEW_JS: &str = include_str!("live/view.js");
const VIEW_CSS: &str = include_str!("live/view.css");

/// Serves the browser of `ds` at `opts.addr` (see [`crate::web::serve`]).
pub async fn serve(opts: &ServeOptions, ds: Arc<Dataset>) -> anyhow::Result<Server> {
    web::serve(opts, "view --serve", router(ds)).await
}

/// A route's work, on a blocking thread: the dataset and the query's parameters to an answer.
type Handler = fn(&Arc<Dataset>, Vec<(String, String)>) -> axum::response::Response;

fn router(ds: Arc<Dataset>) -> axum::Router {
    use axum::http::Uri;
    use axum::routing::get;
    let with = |f: Handler| {
        let ds = ds.clone();
        get(move |uri: Uri| {
            let ds = ds.clone();
            async move {
                let pairs = web::query_pairs(uri.query());
                tokio::task::spawn_blocking(move || f(&ds, pairs)).await.unwrap_or_else(|e| web::bad_request(format!("internal error: {e}\n")))
            }
        })
    };
    axum::Router::new()
        .route("/", get(|| async { web::page("text/html; charset=utf-8", VIEW_HTML) }))
        .route("/view.js", get(|| async { web::page("text/javascript; charset=utf-8", VIEW_JS) }))
        .route("/view.css", get(|| async { web::page("text/css; charset=utf-8", VIEW_CSS) }))
        .route("/app.css", get(|| async { web::page("text/css; charset=utf-8", crate::live::APP_CSS) }))
        .route("/api/info", with(|ds, _| web::json(ds.info().to_string())))
        .route(
            "/api/records",
            with(|ds, pairs| match Query::from_pairs(&pairs) {
                Err(e) => web::bad_request(e + "\n"),
                Ok(q) => match ds.records(&q) {
                    Ok(v) => web::json(v.to_string()),
                    Err(e) => server_error(e),
                },
            }),
        )
        .route(
            "/api/record",
            with(|ds, pairs| {
                let Some(loc) = pairs.iter().find(|(k, _)| k == "loc").map(|(_, v)| v.clone()) else {
                    return web::bad_request("loc=FILE:OFFSET: which record (a row's loc)\n".into());
                };
                match ds.record(&loc) {
                    Ok(Some(j)) => web::json(j),
                    Ok(None) => (axum::http::StatusCode::NOT_FOUND, "no such record\n").into_response(),
                    Err(e) => server_error(e),
                }
            }),
        )
        .route(
            "/api/summary",
            with(|ds, pairs| {
                let stage = pairs.iter().find(|(k, _)| k == "stage").map(|(_, v)| v.as_str()).filter(|s| !s.is_empty());
                match ds.summary(stage) {
                    Ok(v) => web::json(v.to_string()),
                    Err(e) => web::bad_request(e + "\n"),
                }
            }),
        )
}

fn server_error(e: io::Error) -> axum::response::Response {
    (axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read the dataset: {e}\n")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, lines: &[Value]) {
        let mut s = String::new();
        for l in lines {
            s.push_str(&l.to_string());
            s.push('\n');
        }
        std::fs::create_dir_all(dir.join(name).parent().unwrap()).unwrap();
        std::fs::write(dir.join(name), s).unwrap();
    }

    fn rec(id: &str, prompt: &str, response: &str, done: &str, key: &str) -> Value {
        json!({"id": id, "sample": 0, "model": "m", "prompt": prompt, "response": response, "done_reason": done, "completion_tokens": 7, "key": key, "input": {"q": prompt}})
    }

    fn query(pairs: &[(&str, &str)]) -> Query {
        Query::from_pairs(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>()).unwrap()
    }

    fn ids(v: &Value) -> Vec<String> {
        v["rows"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect()
    }

    #[test]
    fn index_search_filters_and_failures() {
        let t = tempfile::tempdir().unwrap();
        write(
            t.path(),
            "dataset.jsonl",
            &[
                rec("a", "What is Rust?", "A language.", "stop", "k1"),
                rec("b", "Café au lait", "Une boisson \"chaude\"", "length", "k2"),
                rec("c", "Tabs\there", "Ünïcode ANSWER", "stop", "k3"),
            ],
        );
        write(
            t.path(),
            "failures.jsonl",
            &[
                json!({"id": "b", "sample": 0, "model": "m", "error": "timed out", "attempts": 3, "retryable": true, "key": "k2", "when": "x"}),
                json!({"id": "d", "sample": 0, "model": "m", "error": "HTTP 400: bad", "attempts": 1, "retryable": false, "key": "k9", "when": "x"}),
            ],
        );
        let ds = Dataset::open(t.path()).unwrap();
        ds.index_now().unwrap();
        let all = ds.records(&query(&[])).unwrap();
        assert_eq!(all["total"], 5);
        assert_eq!(ids(&all), ["a", "b", "c", "b", "d"]);
        // The failure of b was resolved by its record; d's was not.
        assert_eq!(all["rows"][3]["resolved"], true);
        assert_eq!(all["rows"][4]["resolved"], false);
        assert_eq!(ids(&ds.records(&query(&[("status", "failed")])).unwrap()), ["d"]);
        assert_eq!(ids(&ds.records(&query(&[("status", "failures")])).unwrap()), ["b", "d"]);
        assert_eq!(ids(&ds.records(&query(&[("done_reason", "length")])).unwrap()), ["b"]);
        assert_eq!(ids(&ds.records(&query(&[("done_reason", "nonesuch")])).unwrap()), Vec::<String>::new());
        // Search: any letter case, words anywhere, phrases in quotes, escapes and non-ASCII.
        assert_eq!(ids(&ds.records(&query(&[("q", "rust")])).unwrap()), ["a"]);
        assert_eq!(ids(&ds.records(&query(&[("q", "CAFÉ")])).unwrap()), ["b"]);
        assert_eq!(ids(&ds.records(&query(&[("q", "\"chaude\"")])).unwrap()), ["b"]);
        assert_eq!(ids(&ds.records(&query(&[("q", "boisson \"chaude")])).unwrap()), ["b"]);
        assert_eq!(ids(&ds.records(&query(&[("q", "tabs\there")])).unwrap()), ["c"]);
        assert_eq!(ids(&ds.records(&query(&[("q", "ünïcode answer")])).unwrap()), ["c"]);
        assert_eq!(ids(&ds.records(&query(&[("q", "timed")])).unwrap()), ["b"]);
        assert_eq!(ids(&ds.records(&query(&[("q", "language nope")])).unwrap()), Vec::<String>::new());
        // The input is not searched (only id, prompt, response, thinking, error).
        assert_eq!(ids(&ds.records(&query(&[("q", "\"q\"")])).unwrap()), Vec::<String>::new());
        // Paging, newest first.
        let p = ds.records(&query(&[("per", "2"), ("page", "2"), ("order", "newest")])).unwrap();
        assert_eq!((p["pages"].as_u64(), ids(&p)), (Some(3), vec!["c".to_owned(), "b".to_owned()]));
        let loc = all["rows"][1]["loc"].as_str().unwrap().to_owned();
        let r: Value = serde_json::from_str(&ds.record(&loc).unwrap().unwrap()).unwrap();
        assert_eq!(r["record"]["response"], "Une boisson \"chaude\"");
        assert!(ds.record("0:1").unwrap().is_none(), "not where a line starts");
        assert!(ds.record("9:0").unwrap().is_none());
        assert!(ds.record("junk").unwrap().is_none());
        // An id, exactly.
        assert_eq!(ids(&ds.records(&query(&[("id", "b")])).unwrap()), ["b", "b"]);
        assert_eq!(ids(&ds.records(&query(&[("id", "b"), ("status", "finished")])).unwrap()), ["b"]);
    }

    #[test]
    fn follows_a_growing_file_and_a_replaced_one() {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), "dataset.jsonl", &[rec("a", "p", "r", "stop", "k1")]);
        let ds = Dataset::open(t.path()).unwrap();
        ds.index_now().unwrap();
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(t.path().join("dataset.jsonl")).unwrap();
        let line = rec("b", "p2", "needle", "stop", "k2").to_string();
        // A line being written (no newline yet) is not indexed.
        f.write_all(&line.as_bytes()[..10]).unwrap();
        ds.index_now().unwrap();
        assert_eq!(ds.records(&query(&[("q", "needle")])).unwrap()["total"], 0);
        assert_eq!(ds.records(&query(&[])).unwrap()["total"], 1);
        f.write_all(&line.as_bytes()[10..]).unwrap();
        f.write_all(b"\n").unwrap();
        ds.index_now().unwrap();
        // The kept search goes on from where it stopped.
        assert_eq!(ids(&ds.records(&query(&[("q", "needle")])).unwrap()), ["b"]);
        // Replaced by a shorter file: indexed again from the start.
        write(t.path(), "dataset.jsonl", &[rec("z", "p", "r", "stop", "k1")]);
        ds.index_now().unwrap();
        assert_eq!(ids(&ds.records(&query(&[])).unwrap()), ["z"]);
    }

    #[test]
    fn a_file_rewritten_in_place_is_indexed_again() {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), "dataset.jsonl", &[rec("a", "p", "r", "stop", "k1"), rec("b", "p", "r", "stop", "k2")]);
        let ds = Dataset::open(t.path()).unwrap();
        ds.index_now().unwrap();
        // Same inode, longer: what `cat new > dataset.jsonl` does.
        let mut s = String::new();
        for id in ["x", "y", "z"] {
            s.push_str(&rec(id, "other prompt", "other reply", "length", "k").to_string());
            s.push('\n');
        }
        std::fs::write(t.path().join("dataset.jsonl"), s).unwrap();
        ds.index_now().unwrap();
        assert_eq!(ids(&ds.records(&query(&[])).unwrap()), ["x", "y", "z"]);
        assert_eq!(ds.info()["generation"], 1);
    }

    #[test]
    fn failures_are_resolved_by_records_before_and_after_them() {
        let t = tempfile::tempdir().unwrap();
        // More than a first chunk of records, so that they go to the index in several.
        let many: Vec<Value> = (0..1500).map(|i| rec(&format!("r{i}"), "p", "r", "stop", &format!("k{i}"))).collect();
        write(t.path(), "dataset.jsonl", &many);
        let ds = Dataset::open(t.path()).unwrap();
        ds.index_now().unwrap();
        assert_eq!(ds.records(&query(&[])).unwrap()["total"], 1500);
        // A failure of a request whose record came in an earlier pass, and one still open.
        let fail = |id: &str, key: &str| json!({"id": id, "sample": 0, "model": "m", "error": "boom", "attempts": 1, "retryable": true, "key": key, "when": "x"});
        write(t.path(), "failures.jsonl", &[fail("r7", "k7"), fail("zz", "kzz"), fail("zz", "kzz")]);
        ds.index_now().unwrap();
        assert_eq!(ids(&ds.records(&query(&[("status", "failed")])).unwrap()), ["zz", "zz"]);
        let info = ds.info();
        assert_eq!((info["failures"].as_u64(), info["failed_requests"].as_u64(), info["unresolved_requests"].as_u64()), (Some(3), Some(2), Some(1)));
        // A kept search follows a failure resolved after it was made.
        assert_eq!(ids(&ds.records(&query(&[("status", "failed"), ("q", "boom")])).unwrap()), ["zz", "zz"]);
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(t.path().join("dataset.jsonl")).unwrap();
        writeln!(f, "{}", rec("zz", "p", "r", "stop", "kzz")).unwrap();
        ds.index_now().unwrap();
        assert_eq!(ds.records(&query(&[("status", "failed"), ("q", "boom")])).unwrap()["total"], 0);
        assert_eq!(ds.records(&query(&[("status", "failed")])).unwrap()["total"], 0);
        // A field of an odd type does not hide its record.
        writeln!(f, r#"{{"id":"odd","kept":"yes","completion_tokens":"many","sample":"first","key":"ko","response":"r"}}"#).unwrap();
        ds.index_now().unwrap();
        assert_eq!(ids(&ds.records(&query(&[("id", "odd")])).unwrap()), ["odd"]);
    }

    #[test]
    fn multi_stage_folders_filter_by_stage_and_kept() {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), "manifest.json", &[json!({"stages": [{"name": "answer"}, {"name": "judge"}]})]);
        let mut j1 = rec("a", "judge this", "{\"ok\":true}", "stop", "j1");
        j1["stage"] = json!("judge");
        j1["kept"] = json!(true);
        let mut j2 = rec("b", "judge that", "{\"ok\":false}", "stop", "j2");
        j2["stage"] = json!("judge");
        j2["kept"] = json!(false);
        write(t.path(), "stages/answer.jsonl", &[rec("a", "q1", "a1", "stop", "a1"), rec("b", "q2", "a2", "stop", "a2")]);
        write(t.path(), "stages/judge.jsonl", &[j1, j2]);
        write(t.path(), "failures.jsonl", &[json!({"id": "c", "sample": 0, "model": "m", "error": "boom", "attempts": 1, "retryable": false, "key": "x", "when": "x", "stage": "judge"})]);
        let ds = Dataset::open(t.path()).unwrap();
        ds.index_now().unwrap();
        assert_eq!(ds.records(&query(&[])).unwrap()["total"], 5);
        assert_eq!(ids(&ds.records(&query(&[("stage", "judge")])).unwrap()), ["a", "b", "c"]);
        assert_eq!(ids(&ds.records(&query(&[("stage", "judge"), ("kept", "no")])).unwrap()), ["b"]);
        assert_eq!(ids(&ds.records(&query(&[("kept", "unjudged")])).unwrap()), ["a", "b"]);
        assert_eq!(ds.records(&query(&[("stage", "nonesuch")])).unwrap()["total"], 0);
        let info = ds.info();
        assert_eq!(info["per_stage"], json!([2, 2]));
        assert_eq!(info["unresolved_failures"], 1);
        assert!(Query::from_pairs(&[("kept".into(), "maybe".into())]).is_err());
    }
}
