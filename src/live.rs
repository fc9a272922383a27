//! The live view in the browser (`--serve`): the progress events that drive the terminal display
//! also feed a [`LiveHub`], which keeps what a page shows (counts, the requests in flight with
//! their whole text so far, the last finished rows, failures, a tokens/s series) and publishes
//! it as batches of changes at most ten times a second. A page gets a snapshot when it connects,
//! then the batches over Server-Sent Events. Batches go through a bounded broadcast channel: a
//! slow or stalled page never slows the run or grows memory; one that falls behind gets a fresh
//! snapshot instead of the backlog.
//!
//! The server ([`serve`]) has fixed routes only, is read-only, sends a Content-Security-Policy
//! that allows scripts from itself alone, and asks for a token on every request when one is set
//! (any bind address but loopback). The page builds its DOM with `textContent`: model text is
//! data, never markup.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::progress::{format_duration, Event, JobId, Phase, ProgressView};
pub use crate::web::{ServeOptions, Server};
use crate::web::page;

/// Finished rows and failures a page can list.
const KEEP_FINISHED: usize = 50;
const KEEP_FAILURES: usize = 50;
/// Points of the tokens/s chart (one a second; older ones are thinned out).
const MAX_RATE_POINTS: usize = 600;
/// Batches a page may fall behind before it gets a fresh snapshot instead.
const BACKLOG: usize = 64;

/// A request in flight, as a page shows it.
#[derive(Debug, Clone, Serialize)]
struct LiveJob {
    label: String,
    stage: usize,
    phase: String,
    attempt: u32,
    prompt: Option<String>,
    text: String,
    thinking: String,
}

/// A finished request (or a failed one), for the lists.
#[derive(Debug, Clone, Serialize)]
struct LiveRow {
    label: String,
    prompt: Option<String>,
    response: String,
    thinking: String,
    tokens: u64,
    at: String,
}

#[derive(Debug, Clone, Serialize)]
struct LiveFailure {
    label: String,
    error: String,
    at: String,
}

/// Text appended to a request in flight since the last batch.
#[derive(Debug, Default, Clone, Serialize)]
struct Append {
    #[serde(skip_serializing_if = "String::is_empty")]
    text: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    thinking: String,
}

#[derive(Default)]
struct State {
    seq: u64,
    jobs: BTreeMap<JobId, LiveJob>,
    finished: VecDeque<LiveRow>,
    failures: VecDeque<LiveFailure>,
    rates: Vec<(f64, f64)>,
    status: Value,
    ended: Option<Value>,
    // Changes since the last batch.
    started: Vec<JobId>,
    appended: BTreeMap<JobId, Append>,
    phases: BTreeMap<JobId, (String, u32)>,
    gone: Vec<JobId>,
    new_finished: Vec<LiveRow>,
    new_failures: Vec<LiveFailure>,
    new_rates: Vec<(f64, f64)>,
    dirty: bool,
}

/// What pages are fed from. Cheap to share; all its work is done by the display task.
pub struct LiveHub {
    state: Mutex<State>,
    tx: broadcast::Sender<(u64, Arc<str>)>,
    name: String,
    started: Instant,
    last_rate: Mutex<Instant>,
}

fn phase_text(p: &Phase) -> String {
    match p {
        Phase::Queued => "waiting for a slot".into(),
        Phase::Sent => "sent".into(),
        Phase::PromptEval => "reading the prompt".into(),
        Phase::Streaming => "streaming".into(),
        Phase::RetryWait { attempt, of, error, .. } => format!("retry {attempt}/{of} after: {error}"),
        Phase::ServerDown => "waiting for the server".into(),
        Phase::ReAsk { n, of, error } => format!("re-ask {n}/{of}: {error}"),
    }
}

fn now() -> String {
    crate::record::now_rfc3339()
}

