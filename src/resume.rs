//! Resume state: what an output folder already holds, read back before a run so that re-running
//! the same command continues where the last run stopped.
//!
//! `dataset.jsonl` is the truth. On start, a torn last line (a crash mid-write) is cut off and
//! its bytes kept beside the file; `dataset.csv` is then checked record by record against the
//! JSONL and repaired from it (a torn or missing tail re-appended, anything else rebuilt). The
//! keys of the records it holds say which requests are done: a request is done when a record
//! with its exact key exists, so an edited template, another model or other options make a row
//! run again while its old record stays in the file.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::config::OutputFormat;
use crate::dataset::{CsvFile, JsonlReader, OutputPaths, RecordSink};
use crate::record::{csv_columns, Record};

#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}:{line}: not a dataset record ({message}); fix or remove that line, or start over with --fresh")]
    BadLine { path: PathBuf, line: u64, message: String },
    #[error(
        "{jsonl} is missing or empty, but {csv} holds {records} records. The JSONL is the dataset's truth (the CSV \
         lacks each record's input row), so nothing was run: running now would redo all of that work.\n\
         Restore {jsonl} (from a backup or the trash), or rebuild it from the CSV (the records lose their `input` \
         rows) with:\n    data_generator export {csv} --format jsonl -o {jsonl}\n\
         or start over, keeping the old folder aside, with --fresh."
    )]
    JsonlMissing { jsonl: PathBuf, csv: PathBuf, records: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ResumeError + '_ {
    move |source| ResumeError::Io { path: path.to_owned(), source }
}

/// A record's key as a number (32 hex digits); None for anything else.
pub fn parse_key(k: &str) -> Option<u128> {
    (k.len() == 32).then(|| u128::from_str_radix(k, 16).ok()).flatten()
}

/// A set of request keys, 16 bytes each (a sorted vector: a million keys hold 16 MB, where a
/// hash set holds twice that and more while it grows), with a directory of where each range of
/// keys starts (2 bytes a key). Filled, then [`KeySet::seal`]ed once.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<u128>,
    /// `dir[b]`: the index of the first key whose top `bits` bits are `b` or more (`dir[2^bits]`
    /// is the number of keys).
    dir: Vec<u32>,
    bits: u32,
}

impl KeySet {
    pub fn insert(&mut self, key: u128) {
        self.keys.push(key);
    }

    /// Sorts, drops repeats and makes the directory; [`KeySet::contains`] needs it.
    pub fn seal(&mut self) {
        self.keys.sort_unstable();
        self.keys.dedup();
        self.keys.shrink_to_fit();
        // About one range per 8 keys: keys are hashes, spread evenly, so a key's range holds a
        // handful and a lookup reads two places (the directory and one cache line or two of keys)
        // where a binary search over a million keys reads twenty.
        self.bits = (self.keys.len() / 8).max(1).ilog2().min(28);
        let ranges = 1usize << self.bits;
        self.dir = Vec::with_capacity(ranges + 1);
        let mut i = 0;
        for b in 0..ranges {
            while i < self.keys.len() && self.range(self.keys[i]) < b {
                i += 1;
            }
            self.dir.push(i as u32);
        }
        self.dir.push(self.keys.len() as u32);
    }

    fn range(&self, key: u128) -> usize {
        if self.bits == 0 { 0 } else { (key >> (128 - self.bits)) as usize }
    }

    /// Correct for any keys; fast for keys spread evenly (hashes).
    pub fn contains(&self, key: &u128) -> bool {
        if self.keys.len() > u32::MAX as usize || self.dir.is_empty() {
            return self.keys.binary_search(key).is_ok();
        }
        let b = self.range(*key);
        self.keys[self.dir[b] as usize..self.dir[b + 1] as usize].binary_search(key).is_ok()
    }
}

/// What resume reads of a record: its key, why it ended and when (the rest of the line is
/// skipped, not built).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct RecordHead {
    key: String,
    done_reason: Option<String>,
    finished_at: String,
}

/// What resume reads of a failure.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct FailureHead {
    key: String,
    when: String,
}

/// What the folder held before this run.
#[derive(Debug, Default)]
pub struct Prior {
    /// Keys of every record in the dataset.
    pub done: KeySet,
    /// Keys whose latest record was cut off by `num_predict` (`done_reason: length`).
    pub truncated: HashSet<u128>,
    /// Keys in `failures.jsonl` that no record has answered since.
    pub failed: HashSet<u128>,
    /// Records in `dataset.jsonl`.
    pub records: u64,
    /// Records and failures written at or after the `since` time given to [`load`]: what a
    /// run that never recorded its end (killed) had finished.
    pub records_since: u64,
    pub failures_since: u64,
    /// What was repaired, for the log and the user.
    pub repairs: Vec<String>,
}

