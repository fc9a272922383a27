//! Multi-stage pipelines (`[[stages]]`): rows that flow through several requests in order, a
//! teacher's question, a student's answer, a judge's score. This module owns what a row carries
//! from stage to stage, what a stage's template sees, the ids of downstream rows, `explode` and
//! `keep`, the records of `stages/<name>.jsonl` read back for resume, and the rows of the
//! composed `dataset.jsonl`. The scheduling of requests is the binary's (`pipeline.rs`).
//!
//! Ids: a row keeps its id through the stages, except that
//! - a stage with `samples_per_prompt = N > 1` makes N rows downstream, `ID#0` .. `ID#N-1`;
//! - a stage that explodes an array makes one row per element, `ID/0`, `ID/1`, ... (0-based);
//!
//! so the third question of topic `t01` is `t01/2`, and its second sampled answer `t01/2#1`.
//! The same config and input always give the same ids. A stage's record has the id of the row it
//! answered and `parent`, the id of the row the previous stage answered.
//!
//! Keys chain: a later stage's request key includes the key of the record it was made from, so an
//! edited stage re-runs itself and everything below it, and nothing above.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{Config, OutputFormat};
use crate::dataset::{csv_bytes, AppendFile, CsvFile, DatasetError, JsonlFile, OutputPaths, RecordSink, Sink, Written};
use crate::input::{IdSet, Row};
use crate::plan::{Job, PlanError, Planner};
use crate::progress::JobId;
use crate::record::Record;
use crate::resume::{cut_torn_tail, parse_key, ResumeError};
use crate::template::KeepExpr;

/// What a stage contributed to a row: what its template variable holds for later stages, and
/// its object in the row's `dataset.jsonl` record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageOutput {
    pub system: Option<String>,
    pub prompt: String,
    pub response: String,
    pub thinking: Option<String>,
    pub parsed: Option<Value>,
    /// The element of the exploded array this row stands for (stages with `explode`).
    pub item: Option<Value>,
    pub item_index: Option<u64>,
    pub model: String,
    pub done_reason: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub duration_ms: u64,
    pub attempts: u32,
    pub finished_at: String,
}

impl StageOutput {
    /// A stage's record as its output (the item is the row's: see [`Contribution`]).
    pub fn of(r: &Record) -> StageOutput {
        StageOutput {
            system: r.system.clone(),
            prompt: r.prompt.clone(),
            response: r.response.clone(),
            thinking: r.thinking.clone(),
            parsed: r.parsed.clone(),
            item: None,
            item_index: None,
            model: r.model.clone(),
            done_reason: r.done_reason.clone(),
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            duration_ms: r.duration_ms,
            attempts: r.attempts,
            finished_at: r.finished_at.clone(),
        }
    }
}

/// The fields of a [`StageOutput`], in order: the dataset CSV's `<stage>.<field>` columns.
pub const OUTPUT_FIELDS: &[&str] = &[
    "system", "prompt", "response", "thinking", "parsed", "item", "item_index", "model", "done_reason", "prompt_tokens",
    "completion_tokens", "duration_ms", "attempts", "finished_at",
];

/// What one stage added to a row: its output, shared by every row an explode makes of it, and
/// the element of the exploded array this row stands for.
#[derive(Debug, Clone)]
pub struct Contribution {
    pub out: Arc<StageOutput>,
    pub item: Option<(Value, u64)>,
    /// `out` as a template value, converted once (an explode into N rows would otherwise convert
    /// the whole reply, array and all, N times).
    jinja: minijinja::Value,
}

impl Contribution {
    pub fn new(out: StageOutput) -> Contribution {
        let jinja = minijinja::Value::from_serialize(&out);
        Contribution { out: Arc::new(out), item: None, jinja }
    }

    /// The same output for the row of element `i` of the exploded array.
    pub fn with_item(&self, item: Value, i: u64) -> Contribution {
        Contribution { out: self.out.clone(), item: Some((item, i)), jinja: self.jinja.clone() }
    }

    /// What a template sees under the stage's name.
    fn template_value(&self) -> minijinja::Value {
        let Some((item, i)) = &self.item else { return self.jinja.clone() };
        let mut entries: Vec<(minijinja::Value, minijinja::Value)> = Vec::with_capacity(OUTPUT_FIELDS.len());
        if let Ok(keys) = self.jinja.try_iter() {
            for k in keys {
                let v = match k.as_str() {
                    Some("item") => minijinja::Value::from_serialize(item),
                    Some("item_index") => minijinja::Value::from(*i),
                    _ => self.jinja.get_item(&k).unwrap_or_default(),
                };
                entries.push((k, v));
            }
        }
        entries.into_iter().collect()
    }

