//! Several servers at once, and servers that go away for a while.
//!
//! Each attempt takes a slot on the usable endpoint with the most free capacity. An endpoint can
//! be out of rotation in two ways:
//! - **down**: trouble that says the server is gone (no connection, no answer, 502/503/504) was
//!   confirmed by a probe (the startup check) that failed too. It stays out until a probe
//!   answers; the pipeline runs those probes with backoff. Requests that hit it wait for any
//!   endpoint to be up again without spending their retries; when every endpoint is down the
//!   whole run pauses, for at most `run.outage_wait_secs`.
//! - **set aside**: it answers, but keeps failing: several attempts in a row (with two or more
//!   endpoints), or a 5xx to every request of several different rows in a row (any number). It
//!   is left alone for a while (10 s, doubling up to 2 min), then tried again.
//!
//! An endpoint's outage starts at the first trouble after its last answered request, so a server
//! that flaps (answers a probe, fails the next request) keeps its original "down since".

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;

/// Consecutive failed attempts that set an endpoint aside (with two or more endpoints).
pub const FAILURES_TO_BENCH: u32 = 3;
/// Different rows in a row that got a 5xx answer: the server is sick, not the rows.
pub const ROWS_WITH_5XX_TO_BENCH: usize = 3;
const FIRST_BENCH: Duration = Duration::from_secs(10);
const MAX_BENCH: Duration = Duration::from_secs(120);

/// When an outage began, on both clocks: `at` for durations, `wall` for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since {
    pub at: Instant,
    pub wall: SystemTime,
}

impl Since {
    pub fn now() -> Since {
        Since { at: Instant::now(), wall: SystemTime::now() }
    }
}

#[derive(Debug, Clone)]
struct State {
    capacity: usize,
    in_flight: usize,
    failures_in_a_row: u32,
    benched_until: Option<Instant>,
    benched_times: u32,
    /// Confirmed down: out of rotation until a probe answers.
    down: bool,
    /// The first trouble since the last answered request.
    trouble_since: Option<Since>,
    /// Rows (job ids) whose last attempts here all got a 5xx, newest last.
    rows_with_5xx: Vec<u64>,
}

impl State {
    fn usable(&self) -> bool {
        !self.down && self.benched_until.is_none()
    }
}

/// What a report changed, for the log and the display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    SetAside { endpoint: usize, for_: Duration },
    Back { endpoint: usize },
}

pub struct EndpointPool {
    state: Mutex<Vec<State>>,
    freed: Notify,
}

/// A slot taken on an endpoint, given back when dropped.
pub struct Slot<'a> {
    pool: &'a EndpointPool,
    pub endpoint: usize,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Ok(mut st) = self.pool.state.lock() {
            if let Some(s) = st.get_mut(self.endpoint) {
                s.in_flight = s.in_flight.saturating_sub(1);
            }
        }
        self.pool.freed.notify_waiters();
    }
}

/// How an attempt on an endpoint went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The server answered (a 2xx and a reply); whatever came after is the row's business.
    Answered,
    /// A failure that says something about the server (connection, 5xx, broken stream).
    ServerFailed { job: u64, status_5xx: bool },
    /// The request's own fault (4xx, bad reply): says nothing about the server.
    RowFailed,
}