/// Cuts an unterminated last line off a line-oriented file, keeping the cut bytes in
/// `<file>.torn-<n>` beside it. Returns the note of what was done.
pub fn cut_torn_tail(path: &Path) -> Result<Option<String>, ResumeError> {
    let mut f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let len = f.metadata().map_err(io_err(path))?.len();
    if len == 0 {
        return Ok(None);
    }
    // Scan back from the end for the last newline, a block at a time.
    let mut end = len;
    let mut keep = 0u64;
    let mut block = vec![0u8; 64 * 1024];
    'scan: while end > 0 {
        let start = end.saturating_sub(block.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start)).map_err(io_err(path))?;
        f.read_exact(&mut block[..n]).map_err(io_err(path))?;
        if let Some(i) = block[..n].iter().rposition(|b| *b == b'\n') {
            keep = start + i as u64 + 1;
            break 'scan;
        }
        end = start;
    }
    if keep == len {
        return Ok(None);
    }
    let mut torn = Vec::with_capacity((len - keep) as usize);
    f.seek(SeekFrom::Start(keep)).map_err(io_err(path))?;
    f.read_to_end(&mut torn).map_err(io_err(path))?;
    // A whole record whose newline was stripped (an editor does that) is no torn write: keep it.
    if serde_json::from_slice::<serde_json::Value>(&torn).is_ok_and(|v| v.is_object()) {
        f.seek(SeekFrom::End(0)).map_err(io_err(path))?;
        f.write_all(b"\n").and_then(|_| f.sync_all()).map_err(io_err(path))?;
        return Ok(Some(format!("{}: the last record had no newline at its end; added it", path.display())));
    }
    let saved = save_aside(path, "torn", &torn)?;
    f.set_len(keep).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(Some(format!(
        "{}: cut off a torn last line ({} bytes, kept in {})",
        path.display(),
        torn.len(),
        saved.display()
    )))
}

/// Writes bytes to `<file>.<what>-<n>` (the first free n) and returns that path.
fn save_aside(path: &Path, what: &str, bytes: &[u8]) -> Result<PathBuf, ResumeError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    for n in 1.. {
        let p = path.with_file_name(format!("{name}.{what}-{n}"));
        match OpenOptions::new().write(true).create_new(true).open(&p) {
            Ok(mut f) => {
                f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io_err(&p))?;
                return Ok(p);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(&p)(e)),
        }
    }
    unreachable!("an unbounded range always yields")
}

/// Reads a JSONL file of `T`, calling `each` with every record and its line number.
fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path, mut each: impl FnMut(T, u64)) -> Result<(), ResumeError> {
    let lines = match JsonlReader::<T>::open(path) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    for item in lines {
        match item.map_err(io_err(path))? {
            (line, Ok(v)) => each(v, line),
            // An unterminated last line is torn: `load` cuts it when it may write; else it is no record.
            (_, Err(bad)) if bad.torn => return Ok(()),
            (line, Err(bad)) => return Err(ResumeError::BadLine { path: path.to_owned(), line, message: bad.error }),
        }
    }
    Ok(())
}

/// Whether a file's last byte is not a newline (a torn last line).
fn has_torn_tail(path: &Path) -> Result<bool, ResumeError> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() > 0 => Ok(!ends_with_newline(path, m.len())?),
        Ok(_) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Reads the keys of the dataset's records and failures; with `order`, also each record's key in
/// file order (0 for a record without one), for reconciling the CSV.
fn read_back(paths: &OutputPaths, csv_only: bool, order: Option<&mut Vec<u128>>, since: Option<&str>) -> Result<Prior, ResumeError> {
    let mut prior = Prior::default();
    let mut records_since = 0u64;
    let mut failures_since = 0u64;
    // RFC 3339 UTC times of one format compare as text.
    let after = |t: &str| since.is_some_and(|s| !t.is_empty() && t >= s);
    let mut order = order;
    // The latest record of a key says whether it is truncated: a later whole one clears it.
    let mut note = |key: Option<u128>, truncated: bool| {
        prior.records += 1;
        if let Some(o) = order.as_deref_mut() {
            o.push(key.unwrap_or(0));
        }
        if let Some(k) = key {
            prior.done.insert(k);
            if truncated {
                prior.truncated.insert(k);
            } else if !prior.truncated.is_empty() {
                prior.truncated.remove(&k);
            }
        }
    };
    if csv_only {
        for (key, _, truncated) in CsvKeys::open(&paths.csv)? {
            note(key, truncated);
        }
    } else {
        read_jsonl::<RecordHead>(&paths.jsonl, |r, _| {
            records_since += u64::from(after(&r.finished_at));
            note(parse_key(&r.key), r.done_reason.as_deref() == Some("length"))
        })?;
    }
    prior.done.seal();
    read_jsonl::<FailureHead>(&paths.failures, |f, _| {
        failures_since += u64::from(after(&f.when));
        if let Some(k) = parse_key(&f.key) {
            prior.failed.insert(k);
        }
    })?;
    prior.records_since = records_since;
    prior.failures_since = failures_since;
    prior.failed.retain(|k| !prior.done.contains(k));
    Ok(prior)
}