    /// The output as its `dataset.jsonl` object (the item in its place).
    fn view(&self) -> OutputView<'_> {
        let o = &self.out;
        OutputView {
            system: o.system.as_deref(),
            prompt: &o.prompt,
            response: &o.response,
            thinking: o.thinking.as_deref(),
            parsed: o.parsed.as_ref(),
            item: self.item.as_ref().map(|x| &x.0).or(o.item.as_ref()),
            item_index: self.item.as_ref().map(|x| x.1).or(o.item_index),
            model: &o.model,
            done_reason: o.done_reason.as_deref(),
            prompt_tokens: o.prompt_tokens,
            completion_tokens: o.completion_tokens,
            duration_ms: o.duration_ms,
            attempts: o.attempts,
            finished_at: &o.finished_at,
        }
    }
}

/// A [`StageOutput`] with its row's item, borrowed, for writing.
#[derive(Serialize)]
struct OutputView<'a> {
    system: Option<&'a str>,
    prompt: &'a str,
    response: &'a str,
    thinking: Option<&'a str>,
    parsed: Option<&'a Value>,
    item: Option<&'a Value>,
    item_index: Option<u64>,
    model: &'a str,
    done_reason: Option<&'a str>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    duration_ms: u64,
    attempts: u32,
    finished_at: &'a str,
}

/// A row on its way through the stages.
#[derive(Debug, Clone)]
pub struct FlowRow {
    pub id: String,
    /// The input line it comes from (for messages).
    pub line: u64,
    pub input: Arc<Map<String, Value>>,
    /// What the stages before this one made of it, in order, by name.
    pub earlier: Vec<(Arc<str>, Contribution)>,
    /// The row the previous stage answered, and its record's key.
    pub parent: Option<(String, u128)>,
    /// The input's fields as template values, converted once per input row.
    input_jinja: minijinja::Value,
    /// One of its stages was asked in this run (not all read back from earlier runs).
    pub fresh: bool,
}

impl FlowRow {
    pub fn from_input(row: Row) -> FlowRow {
        let input_jinja = minijinja::Value::from_serialize(&row.fields);
        FlowRow { id: row.id, line: row.line, input: Arc::new(row.fields), earlier: Vec::new(), parent: None, input_jinja, fresh: false }
    }

    /// What a template (and `keep`) sees: the input row's fields, each earlier stage's output
    /// under its name, and `extra` (the stage whose `keep` is evaluated).
    pub fn context(&self, extra: Option<(&str, &Contribution)>) -> minijinja::Value {
        let mut entries: Vec<(minijinja::Value, minijinja::Value)> = Vec::with_capacity(self.input.len() + self.earlier.len() + 1);
        for k in self.input.keys() {
            let key = minijinja::Value::from(k.as_str());
            let v = self.input_jinja.get_item(&key).unwrap_or_default();
            entries.push((key, v));
        }
        for (name, c) in self.earlier.iter().map(|(n, c)| (n.as_ref(), c)).chain(extra) {
            entries.push((minijinja::Value::from(name), c.template_value()));
        }
        entries.into_iter().collect()
    }

    /// The names a template can read: input fields and earlier stages.
    fn names(&self) -> impl Iterator<Item = &str> {
        self.input.keys().map(String::as_str).chain(self.earlier.iter().map(|(n, _)| n.as_ref()))
    }
}

/// A row that went through every stage and passed every `keep`: a record of `dataset.jsonl`,
/// `{"id", "input", "<stage>": {...}, ...}` in stage order.
#[derive(Debug, Clone)]
pub struct DatasetRow {
    pub id: String,
    pub input: Arc<Map<String, Value>>,
    pub stages: Vec<(Arc<str>, Contribution)>,
}

impl Serialize for DatasetRow {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2 + self.stages.len()))?;
        m.serialize_entry("id", &self.id)?;
        m.serialize_entry("input", self.input.as_ref())?;
        for (name, c) in &self.stages {
            m.serialize_entry(name.as_ref(), &c.view())?;
        }
        m.end()
    }
}

/// The dataset CSV's header: `id`, `input` (JSON), then `<stage>.<field>` for every stage.
pub fn dataset_csv_columns(stages: &[&str]) -> Vec<String> {
    let mut c = vec!["id".to_owned(), "input".to_owned()];
    for s in stages {
        c.extend(OUTPUT_FIELDS.iter().map(|f| format!("{s}.{f}")));
    }
    c
}

impl DatasetRow {
    /// The CSV row ([`dataset_csv_columns`]): text as it is, other values as compact JSON, an
    /// absent value as an empty cell.
    pub fn csv_fields(&self) -> Vec<String> {
        let mut row = vec![self.id.clone(), Value::Object((*self.input).clone()).to_string()];
        for (_, c) in &self.stages {
            let v = serde_json::to_value(c.view()).unwrap_or(Value::Null);
            for f in OUTPUT_FIELDS {
                row.push(match v.get(*f) {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                });
            }
        }
        row
    }
}

