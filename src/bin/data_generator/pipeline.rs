//! The stages of a run: rows -> prompt -> get_student_response -> dataset.
//!
//! Before the first request everything that can be checked is: the output folder is repaired
//! and read back (what is already done), the whole input is read once (ids unique, every row
//! renders, each request's key known), the output files are opened, the server and model answer.
//! Then a reader thread streams the rows again and renders each as it is dispatched, so a large
//! batch is never held in memory; `run.concurrency` requests are in flight; each finished record
//! goes through the one writer thread. Ctrl-C stops dispatching and lets requests in flight
//! finish for `run.stop_grace_secs`; a second Ctrl-C abandons them at once.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use data_generator::backend::{Chunk, ClientError, Message, ModelClient, Request, Role, ServerInfo, Stats};
use data_generator::config::{self, BackendKind, Config};
use data_generator::dataset::{self, Dataset, OutputLock, OutputPaths, SpaceReserve, WriteItem, Writer};
use data_generator::endpoints::{Change, EndpointPool, Outcome, Since};
use data_generator::input::{IdSet, InputError, Row, RowReader};
use data_generator::manifest::{self, Manifest, RunEntry};
use data_generator::progress::{self, DisplayMode, Event, JobId};
use data_generator::record::{self, Failure, Record};
use data_generator::resume::{self, Prior};
use data_generator::template::PromptTemplate;
use futures::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ollama_client::OllamaClient;
use crate::openai_client::OpenAiClient;

/// How a run ended, for the exit code.
#[derive(Debug)]
pub struct RunOutcome {
    /// Requests that failed in this run, plus earlier failures skipped with `--no-retry-failed`:
    /// either way rows are in `failures.jsonl` and not in the dataset.
    pub failed: u64,
    pub interrupted: bool,
}

pub struct RunOptions {
    pub display: DisplayMode,
    /// Run again the requests in `failures.jsonl` (the default).
    pub retry_failed: bool,
    /// Run again the requests whose record was cut off by `num_predict`.
    pub redo_truncated: bool,
    /// Start over: the old folder is moved aside (once the checks pass) and nothing in it counts.
    pub fresh: bool,
}

/// One request: a (row, sample) with its rendered prompt and the options it is sent with.
struct Job {
    seq: JobId,
    row_id: String,
    sample: u32,
    prompt: String,
    input: Map<String, Value>,
    options: Map<String, Value>,
    seed: Option<i64>,
    key: String,
}

impl Job {
    fn label(&self, samples: u32) -> String {
        if samples > 1 {
            format!("row {} s{}", self.row_id, self.sample)
        } else {
            format!("row {}", self.row_id)
        }
    }
}

/// The response to one prompt, with the system prompt it was sent with and the server's stats.
pub struct StudentResponse {
    pub response: String,
    pub thinking: Option<String>,
    pub system: Option<String>,
    pub stats: Stats,
    pub elapsed: Duration,
}

/// Where progress events go. Token events are made only when a live display shows them.
#[derive(Clone)]
struct Progress {
    tx: mpsc::UnboundedSender<Event>,
    tokens: bool,
}

impl Progress {
    fn send(&self, ev: Event) {
        let _ = self.tx.send(ev);
    }
}

/// Sends one rendered prompt, forwards each piece of text to the display as it arrives, and
/// returns the whole response once the server says it is done.
async fn get_student_response(
    client: &dyn ModelClient,
    system: Option<&str>,
    job: &Job,
    options: &Map<String, Value>,
    schema: Option<&Value>,
    progress: &Progress,
) -> Result<StudentResponse, ClientError> {
    let started = Instant::now();
    let user = Message { role: Role::User, content: &job.prompt };
    let messages = match system {
        Some(s) => vec![Message { role: Role::System, content: s }, user],
        None => vec![user],
    };
    let mut reply = client.stream(Request { messages: &messages, options, schema }).await?;
    progress.send(Event::Responding { job: job.seq });
    let mut response = String::new();
    let mut thinking = String::new();
    while let Some(chunk) = reply.next().await {
        match chunk? {
            Chunk::Content(t) => {
                response.push_str(&t);
                if progress.tokens {
                    progress.send(Event::Token { job: job.seq, text: t, thinking: false });
                }
            }
            Chunk::Thinking(t) => {
                thinking.push_str(&t);
                if progress.tokens {
                    progress.send(Event::Token { job: job.seq, text: t, thinking: true });
                }
            }
            Chunk::Done(stats) => {
                return Ok(StudentResponse {
                    response,
                    thinking: (!thinking.is_empty()).then_some(thinking),
                    system: system.map(str::to_owned),
                    stats,
                    elapsed: started.elapsed(),
                })
            }
        }
    }
    Err(ClientError::Truncated)
}

/// The gist of a check's error for a one-line message: its first line, and of a long chain of
/// causes the last one (`Connection refused (os error 111)`).
fn short_reason(message: &str) -> String {
    let first = message.lines().next().unwrap_or(message).trim();
    if first.len() <= 100 {
        return first.to_owned();
    }
    first.rsplit(": ").next().unwrap_or(first).to_owned()
}

/// What became of one job.
enum JobResult {
    Record(Box<Record>),
    Failure(Box<Failure>),
    /// Given up without a result (Ctrl-C while it waited): the next run does it.
    Abandoned,
}

/// Probe backoff while a server is down: 1 s doubling to 30 s, with jitter.
const PROBE_FIRST: Duration = Duration::from_secs(1);
const PROBE_MAX: Duration = Duration::from_secs(30);
/// A probe that answered this recently vouches for the server (no second probe for the same wave).
const PROBE_FRESH: Duration = Duration::from_secs(1);