/// Whether the CSV is the only dataset file (no JSONL configured or present).
fn csv_only(paths: &OutputPaths, formats: &[OutputFormat]) -> bool {
    !formats.contains(&OutputFormat::Jsonl) && formats.contains(&OutputFormat::Csv) && !paths.jsonl.exists()
}

/// Reads what the folder holds without changing anything (for a dry run): torn tails are
/// noted, not cut, and the CSV is not reconciled.
pub fn scan(paths: &OutputPaths, formats: &[OutputFormat]) -> Result<Prior, ResumeError> {
    refuse_csv_without_jsonl(paths, formats)?;
    let mut notes = Vec::new();
    for p in [&paths.jsonl, &paths.failures] {
        if has_torn_tail(p)? {
            notes.push(format!("{}: has a torn last line; a run will cut it off and keep it aside", p.display()));
        }
    }
    let mut prior = read_back(paths, csv_only(paths, formats), None, None)?;
    prior.repairs = notes;
    Ok(prior)
}

/// A CSV with records beside a JSONL that is gone: rebuilding the CSV from the JSONL would set
/// every record aside and run the whole batch again. Refuse, and say how to get the JSONL back.
fn refuse_csv_without_jsonl(paths: &OutputPaths, formats: &[OutputFormat]) -> Result<(), ResumeError> {
    if !formats.contains(&OutputFormat::Jsonl) {
        return Ok(());
    }
    let jsonl_len = match std::fs::metadata(&paths.jsonl) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_err(&paths.jsonl)(e)),
    };
    if jsonl_len > 0 {
        return Ok(());
    }
    let records = CsvKeys::open(&paths.csv)?.count() as u64;
    if records == 0 {
        return Ok(());
    }
    Err(ResumeError::JsonlMissing { jsonl: paths.jsonl.clone(), csv: paths.csv.clone(), records })
}

/// Repairs the folder's files and reads what they hold. `since` (an RFC 3339 time) asks for the
/// count of records and failures finished from then on (see [`Prior::records_since`]).
/// With `schema`, the CSV has the `parsed` and `invalid` columns of a run with a schema.
pub fn load(paths: &OutputPaths, formats: &[OutputFormat], since: Option<&str>, schema: bool) -> Result<Prior, ResumeError> {
    refuse_csv_without_jsonl(paths, formats)?;
    let mut repairs = Vec::new();
    for p in [&paths.jsonl, &paths.failures] {
        repairs.extend(cut_torn_tail(p)?);
    }
    let only_csv = csv_only(paths, formats);
    if only_csv {
        // The CSV is the truth; only its tail can be torn.
        repairs.extend(cut_torn_csv(&paths.csv)?);
    }
    let mut order = Vec::new();
    let mut prior = read_back(paths, only_csv, Some(&mut order), since)?;
    if !only_csv && formats.contains(&OutputFormat::Csv) {
        repairs.extend(reconcile_csv(&paths.csv, &paths.jsonl, &order, schema)?);
    }
    prior.repairs = repairs;
    Ok(prior)
}

/// The records of one of our CSV files, one at a time: each one's key, the byte offset where it
/// ends, and whether it was cut off by `num_predict` (`done_reason` `length`). Stops at the first
/// record that is not whole (wrong column count, bad quoting). A file that is missing, empty or
/// not ours (another header) has no records.
struct CsvKeys {
    reader: Option<csv::Reader<BufReader<File>>>,
    key_col: usize,
    reason_col: usize,
    columns: usize,
    rec: csv::ByteRecord,
}

