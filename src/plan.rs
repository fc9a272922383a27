//! The plan of a run: which requests the input asks for, each as a [`Job`] (a row's rendered
//! prompt, a sample's options and seed, the request's key), and which of them still have to run
//! given what the output folder already holds.
//!
//! The input is read twice: once up front by [`Planner::check`] or [`Planner::asked`] (ids unique,
//! every row renders, the counts; a large JSONL or TXT input in parts, side by side), then
//! streamed again by [`Planner::jobs`] as the run dispatches, so a large batch is never held in
//! memory.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use serde_json::{json, Map, Value};

use crate::config::Config;
use crate::input::{IdSet, InputError, Row, RowReader};
use crate::progress::JobId;
use crate::request::{self, RequestKey};
use crate::resume::Prior;
use crate::template::{PromptTemplate, TemplateError};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("in {path}: {source}")]
    Render { path: PathBuf, source: TemplateError },
    #[error("{path}:{line}: duplicate id {id:?} (first at line {first}); ids must be unique{hint}")]
    DuplicateId { path: PathBuf, line: u64, id: String, first: u64, hint: String },
    #[error("{path}: no rows to run (the file is empty)")]
    Empty { path: PathBuf },
}

/// One request: a (row, sample) with its rendered prompt and the options it is sent with.
#[derive(Debug, Clone)]
pub struct Job {
    /// Its place in the run's order of dispatch (1-based), for progress events.
    pub seq: JobId,
    pub row_id: String,
    pub sample: u32,
    /// The system prompt it is sent with.
    pub system: Option<String>,
    pub prompt: String,
    pub input: Map<String, Value>,
    /// Options as sent, the per-sample seed included.
    pub options: Map<String, Value>,
    pub seed: Option<i64>,
    /// The request's key (see [`RequestKey`]).
    pub key: String,
    /// Multi-stage runs, after the first stage: the id of the row this one came from.
    pub parent: Option<String>,
}

impl Job {
    /// `row ID` (and ` sN` when a row has several samples), for messages and the display.
    pub fn label(&self, samples: u32) -> String {
        if samples > 1 {
            format!("row {} s{}", self.row_id, self.sample)
        } else {
            format!("row {}", self.row_id)
        }
    }
}

/// What to do again of what the folder already holds.
#[derive(Debug, Clone, Copy)]
pub struct Redo {
    /// Run again the requests in `failures.jsonl` (the default).
    pub failed: bool,
    /// Run again the requests whose record was cut off by `num_predict`.
    pub truncated: bool,
}

/// Whether a request runs, given what the folder already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Run,
    AlreadyDone,
    SkipFailed,
}

/// The verdict of the request with key `k` (see [`crate::resume::parse_key`]).
pub fn verdict(prior: &Prior, redo: Redo, k: u128) -> Verdict {
    if prior.done.contains(&k) && !(redo.truncated && prior.truncated.contains(&k)) {
        Verdict::AlreadyDone
    } else if !redo.failed && prior.failed.contains(&k) {
        Verdict::SkipFailed
    } else {
        Verdict::Run
    }
}

/// What the input asks for, counted before the run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plan {
    pub rows: u64,
    pub requests: u64,
    pub to_run: u64,
    pub already_done: u64,
    pub skipped_failed: u64,
    /// The input line of the first row with a request to run: rows before it are all done (or
    /// skipped), so the run reads past them without rendering them again.
    pub first_to_run: Option<u64>,
}

impl Plan {
    /// Adds the counts of the rows that follow.
    fn add(&mut self, later: &Plan) {
        self.rows += later.rows;
        self.requests += later.requests;
        self.to_run += later.to_run;
        self.already_done += later.already_done;
        self.skipped_failed += later.skipped_failed;
        self.first_to_run = self.first_to_run.or(later.first_to_run);
    }

    /// One request's verdict, from a row at input line `line`.
    fn count(&mut self, v: Verdict, line: u64) {
        self.requests += 1;
        match v {
            Verdict::Run => {
                self.to_run += 1;
                self.first_to_run.get_or_insert(line);
            }
            Verdict::AlreadyDone => self.already_done += 1,
            Verdict::SkipFailed => self.skipped_failed += 1,
        }
    }
}

/// Every request the input asks for, keyed, before the folder is read ([`Planner::asked`]).
pub struct Asked {
    keys: Vec<u128>,
    /// Each row's input line (lines past 4 billion are not told apart: they only delay the
    /// first request to run).
    lines: Vec<u32>,
    samples: u32,
}

