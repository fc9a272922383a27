//! Progress: the pipeline emits [`Event`]s; displays consume them. All state lives in a
//! [`ProgressView`] built from events, and what the terminal shows is a pure function of that
//! view ([`ProgressView::frame`]), so another consumer (a browser view, a test) can be fed the
//! same stream. The terminal is redrawn on a clock (at most [`REDRAW_HZ`] times a second), never
//! once per token; when no live display is shown, token events are not produced at all.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

pub type JobId = u64;

/// Redraws per second of the terminal display, whatever the token rate.
pub const REDRAW_HZ: u64 = 15;

/// What happened in the run, as the pipeline saw it.
#[derive(Debug, Clone)]
pub enum Event {
    /// The batch: its requests (all of them, done before or not), how many were done by earlier
    /// runs, how many earlier failures are skipped, and the servers.
    Started { total: u64, already_done: u64, skipped_failed: u64, endpoints: Vec<String> },
    /// A request was taken up: it waits for a free slot on a server.
    Begin { job: JobId, label: String, stage: usize, prompt: Option<String> },
    /// Multi-stage runs: the stages, named, before any other stage event.
    Stages { names: Vec<String> },
    /// Multi-stage runs: `requests` more requests of a stage are known (rows reached it), of
    /// which `already_done` were done by earlier runs; totals grow as rows flow and explode.
    StageAdd { stage: usize, requests: u64, already_done: u64 },
    /// Multi-stage runs: rows in the dataset so far (read back or new), and rows `keep` stopped.
    StageRows { dataset_rows: u64, dropped: u64 },
    /// Multi-stage runs: every input row has entered the pipeline (totals now grow only by explodes).
    InputRead,
    /// An attempt was sent to an endpoint; nothing has come back yet.
    Attempt { job: JobId, endpoint: usize },
    /// The server answered with its headers; the first token has not come yet.
    Responding { job: JobId },
    /// Streamed text arrived; `thinking` for reasoning text. Only sent when a display shows it.
    Token { job: JobId, text: String, thinking: bool },
    /// An attempt failed; retry number `attempt` of at most `of` starts after `delay`.
    Retry { job: JobId, attempt: u32, of: u32, error: String, delay: Duration },
    /// The request waits because its server is down (it spends no retry meanwhile).
    ServerWait { job: JobId },
    /// A reply did not validate against the schema; re-ask `n` of at most `of` follows.
    ReAsk { job: JobId, n: u32, of: u32, error: String },
    /// The record is complete.
    Done { job: JobId, completion_tokens: u64 },
    /// The request failed for good.
    Failed { job: JobId, label: String, error: String },
    /// The request was given up without a result (Ctrl-C during a wait, the outage limit).
    Abandoned { job: JobId },
    /// An endpoint is down (a probe confirmed it); the next probe is at `next_try`. `first` for
    /// the event that took it down, not for the later failed probes.
    EndpointDown { endpoint: usize, since: SystemTime, next_try: Instant, error: String, first: bool },
    /// A probe answered: the endpoint is back after being down for `after`.
    EndpointUp { endpoint: usize, after: Duration },
    /// An endpoint that answers but keeps failing was set aside until `until`, or came back (None).
    Endpoint { endpoint: usize, until: Option<Instant> },
    /// No new requests will start (Ctrl-C); those in flight may finish until `deadline`, `grace`
    /// from now.
    Stopping { signal: String, deadline: Instant, grace: Duration },
    /// The run is over: the display clears itself and returns its view.
    End,
}

/// What a request in flight is doing.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Waiting for a free slot on a server (client-side queue).
    Queued,
    /// Sent; no answer yet (the server queues it, or loads the model).
    Sent,
    /// Headers came; the server evaluates the prompt.
    PromptEval,
    /// Tokens arrive.
    Streaming,
    /// A failed attempt; the next one starts at `until`.
    RetryWait { until: Instant, attempt: u32, of: u32, error: String },
    /// Its server is down; it waits for one to come back.
    ServerDown,
    /// The last reply did not validate; it is asked again.
    ReAsk { n: u32, of: u32, error: String },
}

#[derive(Debug, Clone)]
pub struct InFlight {
    pub label: String,
    pub phase: Phase,
    /// When the current phase began.
    pub since: Instant,
    /// The last characters streamed, for a one-line glimpse.
    pub tail: String,
    pub thinking: bool,
    pub attempt: u32,
    /// Pieces streamed by the current attempt.
    pub chunks: u64,
    pub endpoint: Option<usize>,
    /// Its stage (0 in a one-stage run).
    pub stage: usize,
}

/// One stage's share of a multi-stage run.
#[derive(Debug, Clone, Default)]
pub struct StageView {
    pub name: String,
    /// Requests known so far (grows as rows reach the stage).
    pub total: u64,
    pub already_done: u64,
    pub done: u64,
    pub failed: u64,
    pub completion_tokens: u64,
}

/// One server's share of the run.
#[derive(Debug, Clone, Default)]
pub struct EndpointView {
    pub url: String,
    pub done: u64,
    pub errors: u64,
    pub chunks: u64,
    pub completion_tokens: u64,
    /// Set aside (it answers but keeps failing) until then.
    pub set_aside: Option<Instant>,
    /// Down since, and the next probe.
    pub down: Option<(SystemTime, Instant, String)>,
}