impl CsvKeys {
    fn open(path: &Path) -> Result<CsvKeys, ResumeError> {
        let none = CsvKeys { reader: None, key_col: 0, reason_col: 0, columns: 0, rec: csv::ByteRecord::new() };
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(none),
            Err(e) => return Err(io_err(path)(e)),
        };
        let mut r = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(BufReader::with_capacity(256 * 1024, f));
        let header: Vec<String> = match r.headers() {
            Ok(h) => h.iter().map(str::to_owned).collect(),
            Err(_) => return Ok(none),
        };
        // Ours, with or without a schema's columns.
        if header != csv_columns(false) && header != csv_columns(true) {
            return Ok(none);
        }
        let col = |name: &str| header.iter().position(|c| c == name).unwrap_or(0);
        Ok(CsvKeys { key_col: col("key"), reason_col: col("done_reason"), columns: header.len(), reader: Some(r), rec: csv::ByteRecord::new() })
    }
}

impl Iterator for CsvKeys {
    type Item = (Option<u128>, u64, bool);

    fn next(&mut self) -> Option<Self::Item> {
        let r = self.reader.as_mut()?;
        match r.read_byte_record(&mut self.rec) {
            Ok(true) if self.rec.len() == self.columns => {
                let key = self.rec.get(self.key_col).and_then(|k| std::str::from_utf8(k).ok()).and_then(parse_key);
                let truncated = self.rec.get(self.reason_col) == Some(b"length".as_slice());
                Some((key, r.position().byte(), truncated))
            }
            _ => {
                self.reader = None;
                None
            }
        }
    }
}

/// The CSV's header row ends where its first record starts: for a header of ours, and with
/// `schema`, for the header of a run with (or without) a schema only.
fn csv_header_end(path: &Path, schema: Option<bool>) -> Option<u64> {
    let f = File::open(path).ok()?;
    let mut r = csv::ReaderBuilder::new().has_headers(true).from_reader(BufReader::new(f));
    let h = r.headers().ok()?;
    let is = |schema: bool| h.iter().eq(csv_columns(schema));
    let ours = match schema {
        Some(s) => is(s),
        None => is(false) || is(true),
    };
    ours.then(|| r.position().byte())
}

/// Cuts a CSV file after its last complete record (terminated, with every column).
fn cut_torn_csv(path: &Path) -> Result<Option<String>, ResumeError> {
    let Ok(len) = std::fs::metadata(path).map(|m| m.len()) else { return Ok(None) };
    let mut end = CsvKeys::open(path)?.last().map(|k| k.1).or_else(|| csv_header_end(path, None)).unwrap_or(0);
    if end > len {
        end = len;
    }
    truncate_keeping(path, end, len)
}

/// Truncates `path` to `keep` bytes, saving the rest aside.
fn truncate_keeping(path: &Path, keep: u64, len: u64) -> Result<Option<String>, ResumeError> {
    if keep >= len {
        return Ok(None);
    }
    let mut f = OpenOptions::new().read(true).write(true).open(path).map_err(io_err(path))?;
    let mut cut = Vec::new();
    f.seek(SeekFrom::Start(keep)).map_err(io_err(path))?;
    f.read_to_end(&mut cut).map_err(io_err(path))?;
    let saved = save_aside(path, "torn", &cut)?;
    f.set_len(keep).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(Some(format!("{}: cut off {} bytes after the last complete record (kept in {})", path.display(), cut.len(), saved.display())))
}

/// Makes the CSV hold exactly the JSONL's records, in order: keeps the longest prefix that
/// matches (a record counts only when terminated), cuts the rest aside, re-appends what is missing.
pub fn reconcile_csv(csv_path: &Path, jsonl: &Path, order: &[u128], schema: bool) -> Result<Option<String>, ResumeError> {
    let len = match std::fs::metadata(csv_path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_err(csv_path)(e)),
    };
    let header_end = if len == 0 { None } else { csv_header_end(csv_path, Some(schema)) };
    let (matched, keep) = match header_end {
        None if len == 0 => (0, 0),
        None => {
            // Not our CSV (or a torn header): set it aside whole and rebuild.
            let mut bytes = Vec::new();
            File::open(csv_path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io_err(csv_path))?;
            let saved = save_aside(csv_path, "replaced", &bytes)?;
            std::fs::remove_file(csv_path).map_err(io_err(csv_path))?;
            let note = format!(
                "{}: not the columns this run writes (another tool's file, or a schema added or removed); moved to {} and rebuilt from the JSONL",
                csv_path.display(),
                saved.display()
            );
            append_from_jsonl(csv_path, jsonl, 0, schema)?;
            return Ok(Some(note));
        }
        Some(h) => {
            let mut matched = 0;
            let mut keep = h;
            for (i, (k, end, _)) in CsvKeys::open(csv_path)?.enumerate() {
                // A record is complete only when its line ended; the file's last byte must be a newline.
                let terminated = end < len || ends_with_newline(csv_path, len)?;
                if i < order.len() && k == Some(order[i]) && order[i] != 0 && terminated {
                    matched += 1;
                    keep = end;
                } else {
                    break;
                }
            }
            (matched, keep.min(len))
        }
    };
    if matched == order.len() && keep == len {
        return Ok(None);
    }
    let cut = if keep < len { truncate_keeping(csv_path, keep, len)? } else { None };
    let appended = append_from_jsonl(csv_path, jsonl, matched, schema)?;
    let mut note = cut.unwrap_or_else(|| format!("{}: behind the JSONL", csv_path.display()));
    note.push_str(&format!("; re-appended {appended} records from {}", jsonl.display()));
    Ok(Some(note))
}

