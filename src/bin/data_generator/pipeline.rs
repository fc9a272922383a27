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
use data_generator::backend::{Chunk, ClientError, ModelClient, Request, ServerInfo, Stats};
use data_generator::config::{self, BackendKind, Config};
use data_generator::endpoints::{Change, EndpointPool};
use data_generator::dataset::{Dataset, OutputPaths, WriteItem, Writer};
use data_generator::input::{IdSet, InputError, Row, RowReader};
use data_generator::manifest::{self, Manifest, RunEntry};
use data_generator::progress::{self, DisplayMode, Event, JobId};
use data_generator::record::{self, Failure, Record};
use data_generator::resume::{self, Prior};
use data_generator::template::PromptTemplate;
use futures::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::ollama_client::OllamaClient;
use crate::openai_client::OpenAiClient;

/// How a run ended, for the exit code.
#[derive(Debug)]
pub struct Outcome {
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

/// Sends one rendered prompt, forwards each piece of text to the display as it arrives, and
/// returns the whole response once the server says it is done.
async fn get_student_response(
    client: &dyn ModelClient,
    system: Option<&str>,
    job: &Job,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<StudentResponse, ClientError> {
    let started = Instant::now();
    let mut reply = client.stream(Request { system, prompt: &job.prompt, options: &job.options }).await?;
    let mut response = String::new();
    let mut thinking = String::new();
    while let Some(chunk) = reply.next().await {
        match chunk? {
            Chunk::Content(t) => {
                response.push_str(&t);
                let _ = events.send(Event::Token { job: job.seq, text: t, thinking: false });
            }
            Chunk::Thinking(t) => {
                thinking.push_str(&t);
                let _ = events.send(Event::Token { job: job.seq, text: t, thinking: true });
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

/// What became of one job.
enum JobResult {
    Record(Box<Record>),
    Failure(Box<Failure>),
}

struct Ctx {
    clients: Vec<Box<dyn ModelClient>>,
    pool: EndpointPool,
    cfg: Config,
    events: mpsc::UnboundedSender<Event>,
    jitter: AtomicU64,
}

impl Ctx {
    /// Exponential backoff with jitter: base * 2^(attempt-1), capped at a minute, scaled by a
    /// random factor in [0.5, 1); never shorter than the server's `retry-after`.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let base = self.cfg.run().retry_base_delay_ms as f64;
        let exp = (base * 2f64.powi(attempt.saturating_sub(1).min(20) as i32)).min(60_000.0);
        // xorshift over a shared state seeded from the clock: spread, not security.
        let mut x = self.jitter.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter.store(x, Ordering::Relaxed);
        let factor = 0.5 + (x % 1000) as f64 / 2000.0;
        let d = Duration::from_millis((exp * factor) as u64);
        d.max(retry_after.unwrap_or_default())
    }

    /// Logs endpoints set aside or back, and tells the display.
    fn endpoint_changes(&self, changes: Vec<Change>) {
        for c in changes {
            match c {
                Change::SetAside { endpoint, for_ } => {
                    let url = self.clients[endpoint].url();
                    tracing::warn!(endpoint = url, secs = for_.as_secs(), "endpoint keeps failing: set aside; its requests go to the others");
                    let _ = self.events.send(Event::Endpoint { endpoint, up: false });
                }
                Change::Back { endpoint } => {
                    tracing::info!(endpoint = self.clients[endpoint].url(), "endpoint back in use");
                    let _ = self.events.send(Event::Endpoint { endpoint, up: true });
                }
            }
        }
    }

    async fn run_job(&self, job: Job) -> JobResult {
        let samples = self.cfg.run().samples_per_prompt;
        let label = job.label(samples);
        let _ = self.events.send(Event::Begin { job: job.seq, label: label.clone() });
        let max_attempts = self.cfg.run().max_retries + 1;
        let mut attempt = 1;
        let mut last_failed: Option<usize> = None;
        loop {
            let (slot, changes) = self.pool.acquire(last_failed).await;
            self.endpoint_changes(changes);
            let endpoint = slot.endpoint;
            let client = self.clients[endpoint].as_ref();
            let _ = self.events.send(Event::Attempt { job: job.seq, endpoint });
            let result = get_student_response(client, self.cfg.system.as_deref(), &job, &self.events).await;
            drop(slot);
            let server_failed = matches!(&result, Err(e) if e.retryable());
            if let Some(change) = self.pool.report(endpoint, server_failed) {
                self.endpoint_changes(vec![change]);
            }
            match result {
                Ok(r) => {
                    let completion = r.stats.completion_tokens.unwrap_or(0);
                    tracing::info!(id = %job.row_id, sample = job.sample, attempt, ms = r.elapsed.as_millis() as u64, tokens = completion, "done");
                    let _ = self.events.send(Event::Done { job: job.seq, completion_tokens: completion });
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
                        attempts: attempt,
                        finished_at: record::now_rfc3339(),
                        seed: job.seed,
                        eval_duration_ms: r.stats.eval_duration_ns.map(|ns| ns as f64 / 1e6),
                        key: job.key,
                        endpoint: Some(client.url().to_owned()),
                        tokens_estimated: r.stats.completion_tokens_estimated,
                        input: job.input,
                    }));
                }
                Err(e) if e.retryable() && attempt < max_attempts => {
                    last_failed = Some(endpoint);
                    let delay = self.backoff(attempt, e.retry_after());
                    tracing::warn!(id = %job.row_id, sample = job.sample, attempt, endpoint = client.url(), error = %e, delay_ms = delay.as_millis() as u64, "attempt failed; retrying");
                    let _ = self.events.send(Event::Retry { job: job.seq, attempt, error: e.to_string(), delay });
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => {
                    let error = e.to_string();
                    tracing::error!(id = %job.row_id, sample = job.sample, attempts = attempt, endpoint = client.url(), error = %error, "failed");
                    let _ = self.events.send(Event::Failed { job: job.seq, label, error: error.clone() });
                    return JobResult::Failure(Box::new(Failure {
                        id: job.row_id,
                        sample: job.sample,
                        model: self.cfg.backend().model.clone(),
                        error,
                        attempts: attempt,
                        retryable: e.retryable(),
                        key: job.key,
                        endpoint: Some(client.url().to_owned()),
                        when: record::now_rfc3339(),
                    }));
                }
            }
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
                BackendKind::Ollama => Box::new(OllamaClient::new(cfg, &e.url, e.concurrency)?),
                BackendKind::Openai => Box::new(OpenAiClient::new(cfg, &e.url, e.concurrency)?),
            })
        })
        .collect()
}

/// Checks every endpoint at once. Those that fail are left out (with a warning) as long as one
/// works; when none does, the first error is the run's. Returns each endpoint's capacity
/// (0 for those left out) and the first answer.
async fn check_endpoints(cfg: &Config, clients: &[Box<dyn ModelClient>]) -> anyhow::Result<(Vec<usize>, ServerInfo)> {
    let results = futures::future::join_all(clients.iter().map(|c| c.check())).await;
    let mut caps = Vec::new();
    let mut info = None;
    let mut first_err = None;
    for ((r, ep), c) in results.into_iter().zip(&cfg.endpoints).zip(clients) {
        match r {
            Ok(i) => {
                tracing::info!(endpoint = c.url(), version = ?i.version, capabilities = ?i.capabilities, "server ready");
                info.get_or_insert(i);
                caps.push(ep.concurrency);
            }
            Err(e) => {
                tracing::error!(endpoint = c.url(), error = %e, "server check failed");
                if clients.len() > 1 {
                    eprintln!("warning: leaving out {}: {e}", c.url());
                }
                first_err.get_or_insert(e);
                caps.push(0);
            }
        }
    }
    match (info, first_err) {
        (Some(i), _) => Ok((caps, i)),
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
        let key_options = json!({ "options": options, "think": cfg.backend().think });
        let key = record::request_key(&row.id, sample, &cfg.backend().model, &self.api, cfg.system.as_deref(), prompt, &key_options);
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
        let opts = RunOptions { display: DisplayMode::None, retry_failed: opts.0, redo_truncated: opts.1 };
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

fn new_manifest(cfg: &Config, server_version: Option<String>, plan: &Plan, runs: Vec<RunEntry>) -> Manifest {
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
            version: server_version,
            model: cfg.backend().model.clone(),
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

pub async fn run(cfg: Config, opts: RunOptions) -> anyhow::Result<Outcome> {
    let paths = OutputPaths::new(&cfg.output_dir);
    let planner = Planner::new(&cfg)?;
    let prior = resume::load(&paths, &cfg.raw.output.formats)?;
    let plan = check_input(&planner, &prior, &opts)?;

    let dataset = Dataset::open(&paths, &cfg.raw.output.formats)?;
    start_log(&paths.log)?;
    tracing::info!(config = %cfg.path.display(), urls = %cfg.urls(), model = %cfg.backend().model, rows = plan.rows,
        requests = plan.requests, to_run = plan.to_run, already_done = plan.already_done, "run starting");
    for note in &prior.repairs {
        tracing::warn!("{note}");
        eprintln!("repaired: {note}");
    }
    for k in config::unknown_options(cfg.options()) {
        tracing::warn!(option = %k, "option is not one Ollama documents; passed through as written");
    }
    let runs = Manifest::prior_runs(&paths.manifest);

    if plan.to_run == 0 {
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
        return Ok(Outcome { failed: plan.skipped_failed, interrupted: false });
    }

    let clients = clients(&cfg)?;
    let (capacities, server) = check_endpoints(&cfg, &clients).await?;

    let mut m = new_manifest(&cfg, server.version.clone(), &plan, runs);
    m.write(&paths.manifest).with_context(|| format!("cannot write {}", paths.manifest.display()))?;

    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let display = tokio::spawn(progress::run_display(ev_rx, opts.display.resolve(), Duration::from_secs(5)));
    let endpoint_urls = cfg.endpoints.iter().map(|e| e.url.clone()).collect();
    let _ = ev_tx.send(Event::Started { total: plan.to_run, already_done: plan.already_done, endpoints: endpoint_urls });
    let mut signals = stop_signals()?;

    let concurrency: usize = capacities.iter().sum();
    let (job_tx, mut job_rx) = mpsc::channel::<anyhow::Result<Job>>(concurrency * 2);
    let prior = Arc::new(prior);
    let reader = spawn_reader(planner, prior, (opts.retry_failed, opts.redo_truncated), job_tx);

    let ctx = Arc::new(Ctx {
        clients,
        pool: EndpointPool::new(&capacities),
        cfg: cfg.clone(),
        events: ev_tx.clone(),
        jitter: AtomicU64::new(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) | 1,
        ),
    });
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
    let mut results = jobs
        .map(move |job| {
            let ctx = ctx.clone();
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
    let mut stop: Option<&'static str> = None;
    let mut aborted = false;
    let grace = Duration::from_secs_f64(cfg.run().stop_grace_secs);
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let mut manifest_at = Instant::now();
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
                if stop.is_none() {
                    stop = Some(sig);
                    dispatching.store(false, Ordering::SeqCst);
                    deadline = tokio::time::Instant::now() + grace;
                    tracing::warn!(signal = sig, grace_secs = grace.as_secs_f64(), "stopping: no new requests; waiting for those in flight");
                    let _ = ev_tx.send(Event::Stopping { signal: sig.into(), deadline: deadline.into_std() });
                } else {
                    tracing::warn!(signal = sig, "second signal: abandoning the requests in flight");
                    aborted = true;
                    break;
                }
            }
            _ = tokio::time::sleep_until(deadline), if stop.is_some() => {
                tracing::warn!("grace period over: abandoning the requests in flight");
                aborted = true;
                break;
            }
        }
    }
    drop(results);
    let _ = reader.join();
    let write_result = writer.finish();
    drop(ev_tx);
    let view = display.await.ok();

    tally(&mut m, &plan, done, failed, tokens);
    let error = match (write_result, fatal) {
        (Err(e), _) => Some(anyhow::Error::from(e).context("stopped: the dataset cannot be written; everything written before is intact")),
        (Ok(()), Some(e)) => Some(e),
        (Ok(()), None) => None,
    };
    let status = match (&error, stop, aborted, failed) {
        (Some(_), ..) => "error",
        (None, Some(_), true, _) => "aborted",
        (None, Some(_), false, _) => "interrupted",
        (None, None, _, 0) => "completed",
        (None, None, _, _) => "completed_with_failures",
    };
    if let Some(r) = m.current_run() {
        r.ended_at = Some(record::now_rfc3339());
        r.status = status.into();
        r.error = error.as_ref().map(|e| format!("{e:#}"));
    }
    let manifest_result = m.write(&paths.manifest).with_context(|| format!("cannot write {}", paths.manifest.display()));
    tracing::info!(done, failed, tokens, status, "run finished");
    if let Some(e) = error {
        tracing::error!(error = %format!("{e:#}"), "run stopped");
        return Err(e);
    }
    manifest_result?;

    print_summary(&cfg, &paths, &m, &plan, view.as_ref(), stop);
    Ok(Outcome { failed: failed + plan.skipped_failed, interrupted: stop.is_some() })
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
    let prior = resume::scan(&paths, &cfg.raw.output.formats)?;
    let opts = RunOptions { display: DisplayMode::None, retry_failed: true, redo_truncated: false };
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
