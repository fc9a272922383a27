//! Progress: the pipeline emits [`Event`]s; a display consumes them. The display keeps only a
//! view of the run ([`ProgressView`]) built from events, so another consumer (a browser view, a
//! test) can be fed the same stream. Redraws are paced by a clock, never one per token.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc;

pub type JobId = u64;

/// What happened in the run, as the pipeline saw it.
#[derive(Debug, Clone)]
pub enum Event {
    /// Requests this run will make, how many were already done before it, and the servers.
    Started { total: u64, already_done: u64, endpoints: Vec<String> },
    /// A request began (its first attempt).
    Begin { job: JobId, label: String },
    /// An attempt of a request went to an endpoint.
    Attempt { job: JobId, endpoint: usize },
    /// An endpoint was set aside after failing (`up: false`), or came back.
    Endpoint { endpoint: usize, up: bool },
    /// Streamed text arrived; `thinking` for reasoning text.
    Token { job: JobId, text: String, thinking: bool },
    /// An attempt failed and another follows after `delay`.
    Retry { job: JobId, attempt: u32, error: String, delay: Duration },
    /// The record is complete.
    Done { job: JobId, completion_tokens: u64 },
    /// The request failed for good.
    Failed { job: JobId, label: String, error: String },
    /// No new requests will start (Ctrl-C); those in flight may finish until `deadline`.
    Stopping { signal: String, deadline: Instant },
}

#[derive(Debug, Clone, Default)]
pub struct InFlight {
    pub label: String,
    /// The last characters streamed, for a one-line glimpse.
    pub tail: String,
    pub thinking: bool,
    pub attempt: u32,
    pub chunks: u64,
    pub last_error: Option<String>,
    pub endpoint: Option<usize>,
}

/// One server's share of the run.
#[derive(Debug, Clone, Default)]
pub struct EndpointView {
    pub url: String,
    pub done: u64,
    pub errors: u64,
    pub chunks: u64,
    pub completion_tokens: u64,
    pub set_aside: bool,
}

/// The run as events tell it.
#[derive(Debug, Clone)]
pub struct ProgressView {
    pub started: Instant,
    pub total: u64,
    pub already_done: u64,
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
}

const TAIL_CHARS: usize = 160;

impl ProgressView {
    pub fn new() -> ProgressView {
        ProgressView {
            started: Instant::now(),
            total: 0,
            already_done: 0,
            done: 0,
            failed: 0,
            streamed_chunks: 0,
            completion_tokens: 0,
            retries: 0,
            in_flight: BTreeMap::new(),
            stopping: None,
            endpoints: Vec::new(),
        }
    }

    fn endpoint_of(&mut self, job: JobId) -> Option<&mut EndpointView> {
        let e = self.in_flight.get(&job)?.endpoint?;
        self.endpoints.get_mut(e)
    }

    pub fn apply(&mut self, ev: &Event) {
        match ev {
            Event::Started { total, already_done, endpoints } => {
                self.total = *total;
                self.already_done = *already_done;
                self.started = Instant::now();
                self.endpoints = endpoints.iter().map(|u| EndpointView { url: u.clone(), ..Default::default() }).collect();
            }
            Event::Attempt { job, endpoint } => {
                if let Some(f) = self.in_flight.get_mut(job) {
                    f.endpoint = Some(*endpoint);
                }
            }
            Event::Endpoint { endpoint, up } => {
                if let Some(e) = self.endpoints.get_mut(*endpoint) {
                    e.set_aside = !up;
                }
            }
            Event::Begin { job, label } => {
                self.in_flight.insert(*job, InFlight { label: label.clone(), attempt: 1, ..Default::default() });
            }
            Event::Token { job, text, thinking } => {
                self.streamed_chunks += 1;
                if let Some(e) = self.endpoint_of(*job) {
                    e.chunks += 1;
                }
                if let Some(f) = self.in_flight.get_mut(job) {
                    f.chunks += 1;
                    if f.thinking != *thinking {
                        f.tail.clear();
                        f.thinking = *thinking;
                    }
                    push_tail(&mut f.tail, text);
                }
            }
            Event::Retry { job, attempt, error, .. } => {
                self.retries += 1;
                if let Some(e) = self.endpoint_of(*job) {
                    e.errors += 1;
                }
                if let Some(f) = self.in_flight.get_mut(job) {
                    f.attempt = attempt + 1;
                    f.tail.clear();
                    f.last_error = Some(error.clone());
                }
            }
            Event::Done { job, completion_tokens } => {
                self.done += 1;
                if let Some(e) = self.endpoint_of(*job) {
                    e.done += 1;
                    e.completion_tokens += completion_tokens;
                }
                self.completion_tokens += completion_tokens;
                self.in_flight.remove(job);
            }
            Event::Failed { job, .. } => {
                self.failed += 1;
                if let Some(e) = self.endpoint_of(*job) {
                    e.errors += 1;
                }
                self.in_flight.remove(job);
            }
            Event::Stopping { signal, deadline } => self.stopping = Some((signal.clone(), *deadline)),
        }
    }