/// The file in the output folder where a run keeps the input's [`Asked`], for the next run to
/// take instead of reading, rendering and keying every row again while the input and the config
/// are as they were ([`crate::manifest::input_fingerprint`]).
pub const ASKED_FILE: &str = ".data_generator.asked";
const ASKED_MAGIC: &[u8; 8] = b"DGASKED1";

impl Asked {
    /// Requests asked.
    pub fn requests(&self) -> usize {
        self.keys.len()
    }

    /// Writes it to `path` (beside it, then renamed over it) with the fingerprint it holds for.
    pub fn save(&self, path: &std::path::Path, fingerprint: &str) -> std::io::Result<()> {
        use std::io::Write;
        crate::dataset::replace_file(path, false, |w| {
            w.write_all(ASKED_MAGIC)?;
            w.write_all(&(fingerprint.len() as u32).to_le_bytes())?;
            w.write_all(fingerprint.as_bytes())?;
            w.write_all(&self.samples.to_le_bytes())?;
            w.write_all(&(self.lines.len() as u64).to_le_bytes())?;
            w.write_all(&(self.keys.len() as u64).to_le_bytes())?;
            for l in &self.lines {
                w.write_all(&l.to_le_bytes())?;
            }
            for k in &self.keys {
                w.write_all(&k.to_le_bytes())?;
            }
            Ok(())
        })
    }

    /// What [`Asked::save`] wrote to `path`, when it was written for `fingerprint` and is whole.
    pub fn load(path: &std::path::Path, fingerprint: &str) -> Option<Asked> {
        use std::io::Read;
        let file = std::fs::File::open(path).ok()?;
        let len = file.metadata().ok()?.len();
        let mut r = std::io::BufReader::with_capacity(256 * 1024, file);
        let mut take = |n: usize| -> Option<Vec<u8>> {
            let mut b = vec![0u8; n];
            r.read_exact(&mut b).ok().map(|()| b)
        };
        let u64_of = |b: Vec<u8>| b.try_into().ok().map(u64::from_le_bytes);
        if take(8)? != ASKED_MAGIC || take(4)? != (fingerprint.len() as u32).to_le_bytes() || take(fingerprint.len())? != fingerprint.as_bytes() {
            return None;
        }
        let samples = u32::from_le_bytes(take(4)?.try_into().ok()?);
        let (rows, keys) = (u64_of(take(8)?)?, u64_of(take(8)?)?);
        let header = 8 + 4 + fingerprint.len() as u64 + 4 + 8 + 8;
        if keys != rows.checked_mul(u64::from(samples))? || len != header.checked_add(rows.checked_mul(4)?)?.checked_add(keys.checked_mul(16)?)? {
            return None;
        }
        let mut asked = Asked { keys: Vec::with_capacity(usize::try_from(keys).ok()?), lines: Vec::with_capacity(usize::try_from(rows).ok()?), samples };
        let mut b4 = [0u8; 4];
        for _ in 0..rows {
            r.read_exact(&mut b4).ok()?;
            asked.lines.push(u32::from_le_bytes(b4));
        }
        let mut b16 = [0u8; 16];
        for _ in 0..keys {
            r.read_exact(&mut b16).ok()?;
            asked.keys.push(u128::from_le_bytes(b16));
        }
        Some(asked)
    }

    /// The plan: [`Planner::check`]'s counts, from the keys against what the folder holds.
    pub fn plan(&self, prior: &Prior, redo: Redo) -> Plan {
        let mut plan = Plan { rows: self.lines.len() as u64, ..Plan::default() };
        for (i, k) in self.keys.iter().enumerate() {
            let line = self.lines[i / self.samples.max(1) as usize];
            plan.count(verdict(prior, redo, *k), if line == u32::MAX { 0 } else { u64::from(line) });
        }
        plan
    }
}

/// A row and its prompt, or None for a row the run reads past (all its requests done).
type RowToRun = Result<Option<(Row, String)>, PlanError>;

/// Inputs at least this large are read in parts side by side by [`Planner::asked`].
const SPLIT_BYTES: u64 = 4 << 20;

/// Turns rows into jobs: the prompt, each sample's options and seed, the request's key.
pub struct Planner {
    cfg: Config,
    template: PromptTemplate,
    api: String,
    /// Inputs at least this large are read in parts ([`SPLIT_BYTES`]; tests lower it).
    split_bytes: u64,
}

