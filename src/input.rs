//! Prompt rows: JSONL (one object a line), CSV (header row) or TXT (one prompt a line, as the
//! field `prompt`), read as a stream so that a million-row batch costs no more memory than one row.
//! Every error names the file and the line.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    Jsonl,
    Csv,
    Txt,
}

impl InputFormat {
    pub fn from_path(p: &Path) -> Option<InputFormat> {
        match p.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "jsonl" | "ndjson" => Some(InputFormat::Jsonl),
            "csv" => Some(InputFormat::Csv),
            "txt" => Some(InputFormat::Txt),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot open input {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Line { path: PathBuf, line: u64, message: String },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

/// One prompt row: its id, where it is, and its fields (the template's variables).
#[derive(Debug, Clone)]
pub struct Row {
    pub id: String,
    /// 1-based line of the file where the row starts.
    pub line: u64,
    pub fields: Map<String, Value>,
}

/// Streams the rows of an input file.
pub struct RowReader {
    path: PathBuf,
    id_field: Option<String>,
    inner: Inner,
}

enum Inner {
    Lines { reader: BufReader<std::io::Take<File>>, line: u64, format: InputFormat, buf: Vec<u8> },
    Csv { reader: csv::Reader<File>, headers: Vec<String>, record: csv::StringRecord },
}

impl RowReader {
    pub fn open(path: &Path, format: InputFormat, id_field: Option<&str>) -> Result<RowReader, InputError> {
        let open_err = |source| InputError::Open { path: path.to_owned(), source };
        let file = File::open(path).map_err(open_err)?;
        let inner = match format {
            InputFormat::Jsonl | InputFormat::Txt => {
                Inner::Lines { reader: BufReader::new(file.take(u64::MAX)), line: 0, format, buf: Vec::new() }
            }
            InputFormat::Csv => {
                let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(file);
                let headers = reader.headers().map_err(|e| InputError::Line {
                    path: path.to_owned(),
                    line: 1,
                    message: format!("cannot read the CSV header row: {e}"),
                })?;
                let headers: Vec<String> =
                    headers.iter().enumerate().map(|(i, h)| if i == 0 { strip_bom(h) } else { h }.to_owned()).collect();
                let mut seen = HashMap::new();
                for (i, h) in headers.iter().enumerate() {
                    if h.is_empty() {
                        return Err(InputError::Line {
                            path: path.to_owned(),
                            line: 1,
                            message: format!("column {} of the header row has no name", i + 1),
                        });
                    }
                    if seen.insert(h.clone(), i).is_some() {
                        return Err(InputError::Line {
                            path: path.to_owned(),
                            line: 1,
                            message: format!("the header row names column {h:?} twice"),
                        });
                    }
                }
                Inner::Csv { reader, headers, record: csv::StringRecord::new() }
            }
        };
        Ok(RowReader { path: path.to_owned(), id_field: id_field.map(str::to_owned), inner })
    }

    /// Splits a JSONL or TXT input into at most `n` parts of about equal size that start at the
    /// start of a line, to be read side by side ([`RowReader::open_part`]). One part (the whole
    /// file) for a CSV, whose records may span lines.
    pub fn parts(path: &Path, format: InputFormat, n: usize) -> Result<Vec<(u64, u64)>, InputError> {
        let open_err = |source| InputError::Open { path: path.to_owned(), source };
        let mut file = File::open(path).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        if format == InputFormat::Csv || n <= 1 {
            return Ok(vec![(0, len)]);
        }
        let mut starts = vec![0u64];
        let mut buf = vec![0u8; 64 * 1024];
        for i in 1..n as u64 {
            // The first line that starts after the i-th n-th of the file.
            let mut at = (len / n as u64 * i).max(*starts.last().unwrap_or(&0));
            file.seek(SeekFrom::Start(at)).map_err(open_err)?;
            let start = loop {
                let got = file.read(&mut buf).map_err(open_err)?;
                if got == 0 {
                    break None;
                }
                if let Some(nl) = memchr::memchr(b'\n', &buf[..got]) {
                    break Some(at + nl as u64 + 1);
                }
                at += got as u64;
            };
            match start {
                Some(s) if s < len && s > *starts.last().unwrap_or(&0) => starts.push(s),
                _ => break,
            }
        }
        Ok(starts.iter().zip(starts.iter().skip(1).chain([&len])).map(|(a, b)| (*a, *b)).collect())
    }

    /// The rows of a JSONL or TXT input from byte `from` (the start of a line) to byte `to`,
    /// numbered by their line in the whole file (the lines before `from` are counted first).
    pub fn open_part(path: &Path, format: InputFormat, id_field: Option<&str>, from: u64, to: u64) -> Result<RowReader, InputError> {
        if from == 0 || format == InputFormat::Csv {
            let mut r = RowReader::open(path, format, id_field)?;
            if let Inner::Lines { reader, .. } = &mut r.inner {
                reader.get_mut().set_limit(to);
            }
            return Ok(r);
        }
        let open_err = |source| InputError::Open { path: path.to_owned(), source };
        let before = lines_before(path, from).map_err(open_err)?;
        let mut file = File::open(path).map_err(open_err)?;
        file.seek(SeekFrom::Start(from)).map_err(open_err)?;
        let reader = BufReader::new(file.take(to.saturating_sub(from)));
        Ok(RowReader { path: path.to_owned(), id_field: id_field.map(str::to_owned), inner: Inner::Lines { reader, line: before, format, buf: Vec::new() } })
    }

    fn err(&self, line: u64, message: impl Into<String>) -> InputError {
        InputError::Line { path: self.path.clone(), line, message: message.into() }
    }

    fn next_row(&mut self) -> Option<Result<Row, InputError>> {
        let (line, fields) = match &mut self.inner {
            Inner::Lines { reader, line, format, buf } => loop {
                buf.clear();
                match reader.read_until(b'\n', buf) {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(e) => {
                        return Some(Err(InputError::File { path: self.path.clone(), message: format!("read error: {e}") }))
                    }
                }
                *line += 1;
                let n = *line;
                let mut bytes: &[u8] = buf;
                if n == 1 {
                    bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
                }
                let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
                let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
                if bytes.iter().all(u8::is_ascii_whitespace) {
                    continue; // blank lines separate nothing and carry no prompt
                }
                let fmt = *format;
                let text = match std::str::from_utf8(bytes) {
                    Ok(t) => t,
                    Err(e) => return Some(Err(self.err(n, format!("not valid UTF-8 (byte {})", e.valid_up_to())))),
                };
                match fmt {
                    InputFormat::Txt => {
                        let mut m = Map::new();
                        m.insert("prompt".into(), Value::String(text.to_owned()));
                        break (n, m);
                    }
                    _ => match serde_json::from_str::<Value>(text) {
                        Ok(Value::Object(m)) => break (n, m),
                        Ok(other) => {
                            return Some(Err(self.err(n, format!("expected a JSON object, found {}", json_kind(&other)))))
                        }
                        Err(e) => return Some(Err(self.err(n, format!("malformed JSON: {e}")))),
                    },
                }
            },
            Inner::Csv { reader, headers, record } => {
                match reader.read_record(record) {
                    Ok(false) => return None,
                    Ok(true) => {}
                    Err(e) => {
                        let line = e.position().map(|p| p.line()).unwrap_or(0);
                        let message = match e.kind() {
                            csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
                                format!("has {len} fields but the header row has {expected_len}")
                            }
                            csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_owned(),
                            _ => format!("malformed CSV: {e}"),
                        };
                        return Some(Err(self.err(line, message)));
                    }
                }
                let line = record.position().map(|p| p.line()).unwrap_or(0);
                let m = headers
                    .iter()
                    .zip(record.iter())
                    .map(|(h, v)| (h.clone(), Value::String(v.to_owned())))
                    .collect();
                (line, m)
            }
        };
        let id = match &self.id_field {
            None => line.to_string(),
            Some(f) => match fields.get(f) {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::String(_)) => return Some(Err(self.err(line, format!("the id field `{f}` is empty")))),
                Some(other) => {
                    return Some(Err(self.err(
                        line,
                        format!("the id field `{f}` must be a string or a number, found {}", json_kind(other)),
                    )))
                }
                None => return Some(Err(self.err(line, format!("the row has no id field `{f}` (input.id_field)")))),
            },
        };
        Some(Ok(Row { id, line, fields }))
    }
}

impl Iterator for RowReader {
    type Item = Result<Row, InputError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_row()
    }
}

