//! The dataset's index, `.data_generator.index` in the output folder: for each record of
//! `dataset.jsonl`, in order, its key, where its line ends in the JSONL and its row in the CSV,
//! whether `num_predict` cut it off, and when it finished; 40 bytes a record. The dataset writer
//! appends to it at each sync; resume reads it instead of the dataset, so that a re-run of a
//! million records reads 40 MB instead of parsing a gigabyte of JSON and CSV.
//!
//! It is a cache, never the truth. Before it is used, it is checked against the files: its offsets
//! must grow and stay within them, and the records at a few entries spread over it, and at its
//! last one, are read back from both files and must be the ones it names. When it does not hold
//! (the dataset was edited, an older version wrote the folder), resume reads the whole dataset as
//! it always did and writes the index anew. Records appended after its last entry (a run killed
//! between two syncs, `merge`) are read from the files.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::record::{Record, CSV_COLUMNS, SCHEMA_CSV_COLUMNS};

pub const INDEX_FILE: &str = ".data_generator.index";
const MAGIC: &[u8; 8] = b"DGINDEX1";
const HEADER: u64 = 16;
const ENTRY: usize = 40;
/// Entries checked against the files, spread over the index (and its last one).
const CHECKS: u64 = 8;

/// What the index was written for: a CSV beside the JSONL, a schema's columns in it. An index
/// written for other files is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flags {
    pub csv: bool,
    pub schema: bool,
}

impl Flags {
    /// The flags of a dataset with or without a CSV and a schema (whose columns only the CSV shows).
    pub fn new(csv: bool, schema: bool) -> Flags {
        Flags { csv, schema: csv && schema }
    }

    fn header(self) -> [u8; HEADER as usize] {
        let mut h = [0u8; HEADER as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8] = u8::from(self.csv) | (u8::from(self.schema) << 1);
        h
    }
}

/// One record, as the index holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    /// None for a record whose key is not one of ours (hand-written).
    pub key: Option<u128>,
    /// Where its line ends in `dataset.jsonl` (after the newline).
    pub jsonl_end: u64,
    /// Where its row ends in `dataset.csv`; 0 without a CSV.
    pub csv_end: u64,
    /// Its `done_reason` is `length`.
    pub truncated: bool,
    /// Its `finished_at`, in milliseconds since 1970 (0 when it is not a time).
    pub finished_ms: u64,
}

/// The flag bit of a cut-off record, beside its time in milliseconds (also in resume's `Tail`).
pub(crate) const TRUNCATED: u64 = 1 << 63;
const HAS_KEY: u64 = 1 << 62;
const MS_MASK: u64 = (1 << 48) - 1;

impl Entry {
    /// The entry of a record just written, its line ending at `jsonl_end` and its row at `csv_end`.
    pub fn of(record: &Record, jsonl_end: u64, csv_end: u64) -> Entry {
        Entry {
            key: crate::resume::parse_key(&record.key),
            jsonl_end,
            csv_end,
            truncated: record.done_reason.as_deref() == Some("length"),
            finished_ms: millis(&record.finished_at),
        }
    }

    fn bytes(&self) -> [u8; ENTRY] {
        let mut b = [0u8; ENTRY];
        b[..16].copy_from_slice(&self.key.unwrap_or(0).to_le_bytes());
        b[16..24].copy_from_slice(&self.jsonl_end.to_le_bytes());
        b[24..32].copy_from_slice(&self.csv_end.to_le_bytes());
        let meta = (self.finished_ms & MS_MASK) | if self.truncated { TRUNCATED } else { 0 } | if self.key.is_some() { HAS_KEY } else { 0 };
        b[32..40].copy_from_slice(&meta.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Entry {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let meta = u64_at(32);
        Entry {
            key: (meta & HAS_KEY != 0).then(|| u128::from_le_bytes(b[..16].try_into().unwrap_or_default())),
            jsonl_end: u64_at(16),
            csv_end: u64_at(24),
            truncated: meta & TRUNCATED != 0,
            finished_ms: meta & MS_MASK,
        }
    }
}

/// An RFC 3339 time in milliseconds since 1970; 0 when it is not one.
pub fn millis(t: &str) -> u64 {
    humantime::parse_rfc3339_weak(t)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0) & MS_MASK)
}

fn path(dir: &Path) -> PathBuf {
    dir.join(INDEX_FILE)
}

/// The dataset files the index describes and how long they are now.
#[derive(Debug, Clone, Copy)]
pub struct Files<'a> {
    pub jsonl: &'a Path,
    pub jsonl_len: u64,
    /// The CSV, its length, and where its header row ends.
    pub csv: Option<(&'a Path, u64, u64)>,
}

