//! The stages of a run: rows -> prompt -> get_student_response -> dataset.
//!
//! Before the first request everything that can be checked is: the whole input is read once
//! (ids unique, every row renders), the output files are opened, the server and model answer.
//! Then a reader thread streams the rows again and renders each as it is dispatched, so a large
//! batch is never held in memory; `run.concurrency` requests are in flight; each finished record
//! goes through the one writer thread.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use data_generator::backend::{Chunk, ClientError, Stats};
use data_generator::config::{self, Config};
use data_generator::dataset::{self, Dataset, OutputPaths, WriteItem, Writer};
use data_generator::input::{IdSet, Row, RowReader};
use data_generator::progress::{self, DisplayMode, Event, JobId};
use data_generator::record::{self, Failure, Record};
use data_generator::template::PromptTemplate;
use futures::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::ollama_client::{OllamaClient, ServerInfo};

/// How a run ended, for the exit code.
#[derive(Debug)]
pub struct Outcome {
    pub failed: u64,
}

pub struct RunOptions {
    pub display: DisplayMode,
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
    client: &OllamaClient,
    system: Option<&str>,
    job: &Job,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<StudentResponse, ClientError> {
    let started = Instant::now();
    let mut reply = client.stream(system, &job.prompt, &job.options).await?;
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
    client: OllamaClient,
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

    async fn run_job(&self, job: Job) -> JobResult {
        let samples = self.cfg.run().samples_per_prompt;
        let label = job.label(samples);
        let _ = self.events.send(Event::Begin { job: job.seq, label: label.clone() });
        let max_attempts = self.cfg.run().max_retries + 1;
        let mut attempt = 1;
        loop {
            match get_student_response(&self.client, self.cfg.system.as_deref(), &job, &self.events).await {
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
                        input: job.input,
                    }));
                }
                Err(e) if e.retryable() && attempt < max_attempts => {
                    let delay = self.backoff(attempt, e.retry_after());
                    tracing::warn!(id = %job.row_id, sample = job.sample, attempt, error = %e, delay_ms = delay.as_millis() as u64, "attempt failed; retrying");
                    let _ = self.events.send(Event::Retry { job: job.seq, attempt, error: e.to_string(), delay });
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => {
                    let error = e.to_string();
                    tracing::error!(id = %job.row_id, sample = job.sample, attempts = attempt, error = %error, "failed");
                    let _ = self.events.send(Event::Failed { job: job.seq, label, error: error.clone() });
                    return JobResult::Failure(Box::new(Failure {
                        id: job.row_id,
                        sample: job.sample,
                        model: self.cfg.backend().model.clone(),
                        error,
                        attempts: attempt,
                        retryable: e.retryable(),
                        key: job.key,
                        when: record::now_rfc3339(),
                    }));
                }
            }
        }
    }
}

/// The rows of the input, first `limit` only.
fn rows(cfg: &Config) -> anyhow::Result<impl Iterator<Item = Result<Row, data_generator::input::InputError>>> {
    let reader = RowReader::open(&cfg.input_path, cfg.input_format, cfg.raw.input.id_field.as_deref())?;
    Ok(reader.take(cfg.run().limit.map_or(usize::MAX, |l| l as usize)))
}

/// Reads every row once: ids unique, every row renders. Returns the row count.
fn validate_input(cfg: &Config, template: &PromptTemplate) -> anyhow::Result<u64> {
    let mut ids = IdSet::default();
    let mut n = 0u64;
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
        template.render(&row).with_context(|| format!("in {}", cfg.input_path.display()))?;
        n += 1;
    }
    if n == 0 {
        anyhow::bail!("{}: no rows to run (the file is empty)", cfg.input_path.display());
    }
    Ok(n)
}

/// Sampling options for one sample, and the key of the request.
fn request_options(cfg: &Config, row_id: &str, sample: u32) -> (Map<String, Value>, Option<i64>) {
    let mut options = cfg.options().clone();
    let seed = options.get("seed").and_then(Value::as_i64).map(|s| {
        let derived = record::derive_seed(s, cfg.run().samples_per_prompt, row_id, sample);
        options.insert("seed".into(), json!(derived));
        derived
    });
    (options, seed)
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

struct ManifestData<'a> {
    cfg: &'a Config,
    server: &'a ServerInfo,
    rows: u64,
    started_at: &'a str,
    ended_at: Option<String>,
    status: &'a str,
    requests: u64,
    done: u64,
    failed: u64,
    tokens: u64,
    prior_runs: Vec<Value>,
}