/// One stage, ready to plan requests.
pub struct StagePlan {
    pub name: Arc<str>,
    pub index: usize,
    pub planner: Planner,
    /// The stage seen as a one-stage config.
    pub cfg: Config,
    pub explode: Option<String>,
    pub keep: Option<KeepExpr>,
}

impl StagePlan {
    pub fn samples(&self) -> u32 {
        self.cfg.run().samples_per_prompt
    }
    pub fn has_schema(&self) -> bool {
        self.cfg.schema.is_some()
    }
}

/// A request a row asks of a stage.
pub struct StageRequest {
    pub sample: u32,
    pub key: u128,
    options: Map<String, Value>,
    seed: Option<i64>,
}

/// What became of a row after a stage's record.
#[derive(Debug)]
pub struct Advance {
    /// With `keep`: whether it passed.
    pub kept: Option<bool>,
    /// With `explode`: how many rows the array made (0 ends the row).
    pub exploded: Option<usize>,
    /// The rows for the next stage; after the last stage, the rows of the dataset.
    pub rows: Vec<FlowRow>,
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("{path}: `{key}`: {message}")]
    Config { path: PathBuf, key: String, message: String },
}

/// Every stage of a run.
pub struct Pipeline {
    pub stages: Vec<StagePlan>,
    cfg: Config,
    /// The input's rows, read with the run's own settings (limit, shard).
    input: Planner,
}

impl Pipeline {
    pub fn new(cfg: &Config) -> Result<Pipeline, StageError> {
        let mut stages = Vec::new();
        for (i, spec) in cfg.stages.iter().enumerate() {
            let keep = match &spec.keep {
                Some(k) => Some(KeepExpr::new(k).map_err(|message| StageError::Config { path: cfg.path.clone(), key: format!("stages[{i}].keep"), message })?),
                None => None,
            };
            stages.push(StagePlan { name: Arc::from(spec.name.as_str()), index: i, planner: Planner::new(&spec.cfg)?, cfg: (*spec.cfg).clone(), explode: spec.explode.clone(), keep });
        }
        Ok(Pipeline { stages, cfg: cfg.clone(), input: Planner::new(cfg)? })
    }

    pub fn names(&self) -> Vec<&str> {
        self.stages.iter().map(|s| s.name.as_ref()).collect()
    }