fn ends_with_newline(path: &Path, len: u64) -> Result<bool, ResumeError> {
    if len == 0 {
        return Ok(false);
    }
    let mut f = File::open(path).map_err(io_err(path))?;
    f.seek(SeekFrom::Start(len - 1)).map_err(io_err(path))?;
    let mut b = [0u8; 1];
    f.read_exact(&mut b).map_err(io_err(path))?;
    Ok(b[0] == b'\n')
}

/// Appends the JSONL's records from index `skip` on to the CSV (creating it with its header).
fn append_from_jsonl(csv_path: &Path, jsonl: &Path, skip: usize, schema: bool) -> Result<u64, ResumeError> {
    let mut sink = CsvFile::open(csv_path, schema).map_err(|e| ResumeError::Io { path: csv_path.to_owned(), source: io::Error::other(e) })?;
    let mut n = 0u64;
    let mut idx = 0usize;
    let mut failed: Option<io::Error> = None;
    read_jsonl::<Record>(jsonl, |r, _| {
        if idx >= skip && failed.is_none() {
            match sink.write(&r) {
                Ok(()) => n += 1,
                Err(e) => failed = Some(e),
            }
        }
        idx += 1;
    })?;
    if let Some(e) = failed {
        return Err(io_err(csv_path)(e));
    }
    sink.sync().map_err(io_err(csv_path))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_sets_find_what_they_hold_whatever_the_spread() {
        let mut x: u64 = 7;
        let mut next = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            x
        };
        // Even keys (hashes), and keys bunched at one end.
        for (bunched, n) in [false, true].into_iter().flat_map(|b| [1, 9, 17, 100, 5000].map(|n| (b, n))) {
            let mut set = KeySet::default();
            let mut held = Vec::new();
            for _ in 0..n {
                let hi = if bunched { next() >> 40 } else { next() };
                let k = (u128::from(hi) << 64) | u128::from(next());
                set.insert(k);
                held.push(k);
            }
            set.seal();
            for k in &held {
                assert!(set.contains(k));
                assert!(!set.contains(&(k ^ 1)) || held.contains(&(k ^ 1)));
            }
            assert!(!set.contains(&0) || held.contains(&0));
            assert!(!set.contains(&u128::MAX));
        }
        assert!(!KeySet::default().contains(&5));
    }

    #[test]
    fn torn_tail_is_cut_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dataset.jsonl");
        std::fs::write(&p, b"{\"a\":1}\n{\"b\":2}\n{\"c\":").unwrap();
        let note = cut_torn_tail(&p).unwrap().unwrap();
        assert!(note.contains("5 bytes"), "{note}");
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"a\":1}\n{\"b\":2}\n");
        assert_eq!(std::fs::read(dir.path().join("dataset.jsonl.torn-1")).unwrap(), b"{\"c\":");
        assert!(cut_torn_tail(&p).unwrap().is_none());
        // A file that is one torn line.
        std::fs::write(&p, b"{\"x\"").unwrap();
        cut_torn_tail(&p).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"");
        assert!(dir.path().join("dataset.jsonl.torn-2").exists());
        // A whole record without its newline is kept, and the newline added.
        std::fs::write(&p, b"{\"a\":1}\n{\"b\":2}").unwrap();
        let note = cut_torn_tail(&p).unwrap().unwrap();
        assert!(note.contains("added"), "{note}");
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"a\":1}\n{\"b\":2}\n");
    }

    #[test]
    fn keys_parse() {
        assert_eq!(parse_key("0000000000000000000000000000000a"), Some(10));
        assert_eq!(parse_key("xyz"), None);
    }
}