/// The run as events tell it.
#[derive(Debug, Clone)]
pub struct ProgressView {
    pub started: Instant,
    /// Requests of the whole batch.
    pub total: u64,
    /// Done by earlier runs.
    pub already_done: u64,
    /// Earlier failures skipped (`--no-retry-failed`).
    pub skipped_failed: u64,
    /// Done by this run.
    pub done: u64,
    pub failed: u64,
    /// Streamed chunks (Ollama sends one token a chunk): the live token rate.
    pub streamed_chunks: u64,
    /// Exact completion tokens of finished records.
    pub completion_tokens: u64,
    pub retries: u64,
    pub in_flight: BTreeMap<JobId, InFlight>,
    /// Set once a stop was asked for: the signal and the end of the grace period.
    pub stopping: Option<(String, Instant)>,
    pub endpoints: Vec<EndpointView>,
    /// Multi-stage runs: one per stage (empty for a one-stage run).
    pub stages: Vec<StageView>,
    /// Multi-stage runs: dataset rows so far, rows dropped by `keep`, and whether the whole input
    /// is in (until then the totals grow, and no ETA is given).
    pub dataset_rows: u64,
    pub dropped: u64,
    pub input_read: bool,
    /// Time spent paused (every server down), so rates and the ETA count working time only.
    paused_total: Duration,
    paused_since: Option<Instant>,
}

const TAIL_CHARS: usize = 200;

impl ProgressView {
    pub fn new() -> ProgressView {
        ProgressView {
            started: Instant::now(),
            total: 0,
            already_done: 0,
            skipped_failed: 0,
            done: 0,
            failed: 0,
            streamed_chunks: 0,
            completion_tokens: 0,
            retries: 0,
            in_flight: BTreeMap::new(),
            stopping: None,
            endpoints: Vec::new(),
            stages: Vec::new(),
            dataset_rows: 0,
            dropped: 0,
            input_read: false,
            paused_total: Duration::ZERO,
            paused_since: None,
        }
    }

    /// Notes when the run starts or stops being paused.
    fn track_pause(&mut self) {
        match (self.paused(), self.paused_since) {
            (true, None) => self.paused_since = Some(Instant::now()),
            (false, Some(t)) => {
                self.paused_total += t.elapsed();
                self.paused_since = None;
            }
            _ => {}
        }
    }

    /// Seconds the run has been working (not paused).
    fn active_secs(&self) -> f64 {
        let paused = self.paused_total + self.paused_since.map(|t| t.elapsed()).unwrap_or_default();
        self.started.elapsed().saturating_sub(paused).as_secs_f64()
    }

    fn endpoint_of(&mut self, job: JobId) -> Option<&mut EndpointView> {
        let e = self.in_flight.get(&job)?.endpoint?;
        self.endpoints.get_mut(e)
    }

    fn stage_of(&mut self, job: JobId) -> Option<&mut StageView> {
        let s = self.in_flight.get(&job)?.stage;
        self.stages.get_mut(s)
    }

    /// Multi-stage runs: one line per stage, `answer    12/40 done, 1 failed · 2 in flight · 35.0 tok/s`.
    pub fn stage_lines(&self) -> Vec<String> {
        let width = self.stages.iter().map(|s| s.name.chars().count()).max().unwrap_or(0).max("dataset".len());
        let secs = self.active_secs();
        self.stages
            .iter()
            .enumerate()
            .map(|(i, st)| {
                let flight = self.in_flight.values().filter(|f| f.stage == i).count();
                let mut line = format!("{:<width$}  {}/{} done", st.name, st.already_done + st.done, st.total);
                if st.failed > 0 {
                    line.push_str(&format!(", {} failed", st.failed));
                }
                let rate = if secs > 0.0 { st.completion_tokens as f64 / secs } else { 0.0 };
                line.push_str(&format!(" · {flight} in flight · {rate:.1} tok/s"));
                line
            })
            .chain((!self.stages.is_empty()).then(|| {
                let mut line = format!("{:<width$}  {} rows", "dataset", self.dataset_rows);
                if self.dropped > 0 {
                    line.push_str(&format!(" ({} dropped by keep)", self.dropped));
                }
                if !self.input_read {
                    line.push_str(" · reading the input");
                }
                line
            }))
            .collect()
    }

    fn set_phase(&mut self, job: JobId, phase: Phase) {
        if let Some(f) = self.in_flight.get_mut(&job) {
            f.phase = phase;
            f.since = Instant::now();
        }
    }