/// What [`read`] found: the first `records` records of the dataset, which end at these offsets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Covered {
    pub records: u64,
    pub jsonl_end: u64,
    pub csv_end: u64,
    /// The index file is exactly these entries (no entry past the files, no torn one): a run
    /// can append to it as it is once the records after them are added.
    pub exact: bool,
}

/// Reads the index of `dir`, written for `flags`, calling `each` with every entry that the files
/// hold, in order. None (after `each` may have seen some entries: the caller starts over) when
/// there is no index or it does not hold for these files.
pub fn read(dir: &Path, flags: Flags, files: Files<'_>, mut each: impl FnMut(&Entry)) -> io::Result<Option<Covered>> {
    let f = match File::open(path(dir)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let mut r = BufReader::with_capacity(256 * 1024, f);
    let mut header = [0u8; HEADER as usize];
    if len < HEADER || r.read_exact(&mut header).is_err() || header != flags.header() {
        return Ok(None);
    }
    let total = (len - HEADER) / ENTRY as u64;
    // The entries checked against the files: spread, and the last that the files hold.
    let spread: Vec<u64> = (0..CHECKS).map(|i| i * total / CHECKS).collect();
    let mut checks: Vec<(Entry, Entry)> = Vec::new();
    let (csv_len, csv_start) = files.csv.map_or((0, 0), |(_, len, start)| (len, start));
    let first = Entry { jsonl_end: 0, csv_end: csv_start, ..Entry::default() };
    // The last two entries read (the one before the last is where the last one's record starts).
    let (mut before, mut prev) = (first, first);
    let mut records = 0u64;
    let mut buf = [0u8; ENTRY];
    while records < total {
        r.read_exact(&mut buf)?;
        let e = Entry::from_bytes(&buf);
        if e.jsonl_end > files.jsonl_len || (files.csv.is_some() && e.csv_end > csv_len) {
            // Past the files: written before them and never reached the disk (a power loss).
            break;
        }
        if e.jsonl_end <= prev.jsonl_end || (files.csv.is_some() && e.csv_end <= prev.csv_end) {
            return Ok(None);
        }
        if spread.binary_search(&records).is_ok() {
            checks.push((prev, e));
        }
        each(&e);
        (before, prev) = (prev, e);
        records += 1;
    }
    if records > 0 {
        checks.push((before, prev));
    }
    for (before, e) in &checks {
        if !holds(files, before, e)? {
            return Ok(None);
        }
    }
    Ok(Some(Covered { records, jsonl_end: prev.jsonl_end, csv_end: if files.csv.is_some() { prev.csv_end } else { 0 }, exact: records == total && len == HEADER + total * ENTRY as u64 }))
}

/// Bytes `from..to` of a file.
fn read_range(path: &Path, from: u64, to: u64) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    let mut b = vec![0u8; usize::try_from(to - from).map_err(io::Error::other)?];
    f.read_exact(&mut b)?;
    Ok(b)
}

/// What the index reads of a record's line to check it.
#[derive(serde::Deserialize)]
struct Head {
    #[serde(default)]
    key: String,
    #[serde(default)]
    done_reason: Option<String>,
}

/// Whether the files hold entry `e` where it says: its JSONL line (after `before`'s, blank
/// lines allowed) is one record with its key, and its CSV row is one row with its key.
fn holds(files: Files<'_>, before: &Entry, e: &Entry) -> io::Result<bool> {
    let line = read_range(files.jsonl, before.jsonl_end, e.jsonl_end)?;
    let Some((b'\n', body)) = line.split_last() else { return Ok(false) };
    let start = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if !body[..start].iter().all(u8::is_ascii_whitespace) {
        return Ok(false);
    }
    let Ok(head) = serde_json::from_slice::<Head>(&body[start..]) else { return Ok(false) };
    if crate::resume::parse_key(&head.key) != e.key || (head.done_reason.as_deref() == Some("length")) != e.truncated {
        return Ok(false);
    }
    let Some((csv, _, _)) = files.csv else { return Ok(true) };
    let row = read_range(csv, before.csv_end, e.csv_end)?;
    let mut r = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(row.as_slice());
    let mut rec = csv::ByteRecord::new();
    if !matches!(r.read_byte_record(&mut rec), Ok(true)) || r.position().byte() != row.len() as u64 || row.last() != Some(&b'\n') {
        return Ok(false);
    }
    // A run with a schema has its two columns after the others: `key` is where it is without.
    let width_ok = rec.len() == CSV_COLUMNS.len() || rec.len() == CSV_COLUMNS.len() + SCHEMA_CSV_COLUMNS.len();
    let key_col = CSV_COLUMNS.iter().position(|c| *c == "key");
    let key = key_col.and_then(|i| rec.get(i)).and_then(|k| std::str::from_utf8(k).ok()).and_then(crate::resume::parse_key);
    Ok(width_ok && key == e.key)
}