impl Planner {
    pub fn new(cfg: &Config) -> Result<Planner, PlanError> {
        let template = PromptTemplate::new(cfg.template.clone(), &cfg.template_origin)?;
        let api = format!("{:?}", cfg.backend().api).to_lowercase();
        Ok(Planner { cfg: cfg.clone(), template, api, split_bytes: SPLIT_BYTES })
    }

    /// The rows of the input: the first `run.limit` only, and of those the shard's.
    pub fn rows(&self) -> Result<impl Iterator<Item = Result<Row, InputError>>, PlanError> {
        let cfg = &self.cfg;
        Ok(self.rows_of(RowReader::open(&cfg.input_path, cfg.input_format, cfg.raw.input.id_field.as_deref())?))
    }

    /// The rows a reader gives: the first `run.limit` only, and of those the shard's.
    fn rows_of(&self, reader: RowReader) -> impl Iterator<Item = Result<Row, InputError>> {
        let cfg = &self.cfg;
        let shard = cfg.shard;
        reader.take(cfg.run().limit.map_or(usize::MAX, |l| l as usize)).filter(move |r| match (r, shard) {
            (Ok(row), Some(s)) => s.has(&row.id),
            _ => true,
        })
    }

    /// A multi-stage row's prompt, from a context the caller built (its top-level `names`).
    pub fn render_context(&self, id: &str, line: u64, ctx: minijinja::Value, names: &mut dyn Iterator<Item = &str>) -> Result<String, PlanError> {
        self.template.render_context(id, line, ctx, names).map_err(|source| PlanError::Render { path: self.cfg.input_path.clone(), source })
    }

    /// A row's prompt.
    pub fn render(&self, row: &Row) -> Result<String, PlanError> {
        self.template.render(row).map_err(|source| PlanError::Render { path: self.cfg.input_path.clone(), source })
    }

    /// The options (the per-sample seed in them), the seed and the key of sample `sample` of a
    /// rendered row.
    fn request(&self, id: &str, prompt: &str, sample: u32) -> (Map<String, Value>, Option<i64>, u128) {
        self.chained_request(id, prompt, sample, None)
    }

    /// [`Planner::request`] of a later stage, whose key chains its parent's.
    pub fn chained_request(&self, id: &str, prompt: &str, sample: u32, parent: Option<u128>) -> (Map<String, Value>, Option<i64>, u128) {
        let (options, seed, key) = self.keyed(id, prompt, sample, parent);
        (options.into_owned(), seed, key)
    }

    /// The options, seed and key of a request, the options borrowed when they are the configured ones.
    fn keyed(&self, id: &str, prompt: &str, sample: u32, parent: Option<u128>) -> (Cow<'_, Map<String, Value>>, Option<i64>, u128) {
        let (options, seed) = self.sample_options(id, sample);
        let key = self.key_with(id, prompt, sample, parent, &options);
        (options, seed, key)
    }

    /// The options of sample `sample` of row `id` and its seed: the configured options, or a
    /// copy with the sample's own seed when several samples derive one.
    fn sample_options(&self, id: &str, sample: u32) -> (Cow<'_, Map<String, Value>>, Option<i64>) {
        let cfg = &self.cfg;
        let options = cfg.options();
        match options.get("seed").and_then(Value::as_i64) {
            None => (Cow::Borrowed(options), None),
            Some(s) => {
                let derived = request::derive_seed(s, cfg.run().samples_per_prompt, id, sample);
                if derived == s {
                    (Cow::Borrowed(options), Some(s))
                } else {
                    let mut o = options.clone();
                    o.insert("seed".into(), json!(derived));
                    (Cow::Owned(o), Some(derived))
                }
            }
        }
    }

    /// The key of sample `sample` of a rendered row (see [`RequestKey`]), without making its job.
    fn key(&self, id: &str, prompt: &str, sample: u32) -> u128 {
        self.keyed(id, prompt, sample, None).2
    }

    fn key_with(&self, id: &str, prompt: &str, sample: u32, parent: Option<u128>, options: &Map<String, Value>) -> u128 {
        let cfg = &self.cfg;
        RequestKey {
            id,
            sample,
            model: &cfg.backend().model,
            api: &self.api,
            system: cfg.system.as_deref(),
            prompt,
            options,
            think: cfg.backend().think.as_ref(),
            schema: cfg.schema.as_ref().map(|s| &s.value),
            parent,
        }
        .value()
    }