    pub fn apply(&mut self, ev: &Event) {
        match ev {
            Event::Started { total, already_done, skipped_failed, endpoints } => {
                self.total = *total;
                self.already_done = *already_done;
                self.skipped_failed = *skipped_failed;
                self.started = Instant::now();
                self.endpoints = endpoints.iter().map(|u| EndpointView { url: u.clone(), ..Default::default() }).collect();
            }
            Event::Stages { names } => {
                self.stages = names.iter().map(|n| StageView { name: n.clone(), ..Default::default() }).collect();
            }
            Event::StageAdd { stage, requests, already_done } => {
                self.total += requests;
                self.already_done += already_done;
                if let Some(st) = self.stages.get_mut(*stage) {
                    st.total += requests;
                    st.already_done += already_done;
                }
            }
            Event::StageRows { dataset_rows, dropped } => {
                self.dataset_rows = *dataset_rows;
                self.dropped = *dropped;
            }
            Event::InputRead => self.input_read = true,
            Event::Begin { job, label, stage, .. } => {
                let f = InFlight {
                    stage: *stage,
                    label: label.clone(),
                    phase: Phase::Queued,
                    since: Instant::now(),
                    tail: String::new(),
                    thinking: false,
                    attempt: 1,
                    chunks: 0,
                    endpoint: None,
                };
                self.in_flight.insert(*job, f);
            }
            Event::Attempt { job, endpoint } => {
                if let Some(f) = self.in_flight.get_mut(job) {
                    f.endpoint = Some(*endpoint);
                    f.tail.clear();
                    f.chunks = 0;
                }
                self.set_phase(*job, Phase::Sent);
            }
            Event::Responding { job } => self.set_phase(*job, Phase::PromptEval),
            Event::Token { job, text, thinking } => {
                self.streamed_chunks += 1;
                if let Some(e) = self.endpoint_of(*job) {
                    e.chunks += 1;
                }
                if let Some(f) = self.in_flight.get_mut(job) {
                    if f.phase != Phase::Streaming {
                        f.phase = Phase::Streaming;
                        f.since = Instant::now();
                    }
                    f.chunks += 1;
                    if f.thinking != *thinking {
                        f.tail.clear();
                        f.thinking = *thinking;
                    }
                    push_tail(&mut f.tail, text);
                }
            }
            Event::Retry { job, attempt, of, error, delay } => {
                self.retries += 1;
                if let Some(e) = self.endpoint_of(*job) {
                    e.errors += 1;
                }
                if let Some(f) = self.in_flight.get_mut(job) {
                    f.attempt = attempt + 1;
                    f.tail.clear();
                }
                let until = Instant::now() + *delay;
                self.set_phase(*job, Phase::RetryWait { until, attempt: *attempt, of: *of, error: error.clone() });
            }
            Event::ReAsk { job, n, of, error } => {
                if let Some(f) = self.in_flight.get_mut(job) {
                    f.tail.clear();
                }
                self.set_phase(*job, Phase::ReAsk { n: *n, of: *of, error: error.clone() });
            }
            Event::ServerWait { job } => {
                if let Some(f) = self.in_flight.get_mut(job) {
                    f.tail.clear();
                }
                self.set_phase(*job, Phase::ServerDown);
            }
            Event::Done { job, completion_tokens } => {
                self.done += 1;
                if let Some(st) = self.stage_of(*job) {
                    st.done += 1;
                    st.completion_tokens += completion_tokens;
                }
                if let Some(e) = self.endpoint_of(*job) {
                    e.done += 1;
                    e.completion_tokens += completion_tokens;
                }
                self.completion_tokens += completion_tokens;
                self.in_flight.remove(job);
            }
            Event::Failed { job, .. } => {
                self.failed += 1;
                if let Some(st) = self.stage_of(*job) {
                    st.failed += 1;
                }
                if let Some(e) = self.endpoint_of(*job) {
                    e.errors += 1;
                }
                self.in_flight.remove(job);
            }
            Event::Abandoned { job } => {
                self.in_flight.remove(job);
            }
            Event::EndpointDown { endpoint, since, next_try, error, .. } => {
                if let Some(e) = self.endpoints.get_mut(*endpoint) {
                    e.down = Some((*since, *next_try, error.clone()));
                }
                self.track_pause();
            }
            Event::EndpointUp { endpoint, .. } => {
                if let Some(e) = self.endpoints.get_mut(*endpoint) {
                    e.down = None;
                }
                self.track_pause();
            }
            Event::Endpoint { endpoint, until } => {
                if let Some(e) = self.endpoints.get_mut(*endpoint) {
                    e.set_aside = *until;
                }
            }
            Event::Stopping { signal, deadline, .. } => self.stopping = Some((signal.clone(), *deadline)),
            Event::End => {}
        }
    }

    /// Rows of the batch that are in the dataset: done before, or by this run.
    pub fn done_total(&self) -> u64 {
        self.already_done + self.done
    }

    /// Requests of the batch that this run has yet to finish.
    pub fn left(&self) -> u64 {
        self.total.saturating_sub(self.done_total() + self.failed + self.skipped_failed)
    }

    pub fn rows_per_sec(&self) -> f64 {
        let secs = self.active_secs();
        if secs > 0.0 { (self.done + self.failed) as f64 / secs } else { 0.0 }
    }

    /// Tokens per second: streamed pieces when they are shown, else the finished records' tokens.
    pub fn tokens_per_sec(&self) -> f64 {
        let secs = self.active_secs();
        let n = if self.streamed_chunks > 0 { self.streamed_chunks } else { self.completion_tokens };
        if secs > 0.0 { n as f64 / secs } else { 0.0 }
    }

    /// Every endpoint is down: the run is paused.
    pub fn paused(&self) -> bool {
        !self.endpoints.is_empty() && self.endpoints.iter().all(|e| e.down.is_some())
    }

