//! Several servers at once: each attempt takes a slot on the usable endpoint with the most free
//! capacity. An endpoint that fails several attempts in a row is set aside for a while (longer
//! each time) and its requests are retried on the others; the run goes on while one works.
//! With a single endpoint nothing is ever set aside: retries and their backoff do the waiting.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Consecutive failed attempts that set an endpoint aside.
pub const FAILURES_TO_BENCH: u32 = 3;
const FIRST_BENCH: Duration = Duration::from_secs(10);
const MAX_BENCH: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
struct State {
    capacity: usize,
    in_flight: usize,
    failures_in_a_row: u32,
    benched_until: Option<Instant>,
    benched_times: u32,
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

impl EndpointPool {
    pub fn new(capacities: &[usize]) -> EndpointPool {
        let state = capacities
            .iter()
            .map(|c| State { capacity: (*c).max(1), in_flight: 0, failures_in_a_row: 0, benched_until: None, benched_times: 0 })
            .collect();
        EndpointPool { state: Mutex::new(state), freed: Notify::new() }
    }

    /// Takes a slot, waiting while every usable endpoint is full or set aside. `avoid` is the
    /// endpoint the request just failed on: another is preferred when one has room.
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
                        changes.push(Change::Back { endpoint: i });
                    }
                }
                let free = |s: &State| if s.benched_until.is_none() { s.capacity.saturating_sub(s.in_flight) } else { 0 };
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
                // Nothing free: wait for a slot, or for the first endpoint to come back.
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

    /// The outcome of an attempt on an endpoint. Only failures that say something about the
    /// server (connection, 5xx, broken stream) count; a bad request does not.
    pub fn report(&self, endpoint: usize, server_failed: bool) -> Option<Change> {
        let mut st = self.state.lock().ok()?;
        let single = st.len() == 1;
        let s = st.get_mut(endpoint)?;
        if !server_failed {
            s.failures_in_a_row = 0;
            s.benched_times = 0;
            return None;
        }
        s.failures_in_a_row += 1;
        if single || s.failures_in_a_row < FAILURES_TO_BENCH || s.benched_until.is_some() {
            return None;
        }
        let for_ = (FIRST_BENCH * 2u32.saturating_pow(s.benched_times.min(8))).min(MAX_BENCH);
        s.benched_times += 1;
        s.benched_until = Some(Instant::now() + for_);
        drop(st);
        self.freed.notify_waiters();
        Some(Change::SetAside { endpoint, for_ })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn most_free_capacity_first_and_avoid() {
        let pool = EndpointPool::new(&[2, 4]);
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
        let pool = EndpointPool::new(&[1, 1]);
        assert_eq!(pool.report(0, true), None);
        assert_eq!(pool.report(0, true), None);
        assert!(matches!(pool.report(0, true), Some(Change::SetAside { endpoint: 0, .. })));
        for _ in 0..3 {
            let (s, _) = pool.acquire(None).await;
            assert_eq!(s.endpoint, 1, "only the healthy endpoint is used");
        }
        // A success resets the count.
        assert_eq!(pool.report(1, true), None);
        assert_eq!(pool.report(1, false), None);
        assert_eq!(pool.report(1, true), None);
    }

    #[tokio::test]
    async fn a_single_endpoint_is_never_set_aside() {
        let pool = EndpointPool::new(&[1]);
        for _ in 0..10 {
            assert_eq!(pool.report(0, true), None);
        }
        let (s, _) = pool.acquire(None).await;
        assert_eq!(s.endpoint, 0);
    }

    #[tokio::test]
    async fn waits_for_a_free_slot() {
        let pool = std::sync::Arc::new(EndpointPool::new(&[1]));
        let (s, _) = pool.acquire(None).await;
        let p = pool.clone();
        let waiter = tokio::spawn(async move { p.acquire(None).await.0.endpoint });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(s);
        assert_eq!(tokio::time::timeout(Duration::from_secs(2), waiter).await.ok().and_then(Result::ok), Some(0));
    }
}