fn manifest(m: &ManifestData<'_>) -> Value {
    let this_run = json!({
        "started_at": m.started_at,
        "ended_at": m.ended_at,
        "status": m.status,
        "requests": m.requests,
        "done": m.done,
        "failed": m.failed,
        "completion_tokens": m.tokens,
    });
    let mut runs = m.prior_runs.clone();
    runs.push(this_run);
    json!({
        "manifest_version": 1,
        "tool": { "name": env!("CARGO_PKG_NAME"), "version": env!("CARGO_PKG_VERSION") },
        "name": m.cfg.name(),
        "config_path": m.cfg.path.display().to_string(),
        "config": config::snapshot(m.cfg),
        "server": { "kind": "ollama", "url": m.cfg.url, "version": m.server.version, "model": m.cfg.backend().model },
        "input": { "path": m.cfg.input_path.display().to_string(), "rows": m.rows, "samples_per_prompt": m.cfg.run().samples_per_prompt },
        "started_at": m.started_at,
        "ended_at": m.ended_at,
        "status": m.status,
        "counts": {
            "requests": m.requests,
            "done": m.done,
            "failed": m.failed,
            "remaining": m.requests.saturating_sub(m.done + m.failed),
        },
        "completion_tokens": m.tokens,
        "runs": runs,
    })
}

fn write_manifest(paths: &OutputPaths, m: &ManifestData<'_>) -> anyhow::Result<()> {
    let text = serde_json::to_vec_pretty(&manifest(m))?;
    dataset::write_atomic(&paths.manifest, &text).with_context(|| format!("cannot write {}", paths.manifest.display()))
}

fn prior_runs(paths: &OutputPaths) -> Vec<Value> {
    std::fs::read(&paths.manifest)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v.get("runs").and_then(Value::as_array).cloned())
        .unwrap_or_default()
}

