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
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::config::OutputFormat;
use crate::index::{self, Covered};
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
    /// How the records were read (from the index or the dataset), for the log.
    pub read_note: String,
}

/// What became of the dataset's index when the records were read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IndexRead {
    /// Not kept for these files (no JSONL, or `check` of a CSV-only folder).
    NotKept,
    Missing,
    /// It held for the files: the records it covers were taken from it.
    Held,
    /// It did not hold for the files (edited, or written for other formats): the dataset was read.
    DidNotHold,
}

impl Prior {
    /// One more record: its key is done; the latest record of a key says whether it is
    /// truncated (a later whole one clears it).
    fn note(&mut self, key: Option<u128>, truncated: bool) {
        self.records += 1;
        if let Some(k) = key {
            self.done.insert(k);
            if truncated {
                self.truncated.insert(k);
            } else if !self.truncated.is_empty() {
                self.truncated.remove(&k);
            }
        }
    }
}

/// The records read from the dataset's files rather than from its index (every record when
/// there is no index that holds), in order: what the CSV is reconciled with and the index
/// extended by. 32 bytes a record, 40 with a CSV.
#[derive(Debug, Default)]
struct Tail {
    /// Each record's key; 0 for a record whose key is not one of ours.
    keys: Vec<u128>,
    jsonl_ends: Vec<u64>,
    /// Each record's `finished_at` (milliseconds), and its top bit for `done_reason: length`.
    meta: Vec<u64>,
    /// Where each record's CSV row ends, once the CSV is reconciled.
    csv_ends: Vec<u64>,
}

impl Tail {
    fn push(&mut self, key: Option<u128>, jsonl_end: u64, truncated: bool, finished_at: &str) {
        self.keys.push(key.unwrap_or(0));
        self.jsonl_ends.push(jsonl_end);
        self.meta.push(index::millis(finished_at) | if truncated { index::TRUNCATED } else { 0 });
    }

    /// The index's entries of these records.
    fn entries(&self) -> impl Iterator<Item = index::Entry> + '_ {
        (0..self.keys.len()).map(|i| index::Entry {
            key: (self.keys[i] != 0).then_some(self.keys[i]),
            jsonl_end: self.jsonl_ends[i],
            csv_end: self.csv_ends.get(i).copied().unwrap_or(0),
            truncated: self.meta[i] & index::TRUNCATED != 0,
            finished_ms: self.meta[i] & !index::TRUNCATED,
        })
    }
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
    read_jsonl_from(path, 0, |v, line, _| each(v, line))
}

