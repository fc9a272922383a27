//! `inspect`: what a dataset holds, in seconds, even for a million records. Records are streamed
//! one at a time; what is kept grows only with the number of distinct records (8-byte hashes for
//! the unique and duplicate counts), never with their text. Distributions use a log-bucketed
//! histogram (about 1% relative precision), not a list of values.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::dataset::JsonlReader;
use crate::record::{fnv1a64, Failure, Record};
use crate::resume::parse_key;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: no dataset here (expected a folder with dataset.jsonl or dataset.csv, or one of those files)")]
    NotADataset { path: PathBuf },
    #[error("{path}: cannot read the CSV header: {message}")]
    CsvHeader { path: PathBuf, message: String },
}

/// Where the records are: a JSONL or CSV file, and the failures file beside it.
#[derive(Debug, Clone)]
pub struct Source {
    pub dataset: PathBuf,
    pub csv: bool,
    pub failures: Option<PathBuf>,
    /// A multi-stage run's `dataset.jsonl`, read as the records of this stage (its object in
    /// each row, with the row's id and input): what `export --stage` makes training rows of.
    /// For a stage file, the stage whose failures count.
    pub stage: Option<String>,
}

impl Source {
    /// PATH as a user gives it: an output folder (JSONL preferred, else CSV), or a dataset file.
    pub fn locate(path: &Path) -> Result<Source, InspectError> {
        let (dataset, dir) = if path.is_dir() {
            let jsonl = path.join("dataset.jsonl");
            let csv = path.join("dataset.csv");
            let d = if jsonl.is_file() {
                jsonl
            } else if csv.is_file() {
                csv
            } else {
                return Err(InspectError::NotADataset { path: path.to_owned() });
            };
            (d, path.to_owned())
        } else if path.is_file() {
            (path.to_owned(), path.parent().map(Path::to_path_buf).unwrap_or_default())
        } else {
            return Err(InspectError::Io {
                path: path.to_owned(),
                source: io::Error::new(io::ErrorKind::NotFound, "no such file or folder"),
            });
        };
        let csv = dataset.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("csv"));
        let failures = Some(dir.join("failures.jsonl")).filter(|f| f.is_file());
        Ok(Source { dataset, csv, failures, stage: None })
    }
}

/// A line that is not a record.
#[derive(Debug, Clone, Serialize)]
pub struct Malformed {
    pub line: u64,
    pub error: String,
}

/// Streams the records of a source; malformed lines are reported to `bad`, never fatal.
pub fn for_each_record(
    src: &Source,
    mut each: impl FnMut(Record, u64) -> bool,
    mut bad: impl FnMut(Malformed),
) -> Result<(), InspectError> {
    let io_err = |source| InspectError::Io { path: src.dataset.clone(), source };
    if src.csv {
        let file = File::open(&src.dataset).map_err(io_err)?;
        let mut r = csv::ReaderBuilder::new().flexible(true).from_reader(BufReader::new(file));
        let headers = r
            .headers()
            .map_err(|e| InspectError::CsvHeader { path: src.dataset.clone(), message: e.to_string() })?
            .clone();
        let mut rec = csv::StringRecord::new();
        loop {
            match r.read_record(&mut rec) {
                Ok(false) => return Ok(()),
                Ok(true) => {
                    let line = rec.position().map(|p| p.line()).unwrap_or(0);
                    match rec.deserialize::<Record>(Some(&headers)) {
                        Ok(record) => {
                            if !each(record, line) {
                                return Ok(());
                            }
                        }
                        Err(e) => bad(Malformed { line, error: e.to_string() }),
                    }
                }
                Err(e) => {
                    let line = e.position().map(|p| p.line()).unwrap_or(0);
                    bad(Malformed { line, error: e.to_string() });
                    if !matches!(e.kind(), csv::ErrorKind::UnequalLengths { .. } | csv::ErrorKind::Utf8 { .. }) {
                        return Ok(());
                    }
                }
            }
        }
    }
    if let Some(stage) = src.stage.as_deref().filter(|_| !is_stage_file(&src.dataset)) {
        for item in JsonlReader::<Value>::open(&src.dataset).map_err(io_err)? {
            match item.map_err(io_err)? {
                (line, Ok(row)) => match stage_record(&row, stage) {
                    Ok(r) => {
                        if !each(r, line) {
                            return Ok(());
                        }
                    }
                    Err(error) => bad(Malformed { line, error }),
                },
                (line, Err(b)) => bad(Malformed { line, error: b.error }),
            }
        }
        return Ok(());
    }
    let lines = JsonlReader::<Record>::open(&src.dataset).map_err(io_err)?;
    for item in lines {
        match item.map_err(io_err)? {
            (line, Ok(record)) => {
                if !each(record, line) {
                    return Ok(());
                }
            }
            (line, Err(b)) => {
                let error = if b.torn { format!("torn last line (no newline): {}", b.error) } else { b.error };
                bad(Malformed { line, error })
            }
        }
    }
    Ok(())
}

