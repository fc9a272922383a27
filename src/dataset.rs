//! The output folder: dataset writers (one per format, behind one small trait), the failures file,
//! the manifest, and the single writer thread through which every finished record passes, so
//! lines never interleave and a slow disk never stalls the network side.
//!
//! Durability: every record is written whole in one `write` call and flushed at once, so a crash
//! loses at most the line being written; files are fsynced every [`SYNC_INTERVAL`] and at close,
//! so a power cut loses at most that many seconds of records.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::config::OutputFormat;
use crate::index::{self, IndexWriter};
use crate::record::{csv_columns, Failure, Record};

pub const SYNC_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot create output folder {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot open {path} for writing: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{} is in use by {holder}: one run at a time per output folder (wait for it to finish, or give this run another --output)", dir.display())]
    InUse { dir: PathBuf, holder: String },
}

/// The lock file in an output folder, held (an OS advisory lock) by the one run writing there.
pub const LOCK_FILE: &str = ".data_generator.lock";
/// A few KiB set aside at the start of a run, freed when a write fails for lack of space, so the
/// manifest can still say how the run ended.
const RESERVE_FILE: &str = ".data_generator.reserve";

/// The files of one output folder.
#[derive(Debug, Clone)]
pub struct OutputPaths {
    pub dir: PathBuf,
    pub jsonl: PathBuf,
    pub csv: PathBuf,
    pub failures: PathBuf,
    pub manifest: PathBuf,
    pub log: PathBuf,
}

impl OutputPaths {
    pub fn new(dir: &Path) -> OutputPaths {
        OutputPaths {
            dir: dir.to_owned(),
            jsonl: dir.join("dataset.jsonl"),
            csv: dir.join("dataset.csv"),
            failures: dir.join("failures.jsonl"),
            manifest: dir.join("manifest.json"),
            log: dir.join("run.log"),
        }
    }

    pub fn create_dir(&self) -> Result<(), DatasetError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| DatasetError::CreateDir { path: self.dir.clone(), source })
    }
}

/// The right to write into an output folder: an exclusive `flock` on its lock file, held for the
/// whole run. The kernel releases it when the process ends however it ends (kill -9 included),
/// so a stale lock cannot outlive its run. The file says who holds it, for the message a second
/// run prints.
#[derive(Debug)]
pub struct OutputLock {
    _file: File,
}

impl OutputLock {
    /// Takes the lock of `dir` (which must exist), or says who holds it.
    pub fn acquire(dir: &Path) -> Result<OutputLock, DatasetError> {
        let path = dir.join(LOCK_FILE);
        let open_err = |source| DatasetError::Open { path: path.clone(), source };
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(open_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(DatasetError::InUse { dir: dir.to_owned(), holder: holder(&mut file) })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(open_err(e)),
        }
        let me = format!(
            "data_generator (pid {}, started {})\n",
            std::process::id(),
            crate::progress::clock(std::time::SystemTime::now())
        );
        file.set_len(0)
            .and_then(|_| io::Seek::seek(&mut file, io::SeekFrom::Start(0)))
            .and_then(|_| file.write_all(me.as_bytes()))
            .map_err(|source| DatasetError::Write { path: path.clone(), source })?;
        Ok(OutputLock { _file: file })
    }