impl LiveHub {
    pub fn new(name: &str) -> Arc<LiveHub> {
        let (tx, _) = broadcast::channel(BACKLOG);
        Arc::new(LiveHub {
            state: Mutex::new(State::default()),
            tx,
            name: name.to_owned(),
            started: Instant::now(),
            last_rate: Mutex::new(Instant::now()),
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut st)
    }

    /// One progress event (after `view` applied it).
    pub fn apply(&self, ev: &Event, view: &ProgressView) {
        self.with(|st| {
            let phase_of = |job: JobId| view.in_flight.get(&job).map(|f| (phase_text(&f.phase), f.attempt));
            match ev {
                Event::Begin { job, label, stage, prompt } => {
                    st.jobs.insert(*job, LiveJob { label: label.clone(), stage: *stage, phase: phase_text(&Phase::Queued), attempt: 1, prompt: prompt.clone(), text: String::new(), thinking: String::new() });
                    st.started.push(*job);
                }
                Event::Token { job, text, thinking } => {
                    if let Some(j) = st.jobs.get_mut(job) {
                        let a = st.appended.entry(*job).or_default();
                        if *thinking {
                            j.thinking.push_str(text);
                            a.thinking.push_str(text);
                        } else {
                            j.text.push_str(text);
                            a.text.push_str(text);
                        }
                        if j.phase != "streaming" {
                            j.phase = "streaming".into();
                            st.phases.insert(*job, ("streaming".into(), j.attempt));
                        }
                    }
                }
                // A new attempt (or a wait before one) starts its text afresh; the first answer
                // of the server only changes the phase.
                Event::Attempt { job, .. } | Event::Retry { job, .. } | Event::ReAsk { job, .. } | Event::ServerWait { job } | Event::Responding { job } => {
                    let Some((phase, attempt)) = phase_of(*job) else { return };
                    let fresh = !matches!(ev, Event::Responding { .. });
                    if let Some(j) = st.jobs.get_mut(job) {
                        if fresh {
                            j.text.clear();
                            j.thinking.clear();
                        }
                        j.phase = phase.clone();
                        j.attempt = attempt;
                    }
                    if fresh {
                        st.appended.remove(job);
                        // Sent whole in the next batch, its text replaced: a phase alone would
                        // not say the text restarted when several phases share one batch (a
                        // re-ask answered within 100 ms).
                        if st.jobs.contains_key(job) && !st.started.contains(job) {
                            st.started.push(*job);
                        }
                    }
                    st.phases.insert(*job, (phase, attempt));
                }
                Event::Done { job, completion_tokens } => {
                    if let Some(j) = st.jobs.remove(job) {
                        let row = LiveRow { label: j.label, prompt: j.prompt, response: j.text, thinking: j.thinking, tokens: *completion_tokens, at: now() };
                        st.finished.push_back(row.clone());
                        if st.finished.len() > KEEP_FINISHED {
                            st.finished.pop_front();
                        }
                        st.new_finished.push(row);
                        st.gone.push(*job);
                    }
                }
                Event::Failed { job, label, error } => {
                    st.jobs.remove(job);
                    let f = LiveFailure { label: label.clone(), error: error.clone(), at: now() };
                    st.failures.push_back(f.clone());
                    if st.failures.len() > KEEP_FAILURES {
                        st.failures.pop_front();
                    }
                    st.new_failures.push(f);
                    st.gone.push(*job);
                }
                Event::Abandoned { job } => {
                    st.jobs.remove(job);
                    st.gone.push(*job);
                }
                _ => {}
            }
            st.dirty = true;
        });
    }

    /// The run's figures as a page shows them.
    fn status(&self, view: &ProgressView) -> Value {
        let failed = view.failed + view.skipped_failed;
        json!({
            "name": self.name,
            "elapsed": format_duration(view.started.elapsed()),
            "done": view.done_total(),
            "total": view.total,
            "already_done": view.already_done,
            "failed": failed,
            "in_flight": view.in_flight.len(),
            "tokens_per_sec": (view.tokens_per_sec() * 10.0).round() / 10.0,
            "eta": view.eta().map(format_duration),
            "paused": view.paused(),
            "stages": view.stage_lines(),
            "servers": view.endpoint_lines(),
            "alerts": view.stopping_line().into_iter().chain(view.outage_lines()).collect::<Vec<_>>(),
        })
    }

    /// Publishes what changed since the last call (called ten times a second by the display).
    pub fn flush(&self, view: &ProgressView) {
        let rate_due = {
            let mut last = self.last_rate.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.elapsed() >= Duration::from_secs(1);
            if due {
                *last = Instant::now();
            }
            due
        };
        let status = self.status(view);
        let batch = self.with(|st| {
            if rate_due {
                let point = ((self.started.elapsed().as_secs_f64() * 10.0).round() / 10.0, (view.tokens_per_sec() * 10.0).round() / 10.0);
                st.rates.push(point);
                if st.rates.len() > MAX_RATE_POINTS {
                    // Thin out the older half: every other point.
                    let half = st.rates.len() / 2;
                    let older: Vec<(f64, f64)> = st.rates[..half].iter().step_by(2).copied().collect();
                    st.rates.splice(..half, older);
                }
                st.new_rates.push(point);
                st.dirty = true;
            }
            let status_changed = st.status != status;
            if !st.dirty && !status_changed {
                return None;
            }
            st.status = status.clone();
            st.seq += 1;
            // A job new in this batch comes whole: what it streamed so far is in it, not appended.
            let new_ids: Vec<JobId> = st.started.drain(..).collect();
            let started: Vec<Value> = new_ids.iter().filter_map(|id| st.jobs.get(id).map(|j| json!({"id": id, "job": j}))).collect();
            for id in &new_ids {
                st.appended.remove(id);
            }
            let appended: BTreeMap<String, Append> = std::mem::take(&mut st.appended).into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            let phases: BTreeMap<String, Value> = std::mem::take(&mut st.phases).into_iter().map(|(k, (p, a))| (k.to_string(), json!({"phase": p, "attempt": a}))).collect();
            let batch = json!({
                "seq": st.seq,
                "status": status,
                "started": started,
                "appended": appended,
                "phases": phases,
                "gone": std::mem::take(&mut st.gone),
                "finished": std::mem::take(&mut st.new_finished),
                "failures": std::mem::take(&mut st.new_failures),
                "rates": std::mem::take(&mut st.new_rates),
                "ended": st.ended,
            });
            st.dirty = false;
            Some(batch)
        });
        if let Some(b) = batch {
            // No page listening is fine.
            let seq = b["seq"].as_u64().unwrap_or(0);
            let _ = self.tx.send((seq, Arc::from(b.to_string())));
        }
    }

    /// The run is over: its status (`completed`, `interrupted`, ...), exit code and summary.
    pub fn end(&self, view: Option<&ProgressView>, status: &str, exit_code: u8, summary: Vec<String>) {
        self.with(|st| {
            st.ended = Some(json!({"status": status, "exit_code": exit_code, "summary": summary}));
            st.dirty = true;
        });
        let empty = ProgressView::new();
        self.flush(view.unwrap_or(&empty));
    }

    /// Everything a page needs to start, and the batch number it is current with: the state as
    /// of that batch. What changed since comes in the next batch, so it is left out here (text
    /// streamed since, a request not yet announced, rows finished since), or the page would
    /// show it twice.
    pub fn snapshot(&self) -> (u64, String) {
        self.with(|st| {
            let before = |s: &str, since: Option<&str>| since.and_then(|a| s.strip_suffix(a)).unwrap_or(s).to_owned();
            let jobs: Vec<Value> = st
                .jobs
                .iter()
                .filter(|(id, _)| !st.started.contains(id))
                .map(|(id, j)| {
                    let a = st.appended.get(id);
                    let job = LiveJob { text: before(&j.text, a.map(|a| a.text.as_str())), thinking: before(&j.thinking, a.map(|a| a.thinking.as_str())), ..j.clone() };
                    json!({"id": id, "job": job})
                })
                .collect();
            let v = json!({
                "seq": st.seq,
                "status": st.status,
                "jobs": jobs,
                "finished": st.finished.iter().take(st.finished.len().saturating_sub(st.new_finished.len())).collect::<Vec<_>>(),
                "failures": st.failures.iter().take(st.failures.len().saturating_sub(st.new_failures.len())).collect::<Vec<_>>(),
                "rates": &st.rates[..st.rates.len().saturating_sub(st.new_rates.len())],
                "ended": st.ended,
            });
            (st.seq, v.to_string())
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<(u64, Arc<str>)> {
        self.tx.subscribe()
    }
}

/// Binds `opts.addr` and serves the live view of `hub` (see [`crate::web::serve`]).
pub async fn serve(opts: &ServeOptions, hub: Arc<LiveHub>) -> anyhow::Result<Server> {
    crate::web::serve(opts, "--serve", router(hub)).await
}

fn router(hub: Arc<LiveHub>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/", get(|| async { page("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/app.js", get(|| async { page("text/javascript; charset=utf-8", APP_JS) }))
        .route("/app.css", get(|| async { page("text/css; charset=utf-8", APP_CSS) }))
        .route("/api/snapshot", get({
            let hub = hub.clone();
            move || async move { page("application/json", hub.snapshot().1) }
        }))
        .route("/api/events", get(move || events(hub.clone())))
}

const INDEX_HTML: &str = include_str!("live/index.html");
const APP_JS: &str = include_str!("live/app.js");
pub(crate) const APP_CSS: &str = include_str!("live/app.css");

/// The event stream: a snapshot, then the batches after it; a page that fell behind gets a
/// fresh snapshot. Nothing is read from the hub while the page does not read: a stalled page
/// only falls behind.
async fn events(hub: Arc<LiveHub>) -> axum::response::Response {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    use axum::response::IntoResponse;
    let rx = hub.subscribe();
    let (seq, first) = hub.snapshot();
    let stream = futures::stream::unfold((rx, hub, seq, Some(first)), |(mut rx, hub, mut seq, first)| async move {
        if let Some(f) = first {
            return Some((Ok::<_, std::convert::Infallible>(SseEvent::default().event("snapshot").data(f)), (rx, hub, seq, None)));
        }
        loop {
            match rx.recv().await {
                Ok((n, _)) if n <= seq => continue,
                Ok((n, batch)) => {
                    seq = n;
                    return Some((Ok(SseEvent::default().event("batch").data(batch.as_ref())), (rx, hub, seq, None)));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let (s, snap) = hub.snapshot();
                    return Some((Ok(SseEvent::default().event("snapshot").data(snap)), (rx, hub, s, None)));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies `ev` as the display task does: the view first, then the hub.
    fn send(hub: &LiveHub, view: &mut ProgressView, ev: Event) {
        view.apply(&ev);
        hub.apply(&ev, view);
    }

    fn token(job: JobId, text: &str) -> Event {
        Event::Token { job, text: text.into(), thinking: false }
    }

    fn begin(job: JobId) -> Event {
        Event::Begin { job, label: format!("row {job}"), stage: 0, prompt: None }
    }

    fn json(s: &str) -> Value {
        serde_json::from_str(s).expect("json")
    }

    #[test]
    fn a_snapshot_holds_what_its_batch_said_and_the_next_batch_adds_the_rest_once() {
        let hub = LiveHub::new("t");
        let mut view = ProgressView::new();
        let mut rx = hub.subscribe();
        for ev in [begin(1), token(1, "Répon"), begin(2)] {
            send(&hub, &mut view, ev);
        }
        hub.flush(&view);
        rx.try_recv().expect("the first batch");
        // Since that batch: more text, a new request, a finished one.
        for ev in [token(1, "se à «"), begin(3), token(3, "Hi"), Event::Done { job: 2, completion_tokens: 0 }] {
            send(&hub, &mut view, ev);
        }

        let (seq, snap) = hub.snapshot();
        let snap = json(&snap);
        assert_eq!(snap["seq"], seq);
        let jobs = snap["jobs"].as_array().expect("jobs");
        // Request 1 as the batch left it; not 3 (the next batch starts it); 2 is gone (the next
        // batch lists it finished).
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        assert_eq!(jobs[0]["job"]["text"], "Répon", "the text as of the batch");
        assert_eq!(snap["finished"].as_array().map(Vec::len), Some(0), "row 2 finished after it");

        hub.flush(&view);
        let (next, batch) = rx.try_recv().expect("the next batch");
        assert_eq!(next, seq + 1);
        let batch = json(&batch);
        assert_eq!(format!("{}{}", jobs[0]["job"]["text"].as_str().unwrap_or_default(), batch["appended"]["1"]["text"].as_str().unwrap_or_default()), "Réponse à «");
        assert_eq!(batch["started"][0]["job"]["text"], "Hi", "request 3 comes whole");
        assert_eq!(batch["gone"], json!([2]));
        assert_eq!(batch["finished"][0]["label"], "row 2");
        // And a page that connects now sees it all, once.
        let now = json(&hub.snapshot().1);
        assert_eq!(now["jobs"].as_array().map(|j| j.iter().map(|j| j["job"]["text"].clone()).collect::<Vec<_>>()), Some(vec![json!("Réponse à «"), json!("Hi")]));
        assert_eq!(now["finished"][0]["label"], "row 2");
    }

    #[test]
    fn a_request_asked_again_comes_whole_with_its_new_text() {
        let hub = LiveHub::new("t");
        let mut view = ProgressView::new();
        let mut rx = hub.subscribe();
        for ev in [begin(1), Event::Attempt { job: 1, endpoint: 0 }, token(1, "{\"bad\": 1}")] {
            send(&hub, &mut view, ev);
        }
        hub.flush(&view);
        rx.try_recv().expect("the first batch");
        // A re-ask answered at once: its phases share one batch, the last one "streaming".
        for ev in [Event::ReAsk { job: 1, n: 1, of: 2, error: "not valid".into() }, Event::Attempt { job: 1, endpoint: 0 }, Event::Responding { job: 1 }, token(1, "{\"good\": 2}")] {
            send(&hub, &mut view, ev);
        }
        hub.flush(&view);
        let batch = json(&rx.try_recv().expect("the next batch").1);
        assert_eq!(batch["started"][0]["job"]["text"], "{\"good\": 2}", "the text replaced: {batch}");
        assert!(batch["appended"].get("1").is_none(), "and not appended to the old one: {batch}");
    }
}