    pub fn finished(&self) -> u64 {
        self.done + self.failed
    }

    pub fn rows_per_sec(&self) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        if secs > 0.0 { self.finished() as f64 / secs } else { 0.0 }
    }

    pub fn tokens_per_sec(&self) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        if secs > 0.0 { self.streamed_chunks as f64 / secs } else { 0.0 }
    }

    /// Time left at the pace so far; None before the first row finishes.
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.rows_per_sec();
        let left = self.total.saturating_sub(self.finished());
        (rate > 0.0 && self.finished() > 0).then(|| Duration::from_secs_f64(left as f64 / rate))
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
                format!(
                    "{}: {} done · {:.1} tok/s · {} errors{}",
                    e.url,
                    e.done,
                    e.chunks as f64 / secs,
                    e.errors,
                    if e.set_aside { " · SET ASIDE (failing)" } else { "" }
                )
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

    /// One line: counts, rates, ETA.
    pub fn summary_line(&self) -> String {
        let eta = match self.eta() {
            Some(d) => format_duration(d),
            None => "?".into(),
        };
        format!(
            "{}/{} done, {} failed, {} in flight, {:.2} rows/s, {:.1} tok/s, ETA {}",
            self.done,
            self.total,
            self.failed,
            self.in_flight.len(),
            self.rows_per_sec(),
            self.tokens_per_sec(),
            eta
        )
    }
}

impl Default for ProgressView {
    fn default() -> Self {
        ProgressView::new()
    }
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

/// `1h02m03s`, `4m05s`, `6s`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
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
}

/// Consumes events until the channel closes; returns the final view.
pub async fn run_display(mut rx: mpsc::UnboundedReceiver<Event>, mode: DisplayMode, plain_every: Duration) -> ProgressView {
    let mut view = ProgressView::new();
    let mut bars = (mode == DisplayMode::Bars).then(Bars::new);
    let tick = match mode {
        DisplayMode::Bars => Duration::from_millis(100),
        _ => plain_every,
    };
    let mut clock = tokio::time::interval(tick);
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    clock.tick().await;
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => {
                    view.apply(&ev);
                    match (&mut bars, &ev) {
                        (Some(b), _) => b.on_event(&ev, &view),
                        (None, Event::Failed { label, error, .. }) if mode == DisplayMode::Plain => {
                            eprintln!("failed: {label}: {error}");
                        }
                        (None, Event::Stopping { .. }) if mode == DisplayMode::Plain => {
                            eprintln!("{}", view.stopping_line().unwrap_or_default());
                        }
                        _ => {}
                    }
                }
                None => break,
            },
            _ = clock.tick() => match &mut bars {
                Some(b) => b.redraw(&view),
                None if mode == DisplayMode::Plain && view.total > 0 => {
                    eprintln!("[{}] {}", format_duration(view.started.elapsed()), view.summary_line());
                    for line in view.endpoint_lines() {
                        eprintln!("    {line}");
                    }
                }
                None => {}
            },
        }
    }
    if let Some(b) = bars {
        b.clear();
    }
    let _ = std::io::stderr().flush();
    view
}

/// The terminal display: an overall bar and one line per request in flight.
struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    endpoint_lines: Vec<ProgressBar>,
    lines: BTreeMap<JobId, ProgressBar>,
    line_style: ProgressStyle,
}

impl Bars {
    fn new() -> Bars {
        let color = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        let overall_tpl = if color {
            "{spinner:.green} [{elapsed_precise}] [{bar:24.cyan/blue}] {pos}/{len} {wide_msg}"
        } else {
            "{spinner} [{elapsed_precise}] [{bar:24}] {pos}/{len} {wide_msg}"
        };
        let line_tpl = if color { "  {prefix:.bold.dim} {msg}" } else { "  {prefix} {msg}" };
        let overall = multi.add(ProgressBar::new(0));
        overall.set_style(
            ProgressStyle::with_template(overall_tpl).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "),
        );
        let line_style = ProgressStyle::with_template(line_tpl).unwrap_or_else(|_| ProgressStyle::default_spinner());
        Bars { multi, overall, endpoint_lines: Vec::new(), lines: BTreeMap::new(), line_style }
    }