/// Writes the index of `dir` anew: the first `keep` entries of the one there, then `more`.
/// Written beside it and renamed over it, so that a crash leaves the old one or the new one.
pub fn rewrite(dir: &Path, flags: Flags, keep: u64, more: impl Iterator<Item = Entry>) -> io::Result<()> {
    let to = path(dir);
    crate::dataset::replace_file(&to, false, |w| {
        w.write_all(&flags.header())?;
        if keep > 0 {
            let mut old = File::open(&to)?;
            old.seek(SeekFrom::Start(HEADER))?;
            io::copy(&mut old.take(keep * ENTRY as u64), w)?;
        }
        for e in more {
            w.write_all(&e.bytes())?;
        }
        Ok(())
    })
}

/// Removes the index of `dir` (the next resume reads the dataset and writes it anew).
pub fn remove(dir: &Path) {
    let _ = std::fs::remove_file(path(dir));
}

/// The dataset writer's side: entries of the records written, appended at each sync.
pub struct IndexWriter {
    file: File,
    pending: Vec<u8>,
}

/// Entries kept before they are written, at most (a sync writes them sooner).
const PENDING: usize = 1 << 20;

impl IndexWriter {
    /// The index of a dataset whose files are as long as `files` says, to append to: a new one
    /// when the dataset is empty; None (and the index removed) when it does not end where the
    /// files do, as after a resume that could not write it: the next resume writes it anew.
    pub fn open(dir: &Path, flags: Flags, files: Files<'_>) -> io::Result<Option<IndexWriter>> {
        let p = path(dir);
        if files.jsonl_len == 0 {
            let mut file = OpenOptions::new().create(true).write(true).truncate(true).open(&p)?;
            file.write_all(&flags.header())?;
            return Ok(Some(IndexWriter { file, pending: Vec::new() }));
        }
        let fits = (|| -> io::Result<bool> {
            let mut f = File::open(&p)?;
            let len = f.metadata()?.len();
            let mut header = [0u8; HEADER as usize];
            f.read_exact(&mut header)?;
            if header != flags.header() || len < HEADER + ENTRY as u64 || !(len - HEADER).is_multiple_of(ENTRY as u64) {
                return Ok(false);
            }
            f.seek(SeekFrom::Start(len - ENTRY as u64))?;
            let mut buf = [0u8; ENTRY];
            f.read_exact(&mut buf)?;
            let last = Entry::from_bytes(&buf);
            // Blank lines after the last record (an edit by hand) are no record: the next one's
            // line is read from the end of the last one's, blank lines allowed.
            let blank_after = last.jsonl_end == files.jsonl_len
                || (last.jsonl_end < files.jsonl_len
                    && files.jsonl_len - last.jsonl_end <= 64 * 1024
                    && read_range(files.jsonl, last.jsonl_end, files.jsonl_len)?.iter().all(u8::is_ascii_whitespace));
            Ok(blank_after && files.csv.is_none_or(|(_, len, _)| last.csv_end == len))
        })()
        .unwrap_or(false);
        if !fits {
            remove(dir);
            return Ok(None);
        }
        Ok(Some(IndexWriter { file: OpenOptions::new().append(true).open(&p)?, pending: Vec::new() }))
    }

    /// Adds the entry of a record written whole to every file.
    pub fn push(&mut self, e: &Entry) -> io::Result<()> {
        self.pending.extend_from_slice(&e.bytes());
        if self.pending.len() >= PENDING {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the entries kept (not fsynced: a lost tail is read from the dataset).
    pub fn flush(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            let r = self.file.write_all(&self.pending);
            self.pending.clear();
            r?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        for e in [
            Entry { key: Some(u128::MAX - 7), jsonl_end: 1 << 40, csv_end: 12, truncated: true, finished_ms: millis("2026-12-01T00:00:00.123Z") },
            Entry { key: None, jsonl_end: 5, csv_end: 0, truncated: false, finished_ms: 0 },
        ] {
            assert_eq!(Entry::from_bytes(&e.bytes()), e);
        }
        assert_eq!(millis("2026-12-01T00:00:01.000Z") - millis("2026-12-01T00:00:00.000Z"), 1000);
        assert_eq!(millis("not a time"), 0);
    }
}