    /// Why a request that waits for a slot waits: every server down, every server set aside, or
    /// just busy.
    fn slot_wait(&self) -> &'static str {
        if self.paused() {
            "server down, waiting"
        } else if !self.endpoints.is_empty() && self.endpoints.iter().all(|e| e.down.is_some() || e.set_aside.is_some()) {
            "server set aside, waiting"
        } else {
            "waiting for a free server slot"
        }
    }

    /// Time left: the pace so far over what is left, and never less than the longest wait a
    /// request in flight was told to sit out (a server's `Retry-After`). None before the first
    /// row finishes, or while the run is paused.
    pub fn eta(&self) -> Option<Duration> {
        // A multi-stage run's total is not known before the whole input is in.
        if self.paused() || (!self.stages.is_empty() && !self.input_read) {
            return None;
        }
        let now = Instant::now();
        let wait = self
            .in_flight
            .values()
            .filter_map(|f| match &f.phase {
                Phase::RetryWait { until, .. } => Some(until.saturating_duration_since(now)),
                _ => None,
            })
            .max()
            .filter(|w| !w.is_zero());
        let rate = self.rows_per_sec();
        let pace = (rate > 0.0 && self.done + self.failed > 0).then(|| Duration::from_secs_f64(self.left() as f64 / rate));
        match (pace, wait) {
            (Some(p), Some(w)) => Some(p.max(w)),
            (p, w) => p.or(w.filter(|_| self.left() > 0)),
        }
    }

    /// One line per server when there are several: its share, speed and health.
    pub fn endpoint_lines(&self) -> Vec<String> {
        if self.endpoints.len() < 2 {
            return Vec::new();
        }
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        self.endpoints
            .iter()
            .map(|e| {
                let tokens = if self.streamed_chunks > 0 { e.chunks } else { e.completion_tokens };
                let health = match (&e.down, e.set_aside) {
                    (Some((since, next, _)), _) => format!(" · DOWN since {}, next try in {}", clock(*since), short_duration(next.saturating_duration_since(Instant::now()))),
                    (None, Some(until)) => format!(" · SET ASIDE (failing), back in {}", short_duration(until.saturating_duration_since(Instant::now()))),
                    (None, None) => String::new(),
                };
                format!("{}: {} done · {:.1} tok/s · {} errors{health}", e.url, e.done, tokens as f64 / secs, e.errors)
            })
            .collect()
    }

    /// Servers that are down, as the display and plain lines say it:
    /// `server down since 02:14:07 (3m05s), next try in 30s`.
    pub fn outage_lines(&self) -> Vec<String> {
        let several = self.endpoints.len() > 1;
        self.endpoints
            .iter()
            .filter_map(|e| {
                if let (None, Some(until)) = (&e.down, e.set_aside) {
                    let who = if several { e.url.as_str() } else { "server" };
                    return Some(format!(
                        "{who} set aside, back in {}: it keeps failing (5xx to row after row)",
                        short_duration(until.saturating_duration_since(Instant::now()))
                    ));
                }
                let (since, next, _) = e.down.as_ref()?;
                let down_for = SystemTime::now().duration_since(*since).unwrap_or_default();
                let who = if several { format!("{} down", e.url) } else { "server down".to_owned() };
                Some(format!(
                    "{who} since {} ({}), next try in {}{}",
                    clock(*since),
                    short_duration(down_for),
                    short_duration(next.saturating_duration_since(Instant::now())),
                    if self.paused() { "; the run is paused" } else { "" }
                ))
            })
            .collect()
    }

    /// What a stop in progress waits for, or None.
    pub fn stopping_line(&self) -> Option<String> {
        let (_, deadline) = self.stopping.as_ref()?;
        let n = self.in_flight.len();
        let left = deadline.saturating_duration_since(Instant::now());
        Some(format!(
            "stopping: waiting for {n} request{} (≤{}), Ctrl-C again to abort",
            if n == 1 { "" } else { "s" },
            format_duration(left)
        ))
    }

    /// `19/40 done, 1 failed` (with `(480 from earlier runs)` on a resumed batch): the same
    /// numbers on the bar and in the plain lines.
    pub fn counts(&self, with_earlier: bool) -> String {
        let mut s = format!("{}/{} done", self.done_total(), self.total);
        if with_earlier && self.already_done > 0 {
            s.push_str(&format!(" ({} from earlier runs)", self.already_done));
        }
        let failed = self.failed + self.skipped_failed;
        if failed > 0 {
            s.push_str(&format!(", {failed} failed"));
        }
        s
    }

    fn eta_text(&self) -> String {
        match self.eta() {
            Some(d) => format_duration(d),
            None if self.paused() => "paused".into(),
            None => "?".into(),
        }
    }

    /// One line for logs and non-terminal output: counts, rates, ETA.
    pub fn summary_line(&self) -> String {
        format!(
            "{}, {} in flight, {:.2} {}/s, {:.1} tok/s, ETA {}",
            self.counts(true),
            self.in_flight.len(),
            self.rows_per_sec(),
            if self.stages.is_empty() { "rows" } else { "requests" },
            self.tokens_per_sec(),
            self.eta_text()
        )
    }

    /// The terminal display for a `cols` x `rows` screen: the overall line, outages or the stop
    /// in progress, one line per server when there are several, and one per request in flight
    /// (as many as fit). Every line is narrower than the screen, so nothing wraps.
    pub fn frame(&self, cols: usize, rows: usize, tick: u64) -> Vec<String> {
        let width = cols.saturating_sub(1).max(20);
        let mut lines = vec![self.overall_line(width, tick)];
        match self.stopping_line() {
            Some(s) => lines.push(fit(&s, width)),
            None => lines.extend(self.outage_lines().iter().map(|l| fit(l, width))),
        }
        lines.extend(self.stage_lines().iter().map(|l| fit(&format!("  ▸ {l}"), width)));
        // A multi-stage run with one server per stage: the stage lines say it all.
        if self.stages.is_empty() || self.endpoints.len() > self.stages.len() {
            lines.extend(self.endpoint_lines().iter().map(|l| fit(&format!("  ⇄ {l}"), width)));
        }
        let room = rows.saturating_sub(lines.len() + 1).max(1);
        let n = self.in_flight.len();
        let show = if n > room { room.saturating_sub(1) } else { n };
        let slot_wait = self.slot_wait();
        for f in self.in_flight.values().take(show) {
            lines.push(request_line(f, width, slot_wait));
        }
        if show < n {
            lines.push(fit(&format!("  … and {} more in flight", n - show), width));
        }
        lines
    }

    /// `⠋ 12:04 [=====>     ] 512/1000 done (480 from earlier runs), 1 failed · 3 in flight · 21 tok/s · ETA 3m05s`,
    /// its less needed parts dropped to fit `width`; the counts and the ETA always stay.
    fn overall_line(&self, width: usize, tick: u64) -> String {
        const SPIN: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
        let spin = if self.paused() { '‖' } else { SPIN[(tick % 10) as usize] };
        let elapsed = format_duration(self.started.elapsed());
        let eta = format!("ETA {}", self.eta_text());
        let rate = format!("{:.1} tok/s", self.tokens_per_sec());
        let flight = format!("{} in flight", self.in_flight.len());
        let ratio = if self.total > 0 { self.done_total() as f64 / self.total as f64 } else { 0.0 };
        // Most wanted first; drop from the end of this list until it fits.
        for (earlier, with_rate, with_flight, bar) in [
            (true, true, true, 24),
            (true, true, false, 16),
            (false, true, false, 16),
            (false, true, false, 10),
            (false, false, false, 10),
            (false, false, false, 0),
        ] {
            let mut parts = vec![self.counts(earlier)];
            if with_flight {
                parts.push(flight.clone());
            }
            if with_rate {
                parts.push(rate.clone());
            }
            parts.push(eta.clone());
            let bar_text = if bar > 0 { format!(" [{}]", bar_of(ratio, bar)) } else { String::new() };
            let line = format!("{spin} {elapsed}{bar_text} {}", parts.join(" · "));
            if console::measure_text_width(&line) <= width {
                return line;
            }
        }
        fit(&format!("{spin} {} · {eta}", self.counts(false)), width)
    }
}