struct Ctx {
    clients: Vec<Box<dyn ModelClient>>,
    pool: EndpointPool,
    cfg: Config,
    progress: Progress,
    jitter: AtomicU64,
    /// Cancelled at the first Ctrl-C: requests that wait (a slot, a retry, a server) stop waiting.
    stop: CancellationToken,
    /// Whether a server that goes away pauses the run (`run.outage_wait_secs > 0`).
    ride_outages: bool,
    /// One probe at a time per endpoint, and when the last one answered.
    probes: Vec<tokio::sync::Mutex<Option<Instant>>>,
    probers: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Ctx {
    /// A random factor in [0.5, 1): xorshift over a shared state seeded from the clock (spread,
    /// not security).
    fn jitter_factor(&self) -> f64 {
        let mut x = self.jitter.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter.store(x, Ordering::Relaxed);
        0.5 + (x % 1000) as f64 / 2000.0
    }

    /// Exponential backoff with jitter: base * 2^(retry-1), capped at a minute, scaled by a
    /// random factor in [0.5, 1); never shorter than the server's `retry-after`.
    fn backoff(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let base = self.cfg.run().retry_base_delay_ms as f64;
        let exp = (base * 2f64.powi(retry.saturating_sub(1).min(20) as i32)).min(60_000.0);
        let d = Duration::from_millis((exp * self.jitter_factor()) as u64);
        d.max(retry_after.unwrap_or_default())
    }

    /// The server's `Retry-After`, capped at `run.max_retry_after_secs` (a cap is logged).
    fn capped_retry_after(&self, e: &ClientError, url: &str) -> Option<Duration> {
        let asked = e.retry_after()?;
        let cap = Duration::from_secs_f64(self.cfg.run().max_retry_after_secs);
        if asked > cap {
            tracing::warn!(endpoint = url, asked_secs = asked.as_secs(), cap_secs = cap.as_secs(), "the server asked to wait longer than run.max_retry_after_secs: capped");
            Some(cap)
        } else {
            Some(asked)
        }
    }

    /// Logs endpoints set aside or back, and tells the display.
    fn endpoint_changes(&self, changes: Vec<Change>) {
        for c in changes {
            match c {
                Change::SetAside { endpoint, for_ } => {
                    let url = self.clients[endpoint].url();
                    tracing::warn!(endpoint = url, secs = for_.as_secs(), "endpoint keeps failing: set aside for a while");
                    self.progress.send(Event::Endpoint { endpoint, until: Some(Instant::now() + for_) });
                }
                Change::Back { endpoint } => {
                    tracing::info!(endpoint = self.clients[endpoint].url(), "endpoint back in use");
                    self.progress.send(Event::Endpoint { endpoint, until: None });
                }
            }
        }
    }

    /// The startup check again, bounded: a probe whether a server is there.
    async fn probe(&self, endpoint: usize) -> Result<(), String> {
        let limit = Duration::from_secs_f64(self.cfg.run().connect_timeout_secs.max(10.0));
        match tokio::time::timeout(limit, self.clients[endpoint].check()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(short_reason(&e.to_string())),
            Err(_) => Err(format!("no answer within {}", progress::short_duration(limit))),
        }
    }

    /// After trouble that says the server may be gone: is it? A probe decides, one at a time per
    /// endpoint. When it is down, it is taken out of rotation and probed in the background until
    /// it answers; returns true.
    async fn confirm_down(self: &Arc<Self>, endpoint: usize, error: &ClientError) -> bool {
        if self.pool.is_down(endpoint) {
            return true;
        }
        let mut last_ok = self.probes[endpoint].lock().await;
        if self.pool.is_down(endpoint) {
            return true;
        }
        if last_ok.is_some_and(|t| t.elapsed() < PROBE_FRESH) {
            return false;
        }
        match self.probe(endpoint).await {
            Ok(()) => {
                *last_ok = Some(Instant::now());
                false
            }
            Err(probe_error) => {
                if let Some((since, true)) = self.pool.mark_down(endpoint) {
                    let url = self.clients[endpoint].url();
                    tracing::warn!(endpoint = url, since = %humantime::format_rfc3339_seconds(since.wall), error = %error, probe = %probe_error, "server down: requests wait for it (no retries spent)");
                    self.spawn_prober(endpoint, since, probe_error);
                }
                true
            }
        }
    }

    /// Probes a down endpoint with backoff until it answers, then puts it back in rotation.
    fn spawn_prober(self: &Arc<Self>, endpoint: usize, since: Since, first_error: String) {
        let ctx = self.clone();
        let task = tokio::spawn(async move {
            let mut delay = PROBE_FIRST;
            let mut error = first_error;
            let mut first = true;
            loop {
                let wait = Duration::from_secs_f64(delay.as_secs_f64() * (0.25 + ctx.jitter_factor()));
                let next_try = Instant::now() + wait;
                ctx.progress.send(Event::EndpointDown { endpoint, since: since.wall, next_try, error: error.clone(), first });
                first = false;
                tokio::time::sleep(wait).await;
                match ctx.probe(endpoint).await {
                    Ok(()) => {
                        let after = ctx.pool.mark_up(endpoint).unwrap_or_default();
                        tracing::info!(endpoint = ctx.clients[endpoint].url(), "server back after {}", progress::short_duration(after));
                        ctx.progress.send(Event::EndpointUp { endpoint, after });
                        return;
                    }
                    Err(e) => {
                        tracing::info!(endpoint = ctx.clients[endpoint].url(), error = %e, "server still down");
                        error = e;
                        delay = (delay * 2).min(PROBE_MAX);
                    }
                }
            }
        });
        if let Ok(mut p) = self.probers.lock() {
            p.push(task.abort_handle());
        }
    }

    fn stop_probers(&self) {
        if let Ok(mut p) = self.probers.lock() {
            for t in p.drain(..) {
                t.abort();
            }
        }
    }

    /// A job that failed for good: logged, shown, and the line for `failures.jsonl`; `invalid`
    /// holds the validation errors and the last reply of one whose replies never validated.
    #[allow(clippy::too_many_arguments)]
    fn failed(&self, job: Job, label: String, attempts: u32, url: &str, error: String, retryable: bool, invalid: Option<(Vec<String>, String)>) -> JobResult {
        tracing::error!(id = %job.row_id, sample = job.sample, attempts, endpoint = url, error = %error, "failed");
        self.progress.send(Event::Failed { job: job.seq, label, error: error.clone() });
        let (validation_errors, last_reply) = invalid.map_or((None, None), |(e, r)| (Some(e), Some(r)));
        JobResult::Failure(Box::new(Failure {
            id: job.row_id,
            sample: job.sample,
            model: self.cfg.backend().model.clone(),
            error,
            attempts,
            retryable,
            key: job.key,
            endpoint: Some(url.to_owned()),
            when: record::now_rfc3339(),
            validation_errors,
            last_reply,
        }))
    }

    /// Runs one job to its end: its attempts, with retries for what another attempt could fix,
    /// and waits (not retries) while its server is down.
    async fn run_job(self: Arc<Self>, job: Job) -> JobResult {
        let samples = self.cfg.run().samples_per_prompt;
        let label = job.label(samples);
        self.progress.send(Event::Begin { job: job.seq, label: label.clone() });
        let max_retries = self.cfg.run().max_retries;
        // Attempts sent, and the failed ones that spent a retry (server-down waits do not).
        let (mut attempts, mut spent) = (0u32, 0u32);
        // Replies that did not validate against the schema: re-asks, counted apart from retries.
        let (schema, max_invalid) = (self.cfg.schema.clone(), self.cfg.run().max_invalid);
        let mut invalid = 0u32;
        let mut options = job.options.clone();
        let mut seed = job.seed;
        let mut last_failed: Option<usize> = None;
        loop {
            let acquired = tokio::select! {
                biased;
                _ = self.stop.cancelled() => None,
                a = self.pool.acquire(last_failed) => Some(a),
            };
            let Some((slot, changes)) = acquired else {
                self.progress.send(Event::Abandoned { job: job.seq });
                return JobResult::Abandoned;
            };
            self.endpoint_changes(changes);
            let endpoint = slot.endpoint;
            let client = self.clients[endpoint].as_ref();
            attempts += 1;
            self.progress.send(Event::Attempt { job: job.seq, endpoint });
            let schema_value = schema.as_ref().map(|s| &s.value);
            let result = get_student_response(client, self.cfg.system.as_deref(), &job, &options, schema_value, &self.progress).await;
            drop(slot);
            let e = match result {
                Ok(r) => {
                    self.pool.report(endpoint, Outcome::Answered);
                    let parsed = match schema.as_ref().map(|s| s.check(&r.response)) {
                        None => None,
                        Some(Ok(v)) => Some(v),
                        Some(Err(why)) if invalid < max_invalid => {
                            invalid += 1;
                            if let Some(base) = job.seed {
                                let s = record::reask_seed(base, &job.row_id, job.sample, invalid);
                                options.insert("seed".into(), json!(s));
                                seed = Some(s);
                            }
                            tracing::warn!(id = %job.row_id, sample = job.sample, reask = invalid, of = max_invalid, errors = %why, "invalid reply; asking again");
                            self.progress.send(Event::ReAsk { job: job.seq, n: invalid, of: max_invalid, error: why.to_string() });
                            continue;
                        }
                        Some(Err(why)) => {
                            let error = format!("the reply did not validate against the schema, {} times: {why}", invalid + 1);
                            return self.failed(job, label, attempts, client.url(), error, true, Some((why.errors, r.response)));
                        }
                    };
                    let completion = r.stats.completion_tokens.unwrap_or(0);
                    tracing::info!(id = %job.row_id, sample = job.sample, attempts, ms = r.elapsed.as_millis() as u64, tokens = completion, "done");
                    self.progress.send(Event::Done { job: job.seq, completion_tokens: completion });
                    return JobResult::Record(Box::new(Record {
                        id: job.row_id,
                        sample: job.sample,
                        model: self.cfg.backend().model.clone(),
                        system: r.system,
                        prompt: job.prompt,
                        response: r.response,
                        thinking: r.thinking,
                        done_reason: r.stats.done_reason,
                        prompt_tokens: r.stats.prompt_tokens,
                        completion_tokens: r.stats.completion_tokens,
                        duration_ms: r.elapsed.as_millis() as u64,
                        attempts,
                        finished_at: record::now_rfc3339(),
                        seed,
                        eval_duration_ms: r.stats.eval_duration_ns.map(|ns| ns as f64 / 1e6),
                        key: job.key,
                        endpoint: Some(client.url().to_owned()),
                        tokens_estimated: r.stats.completion_tokens_estimated,
                        input: job.input,
                        invalid: parsed.is_some().then_some(invalid),
                        parsed,
                    }));
                }
                Err(e) => e,
            };
            last_failed = Some(endpoint);
            if self.ride_outages && e.endpoint_trouble() && self.confirm_down(endpoint, &e).await {
                tracing::warn!(id = %job.row_id, sample = job.sample, endpoint = client.url(), error = %e, "server down: the request waits for it");
                self.progress.send(Event::ServerWait { job: job.seq });
                continue;
            }
            let outcome = if e.retryable() { Outcome::ServerFailed { job: job.seq, status_5xx: e.server_status() } } else { Outcome::RowFailed };
            if let Some(change) = self.pool.report(endpoint, outcome) {
                self.endpoint_changes(vec![change]);
            }
            spent += 1;
            if e.retryable() && spent <= max_retries {
                let delay = self.backoff(spent, self.capped_retry_after(&e, client.url()));
                tracing::warn!(id = %job.row_id, sample = job.sample, attempt = attempts, endpoint = client.url(), error = %e, delay_ms = delay.as_millis() as u64, "attempt failed; retrying");
                self.progress.send(Event::Retry { job: job.seq, attempt: spent, of: max_retries, error: e.to_string(), delay });
                tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => {
                        self.progress.send(Event::Abandoned { job: job.seq });
                        return JobResult::Abandoned;
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
            return self.failed(job, label, attempts, client.url(), e.to_string(), e.retryable(), None);
        }
    }
}

/// The rows of the input: the first `limit` only, and of those the shard's.
fn rows(cfg: &Config) -> anyhow::Result<impl Iterator<Item = Result<Row, InputError>>> {
    let reader = RowReader::open(&cfg.input_path, cfg.input_format, cfg.raw.input.id_field.as_deref())?;
    let shard = cfg.shard;
    Ok(reader
        .take(cfg.run().limit.map_or(usize::MAX, |l| l as usize))
        .filter(move |r| match (r, shard) {
            (Ok(row), Some(s)) => s.has(&row.id),
            _ => true,
        }))
}

/// A client per endpoint.
fn clients(cfg: &Config) -> anyhow::Result<Vec<Box<dyn ModelClient>>> {
    cfg.endpoints
        .iter()
        .map(|e| -> anyhow::Result<Box<dyn ModelClient>> {
            Ok(match cfg.backend().kind {
                BackendKind::Ollama => Box::new(OllamaClient::new(cfg, e)?),
                BackendKind::Openai => Box::new(OpenAiClient::new(cfg, e)?),
            })
        })
        .collect()
}

/// Checks every endpoint at once. Those that fail start out down (with a warning; they are
/// probed in the background and join when they answer) as long as one works; when none does, the
/// first error is the run's. Returns which are down, the first answer, and the check results to
/// log once the log is open.
async fn check_endpoints(clients: &[Box<dyn ModelClient>]) -> anyhow::Result<(Vec<Option<String>>, ServerInfo)> {
    let results = futures::future::join_all(clients.iter().map(|c| c.check())).await;
    let mut down = Vec::new();
    let mut info: Option<ServerInfo> = None;
    let mut first_err = None;
    for (r, c) in results.into_iter().zip(clients) {
        match r {
            Ok(i) => {
                let fake = i.fake;
                match &mut info {
                    Some(first) => first.fake |= fake,
                    None => info = Some(i),
                }
                down.push(None);
            }
            Err(e) => {
                if clients.len() > 1 {
                    eprintln!("warning: {} does not answer the check; it joins when it does: {e}", c.url());
                }
                down.push(Some(e.to_string()));
                first_err.get_or_insert(e);
            }
        }
    }
    match (info, first_err) {
        (Some(i), _) => Ok((down, i)),
        (None, Some(e)) => Err(e.into()),
        (None, None) => anyhow::bail!("no endpoint configured"),
    }
}

/// Turns rows into jobs: the prompt, each sample's options and seed, the request's key.
struct Planner {
    cfg: Config,
    template: PromptTemplate,
    api: String,
}

impl Planner {
    fn new(cfg: &Config) -> anyhow::Result<Planner> {
        let template = PromptTemplate::new(cfg.template.clone(), &cfg.template_origin)?;
        let api = format!("{:?}", cfg.backend().api).to_lowercase();
        Ok(Planner { cfg: cfg.clone(), template, api })
    }

    fn render(&self, row: &Row) -> anyhow::Result<String> {
        self.template.render(row).with_context(|| format!("in {}", self.cfg.input_path.display()))
    }

    fn job(&self, seq: JobId, row: &Row, prompt: &str, sample: u32) -> Job {
        let cfg = &self.cfg;
        let mut options = cfg.options().clone();
        let seed = options.get("seed").and_then(Value::as_i64).map(|s| {
            let derived = record::derive_seed(s, cfg.run().samples_per_prompt, &row.id, sample);
            options.insert("seed".into(), json!(derived));
            derived
        });
        let key = record::RequestKey {
            id: &row.id,
            sample,
            model: &cfg.backend().model,
            api: &self.api,
            system: cfg.system.as_deref(),
            prompt,
            options: &options,
            think: cfg.backend().think.as_ref(),
            schema: cfg.schema.as_ref().map(|s| &s.value),
        }
        .hash();
        Job {
            seq,
            row_id: row.id.clone(),
            sample,
            prompt: prompt.to_owned(),
            input: row.fields.clone(),
            options,
            seed,
            key,
        }
    }
}

/// Whether a request runs, given what the folder already holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Run,
    AlreadyDone,
    SkipFailed,
}

fn verdict(prior: &Prior, opts: &RunOptions, key: &str) -> Verdict {
    let Some(k) = resume::parse_key(key) else { return Verdict::Run };
    if prior.done.contains(&k) && !(opts.redo_truncated && prior.truncated.contains(&k)) {
        Verdict::AlreadyDone
    } else if !opts.retry_failed && prior.failed.contains(&k) {
        Verdict::SkipFailed
    } else {
        Verdict::Run
    }
}

/// What the input asks for, counted before the run.
#[derive(Debug, Default)]
struct Plan {
    rows: u64,
    requests: u64,
    to_run: u64,
    already_done: u64,
    skipped_failed: u64,
}

/// Reads every row once: ids unique, every row renders, each request's verdict counted.
fn check_input(planner: &Planner, prior: &Prior, opts: &RunOptions) -> anyhow::Result<Plan> {
    let cfg = &planner.cfg;
    let mut ids = IdSet::default();
    let mut plan = Plan::default();
    for row in rows(cfg)? {
        let row = row?;
        if let Err(first) = ids.insert(&row.id, row.line) {
            anyhow::bail!(
                "{}:{}: duplicate id {:?} (first at line {first}); ids must be unique{}",
                cfg.input_path.display(),
                row.line,
                row.id,
                match &cfg.raw.input.id_field {
                    Some(f) => format!(" (input.id_field = {f:?})"),
                    None => String::new(),
                }
            );
        }
        let prompt = planner.render(&row)?;
        plan.rows += 1;
        for sample in 0..cfg.run().samples_per_prompt {
            plan.requests += 1;
            match verdict(prior, opts, &planner.job(0, &row, &prompt, sample).key) {
                Verdict::Run => plan.to_run += 1,
                Verdict::AlreadyDone => plan.already_done += 1,
                Verdict::SkipFailed => plan.skipped_failed += 1,
            }
        }
    }
    if plan.rows == 0 {
        anyhow::bail!("{}: no rows to run (the file is empty)", cfg.input_path.display());
    }
    Ok(plan)
}

/// The reader thread: streams rows, renders them, sends the jobs to run; stops when the
/// receiving side is gone.
fn spawn_reader(planner: Planner, prior: Arc<Prior>, opts: (bool, bool), tx: mpsc::Sender<anyhow::Result<Job>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let opts = RunOptions { display: DisplayMode::None, retry_failed: opts.0, redo_truncated: opts.1, fresh: false };
        let send = |j| tx.blocking_send(j).is_ok();
        let rows = match rows(&planner.cfg) {
            Ok(r) => r,
            Err(e) => {
                send(Err(e));
                return;
            }
        };
        let mut seq = 0;
        for row in rows {
            let rendered = row.map_err(anyhow::Error::from).and_then(|row| {
                let prompt = planner.render(&row)?;
                Ok((row, prompt))
            });
            let (row, prompt) = match rendered {
                Ok(x) => x,
                Err(e) => {
                    send(Err(e));
                    return;
                }
            };
            for sample in 0..planner.cfg.run().samples_per_prompt {
                seq += 1;
                let job = planner.job(seq, &row, &prompt, sample);
                if verdict(&prior, &opts, &job.key) == Verdict::Run && !send(Ok(job)) {
                    return;
                }
            }
        }
    })
}