impl EndpointPool {
    /// Endpoints with their capacities; `down` marks those that failed the startup check (they
    /// start out of rotation, to be probed).
    pub fn new(capacities: &[usize], down: &[bool]) -> EndpointPool {
        let state = capacities
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let down = down.get(i).copied().unwrap_or(false);
                State {
                    capacity: (*c).max(1),
                    in_flight: 0,
                    failures_in_a_row: 0,
                    benched_until: None,
                    benched_times: 0,
                    down,
                    trouble_since: down.then(Since::now),
                    rows_with_5xx: Vec::new(),
                }
            })
            .collect();
        EndpointPool { state: Mutex::new(state), freed: Notify::new() }
    }

    /// Takes a slot, waiting while every usable endpoint is full, set aside or down. `avoid` is
    /// the endpoint the request just failed on: another is preferred when one has room.
    pub async fn acquire(&self, avoid: Option<usize>) -> (Slot<'_>, Vec<Change>) {
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait = {
                let Ok(mut st) = self.state.lock() else { return (Slot { pool: self, endpoint: 0 }, Vec::new()) };
                let now = Instant::now();
                let mut changes = Vec::new();
                for (i, s) in st.iter_mut().enumerate() {
                    if s.benched_until.is_some_and(|t| t <= now) {
                        s.benched_until = None;
                        s.failures_in_a_row = 0;
                        s.rows_with_5xx.clear();
                        changes.push(Change::Back { endpoint: i });
                    }
                }
                let free = |s: &State| if s.usable() { s.capacity.saturating_sub(s.in_flight) } else { 0 };
                let pick = |skip: Option<usize>| {
                    st.iter()
                        .enumerate()
                        .filter(|(i, s)| Some(*i) != skip && free(s) > 0)
                        // Most free capacity, relative to size; ties go to the first listed.
                        .max_by(|(ia, a), (ib, b)| {
                            let fa = free(a) as f64 / a.capacity as f64;
                            let fb = free(b) as f64 / b.capacity as f64;
                            fa.partial_cmp(&fb).unwrap_or(std::cmp::Ordering::Equal).then(ib.cmp(ia))
                        })
                        .map(|(i, _)| i)
                };
                if let Some(i) = pick(avoid).or_else(|| pick(None)) {
                    st[i].in_flight += 1;
                    return (Slot { pool: self, endpoint: i }, changes);
                }
                // Nothing free: wait for a slot, a probe that answers, or a bench that ends.
                st.iter().filter_map(|s| s.benched_until).min().map(|t| t.saturating_duration_since(now))
            };
            match wait {
                Some(d) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep(d) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// The outcome of an attempt on an endpoint.
    pub fn report(&self, endpoint: usize, outcome: Outcome) -> Option<Change> {
        let mut st = self.state.lock().ok()?;
        let single = st.len() == 1;
        let s = st.get_mut(endpoint)?;
        let (job, status_5xx) = match outcome {
            Outcome::Answered => {
                s.failures_in_a_row = 0;
                s.benched_times = 0;
                s.trouble_since = None;
                s.rows_with_5xx.clear();
                return None;
            }
            Outcome::RowFailed => {
                s.rows_with_5xx.clear();
                return None;
            }
            Outcome::ServerFailed { job, status_5xx } => (job, status_5xx),
        };
        s.trouble_since.get_or_insert_with(Since::now);
        s.failures_in_a_row += 1;
        if status_5xx {
            s.rows_with_5xx.retain(|j| *j != job);
            s.rows_with_5xx.push(job);
        } else {
            s.rows_with_5xx.clear();
        }
        let sick = s.rows_with_5xx.len() >= ROWS_WITH_5XX_TO_BENCH;
        let keeps_failing = !single && s.failures_in_a_row >= FAILURES_TO_BENCH;
        if !(sick || keeps_failing) || s.benched_until.is_some() || s.down {
            return None;
        }
        let for_ = (FIRST_BENCH * 2u32.saturating_pow(s.benched_times.min(8))).min(MAX_BENCH);
        s.benched_times += 1;
        s.benched_until = Some(Instant::now() + for_);
        s.rows_with_5xx.clear();
        drop(st);
        self.freed.notify_waiters();
        Some(Change::SetAside { endpoint, for_ })
    }

    /// A probe confirmed the endpoint is gone: out of rotation until [`EndpointPool::mark_up`].
    /// Returns when its trouble began, and whether this call took it down.
    pub fn mark_down(&self, endpoint: usize) -> Option<(Since, bool)> {
        let mut st = self.state.lock().ok()?;
        let s = st.get_mut(endpoint)?;
        let since = *s.trouble_since.get_or_insert_with(Since::now);
        let newly = !s.down;
        s.down = true;
        Some((since, newly))
    }

    /// A probe answered: back in rotation. Returns how long it was down, if it was.
    pub fn mark_up(&self, endpoint: usize) -> Option<Duration> {
        let out = {
            let mut st = self.state.lock().ok()?;
            let s = st.get_mut(endpoint)?;
            if !s.down {
                return None;
            }
            s.down = false;
            s.failures_in_a_row = 0;
            // `trouble_since` stays until a request is answered: a flapping server keeps its start.
            s.trouble_since.map(|t| t.at.elapsed()).unwrap_or_default()
        };
        self.freed.notify_waiters();
        Some(out)
    }

    pub fn is_down(&self, endpoint: usize) -> bool {
        self.state.lock().ok().and_then(|st| st.get(endpoint).map(|s| s.down)).unwrap_or(false)
    }

    /// When every endpoint is down: since when the last of them has been (the run is paused).
    pub fn all_down_since(&self) -> Option<Since> {
        let st = self.state.lock().ok()?;
        if st.is_empty() || !st.iter().all(|s| s.down) {
            return None;
        }
        st.iter().filter_map(|s| s.trouble_since).max_by_key(|s| s.at)
    }

    /// When an endpoint's current trouble began, if it has any.
    pub fn trouble_since(&self, endpoint: usize) -> Option<Since> {
        self.state.lock().ok()?.get(endpoint)?.trouble_since
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAIL: Outcome = Outcome::ServerFailed { job: 1, status_5xx: false };

    #[tokio::test]
    async fn most_free_capacity_first_and_avoid() {
        let pool = EndpointPool::new(&[2, 4], &[]);
        let (a, _) = pool.acquire(None).await;
        assert_eq!(a.endpoint, 0, "both fully free: the first listed");
        let (b, _) = pool.acquire(None).await;
        assert_eq!(b.endpoint, 1, "0 is half full, 1 is empty");
        let (c, _) = pool.acquire(Some(1)).await;
        assert_eq!(c.endpoint, 0, "avoid 1 when 0 has room");
        let (d, _) = pool.acquire(Some(0)).await;
        assert_eq!(d.endpoint, 1);
        drop((a, b, c, d));
    }

    #[tokio::test]
    async fn failing_endpoint_is_set_aside() {
        let pool = EndpointPool::new(&[1, 1], &[]);
        assert_eq!(pool.report(0, FAIL), None);
        assert_eq!(pool.report(0, FAIL), None);
        assert!(matches!(pool.report(0, FAIL), Some(Change::SetAside { endpoint: 0, .. })));
        for _ in 0..3 {
            let (s, _) = pool.acquire(None).await;
            assert_eq!(s.endpoint, 1, "only the healthy endpoint is used");
        }
        // A success resets the count.
        assert_eq!(pool.report(1, FAIL), None);
        assert_eq!(pool.report(1, Outcome::Answered), None);
        assert_eq!(pool.report(1, FAIL), None);
    }

    #[tokio::test]
    async fn a_single_endpoint_is_not_set_aside_for_failures_of_one_row() {
        let pool = EndpointPool::new(&[1], &[]);
        for _ in 0..10 {
            assert_eq!(pool.report(0, Outcome::ServerFailed { job: 7, status_5xx: true }), None);
        }
        let (s, _) = pool.acquire(None).await;
        assert_eq!(s.endpoint, 0);
    }

    #[tokio::test]
    async fn five_hundreds_across_rows_set_even_a_single_endpoint_aside() {
        let pool = EndpointPool::new(&[1], &[]);
        assert_eq!(pool.report(0, Outcome::ServerFailed { job: 1, status_5xx: true }), None);
        assert_eq!(pool.report(0, Outcome::ServerFailed { job: 2, status_5xx: true }), None);
        assert!(matches!(pool.report(0, Outcome::ServerFailed { job: 3, status_5xx: true }), Some(Change::SetAside { .. })));
        // An answer in between resets it.
        let pool = EndpointPool::new(&[1], &[]);
        pool.report(0, Outcome::ServerFailed { job: 1, status_5xx: true });
        pool.report(0, Outcome::ServerFailed { job: 2, status_5xx: true });
        pool.report(0, Outcome::Answered);
        assert_eq!(pool.report(0, Outcome::ServerFailed { job: 3, status_5xx: true }), None);
    }

    #[tokio::test]
    async fn down_endpoints_wait_for_a_probe_and_keep_their_start() {
        let pool = std::sync::Arc::new(EndpointPool::new(&[1, 1], &[]));
        pool.report(0, FAIL);
        let (since, newly) = pool.mark_down(0).unwrap();
        assert!(newly);
        assert_eq!(pool.all_down_since(), None, "endpoint 1 is up");
        pool.mark_down(1);
        assert!(pool.all_down_since().is_some());
        let p = pool.clone();
        let waiter = tokio::spawn(async move { p.acquire(None).await.0.endpoint });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "every endpoint is down: requests wait");
        assert!(pool.mark_up(0).is_some());
        assert_eq!(tokio::time::timeout(Duration::from_secs(2), waiter).await.ok().and_then(Result::ok), Some(0));
        // Down again before any answer: the outage started where it did.
        assert_eq!(pool.mark_down(0).map(|(s, _)| s), Some(since));
        pool.mark_up(0);
        pool.report(0, Outcome::Answered);
        assert_eq!(pool.trouble_since(0), None);
    }

    #[tokio::test]
    async fn waits_for_a_free_slot() {
        let pool = std::sync::Arc::new(EndpointPool::new(&[1], &[]));
        let (s, _) = pool.acquire(None).await;
        let p = pool.clone();
        let waiter = tokio::spawn(async move { p.acquire(None).await.0.endpoint });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(s);
        assert_eq!(tokio::time::timeout(Duration::from_secs(2), waiter).await.ok().and_then(Result::ok), Some(0));
    }
}