impl Default for ProgressView {
    fn default() -> Self {
        ProgressView::new()
    }
}

fn bar_of(ratio: f64, width: usize) -> String {
    let filled = ((ratio.clamp(0.0, 1.0) * width as f64) as usize).min(width);
    let mut s = "=".repeat(filled);
    if filled < width {
        s.push('>');
        s.push_str(&" ".repeat(width - filled - 1));
    }
    s
}

/// `  row 12  streaming 143 tok 21 tok/s │ newest text…`, `  row 7  retry 2/4 in 8s: 503 …`.
/// `slot_wait` says what a request that waits for a slot waits for.
fn request_line(f: &InFlight, width: usize, slot_wait: &str) -> String {
    let secs = f.since.elapsed();
    let waiting_for_slot = match &f.phase {
        Phase::Queued => true,
        Phase::RetryWait { until, .. } => *until <= Instant::now(),
        _ => false,
    };
    let state = match &f.phase {
        Phase::Queued => slot_wait.to_owned(),
        _ if waiting_for_slot => slot_wait.to_owned(),
        Phase::Sent => format!("queued on server {}", short_duration(secs)),
        Phase::PromptEval => format!("prompt eval {}", short_duration(secs)),
        Phase::Streaming => {
            let rate = f.chunks as f64 / secs.as_secs_f64().max(0.5);
            format!("{} {} tok {:.0} tok/s", if f.thinking { "thinking" } else { "streaming" }, f.chunks, rate)
        }
        Phase::RetryWait { until, attempt, of, error } => format!(
            "retry {}/{} in {}: {}",
            attempt,
            of,
            short_duration(until.saturating_duration_since(Instant::now())),
            one_line(error)
        ),
        Phase::ServerDown => "server down, waiting".to_owned(),
        Phase::ReAsk { n, of, error } => format!("re-ask {n}/{of}: {}", one_line(error)),
    };
    let head = format!("  {}  {state}", f.label);
    let head = fit(&head, width);
    let used = console::measure_text_width(&head);
    if f.phase == Phase::Streaming && !f.tail.is_empty() && used + 4 < width {
        // The newest text is what shows the request is alive: keep the end of the tail.
        format!("{head} │ {}", fit_end(&f.tail, width - used - 3))
    } else {
        head
    }
}

/// An error message on one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The start of `s` that fits in `cols` columns, with `…` when cut.
fn fit(s: &str, cols: usize) -> String {
    console::truncate_str(s, cols, "…").into_owned()
}