    /// The input's rows as rows of the first stage.
    pub fn rows(&self) -> Result<impl Iterator<Item = Result<FlowRow, PlanError>> + '_, PlanError> {
        Ok(self.input.rows()?.map(|r| r.map(FlowRow::from_input).map_err(PlanError::from)))
    }

    /// Reads the whole input once before the run: ids unique, no field named like a stage, every
    /// row renders the first stage's template, and every later template's variables are fields
    /// of the input (its first row) or earlier stages. Returns the number of rows.
    pub fn check(&self) -> Result<u64, StageError> {
        let mut ids = IdSet::default();
        let mut rows = 0u64;
        let first = &self.stages[0];
        for row in self.rows()? {
            let row = row?;
            ids.push(&row.id, row.line);
            for (i, s) in self.stages.iter().enumerate() {
                if row.input.contains_key(s.name.as_ref()) {
                    return Err(self.key_error(
                        &format!("stages[{i}].name"),
                        format!("{}: row {} (line {}) has a field {:?}, the name of a stage: rename the stage (the template variable would be ambiguous)", self.cfg.input_path.display(), row.id, row.line, s.name.as_ref()),
                    ));
                }
            }
            if rows == 0 {
                for (i, s) in self.stages.iter().enumerate() {
                    let keep_vars = match &s.keep {
                        Some(k) => crate::template::expression_variables(k.source()).unwrap_or_default(),
                        None => Vec::new(),
                    };
                    let template_vars = s.planner.variables().iter().filter(|_| i > 0).map(|v| (v, "template", i));
                    // `keep` also reads the stage's own output.
                    for (v, key, upto) in template_vars.chain(keep_vars.iter().map(|v| (v, "keep", i + 1))) {
                        if !row.input.contains_key(v) && !self.stages[..upto].iter().any(|e| e.name.as_ref() == v) {
                            let mut have: Vec<&str> = row.input.keys().map(String::as_str).collect();
                            have.sort();
                            return Err(self.key_error(
                                &format!("stages[{i}].{key}"),
                                format!(
                                    "stage {:?} uses `{v}`, which is neither a field of the input ({}) nor a stage it can read ({})",
                                    s.name.as_ref(),
                                    have.join(", "),
                                    self.stages[..upto].iter().map(|e| e.name.as_ref()).collect::<Vec<_>>().join(", ")
                                ),
                            ));
                        }
                    }
                }
            }
            first.planner.render(&Row { id: row.id.clone(), line: row.line, fields: (*row.input).clone() })?;
            rows += 1;
        }
        if rows == 0 {
            return Err(PlanError::Empty { path: self.cfg.input_path.clone() }.into());
        }
        if let Some(d) = ids.first_duplicate(|lines| {
            let mut found = HashMap::new();
            for row in self.input.rows()? {
                let row = row?;
                if lines.contains(&row.line) {
                    found.insert(row.line, row.id);
                }
            }
            Ok::<_, PlanError>(found)
        })? {
            return Err(PlanError::DuplicateId {
                path: self.cfg.input_path.clone(),
                line: d.line,
                id: d.id,
                first: d.first,
                hint: self.cfg.raw.input.id_field.as_ref().map(|f| format!(" (input.id_field = {f:?})")).unwrap_or_default(),
            }
            .into());
        }
        Ok(rows)
    }

    fn key_error(&self, key: &str, message: String) -> StageError {
        StageError::Config { path: self.cfg.path.clone(), key: key.to_owned(), message }
    }

    /// A row's prompt at stage `s` and its requests (one per sample), keys chained to its parent.
    pub fn requests(&self, s: usize, row: &FlowRow) -> Result<(String, Vec<StageRequest>), PlanError> {
        let st = &self.stages[s];
        let prompt = st.planner.render_context(&row.id, row.line, row.context(None), &mut row.names())?;
        let parent = row.parent.as_ref().map(|p| p.1);
        let reqs = (0..st.samples())
            .map(|sample| {
                let (options, seed, key) = st.planner.chained_request(&row.id, &prompt, sample, parent);
                StageRequest { sample, key, options, seed }
            })
            .collect();
        Ok((prompt, reqs))
    }

    /// The job of one of a row's requests.
    pub fn job(&self, s: usize, seq: JobId, row: &FlowRow, prompt: &str, req: StageRequest) -> Job {
        let mut job = self.stages[s].planner.job_with(seq, &row.id, &row.input, prompt, req.sample, (req.options, req.seed, req.key));
        job.parent = row.parent.as_ref().map(|p| p.0.clone());
        job
    }

    /// A row's way on after stage `s` answered it with `rec` (whose key is `key`; `fresh` when
    /// asked in this run): `keep`, then the rows for the next stage (or of the dataset, after
    /// the last).
    pub fn advance(&self, s: usize, row: &FlowRow, rec: &Record, key: u128, fresh: bool) -> Result<Advance, String> {
        let st = &self.stages[s];
        let out = Contribution::new(StageOutput::of(rec));
        let kept = match &st.keep {
            None => None,
            Some(k) => Some(k.eval(row.context(Some((st.name.as_ref(), &out))))?),
        };
        let mut adv = Advance { kept, exploded: None, rows: Vec::new() };
        if kept == Some(false) {
            return Ok(adv);
        }
        let id = if st.samples() > 1 { format!("{}#{}", row.id, rec.sample) } else { row.id.clone() };
        let child = |id: String, out: Contribution| {
            let mut earlier = row.earlier.clone();
            earlier.push((st.name.clone(), out));
            FlowRow { id, line: row.line, input: row.input.clone(), earlier, parent: Some((row.id.clone(), key)), input_jinja: row.input_jinja.clone(), fresh: row.fresh || fresh }
        };
        match &st.explode {
            None => adv.rows.push(child(id, out)),
            Some(f) => {
                let items = rec.parsed.as_ref().and_then(|p| p.get(f)).and_then(Value::as_array).ok_or_else(|| format!("`parsed.{f}` is not an array"))?;
                adv.exploded = Some(items.len());
                for (i, item) in items.iter().enumerate() {
                    adv.rows.push(child(format!("{id}/{i}"), out.with_item(item.clone(), i as u64)));
                }
            }
        }
        Ok(adv)
    }

    /// Whether a stage's record read back from an earlier run can stand for its request: a stage
    /// that explodes needs the array in it (the record may come from before `explode` was set, or
    /// from a looser schema); one without it is asked again.
    pub fn reusable(&self, s: usize, rec: &Record) -> bool {
        match &self.stages[s].explode {
            None => true,
            Some(f) => rec.parsed.as_ref().and_then(|p| p.get(f)).is_some_and(Value::is_array),
        }
    }

    pub fn is_last(&self, s: usize) -> bool {
        s + 1 == self.stages.len()
    }

    /// The dataset record of a row that went through every stage.
    pub fn dataset_row(row: FlowRow) -> DatasetRow {
        DatasetRow { id: row.id, input: row.input, stages: row.earlier }
    }
}