fn start_log(path: &Path) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open the log {}", path.display()))?;
    let _ = tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .with_target(false)
        .with_max_level(tracing::Level::INFO)
        .try_init();
    Ok(())
}

/// SIGINT and SIGTERM as a stream of "stop" requests.
fn stop_signals() -> anyhow::Result<mpsc::UnboundedReceiver<&'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = mpsc::unbounded_channel();
    for (kind, name) in [(SignalKind::interrupt(), "SIGINT"), (SignalKind::terminate(), "SIGTERM")] {
        let mut s = signal(kind).context("cannot install the signal handler")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if tx.send(name).is_err() {
                    break;
                }
            }
        });
    }
    Ok(rx)
}

fn new_manifest(cfg: &Config, server: Option<&ServerInfo>, plan: &Plan, runs: Vec<RunEntry>) -> Manifest {
    let mut runs = runs;
    runs.push(RunEntry {
        started_at: record::now_rfc3339(),
        ended_at: None,
        status: "running".into(),
        error: None,
        requests: plan.to_run,
        already_done: plan.already_done,
        done: 0,
        failed: 0,
        completion_tokens: 0,
    });
    Manifest {
        manifest_version: manifest::MANIFEST_VERSION,
        tool: manifest::Tool { name: env!("CARGO_PKG_NAME").into(), version: env!("CARGO_PKG_VERSION").into() },
        name: cfg.name().to_owned(),
        config_path: cfg.path.display().to_string(),
        config: config::snapshot(cfg),
        server: manifest::Server {
            kind: format!("{:?}", cfg.backend().kind).to_lowercase(),
            urls: cfg.endpoints.iter().map(|e| e.url.clone()).collect(),
            version: server.and_then(|s| s.version.clone()),
            model: cfg.backend().model.clone(),
            fake: server.is_some_and(|s| s.fake),
        },
        input: manifest::Input {
            path: cfg.input_path.display().to_string(),
            rows: plan.rows,
            samples_per_prompt: cfg.run().samples_per_prompt,
        },
        counts: manifest::Counts {
            requests: plan.requests,
            already_done: plan.already_done,
            skipped_failed: plan.skipped_failed,
            done: 0,
            failed: 0,
            remaining: plan.to_run,
        },
        completion_tokens: 0,
        runs,
    }
}