    fn on_event(&mut self, ev: &Event, view: &ProgressView) {
        match ev {
            Event::Started { total, endpoints, .. } => {
                self.overall.set_length(*total);
                if endpoints.len() > 1 {
                    for _ in endpoints {
                        let bar = self.multi.insert_after(self.endpoint_lines.last().unwrap_or(&self.overall), ProgressBar::new_spinner());
                        bar.set_style(self.line_style.clone());
                        bar.set_prefix("⇄");
                        self.endpoint_lines.push(bar);
                    }
                }
            }
            Event::Begin { job, label } => {
                let bar = self.multi.add(ProgressBar::new_spinner());
                bar.set_style(self.line_style.clone());
                bar.set_prefix(label.clone());
                bar.set_message("waiting for the first token…");
                self.lines.insert(*job, bar);
            }
            Event::Done { job, .. } | Event::Failed { job, .. } => {
                if let Some(bar) = self.lines.remove(job) {
                    bar.finish_and_clear();
                    self.multi.remove(&bar);
                }
                self.overall.set_position(view.finished());
            }
            Event::Token { .. } | Event::Retry { .. } | Event::Stopping { .. } | Event::Attempt { .. } | Event::Endpoint { .. } => {}
        }
        if let Event::Failed { label, error, .. } = ev {
            let _ = self.multi.println(format!("failed: {label}: {error}"));
        }
    }

    fn redraw(&mut self, view: &ProgressView) {
        let cols = usize::from(console::Term::stderr().size().1).max(20);
        let eta = view.eta().map(format_duration).unwrap_or_else(|| "?".into());
        let msg = view.stopping_line().unwrap_or_else(|| {
            format!("failed {} · {:.2} rows/s · {:.1} tok/s · ETA {}", view.failed, view.rows_per_sec(), view.tokens_per_sec(), eta)
        });
        self.overall.set_message(msg);
        self.overall.tick();
        for (bar, line) in self.endpoint_lines.iter().zip(view.endpoint_lines()) {
            bar.set_message(line);
        }
        for (job, bar) in &self.lines {
            if let Some(f) = view.in_flight.get(job) {
                let mut m = String::new();
                if f.attempt > 1 {
                    m.push_str(&format!("(attempt {}) ", f.attempt));
                }
                if f.thinking {
                    m.push_str("thinking: ");
                }
                // The newest text is what shows the request is alive: keep the end of the tail.
                let room = cols.saturating_sub(6 + console::measure_text_width(&f.label) + console::measure_text_width(&m));
                if f.tail.is_empty() {
                    let note = match &f.last_error {
                        Some(e) if f.attempt > 1 => format!("retrying after: {e}"),
                        _ if f.endpoint.is_none() => "queued: waiting for a free server slot…".to_owned(),
                        _ => "waiting for the first token…".to_owned(),
                    };
                    m.push_str(&console::truncate_str(&note, room, "…"));
                } else {
                    m.push_str(fit_end(&f.tail, room));
                }
                bar.set_message(m);
            }
        }
    }

    fn clear(self) {
        for bar in self.lines.values().chain(&self.endpoint_lines) {
            bar.finish_and_clear();
        }
        self.overall.finish_and_clear();
        let _ = self.multi.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_follows_events() {
        let mut v = ProgressView::new();
        v.apply(&Event::Started { total: 3, already_done: 0, endpoints: vec!["a".into(), "b".into()] });
        v.apply(&Event::Begin { job: 1, label: "row 1".into() });
        v.apply(&Event::Attempt { job: 1, endpoint: 1 });
        v.apply(&Event::Token { job: 1, text: "Hello\n\n world".into(), thinking: false });
        assert_eq!(v.in_flight[&1].tail, "Hello world");
        v.apply(&Event::Retry { job: 1, attempt: 1, error: "boom".into(), delay: Duration::ZERO });
        assert_eq!(v.in_flight[&1].attempt, 2);
        assert!(v.in_flight[&1].tail.is_empty());
        v.apply(&Event::Done { job: 1, completion_tokens: 7 });
        assert_eq!((v.done, v.completion_tokens, v.in_flight.len()), (1, 7, 0));
        assert_eq!((v.endpoints[1].done, v.endpoints[1].errors, v.endpoints[1].chunks), (1, 1, 1));
        assert_eq!(v.endpoints[0].done, 0);
        assert_eq!(v.endpoint_lines().len(), 2);
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
    }
}