/// The stages of a multi-stage output folder, in run order (the manifest's; else the files').
pub fn stage_names(dir: &Path) -> Option<Vec<String>> {
    let stages = dir.join("stages");
    if !stages.is_dir() {
        return None;
    }
    let from_manifest = std::fs::read(dir.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|m| m["stages"].as_array().map(|a| a.iter().filter_map(|s| s["name"].as_str().map(str::to_owned)).collect::<Vec<_>>()))
        .filter(|v| !v.is_empty());
    from_manifest.or_else(|| {
        let mut names: Vec<String> = std::fs::read_dir(&stages)
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".jsonl").map(str::to_owned))
            .collect();
        names.sort();
        Some(names)
    })
}

/// Where a multi-stage run's files are, beside the one-stage names of [`crate::dataset::OutputPaths`].
pub fn stage_jsonl(dir: &Path, name: &str) -> PathBuf {
    dir.join("stages").join(format!("{name}.jsonl"))
}

pub fn stage_csv(dir: &Path, name: &str) -> PathBuf {
    dir.join("stages").join(format!("{name}.csv"))
}

#[derive(Deserialize)]
struct KeyHead {
    #[serde(default)]
    key: String,
    #[serde(default)]
    finished_at: String,
}

#[derive(Deserialize)]
struct FailHead {
    #[serde(default)]
    key: String,
    #[serde(default)]
    when: String,
}

/// What a stage's file held before this run: where each key's latest record starts, to read it
/// back when a row needs it (a finished request is never asked again).
#[derive(Debug, Default)]
pub struct StagePrior {
    pub done: HashMap<u128, u64>,
    file: Option<PathBuf>,
    handle: Option<File>,
    /// Records finished at or after the `since` time given to [`load_prior`].
    pub records_since: u64,
}

