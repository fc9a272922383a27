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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use data_generator::attempt::{JobResult, Reply, Runner, Stage, StageRole};
use data_generator::backend::{Chunk, ClientError, Message, ModelClient, Request, Role, ServerInfo};
use data_generator::config::{self, BackendKind, Config};
use data_generator::dataset::{self, Dataset, OutputLock, OutputPaths, SpaceReserve, WriteItem, Writer};
use data_generator::live::{self, LiveHub};
use data_generator::manifest::{self, Manifest, RunEntry, StageCounts};
use data_generator::plan::{self, Asked, Job, Plan, Planner, Redo};
use data_generator::progress::{self, DisplayMode, Event, Progress};
use data_generator::record::{self, Record};
use data_generator::stages::{self, FlowRow, Pipeline, StageFiles, StageItem};
use data_generator::schema::OutputSchema;
use data_generator::resume::{self, Prior};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

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
    /// What to run again of what the folder holds (failures, truncated records).
    pub redo: Redo,
    /// Start over: the old folder is moved aside (once the checks pass) and nothing in it counts.
    pub fresh: bool,
    /// `--serve`: a live view in the browser.
    pub serve: Option<live::ServeOptions>,
}

/// The one stage of today's runs: a row's prompt, sent with the run's system prompt and schema.
struct StudentStage {
    schema: Option<Arc<OutputSchema>>,
}

impl Stage for StudentStage {
    fn send<'a>(&'a self, client: &'a dyn ModelClient, job: &'a Job, options: &'a Map<String, Value>, progress: &'a Progress) -> BoxFuture<'a, Result<Reply, ClientError>> {
        let schema = self.schema.as_ref().map(|s| &s.value);
        Box::pin(get_student_response(client, job, options, schema, progress))
    }
}

/// Sends one rendered prompt, forwards each piece of text to the display as it arrives, and
/// returns the whole response once the server says it is done.
async fn get_student_response(
    client: &dyn ModelClient,
    job: &Job,
    options: &Map<String, Value>,
    schema: Option<&Value>,
    progress: &Progress,
) -> Result<Reply, ClientError> {
    let started = Instant::now();
    let user = Message { role: Role::User, content: &job.prompt };
    let messages = match &job.system {
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
                // Grown by doubling while it streamed: a long reply is kept at its size.
                response.shrink_to_fit();
                thinking.shrink_to_fit();
                return Ok(Reply { response, thinking: (!thinking.is_empty()).then_some(thinking), stats, elapsed: started.elapsed() });
            }
        }
    }
    Err(ClientError::Truncated)
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