/// Appends streamed text to a one-line tail: whitespace runs become one space, and only the last
/// `TAIL_CHARS` characters are kept.
fn push_tail(tail: &mut String, text: &str) {
    for c in text.chars() {
        // Joiners and variation selectors render differently from one terminal to the next, and a
        // line that comes out wider than measured tears the display: the glimpse goes without them.
        if matches!(c, '\u{200b}'..='\u{200f}' | '\u{fe00}'..='\u{fe0f}') {
            continue;
        }
        let c = if c.is_whitespace() || c.is_control() { ' ' } else { c };
        if c == ' ' && (tail.is_empty() || tail.ends_with(' ')) {
            continue;
        }
        tail.push(c);
    }
    let n = tail.chars().count();
    if n > TAIL_CHARS * 2 {
        let cut: usize = tail.char_indices().nth(n - TAIL_CHARS).map(|(i, _)| i).unwrap_or(0);
        tail.drain(..cut);
    }
}

/// The longest end of `s` that fits in `cols` terminal columns (wide characters count twice).
pub fn fit_end(s: &str, cols: usize) -> &str {
    let mut used = 0;
    let mut start = s.len();
    for (i, c) in s.char_indices().rev() {
        let w = console::measure_text_width(&s[i..i + c.len_utf8()]);
        if used + w > cols {
            break;
        }
        used += w;
        start = i;
    }
    &s[start..]
}

/// Hours, minutes and seconds of a duration.
fn hms(d: Duration) -> (u64, u64, u64) {
    let s = d.as_secs();
    (s / 3600, s / 60 % 60, s % 60)
}

/// `1h02m03s`, `4m05s`, `6s`.
pub fn format_duration(d: Duration) -> String {
    match hms(d) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

/// `3 m 12 s`, `45 s`, `2 h 05 m`: for messages people read.
pub fn short_duration(d: Duration) -> String {
    match hms(d) {
        (0, 0, s) => format!("{s} s"),
        (0, m, s) => format!("{m} m {s:02} s"),
        (h, m, _) => format!("{h} h {m:02} m"),
    }
}

/// A wall-clock time of day in the machine's local time, as `02:14:07`.
pub fn clock(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let local = secs + local_offset_secs(secs);
    let day = local.rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", day / 3600, day / 60 % 60, day % 60)
}

/// The local UTC offset at `unix` seconds (from the C library's time zone rules; 0 if unknown).
fn local_offset_secs(unix: i64) -> i64 {
    let t: libc::time_t = unix as libc::time_t;
    // SAFETY: localtime_r writes only into the zeroed `tm` we own; both pointers are valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if ok { tm.tm_gmtoff as i64 } else { 0 }
}

/// Where progress events go. Token events are made only when a live display shows them.
#[derive(Clone)]
pub struct Progress {
    pub tx: tokio::sync::mpsc::UnboundedSender<Event>,
    /// Whether a live display shows text: only then are `Event::Token`s made.
    pub tokens: bool,
    /// Whether a live view in the browser shows prompts (carried by `Event::Begin`).
    pub prompts: bool,
}

impl Progress {
    pub fn send(&self, ev: Event) {
        let _ = self.tx.send(ev);
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DisplayMode {
    /// Bars on a terminal, plain lines otherwise.
    Auto,
    /// Live bars with one line per request in flight.
    Bars,
    /// A plain progress line every few seconds.
    Plain,
    /// Nothing but the final summary.
    None,
}

impl DisplayMode {
    pub fn resolve(self) -> DisplayMode {
        match self {
            DisplayMode::Auto if std::io::stderr().is_terminal() => DisplayMode::Bars,
            DisplayMode::Auto => DisplayMode::Plain,
            m => m,
        }
    }

    /// Whether token events are worth producing: only a live display shows them.
    pub fn wants_tokens(self) -> bool {
        self == DisplayMode::Bars
    }
}

/// Consumes events until [`Event::End`] (or the channel closes); returns the final view.
/// With a live `hub` (`--serve`), every event feeds it too, and it publishes ten times a second.
pub async fn run_display(mut rx: mpsc::UnboundedReceiver<Event>, mode: DisplayMode, plain_every: Duration, hub: Option<std::sync::Arc<crate::live::LiveHub>>) -> ProgressView {
    let mut view = ProgressView::new();
    let mut live_clock = tokio::time::interval(Duration::from_millis(100));
    live_clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut screen = (mode == DisplayMode::Bars).then(Screen::new);
    let tick = match mode {
        DisplayMode::Bars => Duration::from_millis(1000 / REDRAW_HZ),
        _ => plain_every,
    };
    let mut clock = tokio::time::interval(tick);
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    clock.tick().await;
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                None | Some(Event::End) => break,
                Some(ev) => {
                    view.apply(&ev);
                    if let Some(h) = &hub {
                        h.apply(&ev, &view);
                    }
                    if let Some(line) = notice(&ev, &view) {
                        match &mut screen {
                            Some(s) => s.print_above(&line, &view),
                            None if mode == DisplayMode::Plain => eprintln!("{line}"),
                            None => {}
                        }
                    }
                }
            },
            _ = live_clock.tick(), if hub.is_some() => {
                if let Some(h) = &hub {
                    h.flush(&view);
                }
            }
            _ = clock.tick() => match &mut screen {
                Some(s) => s.draw(&view),
                None if mode == DisplayMode::Plain && view.total > 0 => {
                    eprintln!("[{}] {}", format_duration(view.started.elapsed()), view.summary_line());
                    for line in view.stage_lines() {
                        eprintln!("    {line}");
                    }
                    for line in view.outage_lines().iter().filter(|_| view.endpoints.len() < 2) {
                        eprintln!("    {line}");
                    }
                    for line in view.endpoint_lines() {
                        eprintln!("    {line}");
                    }
                }
                None => {}
            },
        }
    }
    if let Some(s) = screen {
        s.clear();
    }
    if let Some(h) = &hub {
        h.flush(&view);
    }
    let _ = std::io::stderr().flush();
    view
}