    /// Takes the lock when the folder exists; a folder that does not exist yet has nothing to
    /// guard (the run takes the lock when it creates it).
    pub fn acquire_if_exists(dir: &Path) -> Result<Option<OutputLock>, DatasetError> {
        if dir.is_dir() {
            Self::acquire(dir).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Fails with [`DatasetError::InUse`] when a run holds the folder; takes nothing, creates nothing.
    pub fn check_free(dir: &Path) -> Result<(), DatasetError> {
        let Ok(mut file) = File::open(dir.join(LOCK_FILE)) else { return Ok(()) };
        match file.try_lock_shared() {
            Err(std::fs::TryLockError::WouldBlock) => Err(DatasetError::InUse { dir: dir.to_owned(), holder: holder(&mut file) }),
            _ => Ok(()),
        }
    }
}

/// Who holds a lock, from its lock file.
fn holder(file: &mut File) -> String {
    let mut text = String::new();
    let _ = io::Read::read_to_string(file, &mut text);
    let text = text.trim();
    if text.starts_with("data_generator (pid ") {
        text.to_owned()
    } else {
        "another data_generator run".to_owned()
    }
}

/// Space set aside in the output folder (see [`RESERVE_FILE`]); removed when dropped.
pub struct SpaceReserve {
    path: Option<PathBuf>,
}

impl SpaceReserve {
    /// Best effort: on a disk already full there is nothing to set aside.
    pub fn create(dir: &Path, bytes: usize) -> SpaceReserve {
        let path = dir.join(RESERVE_FILE);
        match std::fs::write(&path, vec![0u8; bytes]).and_then(|_| File::open(&path)?.sync_all()) {
            Ok(()) => SpaceReserve { path: Some(path) },
            Err(_) => {
                let _ = std::fs::remove_file(&path);
                SpaceReserve { path: None }
            }
        }
    }

    /// Gives the space back (before writing the manifest after a failed write).
    pub fn release(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for SpaceReserve {
    fn drop(&mut self) {
        self.release();
    }
}

/// One dataset format.
pub trait RecordSink: Send {
    fn write(&mut self, record: &Record) -> io::Result<()>;
    fn sync(&mut self) -> io::Result<()>;
    fn path(&self) -> &Path;
    /// Where it ends: its length in bytes (what was written whole).
    fn end(&self) -> u64;
    /// Takes the last record written back out.
    fn cut_last(&mut self) -> io::Result<()>;
}

/// A file that only grows, one whole entry per write. A write that fails part-way (a full disk)
/// is rolled back to the previous length, so the file never ends in half an entry.
pub struct AppendFile {
    file: File,
    path: PathBuf,
    len: u64,
    /// The length before the last append.
    before: u64,
}

impl AppendFile {
    pub fn open(path: &Path) -> Result<AppendFile, DatasetError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| DatasetError::Open { path: path.to_owned(), source })?;
        let len = file.metadata().map_err(|source| DatasetError::Open { path: path.to_owned(), source })?.len();
        Ok(AppendFile { file, path: path.to_owned(), len, before: len })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self.file.write_all(bytes) {
            Ok(()) => {
                self.before = self.len;
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                Err(e)
            }
        }
    }

    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the last append back out (once).
    pub fn cut_last(&mut self) -> io::Result<()> {
        self.file.set_len(self.before)?;
        self.len = self.before;
        Ok(())
    }
}

/// JSON lines, each written whole.
pub struct JsonlFile {
    file: AppendFile,
    buf: Vec<u8>,
}

impl JsonlFile {
    pub fn open(path: &Path) -> Result<JsonlFile, DatasetError> {
        Ok(JsonlFile { file: AppendFile::open(path)?, buf: Vec::with_capacity(4096) })
    }

    pub fn append<T: serde::Serialize>(&mut self, value: &T) -> io::Result<()> {
        self.append_sized(value, 0)
    }

    /// [`JsonlFile::append`] of a value whose line is about `hint` bytes: a long one is
    /// measured first and its buffer made to size (not doubled past it), and not kept after.
    pub fn append_sized<T: serde::Serialize>(&mut self, value: &T, hint: usize) -> io::Result<()> {
        self.buf.clear();
        if hint > LONG_LINE {
            let mut n = Count(0);
            serde_json::to_writer(&mut n, value)?;
            self.buf.reserve_exact(n.0 + 1);
        }
        serde_json::to_writer(&mut self.buf, value)?;
        self.buf.push(b'\n');
        let r = self.file.append(&self.buf);
        if self.buf.capacity() > LONG_LINE {
            self.buf = Vec::with_capacity(4096);
        }
        r
    }
}

/// Lines longer than this are sized before they are written, and their buffers not kept.
const LONG_LINE: usize = 64 * 1024;

/// A writer that only counts bytes.
struct Count(usize);

impl io::Write for Count {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0 += b.len();
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl RecordSink for JsonlFile {
    fn write(&mut self, record: &Record) -> io::Result<()> {
        self.append_sized(record, record.text_len())
    }
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync()
    }
    fn path(&self) -> &Path {
        self.file.path()
    }
    fn end(&self) -> u64 {
        self.file.len()
    }
    fn cut_last(&mut self) -> io::Result<()> {
        self.file.cut_last()
    }
}

/// RFC 4180 CSV with a header row, formatted by the `csv` crate so commas, quotes and newlines in
/// responses survive; each record written whole.
pub struct CsvFile {
    file: AppendFile,
    /// The run has a schema: `parsed` and `invalid` columns at the end.
    schema: bool,
}

/// One CSV record (with its line terminator) as bytes.
pub fn csv_bytes<I, T>(fields: I) -> io::Result<Vec<u8>>
where
    I: IntoIterator<Item = T>,
    T: AsRef<str>,
{
    let fields: Vec<T> = fields.into_iter().collect();
    // Sized for the fields and some quoting: a long reply's row is not doubled past its size.
    let len: usize = fields.iter().map(|f| f.as_ref().len()).sum();
    let mut w = csv::WriterBuilder::new().has_headers(false).buffer_capacity(1024).from_writer(Vec::with_capacity(len + len / 16 + 64));
    w.write_record(fields.iter().map(|f| f.as_ref().as_bytes())).map_err(io::Error::other)?;
    w.into_inner().map_err(|e| io::Error::other(e.to_string()))
}

impl CsvFile {
    pub fn open(path: &Path, schema: bool) -> Result<CsvFile, DatasetError> {
        let mut file = AppendFile::open(path)?;
        if file.is_empty() {
            csv_bytes(csv_columns(schema))
                .and_then(|b| file.append(&b))
                .map_err(|source| DatasetError::Write { path: path.to_owned(), source })?;
        }
        Ok(CsvFile { file, schema })
    }
}

impl RecordSink for CsvFile {
    fn write(&mut self, record: &Record) -> io::Result<()> {
        let bytes = csv_bytes(record.csv_fields(self.schema))?;
        self.file.append(&bytes)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync()
    }
    fn path(&self) -> &Path {
        self.file.path()
    }
    fn end(&self) -> u64 {
        self.file.len()
    }
    fn cut_last(&mut self) -> io::Result<()> {
        self.file.cut_last()
    }
}

/// Every open output file of a run.
pub struct Dataset {
    sinks: Vec<Box<dyn RecordSink>>,
    /// Where the JSONL and the CSV are in `sinks`.
    jsonl: Option<usize>,
    csv: Option<usize>,
    /// The dataset's index (see [`crate::index`]), while the JSONL is written and the index
    /// ends where the files do.
    index: Option<IndexWriter>,
    dir: PathBuf,
    failures: JsonlFile,
    last_sync: Instant,
    dirty: bool,
}

impl Dataset {
    /// Opens (creating or appending to) every configured format and the failures file, so that a
    /// bad path fails before the first request.
    pub fn open(paths: &OutputPaths, formats: &[OutputFormat], schema: bool) -> Result<Dataset, DatasetError> {
        paths.create_dir()?;
        let mut sinks: Vec<Box<dyn RecordSink>> = Vec::new();
        let (mut jsonl, mut csv) = (None, None);
        for f in formats {
            match f {
                OutputFormat::Jsonl => {
                    jsonl = Some(sinks.len());
                    sinks.push(Box::new(JsonlFile::open(&paths.jsonl)?));
                }
                OutputFormat::Csv => {
                    csv = Some(sinks.len());
                    sinks.push(Box::new(CsvFile::open(&paths.csv, schema)?));
                }
            }
        }
        let failures = JsonlFile::open(&paths.failures)?;
        let index = match jsonl {
            Some(j) => {
                let files = index::Files { jsonl: &paths.jsonl, jsonl_len: sinks[j].end(), csv: csv.map(|c| (paths.csv.as_path(), sinks[c].end(), 0)) };
                // Without it, resume reads the dataset itself: slower, never wrong.
                IndexWriter::open(&paths.dir, index::Flags::new(csv.is_some(), schema), files).unwrap_or_else(|e| {
                    tracing::warn!("cannot write {}: {e}; a resume will read the dataset instead", paths.dir.join(index::INDEX_FILE).display());
                    None
                })
            }
            None => None,
        };
        Ok(Dataset { sinks, jsonl, csv, index, dir: paths.dir.clone(), failures, last_sync: Instant::now(), dirty: false })
    }

    pub fn write_record(&mut self, record: &Record) -> Result<(), DatasetError> {
        for i in 0..self.sinks.len() {
            if let Err(source) = self.sinks[i].write(record) {
                // In every file or in none: the files written before this one lose it again, so
                // that the dataset and the counts agree (the next run does the request).
                for s in &mut self.sinks[..i] {
                    let _ = s.cut_last();
                }
                return Err(DatasetError::Write { path: self.sinks[i].path().to_owned(), source });
            }
        }
        if let (Some(ix), Some(j)) = (self.index.as_mut(), self.jsonl) {
            let entry = index::Entry::of(record, self.sinks[j].end(), self.csv.map_or(0, |c| self.sinks[c].end()));
            if let Err(e) = ix.push(&entry) {
                self.drop_index(&e);
            }
        }
        self.written()
    }

    /// Stops keeping the index after it could not be written (a full disk): it is removed, and
    /// the next resume reads the dataset itself.
    fn drop_index(&mut self, e: &io::Error) {
        tracing::warn!("cannot write {}: {e}; a resume will read the dataset instead", self.dir.join(index::INDEX_FILE).display());
        self.index = None;
        index::remove(&self.dir);
    }

    pub fn write_failure(&mut self, failure: &Failure) -> Result<(), DatasetError> {
        let path = self.failures.path().to_owned();
        self.failures.append(failure).map_err(|source| DatasetError::Write { path, source })?;
        self.written()
    }

    fn written(&mut self) -> Result<(), DatasetError> {
        self.dirty = true;
        if self.last_sync.elapsed() >= SYNC_INTERVAL {
            self.sync()?;
        }
        Ok(())
    }

    /// fsync every file written since the last sync.
    pub fn sync(&mut self) -> Result<(), DatasetError> {
        if !self.dirty {
            return Ok(());
        }
        if let Some(Err(e)) = self.index.as_mut().map(IndexWriter::flush) {
            self.drop_index(&e);
        }
        for s in &mut self.sinks {
            s.sync().map_err(|source| DatasetError::Write { path: s.path().to_owned(), source })?;
        }
        let path = self.failures.path().to_owned();
        self.failures.sync().map_err(|source| DatasetError::Write { path, source })?;
        self.last_sync = Instant::now();
        self.dirty = false;
        Ok(())
    }
}

/// What the writer thread is asked to write.
pub enum WriteItem {
    Record(Box<Record>),
    Failure(Box<Failure>),
}

/// What the writer thread has written (whole, in every file).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub records: u64,
    pub failures: u64,
    /// Completion tokens of the records written.
    pub tokens: u64,
    /// Multi-stage runs: rows of the composed dataset.
    pub rows: u64,
}

/// Files the writer thread owns: each item written whole, counted, and synced now and then.
pub trait Sink: Send + 'static {
    type Item: Send + 'static;
    fn put(&mut self, item: Self::Item, written: &mut Written) -> Result<(), DatasetError>;
    /// fsync what was written since the last sync.
    fn sync(&mut self) -> Result<(), DatasetError>;
}