impl StagePrior {
    /// The record with key `k`, read from the file (one positioned read; no seek, no reopen).
    pub fn record(&self, k: u128) -> Option<io::Result<Record>> {
        use std::os::unix::fs::FileExt;
        let offset = *self.done.get(&k)?;
        let (path, file) = (self.file.as_ref()?, self.handle.as_ref()?);
        let mut line = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        let mut at = offset;
        let result = loop {
            let n = match file.read_at(&mut chunk, at) {
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            if n == 0 {
                break Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{} ends inside the record at byte {offset}", path.display())));
            }
            match chunk[..n].iter().position(|b| *b == b'\n') {
                Some(i) => {
                    line.extend_from_slice(&chunk[..i]);
                    break Ok(());
                }
                None => {
                    line.extend_from_slice(&chunk[..n]);
                    at += n as u64;
                }
            }
        };
        Some(result.and_then(|()| {
            serde_json::from_slice(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{} at byte {offset}: {e}", path.display())))
        }))
    }
}

/// What a multi-stage folder held before this run.
#[derive(Debug, Default)]
pub struct PipelinePrior {
    pub stages: Vec<StagePrior>,
    /// Keys in `failures.jsonl` that no record has answered since.
    pub failed: HashSet<u128>,
    pub failures_since: u64,
    pub repairs: Vec<String>,
}

/// Reads the stage files and failures back. With `repair`: torn last lines are cut (stage files,
/// failures, the live dataset files), and with `csv` (the stages' `(name, schema)`) each stage's
/// CSV is made to hold exactly its JSONL's records.
pub fn load_prior(dir: &Path, names: &[&str], failures: &Path, since: Option<&str>, repair: bool, csv: Option<&[(&str, bool)]>) -> Result<PipelinePrior, ResumeError> {
    let after = |t: &str| since.is_some_and(|s| !t.is_empty() && t >= s);
    let mut prior = PipelinePrior::default();
    let io_err = |p: &Path| {
        let p = p.to_owned();
        move |source: io::Error| ResumeError::Io { path: p.clone(), source }
    };
    for name in names {
        let path = stage_jsonl(dir, name);
        if repair {
            prior.repairs.extend(cut_torn_tail(&path)?);
        }
        let mut sp = StagePrior { file: Some(path.clone()), ..Default::default() };
        let mut order: Vec<u128> = Vec::new();
        match File::open(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
            Ok(f) => {
                sp.handle = f.try_clone().ok();
                let mut r = BufReader::new(f);
                let (mut offset, mut line, mut n) = (0u64, Vec::new(), 0u64);
                loop {
                    line.clear();
                    let len = r.read_until(b'\n', &mut line).map_err(io_err(&path))?;
                    if len == 0 || !line.ends_with(b"\n") {
                        break;
                    }
                    n += 1;
                    let head: KeyHead = serde_json::from_slice(&line)
                        .map_err(|e| ResumeError::BadLine { path: path.clone(), line: n, message: e.to_string() })?;
                    let k = parse_key(&head.key);
                    if let Some(k) = k {
                        sp.done.insert(k, offset);
                    }
                    if csv.is_some() {
                        order.push(k.unwrap_or(0));
                    }
                    sp.records_since += u64::from(after(&head.finished_at));
                    offset += len as u64;
                }
            }
        }
        if let (true, Some(schemas)) = (repair, csv) {
            let schema = schemas.iter().any(|(n, s)| n == name && *s);
            prior.repairs.extend(crate::resume::reconcile_csv(&stage_csv(dir, name), &path, &order, schema)?);
        }
        prior.stages.push(sp);
    }
    if repair {
        prior.repairs.extend(cut_torn_tail(failures)?);
        // The live dataset gets rows appended until the next complete run rebuilds it.
        let paths = OutputPaths::new(dir);
        prior.repairs.extend(cut_torn_tail(&paths.jsonl)?);
        if csv.is_some() {
            prior.repairs.extend(cut_torn_tail(&paths.csv)?);
        }
    }
    if let Ok(f) = File::open(failures) {
        for (n, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(io_err(failures))?;
            let Ok(head) = serde_json::from_str::<FailHead>(&line) else {
                return Err(ResumeError::BadLine { path: failures.to_owned(), line: n as u64 + 1, message: "not a failure record".into() });
            };
            prior.failures_since += u64::from(after(&head.when));
            if let Some(k) = parse_key(&head.key) {
                prior.failed.insert(k);
            }
        }
    }
    prior.failed.retain(|k| !prior.stages.iter().any(|s| s.done.contains_key(k)));
    Ok(prior)
}

/// The files a multi-stage run writes: per stage, its records (JSONL, and CSV when configured);
/// the composed dataset; failures.
///
/// The dataset files are derived from the stage files. A run appends the rows it finishes with a
/// new request to the live `dataset.jsonl`/`.csv` as they complete, and writes every row it
/// finds finished (read back or new) to `dataset.jsonl.next`/`.csv.next`; a run that went
/// through the whole input renames those over the live files ([`StageItem::Commit`]). So the live
/// files never lose a row, and after each complete run they hold exactly the rows of the config
/// it ran (a row whose stages changed is in the live file twice, old and new, until then).
pub struct StageFiles {
    stages: Vec<(JsonlFile, Option<CsvFile>)>,
    /// The live dataset files (the CSV only when its header is this config's).
    live: DatasetFiles,
    /// The dataset as this run finds it, to replace the live files after a complete run.
    next: DatasetFiles,
    failures: JsonlFile,
    dirty: bool,
    last_sync: std::time::Instant,
}

#[derive(Default)]
struct DatasetFiles {
    jsonl: Option<JsonlFile>,
    csv: Option<AppendFile>,
}

impl DatasetFiles {
    fn write(&mut self, r: &DatasetRow) -> Result<(), DatasetError> {
        if let Some(j) = &mut self.jsonl {
            j.append(r).map_err(write_err(j.path()))?;
        }
        if let Some(c) = &mut self.csv {
            csv_bytes(r.csv_fields()).and_then(|b| c.append(&b)).map_err(write_err(c.path()))?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), DatasetError> {
        if let Some(j) = &mut self.jsonl {
            j.sync().map_err(write_err(j.path()))?;
        }
        if let Some(c) = &mut self.csv {
            c.sync().map_err(write_err(c.path()))?;
        }
        Ok(())
    }
}

/// What the writer is asked to write.
pub enum StageItem {
    Record(usize, Box<Record>),
    Failure(Box<crate::record::Failure>),
    /// A row that went through every stage; `fresh` when this run asked one of its requests.
    Row(Box<DatasetRow>, bool),
    /// The end of the run: with `true` (the whole input went through), the rebuilt dataset
    /// replaces the live one; with `false`, it is dropped.
    Commit(bool),
}

/// `dataset.jsonl.next` beside `dataset.jsonl`.
fn next_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".next");
    PathBuf::from(s)
}

impl StageFiles {
    /// Opens every file.
    pub fn open(dir: &Path, stages: &[(&str, bool)], formats: &[OutputFormat]) -> Result<StageFiles, DatasetError> {
        let paths = OutputPaths::new(dir);
        let create = |p: &Path| std::fs::create_dir_all(p).map_err(|source| DatasetError::Open { path: p.to_owned(), source });
        create(&dir.join("stages"))?;
        let csv = formats.contains(&OutputFormat::Csv);
        let mut files = Vec::new();
        for (name, schema) in stages {
            let j = JsonlFile::open(&stage_jsonl(dir, name))?;
            let c = if csv { Some(CsvFile::open(&stage_csv(dir, name), *schema)?) } else { None };
            files.push((j, c));
        }
        let names: Vec<&str> = stages.iter().map(|s| s.0).collect();
        let header = csv_bytes(dataset_csv_columns(&names)).map_err(|source| DatasetError::Write { path: paths.csv.clone(), source })?;
        let mut live = DatasetFiles::default();
        let mut next = DatasetFiles::default();
        if formats.contains(&OutputFormat::Jsonl) {
            live.jsonl = Some(JsonlFile::open(&paths.jsonl)?);
            let n = next_path(&paths.jsonl);
            let _ = std::fs::remove_file(&n);
            next.jsonl = Some(JsonlFile::open(&n)?);
        }
        if csv {
            let mut f = AppendFile::open(&paths.csv)?;
            if f.is_empty() {
                f.append(&header).map_err(write_err(&paths.csv))?;
            }
            // A CSV of other stages (the config changed) gets no rows of this one's columns:
            // the complete run replaces it.
            let same = {
                use std::io::Read;
                let mut head = vec![0u8; header.len()];
                File::open(&paths.csv).and_then(|mut f| f.read_exact(&mut head)).is_ok() && head == header
            };
            live.csv = same.then_some(f);
            let n = next_path(&paths.csv);
            let _ = std::fs::remove_file(&n);
            let mut f = AppendFile::open(&n)?;
            f.append(&header).map_err(write_err(&n))?;
            next.csv = Some(f);
        }
        Ok(StageFiles { stages: files, live, next, failures: JsonlFile::open(&paths.failures)?, dirty: false, last_sync: std::time::Instant::now() })
    }