/// [`read_jsonl`] from byte `from` on (the start of a line), with where each record's line ends.
fn read_jsonl_from<T: serde::de::DeserializeOwned>(path: &Path, from: u64, mut each: impl FnMut(T, u64, u64)) -> Result<(), ResumeError> {
    let mut lines = match JsonlReader::<T>::open_at(path, from) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    while let Some(item) = lines.next() {
        match item.map_err(io_err(path))? {
            (line, Ok(v)) => each(v, line, lines.offset()),
            // An unterminated last line is torn: `load` cuts it when it may write; else it is no record.
            (_, Err(bad)) if bad.torn => return Ok(()),
            (line, Err(bad)) => {
                let line = line + crate::input::lines_before(path, from).map_err(io_err(path))?;
                return Err(ResumeError::BadLine { path: path.to_owned(), line, message: bad.error });
            }
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

/// Reads the keys of the dataset's records and failures: those the index holds (when `flags`
/// says one is kept and it holds for the files) from it, the others from the JSONL (or the CSV
/// when it is the only file). With `tail`, the records read from the files are noted there, in
/// order, for reconciling the CSV and extending the index. Returns what the index covered.
fn read_back(paths: &OutputPaths, csv_only: bool, mut tail: Option<&mut Tail>, since: Option<&str>, flags: Option<index::Flags>) -> Result<(Prior, Covered), ResumeError> {
    let mut prior = Prior::default();
    let mut records_since = 0u64;
    let mut failures_since = 0u64;
    // RFC 3339 UTC times of one format compare as text.
    let after = |t: &str| since.is_some_and(|s| !t.is_empty() && t >= s);
    let mut covered = Covered::default();
    // The records the index holds, when it holds for these files; the rest from the files.
    // (`flags` is None for a folder read from its CSV alone.)
    let mut state = match flags {
        None => IndexRead::NotKept,
        Some(_) if paths.dir.join(index::INDEX_FILE).exists() => IndexRead::DidNotHold,
        Some(_) => IndexRead::Missing,
    };
    if let Some(files) = flags.and_then(|f| index_files(paths, f).map(|files| (f, files))) {
        let since_ms = since.map(index::millis).filter(|m| *m > 0);
        let mut since_n = 0u64;
        let read = index::read(&paths.dir, files.0, files.1, |e| {
            prior.note(e.key, e.truncated);
            since_n += u64::from(since_ms.is_some_and(|s| e.finished_ms >= s));
        });
        match read {
            Ok(Some(c)) => {
                covered = c;
                records_since = since_n;
                state = IndexRead::Held;
            }
            // It does not hold (or cannot be read): the dataset is read instead.
            _ => prior = Prior::default(),
        }
    }
    if csv_only {
        for (key, _, truncated) in CsvKeys::open(&paths.csv)? {
            prior.note(key, truncated);
        }
    } else {
        read_jsonl_from::<RecordHead>(&paths.jsonl, covered.jsonl_end, |r, _, end| {
            records_since += u64::from(after(&r.finished_at));
            let (key, truncated) = (parse_key(&r.key), r.done_reason.as_deref() == Some("length"));
            prior.note(key, truncated);
            if let Some(t) = tail.as_deref_mut() {
                t.push(key, end, truncated, &r.finished_at);
            }
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
    let file = if csv_only { &paths.csv } else { &paths.jsonl };
    let (n, rest) = (prior.records, prior.records - covered.records);
    prior.read_note = match state {
        // A new folder: nothing to say.
        _ if n == 0 && !file.exists() => String::new(),
        IndexRead::Held => format!("{} records from its index {}, {rest} after it from {}", covered.records, index::INDEX_FILE, file.display()),
        IndexRead::Missing => format!("{n} records from {} (no index yet)", file.display()),
        IndexRead::DidNotHold => format!("{n} records from {} (its index did not match it: edited, or written for other output formats)", file.display()),
        IndexRead::NotKept => format!("{n} records from {}", file.display()),
    };
    Ok((prior, covered))
}

/// The dataset files as the index describes them; None when the CSV it should describe is not
/// one of ours (it is rebuilt from the JSONL, and the index with it).
fn index_files(paths: &OutputPaths, flags: index::Flags) -> Option<index::Files<'_>> {
    let jsonl_len = std::fs::metadata(&paths.jsonl).ok()?.len();
    let csv = if flags.csv {
        let len = std::fs::metadata(&paths.csv).ok()?.len();
        Some((paths.csv.as_path(), len, csv_header_end(&paths.csv, Some(flags.schema))?))
    } else {
        None
    };
    Some(index::Files { jsonl: &paths.jsonl, jsonl_len, csv })
}

/// Whether the CSV is the only dataset file (no JSONL configured or present).
fn csv_only(paths: &OutputPaths, formats: &[OutputFormat]) -> bool {
    !formats.contains(&OutputFormat::Jsonl) && formats.contains(&OutputFormat::Csv) && !paths.jsonl.exists()
}

/// Reads what the folder holds without changing anything (for a dry run): torn tails are
/// noted, not cut, and the CSV is not reconciled.
pub fn scan(paths: &OutputPaths, formats: &[OutputFormat], schema: bool) -> Result<Prior, ResumeError> {
    refuse_csv_without_jsonl(paths, formats)?;
    let mut notes = Vec::new();
    for p in [&paths.jsonl, &paths.failures] {
        if has_torn_tail(p)? {
            notes.push(format!("{}: has a torn last line; a run will cut it off and keep it aside", p.display()));
        }
    }
    let only_csv = csv_only(paths, formats);
    let (mut prior, _) = read_back(paths, only_csv, None, None, index_flags(only_csv, formats, schema))?;
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
    let flags = index_flags(only_csv, formats, schema);
    let mut tail = Tail::default();
    let (mut prior, covered) = read_back(paths, only_csv, Some(&mut tail), since, flags)?;
    if !only_csv && formats.contains(&OutputFormat::Csv) {
        repairs.extend(reconcile_tail(&paths.csv, &paths.jsonl, &mut tail, covered, schema)?);
    }
    if let Some(flags) = flags {
        // The index made to hold every record, for the next resume (and for this run to extend);
        // not for a folder without records (a new one: the run writes it from the start).
        if !tail.keys.is_empty() || (covered.records > 0 && !covered.exact) {
            match index::rewrite(&paths.dir, flags, covered.records, tail.entries()) {
                Ok(()) => prior.read_note.push_str(&format!("; index written for {} records", covered.records + tail.keys.len() as u64)),
                Err(e) => {
                    index::remove(&paths.dir);
                    repairs.push(format!("{}: cannot write it ({e}); a resume reads the dataset instead", paths.dir.join(index::INDEX_FILE).display()));
                }
            }
        }
    }
    prior.repairs = repairs;
    Ok(prior)
}

/// What the dataset's index is written for, when it is kept (the JSONL is written).
fn index_flags(only_csv: bool, formats: &[OutputFormat], schema: bool) -> Option<index::Flags> {
    (formats.contains(&OutputFormat::Jsonl) && !only_csv).then_some(index::Flags::new(formats.contains(&OutputFormat::Csv), schema))
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

    /// The records from byte `at` on (the start of a record, after the header).
    fn open_at(path: &Path, at: u64) -> Result<CsvKeys, ResumeError> {
        let mut keys = CsvKeys::open(path)?;
        if let Some(r) = keys.reader.as_mut() {
            let mut pos = csv::Position::new();
            pos.set_byte(at);
            r.seek(pos).map_err(|e| io_err(path)(io::Error::other(e)))?;
        }
        Ok(keys)
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
/// The records the index holds (`covered`) are in the CSV already, up to `covered.csv_end`; the
/// others are `tail`'s, whose rows' ends it fills in.
fn reconcile_tail(csv_path: &Path, jsonl: &Path, tail: &mut Tail, covered: Covered, schema: bool) -> Result<Option<String>, ResumeError> {
    let len = match std::fs::metadata(csv_path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_err(csv_path)(e)),
    };
    let order = &tail.keys;
    tail.csv_ends.clear();
    let header_end = if len == 0 { None } else { csv_header_end(csv_path, Some(schema)) };
    let (matched, keep) = match header_end {
        None if len == 0 => (0, 0),
        None => {
            // Not our CSV (or a torn header): set it aside whole and rebuild. (The index holds no
            // records then: it is used only beside a CSV of ours.)
            let mut bytes = Vec::new();
            File::open(csv_path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io_err(csv_path))?;
            let saved = save_aside(csv_path, "replaced", &bytes)?;
            std::fs::remove_file(csv_path).map_err(io_err(csv_path))?;
            let note = format!(
                "{}: not the columns this run writes (another tool's file, or a schema added or removed); moved to {} and rebuilt from the JSONL",
                csv_path.display(),
                saved.display()
            );
            append_from_jsonl(csv_path, jsonl, covered.jsonl_end, schema, &mut tail.csv_ends)?;
            return Ok(Some(note));
        }
        Some(h) => {
            let mut matched = 0;
            let mut keep = if covered.records > 0 { covered.csv_end } else { h };
            for (i, (k, end, _)) in CsvKeys::open_at(csv_path, keep)?.enumerate() {
                // A record is complete only when its line ended; the file's last byte must be a newline.
                let terminated = end < len || ends_with_newline(csv_path, len)?;
                if i < order.len() && k == Some(order[i]) && order[i] != 0 && terminated {
                    matched += 1;
                    keep = end;
                    tail.csv_ends.push(end);
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
    let from = match matched.checked_sub(1) {
        None => covered.jsonl_end,
        Some(i) => match tail.jsonl_ends.get(i) {
            Some(end) => *end,
            None => record_start(jsonl, matched)?,
        },
    };
    let appended = append_from_jsonl(csv_path, jsonl, from, schema, &mut tail.csv_ends)?;
    let mut note = cut.unwrap_or_else(|| format!("{}: behind the JSONL", csv_path.display()));
    note.push_str(&format!("; re-appended {appended} records from {}", jsonl.display()));
    Ok(Some(note))
}

/// [`reconcile_tail`] of a JSONL whose records' keys are `order` (a stage's files).
pub fn reconcile_csv(csv_path: &Path, jsonl: &Path, order: &[u128], schema: bool) -> Result<Option<String>, ResumeError> {
    let mut tail = Tail { keys: order.to_vec(), ..Tail::default() };
    reconcile_tail(csv_path, jsonl, &mut tail, Covered::default(), schema)
}

/// Where record `n` (0-based; blank lines are no records) of a JSONL file starts.
fn record_start(path: &Path, n: usize) -> Result<u64, ResumeError> {
    let mut r = BufReader::with_capacity(256 * 1024, File::open(path).map_err(io_err(path))?);
    let (mut at, mut seen, mut line) = (0u64, 0usize, Vec::new());
    while seen < n {
        line.clear();
        let got = r.read_until(b'\n', &mut line).map_err(io_err(path))?;
        if got == 0 {
            break;
        }
        at += got as u64;
        seen += usize::from(!line.iter().all(u8::is_ascii_whitespace));
    }
    Ok(at)
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

/// Appends the JSONL's records from byte `from` on to the CSV (creating it with its header),
/// pushing where each row ends to `ends`.
fn append_from_jsonl(csv_path: &Path, jsonl: &Path, from: u64, schema: bool, ends: &mut Vec<u64>) -> Result<u64, ResumeError> {
    let mut sink = CsvFile::open(csv_path, schema).map_err(|e| ResumeError::Io { path: csv_path.to_owned(), source: io::Error::other(e) })?;
    let mut n = 0u64;
    let mut failed: Option<io::Error> = None;
    read_jsonl_from::<Record>(jsonl, from, |r, _, _| {
        if failed.is_none() {
            match sink.write(&r) {
                Ok(()) => {
                    n += 1;
                    ends.push(sink.end());
                }
                Err(e) => failed = Some(e),
            }
        }
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