/// The reader thread: streams the jobs still to run, rendered as they are dispatched; stops at
/// the first error or when the receiving side is gone.
fn spawn_reader(planner: Planner, prior: Arc<Prior>, redo: Redo, from: Option<u64>, tx: mpsc::Sender<anyhow::Result<Job>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for job in planner.jobs(&prior, redo, from) {
            let failed = job.is_err();
            if tx.blocking_send(job.map_err(anyhow::Error::from)).is_err() || failed {
                return;
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

/// The input's requests keyed, and how (for the log): taken from the last run's
/// [`plan::ASKED_FILE`] when the input and the config are as they were then; else checked, and
/// kept there for the next run (unless the input changed while it was read).
fn input_keys(planner: &Planner, cfg: &Config, paths: &OutputPaths) -> Result<(Asked, String), plan::PlanError> {
    let file = paths.dir.join(plan::ASKED_FILE);
    let fp = manifest::input_fingerprint(cfg);
    if let Some(asked) = fp.as_deref().and_then(|fp| Asked::load(&file, fp)) {
        let note = format!("the keys of {} requests from {} (the input and the config are as when they were made)", asked.requests(), plan::ASKED_FILE);
        return Ok((asked, note));
    }
    let asked = planner.asked()?;
    let n = asked.requests();
    let note = match fp.filter(|fp| manifest::input_fingerprint(cfg).as_ref() == Some(fp)).map(|fp| asked.save(&file, &fp)) {
        Some(Ok(())) => format!("checked: {n} requests, their keys kept in {}", plan::ASKED_FILE),
        Some(Err(e)) => {
            let _ = std::fs::remove_file(&file);
            format!("checked: {n} requests (cannot keep their keys in {}: {e})", plan::ASKED_FILE)
        }
        None => format!("checked: {n} requests (the input changed while it was read: its keys are not kept)"),
    };
    Ok((asked, note))
}

/// Says in the log how the folder was read back and the input checked.
fn log_read_back(prior: &Prior, input_note: &str) {
    if !prior.read_note.is_empty() {
        tracing::info!("read back: {}", prior.read_note);
    }
    if !input_note.is_empty() {
        tracing::info!("input: {input_note}");
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
    if !cfg.stages.is_empty() {
        return run_stages(cfg, opts).await;
    }
    let paths = OutputPaths::new(&cfg.output_dir);
    let planner = Planner::new(&cfg)?;
    // One run per folder: the lock comes before anything is read or repaired. A folder that does
    // not exist yet is locked when it is created, after the checks.
    let mut lock = OutputLock::acquire_if_exists(&paths.dir)?;
    if lock.is_some() && !opts.fresh && paths.dir.join("stages").is_dir() {
        anyhow::bail!(
            "{} holds a multi-stage run (it has stages/), and {} has one stage ([prompts]): give another --output (or output.dir), \
             or --fresh to move the old folder aside",
            paths.dir.display(),
            cfg.path.display()
        );
    }
    let (mut runs, killed_since) = if lock.is_some() && !opts.fresh { prior_runs(&paths)? } else { (Vec::new(), None) };
    // A re-run of a run that left nothing to do, with nothing changed since: said at once.
    if lock.is_some() && !opts.fresh && !opts.redo.truncated {
        if let Some(outcome) = unchanged_since_done(&cfg, &paths, &runs) {
            return outcome;
        }
    }
    // A folder to resume: it is read (repaired, its records' keys collected) while the input is
    // checked (every row read, rendered and keyed), on two threads: on a large batch each takes
    // seconds. Its error, if any, comes first, as when they ran one after the other.
    let mut input_note = String::new();
    let (prior, asked) = if opts.fresh {
        (Prior::default(), None)
    } else if lock.is_some() {
        let (prior, asked) = std::thread::scope(|s| {
            let asked = s.spawn(|| input_keys(&planner, &cfg, &paths));
            let prior = resume::load(&paths, &cfg.raw.output.formats, killed_since.as_deref(), cfg.schema.is_some());
            (prior, asked.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        });
        let asked = asked.map(|(asked, note)| {
            input_note = note;
            asked
        });
        (prior?, Some(asked))
    } else {
        (resume::load(&paths, &cfg.raw.output.formats, killed_since.as_deref(), cfg.schema.is_some())?, None)
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
    let plan = match asked {
        Some(asked) => asked?.plan(&prior, opts.redo),
        None => planner.check(&prior, opts.redo)?,
    };

    if plan.to_run == 0 {
        start_log(&paths.log)?;
        log_read_back(&prior, &input_note);
        for note in &prior.repairs {
            tracing::warn!("{note}");
        }
        let mut m = Manifest::for_run(&cfg, None, &plan, runs);
        if let Some(r) = m.current_run() {
            r.ended_at = Some(record::now_rfc3339());
            r.status = "completed".into();
        }
        if plan.skipped_failed == 0 {
            m.fingerprint = manifest::fingerprint(&cfg, &paths);
        }
        m.write(&paths.manifest).with_context(|| format!("cannot write {}", paths.manifest.display()))?;
        say!(
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
    let (hub, live_server) = start_live(&opts, cfg.name()).await?;
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
    if let Some(sv) = &live_server {
        tracing::info!(url = %sv.url, "live view");
    }
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
    log_read_back(&prior, &input_note);
    for note in &prior.repairs {
        tracing::warn!("{note}");
    }
    for k in config::unknown_options(cfg.options()) {
        tracing::warn!(option = %k, "option is not one Ollama documents; passed through as written");
    }

    let mut m = Manifest::for_run(&cfg, Some(&server), &plan, std::mem::take(&mut runs));
    // Space for the manifest's last word should the disk fill up.
    let mut reserve = SpaceReserve::create(&paths.dir, 8192.max(2 * serde_json::to_vec_pretty(&m).map(|v| v.len()).unwrap_or(0)));
    m.write(&paths.manifest).with_context(|| format!("cannot write {}", paths.manifest.display()))?;

    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let mode = opts.display.resolve();
    let display = tokio::spawn(progress::run_display(ev_rx, mode, Duration::from_secs(5), hub.clone()));
    let progress = Progress { tx: ev_tx.clone(), tokens: mode.wants_tokens() || hub.is_some(), prompts: hub.is_some() };
    let endpoint_urls = cfg.endpoints.iter().map(|e| e.url.clone()).collect();
    progress.send(Event::Started { total: plan.requests, already_done: plan.already_done, skipped_failed: plan.skipped_failed, endpoints: endpoint_urls });
    let mut signals = stop_signals()?;

    let concurrency: usize = cfg.endpoints.iter().map(|e| e.concurrency).sum();
    let (job_tx, mut job_rx) = mpsc::channel::<anyhow::Result<Job>>(concurrency * 2);
    let prior = Arc::new(prior);
    let reader = spawn_reader(planner, prior, opts.redo, plan.first_to_run, job_tx);

    let stop = CancellationToken::new();
    let ctx = Runner::new(clients, &cfg, &down, progress.clone(), stop.clone());
    let stage = Arc::new(StudentStage { schema: cfg.schema.clone() });
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
    // Each request is a task of its own on the runtime's worker threads (polled where its
    // connection's data arrives, not all on this thread); dropping `results` aborts those in flight.
    let mut results = jobs
        .map(move |job| {
            let ctx = job_ctx.clone();
            let stage = stage.clone();
            let task = AbortOnDropHandle::new(tokio::spawn(async move {
                match job {
                    Ok(job) => Ok(ctx.run_job(stage.as_ref(), job).await),
                    Err(e) => Err(e),
                }
            }));
            async move { task.await.unwrap_or_else(|e| Err(anyhow::anyhow!("a request's task ended without a result: {e}"))) }
        })
        .buffer_unordered(concurrency);

    let writer = Writer::spawn(dataset);
    let (mut done, mut failed, mut tokens) = (0u64, 0u64, 0u64);
    let mut fatal: Option<anyhow::Error> = None;
    let mut stopping = Stopping::new(Duration::from_secs_f64(cfg.run().stop_grace_secs));
    let outage_limit = Duration::from_secs_f64(cfg.run().outage_wait_secs);
    let mut manifest_at = Instant::now();
    let mut outage_clock = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            result = results.next() => {
                let Some(result) = result else { break };
                // With it, the results that are ready now: handed to the writer at once (one
                // wake of its thread for them all; none waits for another).
                let mut items = Vec::new();
                let mut next = Some(result);
                let mut ended = false;
                while let Some(result) = next.take() {
                    match result {
                        Ok(JobResult::Record(r)) => {
                            done += 1;
                            tokens += r.completion_tokens.unwrap_or(0);
                            items.push(WriteItem::Record(r));
                        }
                        Ok(JobResult::Failure(f)) => {
                            failed += 1;
                            items.push(WriteItem::Failure(f));
                        }
                        Ok(JobResult::Abandoned) => {}
                        Err(e) => {
                            fatal = Some(e);
                            break;
                        }
                    }
                    if items.len() >= 256 {
                        break; // the other branches get their turn
                    }
                    match results.next().now_or_never() {
                        Some(Some(r)) => next = Some(r),
                        Some(None) => ended = true,
                        None => {}
                    }
                }
                if !writer.send_all(items) {
                    break; // the writer stopped on an error: `finish` says which
                }
                if fatal.is_some() || ended {
                    break;
                }
                if manifest_at.elapsed() >= Duration::from_secs(10) {
                    m.tally(&plan, done, failed, tokens);
                    if let Err(e) = m.write(&paths.manifest) {
                        tracing::warn!(error = %e, "cannot update the manifest");
                    }
                    manifest_at = Instant::now();
                }
            }
            sig = signals.recv() => {
                let Some(sig) = sig else { continue };
                if stopping.signal(sig, &stop, &progress) {
                    break;
                }
                dispatching.store(false, Ordering::SeqCst);
            }
            _ = tokio::time::sleep_until(stopping.deadline), if stopping.signal.is_some() => {
                stopping.grace_over();
                break;
            }
            _ = outage_clock.tick(), if !outage_limit.is_zero() => {
                let Some(since) = ctx.pool().all_down_since() else { continue };
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
    m.tally(&plan, done, failed, tokens);
    let (error, status) = stopping.end(&mut m, write_result, fatal, failed);
    if status == "completed" && m.counts.remaining == 0 && plan.skipped_failed == 0 {
        m.fingerprint = manifest::fingerprint(&cfg, &paths);
    }
    // A full disk made room for this with the reserve.
    reserve.release();
    let manifest_result = m.write(&paths.manifest).with_context(|| format!("cannot write {}", paths.manifest.display()));
    tracing::info!(done, failed, tokens, status, "run finished");
    drop(lock);
    if let Some(e) = error {
        tracing::error!(error = %error_text(&e), "run stopped");
        if let Some(h) = &hub {
            h.end(view.as_ref(), status, 1, vec![format!("Error: {}", error_text(&e))]);
            tokio::time::sleep(LIVE_LAST_WORD).await;
        }
        return Err(e);
    }
    manifest_result?;

    let summary = summary_lines(&cfg, &paths, &m, &plan, view.as_ref(), stopping.signal);
    for line in &summary {
        say!("{line}");
    }
    let outcome = RunOutcome { failed: failed + plan.skipped_failed, interrupted: stopping.signal.is_some() };
    end_live(hub.as_deref(), view.as_ref(), status, &outcome, summary).await;
    Ok(outcome)
}

/// The answer of a re-run when the folder's last run left nothing to do and nothing it depended
/// on has changed (the manifest's fingerprint): the run is recorded, nothing else is read.
fn unchanged_since_done(cfg: &Config, paths: &OutputPaths, runs: &[RunEntry]) -> Option<anyhow::Result<RunOutcome>> {
    if runs.last().is_none_or(|r| r.status != "completed") {
        return None;
    }
    let mut m = Manifest::read(&paths.manifest)?;
    let fp = m.fingerprint.clone()?;
    if manifest::fingerprint(cfg, paths).as_deref() != Some(fp.as_str()) {
        return None;
    }
    let now = record::now_rfc3339();
    let requests = m.counts.requests;
    m.runs.push(RunEntry {
        started_at: now.clone(),
        ended_at: Some(now),
        status: "completed".into(),
        error: None,
        requests: 0,
        already_done: requests,
        done: 0,
        failed: 0,
        completion_tokens: 0,
    });
    m.counts = manifest::Counts { requests, already_done: requests, ..Default::default() };
    m.completion_tokens = 0;
    // The manifest's own write and the log do not touch what the fingerprint covers.
    if let Err(e) = m.write(&paths.manifest).with_context(|| format!("cannot write {}", paths.manifest.display())) {
        return Some(Err(e));
    }
    if start_log(&paths.log).is_ok() {
        tracing::info!(config = %cfg.path.display(), requests, "nothing to do: nothing changed since the last run, which left nothing to do");
    }
    say!("{}: nothing to do: {requests} of {requests} requests already in {} (nothing changed since the last run)", cfg.name(), paths.dir.display());
    Some(Ok(RunOutcome { failed: 0, interrupted: false }))
}

/// Ctrl-C and SIGTERM during a run: the first stops new requests and lets those in flight finish
/// for the grace period; a second, or the end of the grace, abandons them.
struct Stopping {
    /// The first stop signal.
    signal: Option<&'static str>,
    /// Requests in flight were abandoned.
    aborted: bool,
    /// The end of the grace period (far away until a signal).
    deadline: tokio::time::Instant,
    grace: Duration,
}

impl Stopping {
    fn new(grace: Duration) -> Stopping {
        Stopping { signal: None, aborted: false, deadline: tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600), grace }
    }

    /// A stop signal; true when the run must end now (the second one).
    fn signal(&mut self, sig: &'static str, stop: &CancellationToken, progress: &Progress) -> bool {
        if self.signal.is_some() {
            tracing::warn!(signal = sig, "second signal: abandoning the requests in flight");
            self.aborted = true;
            return true;
        }
        self.signal = Some(sig);
        stop.cancel();
        self.deadline = tokio::time::Instant::now() + self.grace;
        tracing::warn!(signal = sig, grace_secs = self.grace.as_secs_f64(), "stopping: no new requests; waiting for those in flight");
        progress.send(Event::Stopping { signal: sig.into(), deadline: self.deadline.into_std(), grace: self.grace });
        false
    }

    fn grace_over(&mut self) {
        tracing::warn!("grace period over: abandoning the requests in flight");
        self.aborted = true;
    }

    /// The run's error (a write error first: it says what the files hold) and its status, both
    /// recorded in the manifest's entry of this run.
    fn end(&self, m: &mut Manifest, write_result: Result<(), dataset::DatasetError>, fatal: Option<anyhow::Error>, failed: u64) -> (Option<anyhow::Error>, &'static str) {
        let error = match (write_result, fatal) {
            (Err(e), _) => Some(anyhow::Error::from(e).context("stopped: the dataset cannot be written; everything written before is intact")),
            (Ok(()), Some(e)) => Some(e),
            (Ok(()), None) => None,
        };
        let status = match (&error, self.signal, self.aborted, failed) {
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
        (error, status)
    }
}

/// How long the process stays after the run's end, so that open pages get its last word.
const LIVE_LAST_WORD: Duration = Duration::from_millis(500);

/// `--serve`: the live view's hub and its server, bound before any request (an address that
/// cannot be bound is an error that names it). The URL goes to stderr (with its token, if any:
/// the only place the token is shown); the log gets it without.
async fn start_live(opts: &RunOptions, name: &str) -> anyhow::Result<(Option<Arc<LiveHub>>, Option<live::Server>)> {
    let Some(s) = &opts.serve else { return Ok((None, None)) };
    let hub = LiveHub::new(name);
    let server = live::serve(s, hub.clone()).await?;
    eprintln!("live view: {}", server.url_with_token);
    if let Some(h) = data_generator::web::url_hint(&server) {
        eprintln!("{h}");
    }
    Ok((Some(hub), Some(server)))
}

/// The live view's last word: the run's status, exit code and summary.
async fn end_live(hub: Option<&LiveHub>, view: Option<&progress::ProgressView>, status: &str, outcome: &RunOutcome, summary: Vec<String>) {
    let Some(h) = hub else { return };
    let code = if outcome.interrupted {
        130
    } else if outcome.failed > 0 {
        3
    } else {
        0
    };
    h.end(view, status, code, summary);
    tokio::time::sleep(LIVE_LAST_WORD).await;
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

fn summary_lines(cfg: &Config, paths: &OutputPaths, m: &Manifest, plan: &Plan, view: Option<&progress::ProgressView>, stop: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    let elapsed = view.map(|v| v.started.elapsed()).unwrap_or_default();
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { m.completion_tokens as f64 / secs } else { 0.0 };
    let c = &m.counts;
    if let Some(sig) = stop {
        out.push(format!(
            "{}: interrupted by {sig}: {} done, {} failed, {} not run; re-run the same command to continue",
            cfg.name(),
            c.done,
            c.failed,
            c.remaining
        ));
    } else {
        out.push(format!("{}: {} of {} requests done, {} failed, in {}", cfg.name(), c.done, plan.to_run, c.failed, progress::format_duration(elapsed)));
    }
    out.push(format!("  tokens:   {} generated, {:.1} tok/s", m.completion_tokens, rate));
    for line in view.map(|v| v.endpoint_lines()).unwrap_or_default() {
        out.push(format!("  server:   {line}"));
    }
    if c.already_done > 0 || c.skipped_failed > 0 {
        out.push(format!(
            "  resumed:  {} of {} requests were already done{}",
            c.already_done,
            c.requests,
            if c.skipped_failed > 0 { format!(", {} failed before and skipped", c.skipped_failed) } else { String::new() }
        ));
    }
    for f in &cfg.raw.output.formats {
        let p = match f {
            config::OutputFormat::Jsonl => &paths.jsonl,
            config::OutputFormat::Csv => &paths.csv,
        };
        out.push(format!("  dataset:  {}", p.display()));
    }
    if c.failed > 0 {
        out.push(format!("  failures: {} ({} this run; re-run to retry them)", paths.failures.display(), c.failed));
    }
    out.push(format!("  manifest: {}", paths.manifest.display()));
    out.push(format!("  log:      {}", paths.log.display()));
    out
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

/// A line on stdout; a reader that went away (`| head`) is not an error.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// The dry run: everything `run` checks before its first request, and nothing written.
pub async fn check(cfg: Config) -> anyhow::Result<()> {
    if !cfg.stages.is_empty() {
        return check_stages(cfg).await;
    }
    let paths = OutputPaths::new(&cfg.output_dir);
    let planner = Planner::new(&cfg)?;
    OutputLock::check_free(&paths.dir)?;
    let prior = resume::scan(&paths, &cfg.raw.output.formats, cfg.schema.is_some())?;
    let plan = planner.check(&prior, Redo { failed: true, truncated: false })?;
    let samples = cfg.run().samples_per_prompt;
    say!("config:  {} is valid", cfg.path.display());
    say!(
        "input:   {}: {} rows × {} sample{} = {} requests",
        cfg.input_path.display(),
        plan.rows,
        samples,
        if samples == 1 { "" } else { "s" },
        plan.requests
    );
    say!("first prompts:");
    for row in planner.rows()?.take(3) {
        let row = row?;
        let prompt = planner.render(&row)?;
        say!("  ── row {} (line {}) ──", row.id, row.line);
        for line in prompt.lines() {
            say!("  │ {line}");
        }
    }
    check_writable(&paths.dir)?;
    say!(
        "output:  {}: {} already done, {} to run{}",
        paths.dir.display(),
        plan.already_done,
        plan.to_run,
        if prior.failed.is_empty() { String::new() } else { format!(" ({} failed before: they will be retried)", prior.failed.len()) }
    );
    for note in &prior.repairs {
        say!("  note: {note}");
    }
    let clients = clients(&cfg)?;
    for c in &clients {
        let server = c.check().await?;
        say!(
            "server:  {} at {}{}; model {} is there{}",
            c.kind(),
            c.url(),
            server.version.as_deref().map(|v| format!(" (version {v})")).unwrap_or_default(),
            cfg.backend().model,
            if server.capabilities.is_empty() { String::new() } else { format!(" ({})", server.capabilities.join(", ")) }
        );
    }
    say!("ready:   the run would make {} requests", plan.to_run);
    Ok(())
}

/// How a stage fared in a run, for the manifest and the summary.
fn stage_counts(pipeline: &Pipeline) -> Vec<StageCounts> {
    pipeline.stages.iter().map(|s| StageCounts { name: s.name.to_string(), model: s.cfg.backend().model.clone(), ..Default::default() }).collect()
}

/// A multi-stage run (`[[stages]]`): rows stream through the stages with no barrier between
/// them. The next request is taken from the deepest stage that has one (finished rows come out
/// early, and the rows waiting between stages stay few); a new input row is read only when the
/// stages below have nothing to send. A request whose record a stage file already holds is not
/// asked again: its record is read back and the row goes on. The servers of every stage are
/// checked before the first request (or not at all when nothing is left to ask).
pub async fn run_stages(cfg: Config, opts: RunOptions) -> anyhow::Result<RunOutcome> {
    if opts.redo.truncated {
        anyhow::bail!("--redo-truncated is for one-stage runs: a multi-stage run keeps its truncated records as they are");
    }
    let paths = OutputPaths::new(&cfg.output_dir);
    let pipeline = Arc::new(Pipeline::new(&cfg)?);
    let names: Vec<String> = pipeline.names().iter().map(|s| s.to_string()).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut lock = OutputLock::acquire_if_exists(&paths.dir)?;
    let (mut runs, killed_since) = if lock.is_some() && !opts.fresh { prior_runs(&paths)? } else { (Vec::new(), None) };
    if lock.is_some() && !opts.fresh && !paths.dir.join("stages").is_dir() && [&paths.jsonl, &paths.csv].iter().any(|p| p.metadata().is_ok_and(|m| m.len() > 0)) {
        anyhow::bail!(
            "{} holds a one-stage run (a dataset and no stages/), and {} has [[stages]]: give another --output (or output.dir), \
             or --fresh to move the old folder aside",
            paths.dir.display(),
            cfg.path.display()
        );
    }
    let rows_in = pipeline.check()?;
    let schemas: Vec<(&str, bool)> = pipeline.stages.iter().map(|s| (s.name.as_ref(), s.has_schema())).collect();
    let prior = if opts.fresh || lock.is_none() {
        stages::PipelinePrior { stages: names.iter().map(|_| Default::default()).collect(), ..Default::default() }
    } else {
        let csv = cfg.raw.output.formats.contains(&config::OutputFormat::Csv).then_some(schemas.as_slice());
        stages::load_prior(&paths.dir, &name_refs, &paths.failures, killed_since.as_deref(), true, csv)?
    };
    if let Some(last) = runs.last_mut().filter(|r| r.status == "running") {
        last.status = "killed".into();
        last.done = prior.stages.iter().map(|s| s.records_since).sum();
        last.failed = prior.failures_since;
        eprintln!("note: the last run (started {}) ended without a word (killed?) after finishing {} request{}; continuing", last.started_at, last.done, if last.done == 1 { "" } else { "s" });
    }
    for note in &prior.repairs {
        eprintln!("repaired: {note}");
    }
    check_writable(&paths.dir)?;
    let (hub, live_server) = start_live(&opts, cfg.name()).await?;

    // Every stage's servers, checked before the first request: at once when the folder is new
    // (nothing is created before they answer), else when the first request is due.
    let mut endpoint_urls = Vec::new();
    let mut endpoint_base = Vec::new();
    for st in &pipeline.stages {
        endpoint_base.push(endpoint_urls.len());
        endpoint_urls.extend(st.cfg.endpoints.iter().map(|e| format!("{} ({})", e.url, st.name)));
    }
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let mode = opts.display.resolve();
    let progress = Progress { tx: ev_tx.clone(), tokens: mode.wants_tokens() || hub.is_some(), prompts: hub.is_some() };
    let stop = CancellationToken::new();
    let check_all = || {
        let pipeline = pipeline.clone();
        let progress = progress.clone();
        let stop = stop.clone();
        let endpoint_base = endpoint_base.clone();
        async move {
            let mut runners = Vec::new();
            let mut first: Option<ServerInfo> = None;
            for (i, st) in pipeline.stages.iter().enumerate() {
                let clients = clients(&st.cfg)?;
                let (down, server) = check_endpoints(&clients).await.with_context(|| format!("stage {:?} (stages[{i}])", st.name.as_ref()))?;
                if server.fake {
                    first.get_or_insert_with(|| server.clone()).fake = true;
                }
                first.get_or_insert(server);
                let role = StageRole { name: Some(st.name.to_string()), index: i, endpoint_base: endpoint_base[i], explode: st.explode.clone() };
                runners.push(Runner::for_stage(clients, &st.cfg, &down, progress.clone(), stop.clone(), role));
            }
            anyhow::Ok((runners, first))
        }
    };
    let mut runners: Option<Vec<Arc<Runner>>> = None;
    let mut server: Option<ServerInfo> = None;
    if opts.fresh || lock.is_none() {
        let (r, s) = check_all().await?;
        runners = Some(r);
        server = s;
        if server.as_ref().is_some_and(|i| i.fake) {
            eprintln!("note: the test suite's fake server answers: made-up text (manifest: server.fake)");
        }
    }
    if opts.fresh && lock.is_some() {
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
    let files = StageFiles::open(&paths.dir, &schemas, &cfg.raw.output.formats)?;
    start_log(&paths.log)?;
    if let Some(sv) = &live_server {
        tracing::info!(url = %sv.url, "live view");
    }
    tracing::info!(config = %cfg.path.display(), stages = %names.join(" -> "), rows = rows_in, "run starting");
    for note in &prior.repairs {
        tracing::warn!("{note}");
    }
    let plan0 = Plan { rows: rows_in, ..Default::default() };
    let mut m = Manifest::for_run(&cfg, server.as_ref(), &plan0, std::mem::take(&mut runs));
    m.stages = stage_counts(&pipeline);
    let mut reserve = SpaceReserve::create(&paths.dir, 8192.max(2 * serde_json::to_vec_pretty(&m).map(|v| v.len()).unwrap_or(0)));
    m.write(&paths.manifest).with_context(|| format!("cannot write {}", paths.manifest.display()))?;

    eprintln!("{}: {} input rows through {} into {}", cfg.name(), rows_in, names.join(" -> "), paths.dir.display());
    let display = tokio::spawn(progress::run_display(ev_rx, mode, Duration::from_secs(5), hub.clone()));
    progress.send(Event::Started { total: 0, already_done: 0, skipped_failed: 0, endpoints: endpoint_urls });
    progress.send(Event::Stages { names: names.clone() });
    let mut signals = stop_signals()?;

    let n = pipeline.stages.len();
    let global = cfg.total_concurrency();
    // A stage's cap: its own `concurrency`, within its servers' room and the run's.
    let caps: Vec<usize> = pipeline
        .stages
        .iter()
        .zip(&cfg.stages)
        .map(|(s, spec)| s.cfg.total_concurrency().min(global).min(spec.concurrency.unwrap_or(usize::MAX)))
        .collect();
    let mut counts = stage_counts(&pipeline);
    let mut waiting: Vec<std::collections::VecDeque<FlowRow>> = (0..n).map(|_| Default::default()).collect();
    let mut ready: Vec<std::collections::VecDeque<(Job, FlowRow)>> = (0..n).map(|_| Default::default()).collect();
    let mut flying: Vec<usize> = vec![0; n];
    let mut rows_of: std::collections::HashMap<u64, (usize, FlowRow)> = std::collections::HashMap::new();
    let mut tasks = futures::stream::FuturesUnordered::new();
    let mut input = pipeline.rows()?;
    let mut input_done = false;
    let mut seq: u64 = 0;
    let writer = Writer::spawn(files);
    let mut fatal: Option<anyhow::Error> = None;
    let mut stopping = Stopping::new(Duration::from_secs_f64(cfg.run().stop_grace_secs));
    let (mut tokens, mut dataset_rows) = (0u64, 0u64);
    let outage_limit = Duration::from_secs_f64(cfg.run().outage_wait_secs);
    let mut manifest_at = Instant::now();
    let mut outage_clock = tokio::time::interval(Duration::from_millis(500));
    let mut writer_ok = true;
    let mut rows_changed = false;

    // What a stage's record means for its row: the record is written (when new), `keep` and
    // `explode` decide what goes on, and a row past the last stage is a dataset record.
    macro_rules! on_record {
        ($s:expr, $row:expr, $rec:expr, $new:expr) => {{
            let (s, row, mut rec): (usize, FlowRow, Box<Record>) = ($s, $row, $rec);
            let key = resume::parse_key(&rec.key).unwrap_or(0);
            match pipeline.advance(s, &row, &rec, key, $new) {
                Err(e) => {
                    // The reply is kept (it was paid for; `keep` is not part of its key): a
                    // fixed `keep` finds it again. The row stops here, as a failure.
                    if $new {
                        tokens += rec.completion_tokens.unwrap_or(0);
                        writer_ok &= writer.send(StageItem::Record(s, rec.clone()));
                    }
                    counts[s].failed += 1;
                    let f = record::Failure {
                        attempts: rec.attempts,
                        key: rec.key.clone(),
                        endpoint: rec.endpoint.clone(),
                        ..stage_failure(&names[s], &rec.id, rec.sample, &rec.model, e, rec.parent.clone())
                    };
                    tracing::error!(stage = %names[s], id = %f.id, error = %f.error, "the row cannot go on");
                    writer_ok &= writer.send(StageItem::Failure(Box::new(f)));
                }
                Ok(adv) => {
                    if adv.kept == Some(false) {
                        counts[s].dropped += 1;
                        rows_changed = true;
                        if $new {
                            tracing::info!(stage = %names[s], id = %rec.id, sample = rec.sample, "dropped by keep");
                        }
                    }
                    if let Some(k) = adv.exploded {
                        counts[s].exploded_into += k as u64;
                        counts[s].exploded_empty += u64::from(k == 0);
                    }
                    if $new {
                        rec.kept = adv.kept;
                        tokens += rec.completion_tokens.unwrap_or(0);
                        writer_ok &= writer.send(StageItem::Record(s, rec));
                    }
                    if pipeline.is_last(s) {
                        rows_changed |= !adv.rows.is_empty();
                        for r in adv.rows {
                            dataset_rows += 1;
                            let fresh = r.fresh;
                            writer_ok &= writer.send(StageItem::Row(Box::new(Pipeline::dataset_row(r)), fresh));
                        }
                    } else {
                        waiting[s + 1].extend(adv.rows);
                    }
                }
            }
        }};
    }

    'run: loop {
        // Fill: send what can be sent, deepest stage first; turn waiting rows into requests
        // (or, for requests already answered, into the next stage's rows); read more input only
        // when the stages below have nothing to do. After a few hundred steps it lets the select
        // below run (signals, finished requests), so that reading back a large finished batch
        // never makes Ctrl-C wait.
        let mut steps = 0u32;
        let mut more = false;
        while stopping.signal.is_none() && writer_ok {
            steps += 1;
            if steps > 512 {
                more = true;
                break;
            }
            let mut busy: usize = flying.iter().sum();
            if busy < global && runners.is_some() {
                for s in (0..n).rev() {
                    while busy < global && flying[s] < caps[s] {
                        let Some((job, row)) = ready[s].pop_front() else { break };
                        let runner = runners.as_ref().map(|r| r[s].clone()).expect("checked");
                        let pipeline = pipeline.clone();
                        let job_seq = job.seq;
                        rows_of.insert(job_seq, (s, row));
                        flying[s] += 1;
                        busy += 1;
                        let task = AbortOnDropHandle::new(tokio::spawn(async move {
                            let stage = StagesStage { pipeline, index: s };
                            runner.run_job(&stage, job).await
                        }));
                        tasks.push(async move { (job_seq, task.await) });
                    }
                }
            }
            if runners.is_none() && ready.iter().any(|r| !r.is_empty()) {
                let (r, s) = match check_all().await {
                    Ok(x) => x,
                    Err(e) => {
                        fatal = Some(e);
                        break 'run;
                    }
                };
                if let (Some(info), None) = (&s, &server) {
                    m.server.version = info.version.clone();
                    m.server.fake = info.fake;
                }
                if s.as_ref().is_some_and(|i| i.fake) {
                    eprintln!("note: the test suite's fake server answers: made-up text (manifest: server.fake)");
                }
                server = s;
                runners = Some(r);
                continue;
            }
            // A waiting row, deepest stage first, where fewer requests wait than can be sent.
            if let Some(s) = (0..n).rev().find(|&s| !waiting[s].is_empty() && ready[s].len() < caps[s]) {
                let row = waiting[s].pop_front().expect("not empty");
                match pipeline.requests(s, &row) {
                    Err(e) => {
                        counts[s].failed += 1;
                        let f = stage_failure(&names[s], &row.id, 0, &pipeline.stages[s].cfg.backend().model, e.to_string(), row.parent.as_ref().map(|p| p.0.clone()));
                        tracing::error!(stage = %names[s], id = %row.id, error = %f.error, "cannot render the stage's prompt");
                        writer_ok &= writer.send(StageItem::Failure(Box::new(f)));
                    }
                    Ok((prompt, reqs)) => {
                        let (mut added, mut already) = (0u64, 0u64);
                        for req in reqs {
                            added += 1;
                            counts[s].requested += 1;
                            let earlier = match prior.stages[s].record(req.key).transpose() {
                                Ok(r) => r.filter(|r| pipeline.reusable(s, r)),
                                Err(e) => {
                                    fatal = Some(anyhow::Error::from(e).context(format!("cannot read back a record of stage {:?}", names[s])));
                                    break 'run;
                                }
                            };
                            if let Some(rec) = earlier {
                                already += 1;
                                counts[s].already_done += 1;
                                on_record!(s, row.clone(), Box::new(rec), false);
                            } else if !opts.redo.failed && prior.failed.contains(&req.key) {
                                counts[s].skipped_failed += 1;
                            } else {
                                seq += 1;
                                let job = pipeline.job(s, seq, &row, &prompt, req);
                                ready[s].push_back((job, row.clone()));
                            }
                        }
                        progress.send(Event::StageAdd { stage: s, requests: added, already_done: already });
                    }
                }
                continue;
            }
            let buffered: usize = waiting.iter().map(|w| w.len()).sum::<usize>() + ready.iter().map(|r| r.len()).sum::<usize>();
            if !input_done && buffered < global.max(4) {
                match input.next() {
                    Some(Ok(row)) => waiting[0].push_back(row),
                    Some(Err(e)) => {
                        fatal = Some(e.into());
                        break 'run;
                    }
                    None => {
                        input_done = true;
                        progress.send(Event::InputRead);
                    }
                }
                continue;
            }
            break;
        }
        if std::mem::take(&mut rows_changed) {
            progress.send(Event::StageRows { dataset_rows, dropped: counts.iter().map(|c| c.dropped).sum() });
        }
        if tasks.is_empty() && (stopping.signal.is_some() || !writer_ok || (input_done && waiting.iter().all(|w| w.is_empty()) && ready.iter().all(|r| r.is_empty()))) {
            break;
        }
        if manifest_at.elapsed() >= Duration::from_secs(10) {
            tally_stages(&mut m, &counts, tokens, dataset_rows);
            if let Err(e) = m.write(&paths.manifest) {
                tracing::warn!(error = %e, "cannot update the manifest");
            }
            manifest_at = Instant::now();
        }
        tokio::select! {
            _ = tokio::task::yield_now(), if more => {}
            done = tasks.next(), if !tasks.is_empty() => {
                let Some((job_seq, result)) = done else { continue };
                let Some((s, row)) = rows_of.remove(&job_seq) else { continue };
                flying[s] -= 1;
                match result {
                    Ok(JobResult::Record(rec)) => {
                        counts[s].done += 1;
                        on_record!(s, row, rec, true);
                    }
                    Ok(JobResult::Failure(f)) => {
                        counts[s].failed += 1;
                        writer_ok &= writer.send(StageItem::Failure(f));
                    }
                    Ok(JobResult::Abandoned) => {}
                    Err(e) => {
                        fatal = Some(anyhow::anyhow!("a request's task ended without a result: {e}"));
                        break;
                    }
                }
            }
            sig = signals.recv() => {
                let Some(sig) = sig else { continue };
                if stopping.signal(sig, &stop, &progress) {
                    break;
                }
            }
            _ = tokio::time::sleep_until(stopping.deadline), if stopping.signal.is_some() => {
                stopping.grace_over();
                break;
            }
            _ = outage_clock.tick(), if !outage_limit.is_zero() && runners.is_some() => {
                let down = runners.iter().flatten().zip(&pipeline.stages).find_map(|(r, st)| r.pool().all_down_since().filter(|s| s.at.elapsed() >= outage_limit).map(|s| (s, st)));
                if let Some((since, st)) = down {
                    fatal = Some(anyhow::anyhow!(
                        "stopped: the servers of stage {:?} ({}) have been down since {} ({}), longer than run.outage_wait_secs ({}); \
                         what is finished is kept, and the rest was not marked failed: re-run the same command to continue",
                        st.name.as_ref(), st.cfg.urls(), humantime::format_rfc3339_seconds(since.wall), progress::short_duration(since.at.elapsed()), progress::short_duration(outage_limit)
                    ));
                    break;
                }
            }
        }
    }
    drop(tasks);
    for r in runners.iter().flatten() {
        r.stop_probers();
    }
    // The whole input went through: the dataset is rebuilt; else the live one stays as it is.
    let complete = fatal.is_none() && stopping.signal.is_none() && input_done && waiting.iter().all(|w| w.is_empty()) && ready.iter().all(|r| r.is_empty());
    writer.send(StageItem::Commit(complete && writer_ok));
    let (written, write_result) = writer.finish();
    progress.send(Event::End);
    drop(ev_tx);
    drop(progress);
    let view = display.await.ok();

    tally_stages(&mut m, &counts, written.tokens, written.rows);
    let failed: u64 = counts.iter().map(|c| c.failed).sum();
    let (error, status) = stopping.end(&mut m, write_result, fatal, failed);
    reserve.release();
    let manifest_result = m.write(&paths.manifest).with_context(|| format!("cannot write {}", paths.manifest.display()));
    tracing::info!(done = written.records, failed, rows = written.rows, status, "run finished");
    drop(lock);
    if let Some(e) = error {
        tracing::error!(error = %error_text(&e), "run stopped");
        if let Some(h) = &hub {
            h.end(view.as_ref(), status, 1, vec![format!("Error: {}", error_text(&e))]);
            tokio::time::sleep(LIVE_LAST_WORD).await;
        }
        return Err(e);
    }
    manifest_result?;
    let summary = stage_summary_lines(&cfg, &paths, &m, view.as_ref(), stopping.signal);
    for line in &summary {
        say!("{line}");
    }
    let skipped: u64 = counts.iter().map(|c| c.skipped_failed).sum();
    let outcome = RunOutcome { failed: failed + skipped, interrupted: stopping.signal.is_some() };
    end_live(hub.as_deref(), view.as_ref(), status, &outcome, summary).await;
    Ok(outcome)
}

/// A row that cannot go on at a stage for a reason of its own (its prompt does not render, its
/// `keep` fails): a failure no retry would mend.
fn stage_failure(stage: &str, id: &str, sample: u32, model: &str, error: String, parent: Option<String>) -> record::Failure {
    record::Failure {
        id: id.to_owned(),
        sample,
        model: model.to_owned(),
        error,
        attempts: 0,
        retryable: false,
        key: String::new(),
        endpoint: None,
        when: record::now_rfc3339(),
        validation_errors: None,
        last_reply: None,
        stage: Some(stage.to_owned()),
        parent,
    }
}

/// A stage's request: its messages and schema (what [`get_student_response`] sends).
struct StagesStage {
    pipeline: Arc<Pipeline>,
    index: usize,
}

impl Stage for StagesStage {
    fn send<'a>(&'a self, client: &'a dyn ModelClient, job: &'a Job, options: &'a Map<String, Value>, progress: &'a Progress) -> BoxFuture<'a, Result<Reply, ClientError>> {
        let schema = self.pipeline.stages[self.index].cfg.schema.as_ref().map(|s| &s.value);
        Box::pin(get_student_response(client, job, options, schema, progress))
    }
}

/// The run's counts into the manifest: per stage, and overall (requests of every stage).
fn tally_stages(m: &mut Manifest, counts: &[StageCounts], tokens: u64, rows: u64) {
    let sum = |f: fn(&StageCounts) -> u64| counts.iter().map(f).sum::<u64>();
    m.counts.requests = sum(|c| c.requested);
    m.counts.already_done = sum(|c| c.already_done);
    m.counts.skipped_failed = sum(|c| c.skipped_failed);
    let (done, failed) = (sum(|c| c.done), sum(|c| c.failed));
    m.counts.done = done;
    m.counts.failed = failed;
    m.counts.remaining = m.counts.requests.saturating_sub(m.counts.already_done + m.counts.skipped_failed + done + failed);
    m.completion_tokens = tokens;
    m.stages = counts.to_vec();
    m.dataset_rows = Some(rows);
    let (requests, already) = (m.counts.requests, m.counts.already_done);
    if let Some(r) = m.current_run() {
        r.requests = requests - already;
        r.already_done = already;
        r.done = done;
        r.failed = failed;
        r.completion_tokens = tokens;
    }
}

fn stage_summary_lines(cfg: &Config, paths: &OutputPaths, m: &Manifest, view: Option<&progress::ProgressView>, stop: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    let elapsed = view.map(|v| v.started.elapsed()).unwrap_or_default();
    let c = &m.counts;
    if let Some(sig) = stop {
        out.push(format!("{}: interrupted by {sig}: {} requests done, {} failed; re-run the same command to continue", cfg.name(), c.done, c.failed));
    } else {
        out.push(format!("{}: {} dataset rows; {} requests done, {} failed, {} already done, in {}", cfg.name(), m.dataset_rows.unwrap_or(0), c.done, c.failed, c.already_done, progress::format_duration(elapsed)));
    }
    let secs = elapsed.as_secs_f64();
    out.push(format!("  tokens:   {} generated, {:.1} tok/s", m.completion_tokens, if secs > 0.0 { m.completion_tokens as f64 / secs } else { 0.0 }));
    for s in &m.stages {
        let mut line = format!("  stage:    {} ({}): {} requests, {} done, {} already done", s.name, s.model, s.requested, s.done, s.already_done);
        if s.failed > 0 {
            line.push_str(&format!(", {} failed", s.failed));
        }
        if s.dropped > 0 {
            line.push_str(&format!(", {} dropped by keep", s.dropped));
        }
        if s.exploded_into > 0 || s.exploded_empty > 0 {
            line.push_str(&format!(", exploded into {} rows", s.exploded_into));
        }
        out.push(line.to_string());
    }
    for f in &cfg.raw.output.formats {
        let p = match f {
            config::OutputFormat::Jsonl => &paths.jsonl,
            config::OutputFormat::Csv => &paths.csv,
        };
        out.push(format!("  dataset:  {}", p.display()));
    }
    out.push(format!("  stages:   {}", paths.dir.join("stages").display()));
    if c.failed > 0 {
        out.push(format!("  failures: {} ({} this run; re-run to retry them)", paths.failures.display(), c.failed));
    }
    out.push(format!("  manifest: {}", paths.manifest.display()));
    out.push(format!("  log:      {}", paths.log.display()));
    out
}

/// The dry run of a multi-stage config: the input, every stage's first prompt that can be
/// rendered from the input alone, and every stage's servers.
async fn check_stages(cfg: Config) -> anyhow::Result<()> {
    let paths = OutputPaths::new(&cfg.output_dir);
    let pipeline = Pipeline::new(&cfg)?;
    OutputLock::check_free(&paths.dir)?;
    let rows = pipeline.check()?;
    say!("config:  {} is valid", cfg.path.display());
    say!("input:   {}: {} rows", cfg.input_path.display(), rows);
    for (i, st) in pipeline.stages.iter().enumerate() {
        let mut how = vec![format!("model {}", st.cfg.backend().model)];
        if st.samples() > 1 {
            how.push(format!("{} samples", st.samples()));
        }
        if let Some(f) = &st.explode {
            how.push(format!("explodes `{f}`"));
        }
        if let Some(k) = &st.keep {
            how.push(format!("keeps {}", k.source()));
        }
        say!("stage {}: {} ({})", i + 1, st.name, how.join(", "));
    }
    if let Some(row) = pipeline.rows()?.next() {
        let row = row?;
        let (prompt, _) = pipeline.requests(0, &row)?;
        say!("first prompt ({}, row {}):", pipeline.stages[0].name, row.id);
        for line in prompt.lines() {
            say!("  │ {line}");
        }
    }
    check_writable(&paths.dir)?;
    for st in &pipeline.stages {
        for c in &clients(&st.cfg)? {
            let server = c.check().await.with_context(|| format!("stage {:?}", st.name.as_ref()))?;
            say!(
                "server:  {} at {}{}; model {} is there (stage {})",
                c.kind(),
                c.url(),
                server.version.as_deref().map(|v| format!(" (version {v})")).unwrap_or_default(),
                st.cfg.backend().model,
                st.name
            );
        }
    }
    say!("ready:   {rows} input rows; later stages' requests depend on the replies");
    Ok(())
}