    fn write(&mut self, item: &StageItem) -> Result<(), DatasetError> {
        match item {
            StageItem::Record(s, r) => {
                let (j, c) = &mut self.stages[*s];
                j.append(r.as_ref()).map_err(write_err(j.path()))?;
                if let Some(c) = c {
                    c.write(r).map_err(write_err(c.path()))?;
                }
            }
            StageItem::Failure(f) => self.failures.append(f.as_ref()).map_err(write_err(self.failures.path()))?,
            StageItem::Row(r, fresh) => {
                if *fresh {
                    self.live.write(r)?;
                }
                self.next.write(r)?;
            }
            StageItem::Commit(complete) => {
                Sink::sync(self)?;
                let files = [self.next.jsonl.as_ref().map(|f| f.path().to_owned()), self.next.csv.as_ref().map(|f| f.path().to_owned())];
                self.next = DatasetFiles::default();
                for n in files.into_iter().flatten() {
                    let live = n.with_extension("");
                    let done = if *complete { std::fs::rename(&n, &live) } else { std::fs::remove_file(&n) };
                    done.map_err(write_err(&live))?;
                }
                if *complete {
                    // The renames, durable; the old live files are gone with them.
                    self.live = DatasetFiles::default();
                    if let Some(d) = self.failures.path().parent() {
                        File::open(d).and_then(|d| d.sync_all()).map_err(write_err(d))?;
                    }
                }
                return Ok(());
            }
        }
        self.dirty = true;
        if self.last_sync.elapsed() >= crate::dataset::SYNC_INTERVAL {
            Sink::sync(self)?;
        }
        Ok(())
    }
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> DatasetError {
    let path = path.to_owned();
    move |source| DatasetError::Write { path, source }
}

impl Sink for StageFiles {
    type Item = StageItem;