/// Whether a path is a stage's own file (`stages/<name>.jsonl`), which holds records.
fn is_stage_file(p: &Path) -> bool {
    p.parent().and_then(|d| d.file_name()).is_some_and(|n| n == "stages")
}

/// A stage's record out of a multi-stage dataset row: the stage's object, with the row's id and
/// input (and no key: the row is the current config's by construction).
fn stage_record(row: &Value, stage: &str) -> Result<Record, String> {
    let obj = row.get(stage).filter(|o| o.is_object()).ok_or_else(|| format!("the row has no stage {stage:?} (a multi-stage dataset row has one object per stage)"))?;
    let mut r: Record = serde_json::from_value(obj.clone()).map_err(|e| format!("stage {stage:?}: {e}"))?;
    r.id = row.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
    r.input = row.get("input").and_then(Value::as_object).cloned().unwrap_or_default();
    r.stage = Some(stage.to_owned());
    Ok(r)
}

/// Log-bucketed histogram: exact count, min, max and mean; quantiles within about 1%.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    buckets: BTreeMap<i32, u64>,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

const GROWTH: f64 = 1.02;

impl Histogram {
    pub fn add(&mut self, v: f64) {
        if !v.is_finite() || v < 0.0 {
            return;
        }
        if self.count == 0 || v < self.min {
            self.min = v;
        }
        if self.count == 0 || v > self.max {
            self.max = v;
        }
        self.count += 1;
        self.sum += v;
        let b = if v < 1.0 { -1 } else { (v.ln() / GROWTH.ln()).floor() as i32 };
        *self.buckets.entry(b).or_insert(0) += 1;
    }