pub async fn run(cfg: Config, opts: RunOptions) -> anyhow::Result<Outcome> {
    let template = PromptTemplate::new(cfg.template.clone(), &cfg.template_origin)?;
    let row_count = validate_input(&cfg, &template)?;
    let samples = cfg.run().samples_per_prompt;
    let requests = row_count * u64::from(samples);

    let paths = OutputPaths::new(&cfg.output_dir);
    let dataset = Dataset::open(&paths, &cfg.raw.output.formats)?;
    start_log(&paths.log)?;
    tracing::info!(config = %cfg.path.display(), url = %cfg.url, model = %cfg.backend().model, rows = row_count, samples, "run starting");
    for k in config::unknown_options(cfg.options()) {
        tracing::warn!(option = %k, "option is not one Ollama documents; passed through as written");
    }

    let client = OllamaClient::new(&cfg)?;
    let server = match client.check().await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "server check failed");
            return Err(e);
        }
    };
    tracing::info!(version = ?server.version, capabilities = ?server.capabilities, "server ready");

    let started_at = record::now_rfc3339();
    let mut md = ManifestData {
        cfg: &cfg,
        server: &server,
        rows: row_count,
        started_at: &started_at,
        ended_at: None,
        status: "running",
        requests,
        done: 0,
        failed: 0,
        tokens: 0,
        prior_runs: prior_runs(&paths),
    };
    write_manifest(&paths, &md)?;

    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let display = tokio::spawn(progress::run_display(ev_rx, opts.display.resolve(), Duration::from_secs(5)));
    let _ = ev_tx.send(Event::Started { total: requests, already_done: 0 });

    // The reader thread streams rows and renders them; a small queue keeps it just ahead.
    let concurrency = cfg.run().concurrency;
    let (job_tx, mut job_rx) = mpsc::channel::<anyhow::Result<Job>>(concurrency * 2);
    let reader_cfg = cfg.clone();
    let reader = std::thread::spawn(move || {
        let send = |j| job_tx.blocking_send(j).is_ok();
        let rows = match rows(&reader_cfg) {
            Ok(r) => r,
            Err(e) => return send(Err(e)),
        };
        let template = match PromptTemplate::new(reader_cfg.template.clone(), &reader_cfg.template_origin) {
            Ok(t) => t,
            Err(e) => return send(Err(e.into())),
        };
        let mut seq = 0;
        for row in rows {
            let job = row.map_err(anyhow::Error::from).and_then(|row| {
                let prompt = template.render(&row)?;
                Ok((row, prompt))
            });
            let (row, prompt) = match job {
                Ok(x) => x,
                Err(e) => return send(Err(e)),
            };
            for sample in 0..reader_cfg.run().samples_per_prompt {
                let (options, seed) = request_options(&reader_cfg, &row.id, sample);
                let key_options = json!({ "options": options, "think": reader_cfg.backend().think });
                let b = reader_cfg.backend();
                let api = format!("{:?}", b.api).to_lowercase();
                let key =
                    record::request_key(&row.id, sample, &b.model, &api, reader_cfg.system.as_deref(), &prompt, &key_options);
                seq += 1;
                let job = Job {
                    seq,
                    row_id: row.id.clone(),
                    sample,
                    prompt: prompt.clone(),
                    input: row.fields.clone(),
                    options,
                    seed,
                    key,
                };
                if !send(Ok(job)) {
                    return false;
                }
            }
        }
        true
    });

    let ctx = Arc::new(Ctx {
        client,
        cfg: cfg.clone(),
        events: ev_tx.clone(),
        jitter: AtomicU64::new(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) | 1,
        ),
    });
    let jobs = futures::stream::poll_fn(move |cx| job_rx.poll_recv(cx));
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
    let mut fatal: Option<anyhow::Error> = None;
    while let Some(result) = results.next().await {
        let item = match result {
            Ok(JobResult::Record(r)) => {
                md.done += 1;
                md.tokens += r.completion_tokens.unwrap_or(0);
                WriteItem::Record(r)
            }
            Ok(JobResult::Failure(f)) => {
                md.failed += 1;
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
    }
    drop(results);
    let _ = reader.join();
    let write_result = writer.finish();
    drop(ev_tx);
    let view = display.await.ok();

    md.ended_at = Some(record::now_rfc3339());
    let error = match (write_result, fatal) {
        (Err(e), _) => Some(anyhow::Error::from(e).context("stopped: the dataset cannot be written")),
        (Ok(()), Some(e)) => Some(e),
        (Ok(()), None) => None,
    };
    md.status = match (&error, md.failed) {
        (Some(_), _) => "error",
        (None, 0) => "completed",
        (None, _) => "completed_with_failures",
    };
    let manifest_result = write_manifest(&paths, &md);
    tracing::info!(done = md.done, failed = md.failed, tokens = md.tokens, status = md.status, "run finished");
    if let Some(e) = error {
        tracing::error!(error = %format!("{e:#}"), "run stopped");
        return Err(e);
    }
    manifest_result?;

    print_summary(&cfg, &paths, &md, view.as_ref().map(|v| v.started.elapsed()));
    Ok(Outcome { failed: md.failed })
}

fn print_summary(cfg: &Config, paths: &OutputPaths, md: &ManifestData<'_>, elapsed: Option<Duration>) {
    let secs = elapsed.unwrap_or_default().as_secs_f64();
    let rate = if secs > 0.0 { md.tokens as f64 / secs } else { 0.0 };
    println!(
        "{}: {} of {} requests done, {} failed, in {} ({} tokens, {:.1} tok/s)",
        cfg.name(),
        md.done,
        md.requests,
        md.failed,
        progress::format_duration(elapsed.unwrap_or_default()),
        md.tokens,
        rate
    );
    for f in &cfg.raw.output.formats {
        let p = match f {
            config::OutputFormat::Jsonl => &paths.jsonl,
            config::OutputFormat::Csv => &paths.csv,
        };
        println!("  dataset:  {}", p.display());
    }
    if md.failed > 0 {
        println!("  failures: {} ({} rows; re-run to retry them)", paths.failures.display(), md.failed);
    }
    println!("  manifest: {}", paths.manifest.display());
    println!("  log:      {}", paths.log.display());
}