    fn put(&mut self, item: StageItem, written: &mut Written) -> Result<(), DatasetError> {
        self.write(&item)?;
        match item {
            StageItem::Record(_, r) => {
                written.records += 1;
                written.tokens += r.completion_tokens.unwrap_or(0);
            }
            StageItem::Failure(_) => written.failures += 1,
            StageItem::Row(..) => written.rows += 1,
            StageItem::Commit(_) => {}
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), DatasetError> {
        if !self.dirty {
            return Ok(());
        }
        for (j, c) in &mut self.stages {
            j.sync().map_err(write_err(j.path()))?;
            if let Some(c) = c {
                c.sync().map_err(write_err(c.path()))?;
            }
        }
        self.live.sync()?;
        self.next.sync()?;
        self.failures.sync().map_err(write_err(self.failures.path()))?;
        self.dirty = false;
        self.last_sync = std::time::Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pipeline(dir: &Path) -> Pipeline {
        std::fs::write(dir.join("in.jsonl"), "{\"id\": \"t1\", \"topic\": \"optics\"}\n").expect("input");
        let text = r#"name = "s"
[backend]
kind = "ollama"
url = "http://h:1"
model = "m"
[input]
path = "in.jsonl"
id_field = "id"
[[stages]]
name = "q"
template_text = "About {{ topic }}"
schema_text = '{"type": "object", "properties": {"qs": {"type": "array"}}}'
explode = "qs"
[[stages]]
name = "a"
template_text = "{{ q.item }} (#{{ q.item_index }} of {{ q.parsed.qs | length }}, {{ topic }})"
samples_per_prompt = 2
keep = "a.response != 'drop me'"
"#;
        std::fs::write(dir.join("run.toml"), text).expect("config");
        let cfg = crate::config::load_with_env(&dir.join("run.toml"), &Default::default(), &|_| None).expect("config");
        Pipeline::new(&cfg).expect("pipeline")
    }

    fn record(id: &str, sample: u32, response: &str, parsed: Option<Value>) -> Record {
        Record { id: id.into(), sample, response: response.into(), parsed, prompt: "p".into(), model: "m".into(), ..Record::default() }
    }

    #[test]
    fn rows_explode_sample_keep_and_see_earlier_stages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pipeline(dir.path());
        assert_eq!(p.check().expect("check"), 1);
        let row = p.rows().expect("rows").next().expect("a row").expect("ok");
        let (prompt, reqs) = p.requests(0, &row).expect("requests");
        assert_eq!(prompt, "About optics");
        assert_eq!(reqs.len(), 1);
        let q = record("t1", 0, "{}", Some(json!({"qs": ["why?", "how?", "when?"]})));
        let adv = p.advance(0, &row, &q, 7, true).expect("advance");
        assert_eq!(adv.exploded, Some(3));
        let ids: Vec<&str> = adv.rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["t1/0", "t1/1", "t1/2"]);
        let second = &adv.rows[1];
        assert_eq!(second.parent, Some(("t1".to_owned(), 7)));
        assert!(second.fresh);
        let (prompt, reqs) = p.requests(1, second).expect("requests");
        assert_eq!(prompt, "how? (#1 of 3, optics)");
        assert_eq!(reqs.len(), 2, "two samples");
        assert_ne!(reqs[0].key, reqs[1].key);
        // Keys chain: the same prompt under another parent is another request.
        let mut other = second.clone();
        other.parent = Some(("t1".to_owned(), 8));
        assert_ne!(p.requests(1, &other).expect("requests").1[0].key, reqs[0].key);

        // Samples make ID#k rows; keep drops one; the last stage's rows are the dataset's.
        let kept = p.advance(1, second, &record("t1/1", 1, "an answer", None), 9, false).expect("advance");
        assert_eq!(kept.kept, Some(true));
        assert_eq!(kept.rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["t1/1#1"]);
        let dropped = p.advance(1, second, &record("t1/1", 0, "drop me", None), 9, false).expect("advance");
        assert_eq!((dropped.kept, dropped.rows.len()), (Some(false), 0));

        let ds = Pipeline::dataset_row(kept.rows.into_iter().next().expect("row"));
        let v = serde_json::to_value(&ds).expect("json");
        assert_eq!(v["id"], "t1/1#1");
        assert_eq!(v["input"], json!({"id": "t1", "topic": "optics"}));
        assert_eq!((v["q"]["item"].clone(), v["q"]["item_index"].clone()), (json!("how?"), json!(1)));
        assert_eq!(v["a"]["response"], "an answer");
        assert!(v["a"]["item"].is_null());
        let text = serde_json::to_string(&ds).expect("json");
        assert!(text.starts_with("{\"id\":\"t1/1#1\",\"input\":"), "id and input first: {text}");
        assert!(text.find("\"q\":").unwrap_or(0) < text.find("\"a\":").unwrap_or(0), "stages in order");
        assert_eq!(ds.csv_fields().len(), dataset_csv_columns(&["q", "a"]).len());
    }

    #[test]
    fn an_empty_array_ends_the_row_and_a_failing_keep_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pipeline(dir.path());
        let row = p.rows().expect("rows").next().expect("a row").expect("ok");
        let adv = p.advance(0, &row, &record("t1", 0, "{}", Some(json!({"qs": []}))), 1, true).expect("advance");
        assert_eq!((adv.exploded, adv.rows.len()), (Some(0), 0));
        let child = p.advance(0, &row, &record("t1", 0, "{}", Some(json!({"qs": ["x"]}))), 1, true).expect("advance").rows.remove(0);
        // `keep` reads a.response: fine. A keep naming what is not there is an error, not a drop.
        let mut bad = p;
        bad.stages[1].keep = Some(KeepExpr::new("a.parsed.score >= 7").expect("compiles"));
        assert!(bad.advance(1, &child, &record("t1/0", 0, "text", None), 2, true).is_err());
    }
}