    /// Sample `sample` of a rendered row.
    pub fn job(&self, seq: JobId, row: &Row, prompt: &str, sample: u32) -> Job {
        self.job_of(seq, row, prompt, sample, self.request(&row.id, prompt, sample))
    }

    /// The job of a request whose options, seed and key are known.
    fn job_of(&self, seq: JobId, row: &Row, prompt: &str, sample: u32, request: (Map<String, Value>, Option<i64>, u128)) -> Job {
        self.job_with(seq, &row.id, &row.fields, prompt, sample, request)
    }

    /// The job of a request of row `id` whose input row is `input`.
    pub fn job_with(&self, seq: JobId, id: &str, input: &Map<String, Value>, prompt: &str, sample: u32, (options, seed, key): (Map<String, Value>, Option<i64>, u128)) -> Job {
        Job {
            seq,
            row_id: id.to_owned(),
            sample,
            system: self.cfg.system.clone(),
            prompt: prompt.to_owned(),
            input: input.clone(),
            options,
            seed,
            key: format!("{key:032x}"),
            parent: None,
        }
    }

    /// The template's top-level variables.
    pub fn variables(&self) -> &[String] {
        self.template.variables()
    }

    /// Every row and its prompt, in input order; stops at the first row that cannot be read or
    /// rendered.
    fn rendered(&self) -> Result<impl Iterator<Item = Result<(Row, String), PlanError>> + '_, PlanError> {
        Ok(self.rows()?.map(|row| {
            let row = row?;
            let prompt = self.render(&row)?;
            Ok((row, prompt))
        }))
    }

    /// Reads every row once: ids unique, every row renders, each request's verdict counted.
    pub fn check(&self, prior: &Prior, redo: Redo) -> Result<Plan, PlanError> {
        let samples = self.cfg.run().samples_per_prompt;
        let parts = self.in_parts(|reader| {
            let mut plan = Plan::default();
            self.each_row(reader, |row, prompt| {
                plan.rows += 1;
                for sample in 0..samples {
                    plan.count(verdict(prior, redo, self.key(&row.id, prompt, sample)), row.line);
                }
            })
            .map(|ids| (plan, ids))
        })?;
        let mut plan = Plan::default();
        let mut ids = IdSet::default();
        for (p, more_ids) in parts {
            plan.add(&p);
            ids.append(more_ids);
        }
        if plan.rows == 0 {
            return Err(PlanError::Empty { path: self.cfg.input_path.clone() });
        }
        self.unique(ids)?;
        Ok(plan)
    }

    /// The first id seen twice, as an error.
    fn unique(&self, ids: IdSet) -> Result<(), PlanError> {
        let cfg = &self.cfg;
        if let Some(d) = ids.first_duplicate(|lines| self.ids_at(lines))? {
            return Err(PlanError::DuplicateId {
                path: cfg.input_path.clone(),
                line: d.line,
                id: d.id,
                first: d.first,
                hint: cfg.raw.input.id_field.as_ref().map(|f| format!(" (input.id_field = {f:?})")).unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// [`Planner::check`] without the folder: every row read, rendered and keyed, ids checked
    /// unique; the keys kept (16 bytes a request, 4 a row) to be counted against the folder
    /// once it is read ([`Asked::plan`]). Made while the folder is read, on another thread.
    pub fn asked(&self) -> Result<Asked, PlanError> {
        let samples = self.cfg.run().samples_per_prompt;
        let mut parts = self.in_parts(|reader| {
            let mut asked = Asked { keys: Vec::new(), lines: Vec::new(), samples };
            self.each_row(reader, |row, prompt| {
                asked.lines.push(u32::try_from(row.line).unwrap_or(u32::MAX));
                for sample in 0..samples {
                    asked.keys.push(self.key(&row.id, prompt, sample));
                }
            })
            .map(|ids| (asked, ids))
        })?
        .into_iter();
        let (mut asked, mut ids) = parts.next().unwrap_or_else(|| (Asked { keys: Vec::new(), lines: Vec::new(), samples }, IdSet::default()));
        for (mut more, more_ids) in parts {
            asked.keys.append(&mut more.keys);
            asked.lines.append(&mut more.lines);
            ids.append(more_ids);
        }
        if asked.lines.is_empty() {
            return Err(PlanError::Empty { path: self.cfg.input_path.clone() });
        }
        self.unique(ids)?;
        Ok(asked)
    }

    /// Calls `f` with readers of the input's rows: one, or for a large JSONL or TXT input one
    /// per part, read side by side (reading, rendering and keying a million rows takes seconds on
    /// one core). Their results in file order; the first part's error is the file's first error.
    /// `run.limit` counts rows from the start: one part.
    fn in_parts<T: Send>(&self, f: impl Fn(RowReader) -> Result<T, PlanError> + Sync) -> Result<Vec<T>, PlanError> {
        let cfg = &self.cfg;
        let big = std::fs::metadata(&cfg.input_path).is_ok_and(|m| m.len() >= self.split_bytes);
        let parts = if big && cfg.run().limit.is_none() { std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(2, 4) } else { 1 };
        let id_field = cfg.raw.input.id_field.as_deref();
        let ranges = if parts > 1 { RowReader::parts(&cfg.input_path, cfg.input_format, parts)? } else { Vec::new() };
        if ranges.len() <= 1 {
            return Ok(vec![f(RowReader::open(&cfg.input_path, cfg.input_format, id_field)?)?]);
        }
        let f = &f;
        let done: Vec<Result<T, PlanError>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranges
                .iter()
                .map(|&(from, to)| s.spawn(move || f(RowReader::open_part(&cfg.input_path, cfg.input_format, id_field, from, to)?)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        done.into_iter().collect()
    }

    /// Reads a reader's rows, rendering each, and calls `each` with the row and its prompt;
    /// returns their ids.
    fn each_row(&self, reader: RowReader, mut each: impl FnMut(&Row, &str)) -> Result<IdSet, PlanError> {
        let mut ids = IdSet::default();
        for row in self.rows_of(reader) {
            let row = row?;
            ids.push(&row.id, row.line);
            each(&row, &self.render(&row)?);
        }
        Ok(ids)
    }

    /// The ids on the given lines of the input (a second read, to confirm ids whose hashes match).
    fn ids_at(&self, lines: &HashSet<u64>) -> Result<HashMap<u64, String>, PlanError> {
        let mut ids = HashMap::new();
        for row in self.rows()? {
            let row = row?;
            if lines.contains(&row.line) {
                ids.insert(row.line, row.id);
            }
        }
        Ok(ids)
    }

    /// The jobs still to run, numbered in input order (every request counts for `seq`, so a
    /// job's number is the same whatever is already done). Rows before the line `from` (the
    /// plan's [`Plan::first_to_run`]) are counted, not rendered. An error ends the stream.
    pub fn jobs<'a>(&'a self, prior: &'a Prior, redo: Redo, from: Option<u64>) -> impl Iterator<Item = Result<Job, PlanError>> + 'a {
        let samples = self.cfg.run().samples_per_prompt;
        let from = from.unwrap_or(0);
        // A row and its prompt; None for a row before `from`.
        let rows: Box<dyn Iterator<Item = RowToRun> + 'a> = match self.rows() {
            Ok(r) => Box::new(r.map(move |row| {
                let row = row?;
                if row.line < from {
                    return Ok(None);
                }
                let prompt = self.render(&row)?;
                Ok(Some((row, prompt)))
            })),
            Err(e) => Box::new(std::iter::once(Err(e))),
        };
        let mut failed = false;
        let mut seq = 0;
        rows.map_while(move |r| {
            if failed {
                return None;
            }
            failed = r.is_err();
            Some(r)
        })
        .flat_map(move |r| -> Box<dyn Iterator<Item = Result<Job, PlanError>> + 'a> {
            match r {
                Err(e) => Box::new(std::iter::once(Err(e))),
                Ok(None) => {
                    seq += u64::from(samples);
                    Box::new(std::iter::empty())
                }
                Ok(Some((row, prompt))) => {
                    let first = seq;
                    seq += u64::from(samples);
                    Box::new((0..samples).filter_map(move |sample| {
                        let (options, seed, key) = self.keyed(&row.id, &prompt, sample, None);
                        (verdict(prior, redo, key) == Verdict::Run)
                            .then(|| Ok(self.job_of(first + u64::from(sample) + 1, &row, &prompt, sample, (options.into_owned(), seed, key))))
                    }))
                }
            }
        })
    }

    /// Keys of every request the config asks for (what counts, for `inspect` and `export`).
    pub fn keys(&self) -> Result<HashSet<u128>, PlanError> {
        let mut keys = HashSet::new();
        for r in self.rendered()? {
            let (row, prompt) = r?;
            for sample in 0..self.cfg.run().samples_per_prompt {
                keys.insert(self.key(&row.id, &prompt, sample));
            }
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_with_env, Overrides};

    /// A planner over `input` (a file `in.<ext>`), with `run` in its `[run]` table.
    fn planner(dir: &std::path::Path, ext: &str, input: &[u8], id_field: bool, run: &str) -> Planner {
        std::fs::write(dir.join(format!("in.{ext}")), input).expect("input");
        let id = if id_field { "id_field = \"id\"\n" } else { "" };
        let var = if ext == "txt" { "prompt" } else { "question" };
        let text = format!(
            "name = \"p\"\n[backend]\nkind = \"ollama\"\nurl = \"http://h:1\"\nmodel = \"m\"\n[options]\nseed = 3\n\
             [prompts]\ntemplate_text = \"Q: {{{{ {var} }}}}\"\n[input]\npath = \"in.{ext}\"\n{id}[run]\nsamples_per_prompt = 2\n{run}"
        );
        let path = dir.join("run.toml");
        std::fs::write(&path, text).expect("config");
        Planner::new(&load_with_env(&path, &Overrides::default(), &|_| None).expect("config")).expect("planner")
    }

    /// What `asked` (keys, lines) and `check` (rows, requests, first to run) say.
    type Said = (Result<(Vec<u128>, Vec<u32>), String>, Result<(u64, u64, Option<u64>), String>);

    /// `asked` and `check` of the planner read whole and read in parts.
    fn both(p: &mut Planner) -> [Said; 2] {
        [u64::MAX, 0].map(|split| {
            p.split_bytes = split;
            let asked = p.asked().map(|a| (a.keys, a.lines)).map_err(|e| e.to_string());
            let check = p.check(&Prior::default(), Redo { failed: true, truncated: false }).map(|c| (c.rows, c.requests, c.first_to_run)).map_err(|e| e.to_string());
            (asked, check)
        })
    }

    #[test]
    fn an_input_read_in_parts_gives_what_it_gives_read_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rows: String = (0..101).map(|i| if i % 7 == 3 { "\n".to_owned() } else { format!("{{\"id\": \"r{i}\", \"question\": \"q{i} {}\"}}\n", "x".repeat(i % 13)) }).collect();
        let with_bom = [b"\xEF\xBB\xBF".as_slice(), rows.as_bytes()].concat();
        for (ext, input, id_field) in [("jsonl", with_bom.as_slice(), true), ("jsonl", rows.as_bytes(), false), ("txt", b"a\nb\n\nc\nd\ne\nf" as &[u8], false), ("csv", b"id,question\nr1,a\nr2,\"b\nb\"\nr3,c\n" as &[u8], true)] {
            let mut p = planner(dir.path(), ext, input, id_field, "");
            let [whole, parts] = both(&mut p);
            assert!(whole.0.is_ok() && whole.1.is_ok(), "{ext}: {whole:?}");
            assert_eq!(whole, parts, "{ext}, id field {id_field}");
        }
        // Errors name the same line and the first one in the file wins: a bad line late in the
        // file, a repeated id across the parts.
        // What a JSONL input of `rows` and then `more` says read whole, the same read in parts.
        let jsonl = |more: &str, run: &str| -> Said {
            let [whole, parts] = both(&mut planner(dir.path(), "jsonl", format!("{rows}{more}").as_bytes(), true, run));
            assert_eq!(whole, parts, "{more:?} {run:?}");
            whole
        };
        let bad = jsonl("{\"id\": \"late\", \"question\": 1\n", "");
        assert!(bad.0.as_ref().is_err_and(|e| e.contains(":102: malformed JSON")), "{bad:?}");
        let dup = jsonl("{\"id\": \"r1\", \"question\": \"again\"}\n", "");
        assert!(dup.1.as_ref().is_err_and(|e| e.contains(":102: duplicate id \"r1\" (first at line 2)")), "{dup:?}");
        // `run.limit` counts from the start: read whole.
        assert_eq!(jsonl("", "limit = 10\n").1.map(|c| c.0), Ok(10));
    }
}