/// Counts this run's progress into the manifest.
fn tally(m: &mut Manifest, plan: &Plan, done: u64, failed: u64, tokens: u64) {
    m.counts.done = done;
    m.counts.failed = failed;
    m.counts.remaining = plan.to_run.saturating_sub(done + failed);
    m.completion_tokens = tokens;
    if let Some(r) = m.current_run() {
        r.done = done;
        r.failed = failed;
        r.completion_tokens = tokens;
    }
}

/// The runs recorded in the folder's manifest, with a run that never recorded its end marked
/// `killed` and given the counts the dataset holds for it. Returns them with that run's start.
fn prior_runs(paths: &OutputPaths) -> anyhow::Result<(Vec<RunEntry>, Option<String>)> {
    let (runs, moved) = Manifest::prior_runs(&paths.manifest).with_context(|| format!("cannot read {}", paths.manifest.display()))?;
    if let Some(to) = moved {
        eprintln!("warning: {} was not a readable manifest: moved it to {}; the run history starts afresh", paths.manifest.display(), to.display());
    }
    let unfinished = runs.last().filter(|r| r.status == "running").map(|r| r.started_at.clone());
    Ok((runs, unfinished))
}

pub async fn run(cfg: Config, opts: RunOptions) -> anyhow::Result<RunOutcome> {
    let paths = OutputPaths::new(&cfg.output_dir);
    let planner = Planner::new(&cfg)?;
    // One run per folder: the lock comes before anything is read or repaired. A folder that does
    // not exist yet is locked when it is created, after the checks.
    let mut lock = OutputLock::acquire_if_exists(&paths.dir)?;
    let (mut runs, killed_since) = if lock.is_some() && !opts.fresh { prior_runs(&paths)? } else { (Vec::new(), None) };
    let prior = if opts.fresh {
        Prior::default()
    } else {
        resume::load(&paths, &cfg.raw.output.formats, killed_since.as_deref(), cfg.schema.is_some())?
    };
    if let Some(last) = runs.last_mut().filter(|r| r.status == "running") {
        // Killed (or the machine went down): its own counts never made it to the manifest.
        last.status = "killed".into();
        last.done = prior.records_since;
        last.failed = prior.failures_since;
        eprintln!(
            "note: the last run (started {}) ended without a word (killed?) after finishing {} request{}{}; continuing",
            last.started_at,
            last.done,
            if last.done == 1 { "" } else { "s" },
            if last.failed > 0 { format!(" and failing {}", last.failed) } else { String::new() }
        );
    }
    for note in &prior.repairs {
        eprintln!("repaired: {note}");
    }
    let plan = check_input(&planner, &prior, &opts)?;

    if plan.to_run == 0 {
        start_log(&paths.log)?;
        for note in &prior.repairs {
            tracing::warn!("{note}");
        }
        let mut m = new_manifest(&cfg, None, &plan, runs);
        if let Some(r) = m.current_run() {
            r.ended_at = Some(record::now_rfc3339());
            r.status = "completed".into();
        }
        m.write(&paths.manifest).with_context(|| format!("cannot write {}", paths.manifest.display()))?;
        println!(
            "{}: nothing to do: {} of {} requests already in {}{}",
            cfg.name(),
            plan.already_done,
            plan.requests,
            paths.dir.display(),
            if plan.skipped_failed > 0 { format!(", {} failed before and skipped", plan.skipped_failed) } else { String::new() }
        );
        return Ok(RunOutcome { failed: plan.skipped_failed, interrupted: false });
    }

    // The server and model, before anything is created in the folder.
    check_writable(&paths.dir)?;
    let clients = clients(&cfg)?;
    let (down, server) = check_endpoints(&clients).await?;
    if opts.fresh && lock.is_some() {
        // Only now that the run can start: a --fresh that fails its checks moves nothing.
        let moved = dataset::move_aside(&paths.dir).with_context(|| format!("--fresh: cannot move {} aside", paths.dir.display()))?;
        lock = None;
        if let Some(to) = moved {
            eprintln!("--fresh: moved the old {} to {}", paths.dir.display(), to.display());
        }
    }
    if lock.is_none() {
        paths.create_dir()?;
        lock = Some(OutputLock::acquire(&paths.dir)?);
    }
    let dataset = Dataset::open(&paths, &cfg.raw.output.formats, cfg.schema.is_some())?;
    start_log(&paths.log)?;
    tracing::info!(config = %cfg.path.display(), urls = %cfg.urls(), model = %cfg.backend().model, rows = plan.rows,
        requests = plan.requests, to_run = plan.to_run, already_done = plan.already_done, "run starting");
    for (c, d) in clients.iter().zip(&down) {
        match d {
            None => tracing::info!(endpoint = c.url(), version = ?server.version, "server ready"),
            Some(e) => tracing::warn!(endpoint = c.url(), error = %e, "server check failed: probed until it answers"),
        }
    }
    if server.fake {
        eprintln!("note: the test suite's fake server answers: made-up text (manifest: server.fake)");
        tracing::warn!("the server is the test suite's fake: do not train on this dataset");
    }
    for note in &prior.repairs {
        tracing::warn!("{note}");
    }
    for k in config::unknown_options(cfg.options()) {
        tracing::warn!(option = %k, "option is not one Ollama documents; passed through as written");
    }

    let mut m = new_manifest(&cfg, Some(&server), &plan, std::mem::take(&mut runs));
    // Space for the manifest's last word should the disk fill up.
    let mut reserve = SpaceReserve::create(&paths.dir, 8192.max(2 * serde_json::to_vec_pretty(&m).map(|v| v.len()).unwrap_or(0)));
    m.write(&paths.manifest).with_context(|| format!("cannot write {}", paths.manifest.display()))?;

    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let mode = opts.display.resolve();
    let display = tokio::spawn(progress::run_display(ev_rx, mode, Duration::from_secs(5)));
    let progress = Progress { tx: ev_tx.clone(), tokens: mode.wants_tokens() };
    let endpoint_urls = cfg.endpoints.iter().map(|e| e.url.clone()).collect();
    progress.send(Event::Started { total: plan.requests, already_done: plan.already_done, skipped_failed: plan.skipped_failed, endpoints: endpoint_urls });
    let mut signals = stop_signals()?;

    let capacities: Vec<usize> = cfg.endpoints.iter().map(|e| e.concurrency).collect();
    let concurrency: usize = capacities.iter().sum();
    let (job_tx, mut job_rx) = mpsc::channel::<anyhow::Result<Job>>(concurrency * 2);
    let prior = Arc::new(prior);
    let reader = spawn_reader(planner, prior, (opts.retry_failed, opts.redo_truncated), job_tx);

    let stop = CancellationToken::new();
    let is_down: Vec<bool> = down.iter().map(Option::is_some).collect();
    let ctx = Arc::new(Ctx {
        pool: EndpointPool::new(&capacities, &is_down),
        probes: clients.iter().map(|_| tokio::sync::Mutex::new(None)).collect(),
        clients,
        cfg: cfg.clone(),
        progress: progress.clone(),
        jitter: AtomicU64::new(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) | 1,
        ),
        stop: stop.clone(),
        ride_outages: cfg.run().outage_wait_secs > 0.0,
        probers: std::sync::Mutex::new(Vec::new()),
    });
    for (i, d) in down.into_iter().enumerate() {
        if let Some(e) = d {
            if let Some((since, _)) = ctx.pool.mark_down(i) {
                ctx.spawn_prober(i, since, short_reason(&e));
            }
        }
    }
    // After the first stop signal no new job is taken; those in flight go on.
    let dispatching = Arc::new(AtomicBool::new(true));
    let open = dispatching.clone();
    let jobs = futures::stream::poll_fn(move |cx| {
        if open.load(Ordering::SeqCst) {
            job_rx.poll_recv(cx)
        } else {
            std::task::Poll::Ready(None)
        }
    });
    let job_ctx = ctx.clone();
    let mut results = jobs
        .map(move |job| {
            let ctx = job_ctx.clone();
            async move {
                match job {
                    Ok(job) => Ok(ctx.run_job(job).await),
                    Err(e) => Err(e),
                }
            }
        })
        .buffer_unordered(concurrency);

    let writer = Writer::spawn(dataset);
    let (mut done, mut failed, mut tokens) = (0u64, 0u64, 0u64);
    let mut fatal: Option<anyhow::Error> = None;
    let mut stop_signal: Option<&'static str> = None;
    let mut aborted = false;
    let grace = Duration::from_secs_f64(cfg.run().stop_grace_secs);
    let outage_limit = Duration::from_secs_f64(cfg.run().outage_wait_secs);
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let mut manifest_at = Instant::now();
    let mut outage_clock = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            result = results.next() => {
                let Some(result) = result else { break };
                let item = match result {
                    Ok(JobResult::Record(r)) => {
                        done += 1;
                        tokens += r.completion_tokens.unwrap_or(0);
                        WriteItem::Record(r)
                    }
                    Ok(JobResult::Failure(f)) => {
                        failed += 1;
                        WriteItem::Failure(f)
                    }
                    Ok(JobResult::Abandoned) => continue,
                    Err(e) => {
                        fatal = Some(e);
                        break;
                    }
                };
                if !writer.send(item) {
                    break; // the writer stopped on an error: `finish` says which
                }
                if manifest_at.elapsed() >= Duration::from_secs(10) {
                    tally(&mut m, &plan, done, failed, tokens);
                    if let Err(e) = m.write(&paths.manifest) {
                        tracing::warn!(error = %e, "cannot update the manifest");
                    }
                    manifest_at = Instant::now();
                }
            }
            sig = signals.recv() => {
                let Some(sig) = sig else { continue };
                if stop_signal.is_none() {
                    stop_signal = Some(sig);
                    dispatching.store(false, Ordering::SeqCst);
                    stop.cancel();
                    deadline = tokio::time::Instant::now() + grace;
                    tracing::warn!(signal = sig, grace_secs = grace.as_secs_f64(), "stopping: no new requests; waiting for those in flight");
                    progress.send(Event::Stopping { signal: sig.into(), deadline: deadline.into_std() });
                } else {
                    tracing::warn!(signal = sig, "second signal: abandoning the requests in flight");
                    aborted = true;
                    break;
                }
            }
            _ = tokio::time::sleep_until(deadline), if stop_signal.is_some() => {
                tracing::warn!("grace period over: abandoning the requests in flight");
                aborted = true;
                break;
            }
            _ = outage_clock.tick(), if !outage_limit.is_zero() => {
                let Some(since) = ctx.pool.all_down_since() else { continue };
                if since.at.elapsed() >= outage_limit {
                    let urls = cfg.urls();
                    fatal = Some(anyhow::anyhow!(
                        "stopped: {} {} been down since {} ({}), longer than run.outage_wait_secs ({}); the {} requests \
                         finished are kept, and the rest were not marked failed: re-run the same command to continue",
                        if cfg.endpoints.len() > 1 { "every server" } else { "the server" },
                        if cfg.endpoints.len() > 1 { format!("({urls}) has") } else { format!("at {urls} has") },
                        humantime::format_rfc3339_seconds(since.wall),
                        progress::short_duration(since.at.elapsed()),
                        progress::short_duration(outage_limit),
                        plan.already_done + done
                    ));
                    break;
                }
            }
        }
    }
    drop(results);
    ctx.stop_probers();
    let _ = reader.join();
    let (written, write_result) = writer.finish();
    progress.send(Event::End);
    drop(ev_tx);
    let view = display.await.ok();

    // What is in the files counts, not what came back: after a failed write they differ.
    let (done, failed, tokens) = (written.records, written.failures, written.tokens);
    tally(&mut m, &plan, done, failed, tokens);
    let error = match (write_result, fatal) {
        (Err(e), _) => Some(anyhow::Error::from(e).context("stopped: the dataset cannot be written; everything written before is intact")),
        (Ok(()), Some(e)) => Some(e),
        (Ok(()), None) => None,
    };
    let status = match (&error, stop_signal, aborted, failed) {
        (Some(_), ..) => "failed",
        (None, Some(_), true, _) => "aborted",
        (None, Some(_), false, _) => "interrupted",
        (None, None, _, 0) => "completed",
        (None, None, _, _) => "completed_with_failures",
    };
    if let Some(r) = m.current_run() {
        r.ended_at = Some(record::now_rfc3339());
        r.status = status.into();
        r.error = error.as_ref().map(error_text);
    }
    // A full disk made room for this with the reserve.
    reserve.release();
    let manifest_result = m.write(&paths.manifest).with_context(|| format!("cannot write {}", paths.manifest.display()));
    tracing::info!(done, failed, tokens, status, "run finished");
    drop(lock);
    if let Some(e) = error {
        tracing::error!(error = %error_text(&e), "run stopped");
        return Err(e);
    }
    manifest_result?;

    print_summary(&cfg, &paths, &m, &plan, view.as_ref(), stop_signal);
    Ok(RunOutcome { failed: failed + plan.skipped_failed, interrupted: stop_signal.is_some() })
}