impl Sink for Dataset {
    type Item = WriteItem;
    fn put(&mut self, item: WriteItem, written: &mut Written) -> Result<(), DatasetError> {
        match item {
            WriteItem::Record(r) => {
                self.write_record(&r)?;
                written.records += 1;
                written.tokens += r.completion_tokens.unwrap_or(0);
            }
            WriteItem::Failure(f) => {
                self.write_failure(&f)?;
                written.failures += 1;
            }
        }
        Ok(())
    }
    fn sync(&mut self) -> Result<(), DatasetError> {
        Dataset::sync(self)
    }
}

/// The one writer: a thread that owns the dataset files. Sends fail once it has stopped on an
/// error; `finish` returns that error, and what was written before it.
pub struct Writer<I = WriteItem> {
    tx: Option<mpsc::Sender<Vec<I>>>,
    handle: Option<std::thread::JoinHandle<(Written, Result<(), DatasetError>)>>,
}

impl<I: Send + 'static> Writer<I> {
    pub fn spawn<S: Sink<Item = I>>(mut sink: S) -> Writer<I> {
        let (tx, rx) = mpsc::channel::<Vec<I>>();
        let handle = std::thread::Builder::new()
            .name("dataset-writer".into())
            .spawn(move || {
                let mut written = Written::default();
                let result = (|| {
                    loop {
                        match rx.recv_timeout(SYNC_INTERVAL) {
                            Ok(items) => {
                                for item in items {
                                    sink.put(item, &mut written)?;
                                }
                            }
                            Err(mpsc::RecvTimeoutError::Timeout) => sink.sync()?,
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        }
                    }
                    sink.sync()
                })();
                (written, result)
            })
            .ok();
        Writer { tx: Some(tx), handle }
    }

    /// False when the writer has stopped (on a write error): stop producing.
    pub fn send(&self, item: I) -> bool {
        self.send_all(vec![item])
    }

    /// [`Writer::send`] of several items at once (one wake of the writer thread).
    pub fn send_all(&self, items: Vec<I>) -> bool {
        items.is_empty() || (self.tx.as_ref().is_some_and(|tx| tx.send(items).is_ok()) && self.handle.is_some())
    }

    /// Closes the channel, waits for every queued item to be written and synced. Returns what
    /// was written whole (on an error too: the counts the manifest should show) and the error.
    pub fn finish(mut self) -> (Written, Result<(), DatasetError>) {
        self.tx.take();
        let failed = |what: &str| Err(DatasetError::Write { path: PathBuf::from("dataset"), source: io::Error::other(what.to_owned()) });
        match self.handle.take() {
            Some(h) => h.join().unwrap_or_else(|_| (Written::default(), failed("writer thread panicked"))),
            None => (Written::default(), failed("cannot start the writer thread")),
        }
    }
}