/// A line worth keeping in the scrollback (printed above the live display, or as a plain line).
fn notice(ev: &Event, view: &ProgressView) -> Option<String> {
    let url = |e: &usize| view.endpoints.get(*e).map(|v| v.url.clone()).unwrap_or_default();
    match ev {
        Event::Failed { label, error, .. } => Some(format!("failed: {label}: {error}")),
        // An event for the scrollback, not the state the live line keeps up to date: a count
        // printed once would look stale above the bars.
        // Requests only waiting (for a slot, a retry, the server) are given up, not waited for.
        Event::Stopping { signal, grace, .. } => {
            let n = view.in_flight.values().filter(|f| matches!(f.phase, Phase::Sent | Phase::PromptEval | Phase::Streaming)).count();
            Some(format!(
                "stopping ({signal} at {}): no new requests; waiting up to {} for the {n} in flight, Ctrl-C again to abort",
                clock(SystemTime::now()),
                format_duration(*grace)
            ))
        }
        Event::EndpointDown { endpoint, since, error, first: true, .. } => Some(format!(
            "{} since {}: {}; requests wait for it, spending no retries",
            if view.endpoints.len() > 1 { format!("{} down", url(endpoint)) } else { "server down".to_owned() },
            clock(*since),
            one_line(error),
        )),
        Event::EndpointUp { endpoint, after } => Some(if view.endpoints.len() > 1 {
            format!("{} back after {}", url(endpoint), short_duration(*after))
        } else {
            format!("server back after {}", short_duration(*after))
        }),
        Event::Endpoint { endpoint, until: Some(until) } => Some(format!(
            "set aside for {}, it keeps failing: {}",
            short_duration(until.saturating_duration_since(Instant::now())),
            url(endpoint)
        )),
        _ => None,
    }
}

/// The live terminal display: a frame of lines redrawn in place at the bottom of the screen.
/// Each redraw moves up over the last frame, clears to the end of the screen and writes the new
/// one, every line shorter than the screen is wide; so a `^C` echoed by the terminal, or a
/// resize, never leaves a stale line behind.
struct Screen {
    term: console::Term,
    height: usize,
    last: Vec<String>,
    tick: u64,
}

impl Screen {
    fn new() -> Screen {
        Screen { term: console::Term::stderr(), height: 0, last: Vec::new(), tick: 0 }
    }

    fn size(&self) -> (usize, usize) {
        let (rows, cols) = self.term.size();
        (usize::from(cols).max(20), usize::from(rows).max(4))
    }

    fn draw(&mut self, view: &ProgressView) {
        self.tick += 1;
        let (cols, rows) = self.size();
        let lines = view.frame(cols, rows, self.tick);
        if lines == self.last {
            return;
        }
        let mut out = self.erase();
        for l in &lines {
            out.push_str(l);
            out.push('\n');
        }
        self.height = lines.len();
        self.last = lines;
        let _ = self.term.write_str(&out);
        let _ = self.term.flush();
    }

    /// Moves up over the last frame and clears from there down.
    fn erase(&mut self) -> String {
        let mut out = String::new();
        if self.height > 0 {
            out.push_str(&format!("\r\x1b[{}A", self.height));
        }
        out.push_str("\r\x1b[J");
        self.height = 0;
        self.last.clear();
        out
    }

    fn print_above(&mut self, line: &str, view: &ProgressView) {
        let mut out = self.erase();
        out.push_str(line);
        out.push('\n');
        let _ = self.term.write_str(&out);
        self.draw(view);
    }