/// An error and its causes on one line, each cause said once (an I/O error is often both the
/// message's tail and its source).
pub fn error_text(e: &anyhow::Error) -> String {
    let mut s = String::new();
    for cause in e.chain() {
        let t = cause.to_string();
        if s.contains(&t) {
            continue;
        }
        if !s.is_empty() {
            s.push_str(": ");
        }
        s.push_str(&t);
    }
    s
}

fn print_summary(cfg: &Config, paths: &OutputPaths, m: &Manifest, plan: &Plan, view: Option<&progress::ProgressView>, stop: Option<&str>) {
    let elapsed = view.map(|v| v.started.elapsed()).unwrap_or_default();
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { m.completion_tokens as f64 / secs } else { 0.0 };
    let c = &m.counts;
    if let Some(sig) = stop {
        println!(
            "{}: interrupted by {sig}: {} done, {} failed, {} not run; re-run the same command to continue",
            cfg.name(),
            c.done,
            c.failed,
            c.remaining
        );
    } else {
        println!("{}: {} of {} requests done, {} failed, in {}", cfg.name(), c.done, plan.to_run, c.failed, progress::format_duration(elapsed));
    }
    println!("  tokens:   {} generated, {:.1} tok/s", m.completion_tokens, rate);
    for line in view.map(|v| v.endpoint_lines()).unwrap_or_default() {
        println!("  server:   {line}");
    }
    if c.already_done > 0 || c.skipped_failed > 0 {
        println!(
            "  resumed:  {} of {} requests were already done{}",
            c.already_done,
            c.requests,
            if c.skipped_failed > 0 { format!(", {} failed before and skipped", c.skipped_failed) } else { String::new() }
        );
    }
    for f in &cfg.raw.output.formats {
        let p = match f {
            config::OutputFormat::Jsonl => &paths.jsonl,
            config::OutputFormat::Csv => &paths.csv,
        };
        println!("  dataset:  {}", p.display());
    }
    if c.failed > 0 {
        println!("  failures: {} ({} this run; re-run to retry them)", paths.failures.display(), c.failed);
    }
    println!("  manifest: {}", paths.manifest.display());
    println!("  log:      {}", paths.log.display());
}

