//! The attempts of one request, until it has a result: an endpoint from the pool, the stage's
//! request, transport retries with backoff for what another attempt could fix, waits (not
//! retries) while a server is down, and re-asks with a new seed while a structured reply does not
//! validate. Generic over [`ModelClient`]: what a stage sends is the [`Stage`]'s business.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use crate::backend::{ClientError, ModelClient, Stats};
use crate::config::Config;
use crate::endpoints::{Change, EndpointPool, Outcome, Since};
use crate::plan::Job;
use crate::progress::{self, Event, Progress};
use crate::record::{self, Failure, Record};
use crate::request;

/// A whole reply to one request, with the server's stats.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub response: String,
    pub thinking: Option<String>,
    pub stats: Stats,
    pub elapsed: Duration,
}

/// A stage of the pipeline: how one job is sent to a server and its reply collected.
pub trait Stage: Send + Sync {
    /// One attempt of `job`, with `options` (its own, or a re-ask's with a new seed).
    fn send<'a>(&'a self, client: &'a dyn ModelClient, job: &'a Job, options: &'a Map<String, Value>, progress: &'a Progress) -> BoxFuture<'a, Result<Reply, ClientError>>;
}

/// The gist of a check's error for a one-line message: its first line, and of a long chain of
/// causes the last one (`Connection refused (os error 111)`).
pub fn short_reason(message: &str) -> String {
    let first = message.lines().next().unwrap_or(message).trim();
    if first.len() <= 100 {
        return first.to_owned();
    }
    first.rsplit(": ").next().unwrap_or(first).to_owned()
}

/// What became of one job.
pub enum JobResult {
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

/// What the attempts of every job share: the clients, the endpoint pool and its probes, the
/// run's settings, where progress goes, and the stop signal.
pub struct Runner {
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
    role: StageRole,
}

/// Which stage of a multi-stage run a runner serves (the default: the one stage of a run).
#[derive(Debug, Clone, Default)]
pub struct StageRole {
    /// The stage's name, written into its records and failures (None for a one-stage run).
    pub name: Option<String>,
    /// Its place in the pipeline, for progress events.
    pub index: usize,
    /// Where its endpoints start in the run's list of endpoints (progress events number them).
    pub endpoint_base: usize,
    /// The array field of `parsed` that must be there (`explode`).
    pub explode: Option<String>,
}

impl Runner {
    /// The runner of a run: `down[i]` holds the startup check's error of an endpoint that did
    /// not answer; it starts out of rotation and is probed in the background until it does.
    /// Needs a tokio runtime.
    pub fn new(clients: Vec<Box<dyn ModelClient>>, cfg: &Config, down: &[Option<String>], progress: Progress, stop: CancellationToken) -> Arc<Runner> {
        Self::for_stage(clients, cfg, down, progress, stop, StageRole::default())
    }

    /// The runner of one stage of a multi-stage run; `cfg` is the stage's own config.
    pub fn for_stage(clients: Vec<Box<dyn ModelClient>>, cfg: &Config, down: &[Option<String>], progress: Progress, stop: CancellationToken, role: StageRole) -> Arc<Runner> {
        let capacities: Vec<usize> = cfg.endpoints.iter().map(|e| e.concurrency).collect();
        let is_down: Vec<bool> = down.iter().map(Option::is_some).collect();
        let runner = Arc::new(Runner {
            pool: EndpointPool::new(&capacities, &is_down),
            probes: clients.iter().map(|_| tokio::sync::Mutex::new(None)).collect(),
            clients,
            cfg: cfg.clone(),
            progress,
            jitter: AtomicU64::new(
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) | 1,
            ),
            stop,
            ride_outages: cfg.run().outage_wait_secs > 0.0,
            probers: std::sync::Mutex::new(Vec::new()),
            role,
        });
        for (i, d) in down.iter().enumerate() {
            if let Some(e) = d {
                if let Some((since, _)) = runner.pool.mark_down(i) {
                    runner.spawn_prober(i, since, short_reason(e));
                }
            }
        }
        runner
    }