    fn clear(mut self) {
        let out = self.erase();
        let _ = self.term.write_str(&out);
        let _ = self.term.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(total: u64, already: u64, endpoints: usize) -> ProgressView {
        let mut v = ProgressView::new();
        let urls = (0..endpoints).map(|i| format!("http://127.0.0.1:{}", 8000 + i)).collect();
        v.apply(&Event::Started { total, already_done: already, skipped_failed: 0, endpoints: urls });
        v
    }

    #[test]
    fn view_follows_events() {
        let mut v = started(3, 0, 2);
        v.apply(&Event::Begin { job: 1, label: "row 1".into(), stage: 0, prompt: None });
        assert_eq!(v.in_flight[&1].phase, Phase::Queued);
        v.apply(&Event::Attempt { job: 1, endpoint: 1 });
        assert_eq!(v.in_flight[&1].phase, Phase::Sent);
        v.apply(&Event::Responding { job: 1 });
        assert_eq!(v.in_flight[&1].phase, Phase::PromptEval);
        v.apply(&Event::Token { job: 1, text: "Hello\n\n world".into(), thinking: false });
        assert_eq!(v.in_flight[&1].tail, "Hello world");
        assert_eq!(v.in_flight[&1].phase, Phase::Streaming);
        v.apply(&Event::Retry { job: 1, attempt: 1, of: 5, error: "boom".into(), delay: Duration::from_secs(8) });
        assert_eq!(v.in_flight[&1].attempt, 2);
        assert!(v.in_flight[&1].tail.is_empty());
        assert!(v.eta().is_some_and(|d| d > Duration::from_secs(6)), "a retry wait counts in the ETA");
        v.apply(&Event::Done { job: 1, completion_tokens: 7 });
        assert_eq!((v.done, v.completion_tokens, v.in_flight.len()), (1, 7, 0));
        assert_eq!((v.endpoints[1].done, v.endpoints[1].errors, v.endpoints[1].chunks), (1, 1, 1));
        assert_eq!(v.endpoints[0].done, 0);
        assert_eq!(v.endpoint_lines().len(), 2);
    }

    #[test]
    fn counts_cover_the_whole_batch_and_keep_failures_beside() {
        let mut v = started(1000, 480, 1);
        for job in 0..33 {
            v.apply(&Event::Begin { job, label: format!("row {job}"), stage: 0, prompt: None });
            v.apply(&Event::Done { job, completion_tokens: 1 });
        }
        v.apply(&Event::Begin { job: 99, label: "row 99".into(), stage: 0, prompt: None });
        v.apply(&Event::Failed { job: 99, label: "row 99".into(), error: "x".into() });
        assert_eq!(v.counts(true), "513/1000 done (480 from earlier runs), 1 failed");
        assert!(v.summary_line().starts_with("513/1000 done (480 from earlier runs), 1 failed, 0 in flight"));
        assert_eq!(v.left(), 1000 - 513 - 1);
    }

    #[test]
    fn frames_fit_the_screen_and_keep_the_eta() {
        let mut v = started(40, 0, 1);
        for job in 0..30 {
            v.apply(&Event::Begin { job, label: format!("row {job}"), stage: 0, prompt: None });
            v.apply(&Event::Attempt { job, endpoint: 0 });
        }
        for job in 0..5 {
            v.apply(&Event::Token { job, text: "日本語のテキスト 🎉 and a long answer that goes on and on ".repeat(4), thinking: false });
        }
        v.apply(&Event::Retry { job: 6, attempt: 2, of: 5, error: "HTTP 503: server busy,\nplease try again".into(), delay: Duration::from_secs(8) });
        v.apply(&Event::Done { job: 29, completion_tokens: 10 });
        for (cols, rows) in [(80, 24), (200, 50), (40, 10)] {
            let frame = v.frame(cols, rows, 3);
            assert!(frame.len() < rows, "{cols}x{rows}: {} lines", frame.len());
            for l in &frame {
                assert!(console::measure_text_width(l) < cols, "{cols}: {l:?} is {} wide", console::measure_text_width(l));
            }
            assert!(frame[0].contains("1/40 done") && frame[0].contains("ETA"), "{:?}", frame[0]);
            assert!(frame.iter().any(|l| l.contains("more in flight")) || rows >= 50, "{frame:?}");
        }
        let wide = v.frame(200, 50, 0);
        assert!(wide.iter().any(|l| l.contains("retry 2/5 in") && l.contains("503: server busy, please")), "{wide:#?}");
        assert!(wide.iter().any(|l| l.contains("queued on server")), "{wide:#?}");
        assert!(wide.iter().any(|l| l.contains("streaming") && l.contains("│")), "{wide:#?}");
    }

    #[test]
    fn an_outage_is_told_with_its_start_and_next_try() {
        let mut v = started(10, 0, 1);
        let since = SystemTime::UNIX_EPOCH + Duration::from_secs(2 * 3600 + 14 * 60 + 7);
        v.apply(&Event::EndpointDown { endpoint: 0, since, next_try: Instant::now() + Duration::from_secs(30), error: "refused".into(), first: true });
        assert!(v.paused() && v.eta().is_none());
        let l = &v.outage_lines()[0];
        assert!(l.starts_with("server down since 02:14:07 ("), "{l}");
        assert!(l.contains("next try in 29 s") || l.contains("next try in 30 s"), "{l}");
        assert!(v.frame(80, 24, 0)[0].contains("ETA paused"));
        v.apply(&Event::EndpointUp { endpoint: 0, after: Duration::from_secs(192) });
        assert!(v.outage_lines().is_empty() && !v.paused());
    }

    #[test]
    fn tail_stays_short_and_on_char_boundaries() {
        let mut t = String::new();
        for _ in 0..1000 {
            push_tail(&mut t, "日本🎉 ");
        }
        assert!(t.chars().count() <= TAIL_CHARS * 2);
    }

    #[test]
    fn fit_end_keeps_the_newest_text() {
        assert_eq!(fit_end("hello world", 5), "world");
        assert_eq!(fit_end("日本語", 4), "本語");
        assert_eq!(fit_end("abc", 10), "abc");
        assert_eq!(fit_end("abc", 0), "");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_duration(Duration::from_secs(65)), "1m05s");
        assert_eq!(format_duration(Duration::from_secs(3723)), "1h02m03s");
        assert_eq!(short_duration(Duration::from_secs(192)), "3 m 12 s");
        assert_eq!(short_duration(Duration::from_secs(30)), "30 s");
    }
}