/// Keys of every request a config asks for (what counts, for `inspect` and `export`).
pub fn request_keys(cfg: &Config) -> anyhow::Result<std::collections::HashSet<u128>> {
    let planner = Planner::new(cfg)?;
    let mut keys = std::collections::HashSet::new();
    for row in rows(cfg)? {
        let row = row?;
        let prompt = planner.render(&row)?;
        for sample in 0..cfg.run().samples_per_prompt {
            keys.extend(resume::parse_key(&planner.job(0, &row, &prompt, sample).key));
        }
    }
    Ok(keys)
}

/// Whether files can be created in `dir` (or, if it does not exist yet, in the folder that
/// would hold it); tried with a temporary file that is removed at once.
fn check_writable(dir: &Path) -> anyhow::Result<()> {
    let mut probe_dir = dir;
    while !probe_dir.exists() {
        match probe_dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => probe_dir = p,
            _ => {
                probe_dir = Path::new(".");
                break;
            }
        }
    }
    if !probe_dir.is_dir() {
        anyhow::bail!("{} is not a folder, so {} cannot be created", probe_dir.display(), dir.display());
    }
    let probe = probe_dir.join(format!(".data_generator-check-{}", std::process::id()));
    std::fs::File::create(&probe).with_context(|| format!("cannot write in {}", probe_dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The dry run: everything `run` checks before its first request, and nothing written.
pub async fn check(cfg: Config) -> anyhow::Result<()> {
    let paths = OutputPaths::new(&cfg.output_dir);
    let planner = Planner::new(&cfg)?;
    OutputLock::check_free(&paths.dir)?;
    let prior = resume::scan(&paths, &cfg.raw.output.formats)?;
    let opts = RunOptions { display: DisplayMode::None, retry_failed: true, redo_truncated: false, fresh: false };
    let plan = check_input(&planner, &prior, &opts)?;
    let samples = cfg.run().samples_per_prompt;
    println!("config:  {} is valid", cfg.path.display());
    println!(
        "input:   {}: {} rows × {} sample{} = {} requests",
        cfg.input_path.display(),
        plan.rows,
        samples,
        if samples == 1 { "" } else { "s" },
        plan.requests
    );
    println!("first prompts:");
    for row in rows(&cfg)?.take(3) {
        let row = row?;
        let prompt = planner.render(&row)?;
        println!("  ── row {} (line {}) ──", row.id, row.line);
        for line in prompt.lines() {
            println!("  │ {line}");
        }
    }
    check_writable(&paths.dir)?;
    println!(
        "output:  {}: {} already done, {} to run{}",
        paths.dir.display(),
        plan.already_done,
        plan.to_run,
        if prior.failed.is_empty() { String::new() } else { format!(" ({} failed before: they will be retried)", prior.failed.len()) }
    );
    for note in &prior.repairs {
        println!("  note: {note}");
    }
    let clients = clients(&cfg)?;
    for c in &clients {
        let server = c.check().await?;
        println!(
            "server:  {} at {}{}; model {} is there{}",
            c.kind(),
            c.url(),
            server.version.as_deref().map(|v| format!(" (version {v})")).unwrap_or_default(),
            cfg.backend().model,
            if server.capabilities.is_empty() { String::new() } else { format!(" ({})", server.capabilities.join(", ")) }
        );
    }
    println!("ready:   the run would make {} requests", plan.to_run);
    Ok(())
}