    /// The endpoints and their state.
    pub fn pool(&self) -> &EndpointPool {
        &self.pool
    }

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
                    self.progress.send(Event::Endpoint { endpoint: self.role.endpoint_base + endpoint, until: Some(Instant::now() + for_) });
                }
                Change::Back { endpoint } => {
                    tracing::info!(endpoint = self.clients[endpoint].url(), "endpoint back in use");
                    self.progress.send(Event::Endpoint { endpoint: self.role.endpoint_base + endpoint, until: None });
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
                ctx.progress.send(Event::EndpointDown { endpoint: ctx.role.endpoint_base + endpoint, since: since.wall, next_try, error: error.clone(), first });
                first = false;
                tokio::time::sleep(wait).await;
                match ctx.probe(endpoint).await {
                    Ok(()) => {
                        let after = ctx.pool.mark_up(endpoint).unwrap_or_default();
                        tracing::info!(endpoint = ctx.clients[endpoint].url(), "server back after {}", progress::short_duration(after));
                        ctx.progress.send(Event::EndpointUp { endpoint: ctx.role.endpoint_base + endpoint, after });
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

    /// Ends the background probes (at the end of the run).
    pub fn stop_probers(&self) {
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
        tracing::error!(stage = self.role.name.as_deref(), id = %job.row_id, sample = job.sample, attempts, endpoint = url, error = %error, "failed");
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
            stage: self.role.name.clone(),
            parent: job.parent,
        }))
    }

    /// A valid reply of a stage that explodes must hold the array it explodes.
    fn check_explode(&self, v: Value) -> Result<Value, crate::schema::Invalid> {
        let Some(f) = &self.role.explode else { return Ok(v) };
        let why = match v.get(f) {
            Some(Value::Array(_)) => return Ok(v),
            Some(other) => format!("/{f}: {} is not an array (the stage explodes it)", crate::input::json_kind(other)),
            None => format!("/{f}: missing (the stage explodes it)"),
        };
        Err(crate::schema::Invalid { errors: vec![why] })
    }

    /// Runs one job to its end: its attempts, with retries for what another attempt could fix,
    /// and waits (not retries) while its server is down.
    pub async fn run_job(self: Arc<Self>, stage: &dyn Stage, job: Job) -> JobResult {
        let samples = self.cfg.run().samples_per_prompt;
        let label = match &self.role.name {
            Some(stage) => format!("{stage} {}", job.label(samples).trim_start_matches("row ")),
            None => job.label(samples),
        };
        // The prompt only for a live view in the browser (which shows it); the terminal does not.
        let prompt = self.progress.prompts.then(|| job.prompt.clone());
        self.progress.send(Event::Begin { job: job.seq, label: label.clone(), stage: self.role.index, prompt });
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
            self.progress.send(Event::Attempt { job: job.seq, endpoint: self.role.endpoint_base + endpoint });
            let result = stage.send(client, &job, &options, &self.progress).await;
            drop(slot);
            let e = match result {
                Ok(r) => {
                    self.pool.report(endpoint, Outcome::Answered);
                    let parsed = match schema.as_ref().map(|s| s.check(&r.response).and_then(|v| self.check_explode(v))) {
                        None => None,
                        Some(Ok(v)) => Some(v),
                        Some(Err(why)) if invalid < max_invalid => {
                            invalid += 1;
                            if let Some(base) = job.seed {
                                let s = request::reask_seed(base, &job.row_id, job.sample, invalid);
                                options.insert("seed".into(), json!(s));
                                seed = Some(s);
                            }
                            tracing::warn!(stage = self.role.name.as_deref(), id = %job.row_id, sample = job.sample, reask = invalid, of = max_invalid, errors = %why, "invalid reply; asking again");
                            self.progress.send(Event::ReAsk { job: job.seq, n: invalid, of: max_invalid, error: why.to_string() });
                            continue;
                        }
                        Some(Err(why)) => {
                            let error = format!("the reply did not validate against the schema, {} times: {why}", invalid + 1);
                            return self.failed(job, label, attempts, client.url(), error, true, Some((why.errors, r.response)));
                        }
                    };
                    let completion = r.stats.completion_tokens.unwrap_or(0);
                    tracing::info!(stage = self.role.name.as_deref(), id = %job.row_id, sample = job.sample, attempts, ms = r.elapsed.as_millis() as u64, tokens = completion, "done");
                    self.progress.send(Event::Done { job: job.seq, completion_tokens: completion });
                    return JobResult::Record(Box::new(Record {
                        id: job.row_id,
                        sample: job.sample,
                        model: self.cfg.backend().model.clone(),
                        system: job.system,
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
                        stage: self.role.name.clone(),
                        parent: job.parent,
                        kept: None,
                    }));
                }
                Err(e) => e,
            };
            last_failed = Some(endpoint);
            if self.ride_outages && e.endpoint_trouble() && self.confirm_down(endpoint, &e).await {
                tracing::warn!(stage = self.role.name.as_deref(), id = %job.row_id, sample = job.sample, endpoint = client.url(), error = %e, "server down: the request waits for it");
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
                tracing::warn!(stage = self.role.name.as_deref(), id = %job.row_id, sample = job.sample, attempt = attempts, endpoint = client.url(), error = %e, delay_ms = delay.as_millis() as u64, "attempt failed; retrying");
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