/// Replaces a file's contents atomically: temp file, fsync, rename, fsync the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_file(path, true, |w| w.write_all(bytes))
}

/// Replaces a file with what `write` writes: into `.<name>.tmp` beside it, then renamed over
/// it, so that a crash leaves the old file or the new one; with `sync`, the temp file and then
/// the folder are synced (a cache that can be rebuilt skips that). The temp file is never left
/// behind, half written, on an error.
pub fn replace_file(path: &Path, sync: bool, write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = File::create(&tmp).and_then(|f| {
        let mut w = BufWriter::with_capacity(256 * 1024, f);
        write(&mut w)?;
        let f = w.into_inner().map_err(io::IntoInnerError::into_error)?;
        if sync {
            f.sync_all()?;
        }
        Ok(())
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if sync {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Moves a folder aside to `<dir>.old-<n>` (the first free n) so a fresh run can start without
/// deleting anything. None when there was nothing to move.
pub fn move_aside(dir: &Path) -> io::Result<Option<PathBuf>> {
    match std::fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
        Ok(mut entries) => {
            if entries.next().is_none() {
                return Ok(None);
            }
        }
    }
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("output");
    for n in 1.. {
        let to = dir.with_file_name(format!("{name}.old-{n}"));
        if !to.exists() {
            std::fs::rename(dir, &to)?;
            return Ok(Some(to));
        }
    }
    unreachable!("an unbounded range always yields")
}

/// A line of a JSONL file that is not a `T`: its 1-based number and why; `torn` when it is the
/// last line and has no newline (a write cut short).
#[derive(Debug, Clone)]
pub struct BadLine {
    pub line: u64,
    pub error: String,
    pub torn: bool,
}

/// The one streaming reader of the JSONL files an output folder holds (`dataset.jsonl`,
/// `failures.jsonl`): one line in memory at a time, each deserialized as `T` (a type that reads
/// only the fields it names costs only those). Blank lines are skipped. What a bad line means is
/// the caller's: resume stops, inspect counts it.
pub struct JsonlReader<T> {
    reader: BufReader<File>,
    buf: Vec<u8>,
    line: u64,
    /// Where the last line read ends.
    offset: u64,
    _item: PhantomData<fn() -> T>,
}

impl<T: serde::de::DeserializeOwned> JsonlReader<T> {
    pub fn open(path: &Path) -> io::Result<JsonlReader<T>> {
        JsonlReader::open_at(path, 0)
    }

    /// Reads from byte `offset` on (the start of a line); line numbers count from there.
    pub fn open_at(path: &Path, offset: u64) -> io::Result<JsonlReader<T>> {
        let mut f = File::open(path)?;
        if offset > 0 {
            f.seek(SeekFrom::Start(offset))?;
        }
        Ok(JsonlReader { reader: BufReader::with_capacity(256 * 1024, f), buf: Vec::new(), line: 0, offset, _item: PhantomData })
    }

    /// Where the last line read ends (after its newline).
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl<T: serde::de::DeserializeOwned> Iterator for JsonlReader<T> {
    /// The line's number and its item, or what is wrong with it; Err on a read error.
    type Item = io::Result<(u64, Result<T, BadLine>)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(n) => self.offset += n as u64,
                Err(e) => return Some(Err(e)),
            }
            self.line += 1;
            if self.buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let line = self.line;
            return Some(Ok((
                line,
                serde_json::from_slice::<T>(&self.buf).map_err(|e| BadLine { line, error: e.to_string(), torn: self.buf.last() != Some(&b'\n') }),
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_reader_numbers_lines_and_tells_bad_from_torn() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.jsonl");
        std::fs::write(&p, "{\"id\":\"a\"}\n\n  \nnot json\n{\"id\":\"b\"}\n{\"id\":").unwrap();
        let items: Vec<(u64, Result<Record, BadLine>)> = JsonlReader::<Record>::open(&p).unwrap().map(Result::unwrap).collect();
        let summary: Vec<(u64, Option<&str>, Option<bool>)> =
            items.iter().map(|(l, r)| (*l, r.as_ref().ok().map(|r| r.id.as_str()), r.as_ref().err().map(|b| b.torn))).collect();
        assert_eq!(summary, vec![(1, Some("a"), None), (4, None, Some(false)), (5, Some("b"), None), (6, None, Some(true))]);
        assert!(JsonlReader::<Record>::open(&dir.path().join("missing")).is_err());
    }
}