fn strip_bom(s: &str) -> &str {
    s.strip_prefix('\u{feff}').unwrap_or(s)
}

/// The number of lines in the first `end` bytes of a file (to number a line read from there).
pub fn lines_before(path: &Path, end: u64) -> std::io::Result<u64> {
    let mut n = 0u64;
    let mut r = File::open(path)?.take(end);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let got = r.read(&mut buf)?;
        if got == 0 {
            return Ok(n);
        }
        n += memchr::memchr_iter(b'\n', &buf[..got]).count() as u64;
    }
}

pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The ids of a batch, 16 bytes each whatever their length (a million rows: 16 MB, not the
/// ~100 MB of a map of strings): a 64-bit hash of each and its line. Duplicates are found at the
/// end, by sorting; rows whose hashes match are confirmed against their ids, read again from the
/// input, so that two different ids never pass for one.
#[derive(Default)]
pub struct IdSet {
    entries: Vec<(u64, u64)>,
}

/// A repeated id: the line it was first on and the line that repeats it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    pub id: String,
    pub first: u64,
    pub line: u64,
}

impl IdSet {
    pub fn push(&mut self, id: &str, line: u64) {
        self.entries.push((crate::record::fnv1a64(&[id.as_bytes()]), line));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Adds the ids of another set (of the rows that follow).
    pub fn append(&mut self, mut other: IdSet) {
        self.entries.append(&mut other.entries);
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The duplicate whose repeat comes first in the file, if any. `ids_at` reads the ids on the
    /// given lines (called only when some hashes match).
    pub fn first_duplicate<E>(mut self, ids_at: impl FnOnce(&HashSet<u64>) -> Result<HashMap<u64, String>, E>) -> Result<Option<Duplicate>, E> {
        self.entries.sort_unstable();
        let mut lines = HashSet::new();
        for w in self.entries.windows(2) {
            if w[0].0 == w[1].0 {
                lines.insert(w[0].1);
                lines.insert(w[1].1);
            }
        }
        if lines.is_empty() {
            return Ok(None);
        }
        let ids = ids_at(&lines)?;
        // Within one hash, lines in order: the first line of each id, and its first repeat.
        let mut best: Option<Duplicate> = None;
        for group in self.entries.chunk_by(|a, b| a.0 == b.0).filter(|g| g.len() > 1) {
            let mut first_of: HashMap<&str, u64> = HashMap::new();
            for &(_, line) in group {
                let Some(id) = ids.get(&line) else { continue };
                match first_of.get(id.as_str()) {
                    None => {
                        first_of.insert(id, line);
                    }
                    Some(&first) => {
                        if best.as_ref().is_none_or(|b| line < b.line) {
                            best = Some(Duplicate { id: id.clone(), first, line });
                        }
                    }
                }
            }
        }
        Ok(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn id_set_finds_the_first_repeat_and_tells_colliding_ids_apart() {
        let mut ids = IdSet::default();
        for (id, line) in [("a", 1), ("b", 2), ("c", 3), ("b", 4), ("a", 5), ("b", 6)] {
            ids.push(id, line);
        }
        let dup = ids.first_duplicate(|lines| -> Result<_, ()> {
            let all: HashMap<u64, String> = [(1, "a"), (2, "b"), (3, "c"), (4, "b"), (5, "a"), (6, "b")].into_iter().map(|(l, i)| (l, i.to_owned())).collect();
            Ok(lines.iter().map(|l| (*l, all[l].clone())).collect())
        });
        assert_eq!(dup, Ok(Some(Duplicate { id: "b".into(), first: 2, line: 4 })));
        // No shared hash: the input is not read again.
        let mut ids = IdSet::default();
        ids.push("x", 1);
        ids.push("y", 2);
        assert_eq!(ids.first_duplicate(|_| -> Result<HashMap<u64, String>, ()> { panic!("read again") }), Ok(None));
        // Two different ids under one hash (made to collide here) are not a duplicate.
        let ids = IdSet { entries: vec![(7, 1), (7, 2)] };
        let read = |_: &HashSet<u64>| -> Result<_, ()> { Ok(HashMap::from([(1, "p".to_owned()), (2, "q".to_owned())])) };
        assert_eq!(ids.first_duplicate(read), Ok(None));
    }

    fn file(ext: &str, content: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(ext).tempfile().unwrap();
        f.write_all(content).unwrap();
        f
    }

    #[test]
    fn jsonl_rows_with_blank_lines_and_line_ids() {
        let f = file(".jsonl", b"\xEF\xBB\xBF{\"q\":\"a\"}\n\n{\"q\":\"b\"}\r\n{\"q\":\"c\"}");
        let rows: Vec<Row> = RowReader::open(f.path(), InputFormat::Jsonl, None).unwrap().map(Result::unwrap).collect();
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["1", "3", "4"]);
        assert_eq!(rows[2].fields["q"], "c");
    }

    #[test]
    fn jsonl_malformed_line_is_named() {
        let f = file(".jsonl", b"{\"q\":1}\n{\"q\":\n");
        let err = RowReader::open(f.path(), InputFormat::Jsonl, None).unwrap().nth(1).unwrap().unwrap_err();
        assert!(err.to_string().contains(":2: malformed JSON"), "{err}");
        let f = file(".jsonl", b"[1,2]\n");
        let err = RowReader::open(f.path(), InputFormat::Jsonl, None).unwrap().next().unwrap().unwrap_err();
        assert!(err.to_string().contains(":1: expected a JSON object, found an array"), "{err}");
    }

    #[test]
    fn csv_multiline_fields_and_id_field() {
        let f = file(".csv", b"id,question\nx1,\"two\nlines, \"\"quoted\"\"\"\nx2,plain\n");
        let rows: Vec<Row> =
            RowReader::open(f.path(), InputFormat::Csv, Some("id")).unwrap().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].id, "x1");
        assert_eq!(rows[0].fields["question"], "two\nlines, \"quoted\"");
        assert_eq!(rows[1].line, 4);
    }

    #[test]
    fn csv_ragged_row_is_named() {
        let f = file(".csv", b"a,b\n1,2\n3\n");
        let err = RowReader::open(f.path(), InputFormat::Csv, None).unwrap().nth(1).unwrap().unwrap_err();
        assert!(err.to_string().contains(":3: has 1 fields but the header row has 2"), "{err}");
    }

    #[test]
    fn txt_lines_are_prompts() {
        let f = file(".txt", "héllo\n\n  world  \n".as_bytes());
        let rows: Vec<Row> = RowReader::open(f.path(), InputFormat::Txt, None).unwrap().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].fields["prompt"], "  world  ");
        assert_eq!(rows[1].id, "3");
    }

    #[test]
    fn missing_id_field() {
        let f = file(".jsonl", b"{\"q\":1}\n");
        let err = RowReader::open(f.path(), InputFormat::Jsonl, Some("id")).unwrap().next().unwrap().unwrap_err();
        assert!(err.to_string().contains("no id field `id`"), "{err}");
    }
}