    fn bucket_value(&self, b: i32) -> f64 {
        let v = if b < 0 { 0.5 } else { GROWTH.powf(b as f64 + 0.5) };
        v.clamp(self.min, self.max)
    }

    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (b, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return Some(self.bucket_value(*b));
            }
        }
        Some(self.max)
    }

    pub fn summary(&self, bins: usize) -> Dist {
        let mut hist = Vec::new();
        if self.count > 0 && bins > 0 {
            let width = ((self.max - self.min) / bins as f64).max(f64::MIN_POSITIVE);
            let mut counts = vec![0u64; bins];
            for (b, n) in &self.buckets {
                let v = self.bucket_value(*b);
                let i = (((v - self.min) / width) as usize).min(bins - 1);
                counts[i] += n;
            }
            for (i, c) in counts.into_iter().enumerate() {
                hist.push(Bin { from: self.min + width * i as f64, to: self.min + width * (i + 1) as f64, count: c });
            }
            if self.max == self.min {
                hist.truncate(1);
            }
        }
        Dist {
            count: self.count,
            min: (self.count > 0).then_some(self.min),
            median: self.quantile(0.5),
            p90: self.quantile(0.9),
            p99: self.quantile(0.99),
            max: (self.count > 0).then_some(self.max),
            mean: (self.count > 0).then(|| self.sum / self.count as f64),
            histogram: hist,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Bin {
    pub from: f64,
    pub to: f64,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Dist {
    pub count: u64,
    pub min: Option<f64>,
    pub median: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
    pub histogram: Vec<Bin>,
}

/// Records against a config's requests.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigMatch {
    /// Requests the config asks for.
    pub requests: u64,
    /// Records whose key is one of them (what counts).
    pub matching: u64,
    /// Records made by another request (edited template, other model or options).
    pub stale: u64,
    /// The config's requests with no record yet.
    pub missing: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailureSummary {
    pub lines: u64,
    /// Failures whose request has a record since.
    pub resolved: u64,
    pub unresolved: u64,
    /// Most common errors first, with how many failures had each.
    pub top_errors: Vec<(String, u64)>,
    pub malformed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub dataset: String,
    pub records: u64,
    pub unique: u64,
    /// Records repeating an (id, sample) seen before (e.g. re-runs after a change).
    pub repeated: u64,
    pub malformed: u64,
    /// The first malformed lines.
    pub malformed_lines: Vec<Malformed>,
    pub config: Option<ConfigMatch>,
    pub failures: Option<FailureSummary>,
    pub done_reasons: BTreeMap<String, u64>,
    /// Share of records cut off by `num_predict`.
    pub length_share: f64,
    pub completion_tokens: Dist,
    pub response_chars: Dist,
    pub tokens_per_sec: Dist,
    pub empty_responses: u64,
    pub duplicate_responses: u64,
    pub contains_prompt: u64,
    pub replacement_chars: u64,
    pub with_thinking: u64,
    pub models: BTreeMap<String, u64>,
    pub samples: BTreeMap<u32, u64>,
    pub sampled: Vec<Record>,
    pub by_id: Vec<Record>,
    /// For a run with a schema: re-asks and the top-level fields of `parsed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub structured: Option<Structured>,
    /// A stage with `keep`: records whose row went on, of those judged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept: Option<(u64, u64)>,
}

/// What the `parsed` values of a run with a schema hold.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Structured {
    /// Records with a `parsed` value.
    pub records: u64,
    /// Records that needed at least one re-ask, and the invalid replies re-asked in all.
    pub reasked: u64,
    pub invalid_replies: u64,
    /// Per top-level field of `parsed` (objects only).
    pub fields: BTreeMap<String, FieldStats>,
}

/// One field of `parsed`: its JSON types, numbers' range and mean, the most common strings.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FieldStats {
    pub types: BTreeMap<String, u64>,
    pub min: Option<f64>,
    pub mean: Option<f64>,
    pub max: Option<f64>,
    /// The most common values of strings (and booleans), most common first (at most 5).
    pub top: Vec<(String, u64)>,
    #[serde(skip)]
    sum: f64,
    #[serde(skip)]
    numbers: u64,
    #[serde(skip)]
    counts: HashMap<String, u64>,
}

/// Distinct string values counted per field: enough for enums and labels, bounded for free text.
const MAX_DISTINCT: usize = 1000;

impl FieldStats {
    fn add(&mut self, v: &Value) {
        let t = match v {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        *self.types.entry(t.to_owned()).or_insert(0) += 1;
        if let Some(x) = v.as_f64() {
            self.min = Some(self.min.map_or(x, |m| m.min(x)));
            self.max = Some(self.max.map_or(x, |m| m.max(x)));
            self.sum += x;
            self.numbers += 1;
            self.mean = Some(self.sum / self.numbers as f64);
        }
        let text = match v {
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
        if let Some(text) = text {
            if let Some(c) = self.counts.get_mut(&text) {
                *c += 1;
            } else if self.counts.len() < MAX_DISTINCT {
                self.counts.insert(text, 1);
            }
        }
    }

    fn finish(&mut self) {
        let mut top: Vec<(String, u64)> = self.counts.iter().map(|(k, v)| (k.clone(), *v)).collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top.truncate(5);
        // A value seen once is free text, not a category.
        top.retain(|(_, c)| *c > 1);
        self.top = top;
    }
}

impl Structured {
    fn add(&mut self, r: &Record) {
        let Some(parsed) = &r.parsed else { return };
        // A CSV carries `parsed` as its compact JSON text.
        let from_text = parsed.as_str().and_then(|t| serde_json::from_str::<Value>(t).ok());
        let parsed = from_text.as_ref().unwrap_or(parsed);
        self.records += 1;
        let invalid = u64::from(r.invalid.unwrap_or(0));
        self.invalid_replies += invalid;
        self.reasked += u64::from(invalid > 0);
        if let Value::Object(o) = parsed {
            for (k, v) in o {
                self.fields.entry(k.clone()).or_default().add(v);
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct InspectOptions {
    /// Show this many records, chosen at random with `seed`.
    pub sample: usize,
    pub seed: u64,
    /// Show the records of this id.
    pub id: Option<String>,
    /// Keys of the current config's requests, to tell matching records from stale ones.
    pub current_keys: Option<HashSet<u128>>,
}

const MAX_MALFORMED_SHOWN: usize = 20;

/// The response's tokens per second: server generation time when known, else wall time.
fn tokens_per_sec(r: &Record) -> Option<f64> {
    let tokens = r.completion_tokens? as f64;
    let ms = r.eval_duration_ms.filter(|m| *m > 0.0).or_else(|| (r.duration_ms > 0).then_some(r.duration_ms as f64))?;
    Some(tokens / (ms / 1000.0))
}

pub fn inspect(src: &Source, opts: &InspectOptions) -> Result<Report, InspectError> {
    let mut records = 0u64;
    let mut ids: HashSet<u64> = HashSet::new();
    let mut responses: HashSet<u64> = HashSet::new();
    let mut keys_seen: HashSet<u128> = HashSet::new();
    let mut repeated = 0u64;
    let (mut matching, mut stale) = (0u64, 0u64);
    let mut malformed = 0u64;
    let mut malformed_lines = Vec::new();
    let mut done_reasons: BTreeMap<String, u64> = BTreeMap::new();
    let (mut tokens, mut chars, mut tps) = (Histogram::default(), Histogram::default(), Histogram::default());
    let (mut empty, mut dup, mut contains, mut fffd, mut thinking) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut models: BTreeMap<String, u64> = BTreeMap::new();
    let mut samples: BTreeMap<u32, u64> = BTreeMap::new();
    let mut reservoir: Vec<Record> = Vec::new();
    let mut by_id = Vec::new();
    let mut structured = Structured::default();
    let mut kept: Option<(u64, u64)> = None;
    let mut rng = opts.seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut next_rand = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };

    for_each_record(
        src,
        |r, _line| {
            records += 1;
            if !ids.insert(fnv1a64(&[r.id.as_bytes(), &r.sample.to_le_bytes()])) {
                repeated += 1;
            }
            if let Some(current) = &opts.current_keys {
                match parse_key(&r.key) {
                    Some(k) if current.contains(&k) => {
                        matching += 1;
                        keys_seen.insert(k);
                    }
                    _ => stale += 1,
                }
            }
            *done_reasons.entry(r.done_reason.clone().unwrap_or_else(|| "(none)".into())).or_insert(0) += 1;
            if let Some(t) = r.completion_tokens {
                tokens.add(t as f64);
            }
            chars.add(r.response.chars().count() as f64);
            if let Some(v) = tokens_per_sec(&r) {
                tps.add(v);
            }
            if r.response.trim().is_empty() {
                empty += 1;
            } else if !responses.insert(fnv1a64(&[r.response.as_bytes()])) {
                dup += 1;
            }
            if !r.prompt.trim().is_empty() && r.response.contains(r.prompt.as_str()) {
                contains += 1;
            }
            if r.response.contains('\u{fffd}') {
                fffd += 1;
            }
            if r.thinking.as_deref().is_some_and(|t| !t.is_empty()) {
                thinking += 1;
            }
            structured.add(&r);
            if let Some(k) = r.kept {
                let c = kept.get_or_insert((0, 0));
                c.0 += u64::from(k);
                c.1 += 1;
            }
            *models.entry(r.model.clone()).or_insert(0) += 1;
            *samples.entry(r.sample).or_insert(0) += 1;
            if opts.id.as_deref() == Some(r.id.as_str()) {
                by_id.push(r.clone());
            }
            // Reservoir sampling: every record has the same chance, in one pass, in N slots.
            if opts.sample > 0 {
                if reservoir.len() < opts.sample {
                    reservoir.push(r);
                } else {
                    let j = (next_rand() % records) as usize;
                    if j < opts.sample {
                        reservoir[j] = r;
                    }
                }
            }
            true
        },
        |m| {
            malformed += 1;
            if malformed_lines.len() < MAX_MALFORMED_SHOWN {
                malformed_lines.push(m);
            }
        },
    )?;

    let failures = match &src.failures {
        Some(f) => Some(summarize_failures(f, |key| {
            // A failure is resolved when a record with its key exists; without a config that
            // needs the dataset's keys, which `keys_seen` holds only for matching records.
            parse_key(key).is_some_and(|k| keys_seen.contains(&k))
        }, opts.current_keys.is_some(), src)?),
        None => None,
    };
    let length = done_reasons.get("length").copied().unwrap_or(0);
    Ok(Report {
        dataset: src.dataset.display().to_string(),
        records,
        unique: ids.len() as u64,
        repeated,
        malformed,
        malformed_lines,
        config: opts.current_keys.as_ref().map(|c| ConfigMatch {
            requests: c.len() as u64,
            matching,
            stale,
            missing: c.len() as u64 - keys_seen.len() as u64,
        }),
        failures,
        length_share: if records > 0 { length as f64 / records as f64 } else { 0.0 },
        done_reasons,
        completion_tokens: tokens.summary(10),
        response_chars: chars.summary(10),
        tokens_per_sec: tps.summary(10),
        empty_responses: empty,
        duplicate_responses: dup,
        contains_prompt: contains,
        replacement_chars: fffd,
        with_thinking: thinking,
        models,
        samples,
        sampled: reservoir,
        structured: (structured.records > 0).then(|| {
            structured.fields.values_mut().for_each(FieldStats::finish);
            structured
        }),
        by_id,
        kept,
    })
}

fn summarize_failures(
    path: &Path,
    resolved_by_config: impl Fn(&str) -> bool,
    have_config: bool,
    src: &Source,
) -> Result<FailureSummary, InspectError> {
    // Without a config, a failure is resolved when the dataset has any record with its key.
    let dataset_keys: Option<HashSet<u128>> = if have_config {
        None
    } else {
        let mut keys = HashSet::new();
        for_each_record(src, |r, _| {
            if let Some(k) = parse_key(&r.key) {
                keys.insert(k);
            }
            true
        }, |_| {})?;
        Some(keys)
    };
    let io_err = |source| InspectError::Io { path: path.to_owned(), source };
    let (mut lines, mut resolved, mut malformed) = (0u64, 0u64, 0u64);
    let mut errors: HashMap<String, u64> = HashMap::new();
    for item in JsonlReader::<Failure>::open(path).map_err(io_err)? {
        let Ok(fail) = item.map_err(io_err)?.1 else {
            malformed += 1;
            continue;
        };
        if src.stage.is_some() && fail.stage != src.stage {
            continue;
        }
        lines += 1;
        let done = match &dataset_keys {
            Some(keys) => parse_key(&fail.key).is_some_and(|k| keys.contains(&k)),
            None => resolved_by_config(&fail.key),
        };
        if done {
            resolved += 1;
        } else {
            *errors.entry(fail.error).or_insert(0) += 1;
        }
    }
    let mut top: Vec<(String, u64)> = errors.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.truncate(5);
    Ok(FailureSummary { lines, resolved, unresolved: lines - resolved, top_errors: top, malformed })
}

fn num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x >= 100.0 || x.fract() == 0.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.1}"),
    }
}

fn pct(n: u64, of: u64) -> String {
    if of == 0 {
        "0%".into()
    } else {
        format!("{:.1}%", n as f64 * 100.0 / of as f64)
    }
}

impl Report {
    /// The report for a person: a few screens at most.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let n = self.records;
        let _ = writeln!(s, "dataset: {}", self.dataset);
        let _ = writeln!(s, "records: {n} ({} unique (id, sample){})", self.unique, if self.repeated > 0 { format!(", {} repeated", self.repeated) } else { String::new() });
        if self.malformed > 0 {
            let lines: Vec<String> = self.malformed_lines.iter().map(|m| m.line.to_string()).collect();
            let more = if self.malformed as usize > self.malformed_lines.len() { ", ..." } else { "" };
            let _ = writeln!(s, "malformed lines: {} (line {}{more})", self.malformed, lines.join(", "));
            if let Some(m) = self.malformed_lines.first() {
                let _ = writeln!(s, "  first: line {}: {}", m.line, m.error);
            }
        }
        if let Some(c) = &self.config {
            let _ = writeln!(
                s,
                "config: {} requests; {} records match it, {} are stale (made by another template, model or options), {} requests have no record yet",
                c.requests, c.matching, c.stale, c.missing
            );
        }
        if let Some(f) = &self.failures {
            let _ = writeln!(s, "failures: {} unresolved ({} in failures.jsonl, {} since answered)", f.unresolved, f.lines, f.resolved);
            for (e, c) in &f.top_errors {
                let _ = writeln!(s, "  {c:>6} × {e}");
            }
        }
        let reasons: Vec<String> = self.done_reasons.iter().map(|(k, v)| format!("{k} {v} ({})", pct(*v, n))).collect();
        let _ = writeln!(s, "done_reason: {}", reasons.join(", "));
        if self.length_share > 0.0 {
            let _ = writeln!(
                s,
                "  warning: {:.1}% of responses were cut off by num_predict (done_reason \"length\"): raise num_predict and re-run, or use --redo-truncated",
                self.length_share * 100.0
            );
        }
        for (name, d) in [("completion tokens", &self.completion_tokens), ("response chars", &self.response_chars), ("tokens/s", &self.tokens_per_sec)] {
            let _ = writeln!(
                s,
                "{name}: min {} · median {} · p90 {} · p99 {} · max {} (n={})",
                num(d.min),
                num(d.median),
                num(d.p90),
                num(d.p99),
                num(d.max),
                d.count
            );
            let peak = d.histogram.iter().map(|b| b.count).max().unwrap_or(0);
            for b in &d.histogram {
                let bar = if peak > 0 { (b.count * 30).div_ceil(peak) as usize } else { 0 };
                let _ = writeln!(s, "  {:>9} – {:<9} {:<30} {}", num(Some(b.from)), num(Some(b.to)), "█".repeat(bar), b.count);
            }
        }
        let _ = writeln!(s, "checks:");
        for (label, v) in [
            ("empty responses", self.empty_responses),
            ("exact duplicate responses", self.duplicate_responses),
            ("responses containing the prompt verbatim", self.contains_prompt),
            ("responses with U+FFFD (lost characters)", self.replacement_chars),
            ("with thinking", self.with_thinking),
        ] {
            let _ = writeln!(s, "  {label}: {v} ({})", pct(v, n));
        }
        if let Some((k, of)) = self.kept {
            let _ = writeln!(s, "keep: {k} of {of} rows went on ({}); {} dropped", pct(k, of), of - k);
        }
        if let Some(st) = &self.structured {
            let _ = writeln!(
                s,
                "structured: {} records with parsed JSON; {} needed a re-ask ({} invalid replies re-asked in all)",
                st.records, st.reasked, st.invalid_replies
            );
            for (name, f) in &st.fields {
                let types: Vec<String> = f.types.iter().map(|(t, c)| format!("{t} {c}")).collect();
                let mut line = format!("  {name}: {}", types.join(", "));
                if let (Some(lo), Some(mean), Some(hi)) = (f.min, f.mean, f.max) {
                    line.push_str(&format!(" · min {} · mean {:.2} · max {}", num(Some(lo)), mean, num(Some(hi))));
                }
                if !f.top.is_empty() {
                    let top: Vec<String> = f.top.iter().map(|(v, c)| format!("{v:?} {c}")).collect();
                    line.push_str(&format!(" · most common: {}", top.join(", ")));
                }
                let _ = writeln!(s, "{line}");
            }
        }
        if self.models.len() > 1 {
            let m: Vec<String> = self.models.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(s, "models: {}", m.join(", "));
        }
        if self.samples.len() > 1 {
            let m: Vec<String> = self.samples.iter().map(|(k, v)| format!("#{k} {v}")).collect();
            let _ = writeln!(s, "samples: {}", m.join(", "));
        }
        for (title, recs) in [("sample", &self.sampled), ("id", &self.by_id)] {
            for r in recs {
                let _ = writeln!(s, "\n── {title}: id {} · sample {} · {} · {} ──", r.id, r.sample, r.model, r.done_reason.as_deref().unwrap_or("-"));
                if let Some(sys) = &r.system {
                    let _ = writeln!(s, "[system]\n{sys}");
                }
                let _ = writeln!(s, "[prompt]\n{}", r.prompt);
                if let Some(t) = &r.thinking {
                    let _ = writeln!(s, "[thinking]\n{t}");
                }
                let _ = writeln!(s, "[response]\n{}", r.response);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_close() {
        let mut h = Histogram::default();
        for v in 1..=1000 {
            h.add(v as f64);
        }
        let d = h.summary(10);
        assert_eq!((d.min, d.max, d.count), (Some(1.0), Some(1000.0), 1000));
        for (q, want) in [(0.5, 500.0), (0.9, 900.0), (0.99, 990.0)] {
            let got = h.quantile(q).unwrap();
            assert!((got - want).abs() / want < 0.02, "q{q}: {got} vs {want}");
        }
        assert_eq!(d.histogram.len(), 10);
        assert_eq!(d.histogram.iter().map(|b| b.count).sum::<u64>(), 1000);
    }

    #[test]
    fn histogram_of_one_value() {
        let mut h = Histogram::default();
        h.add(0.0);
        h.add(0.0);
        let d = h.summary(10);
        assert_eq!(d.median, Some(0.0));
        assert_eq!(d.histogram.len(), 1);
    }
}
