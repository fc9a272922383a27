//! The live view (`--serve`) at the HTTP level: the snapshot and the event stream (token deltas
//! in order, adding up to the stored responses), the token off loopback, fixed routes only, a busy
//! address, and a page that connects and never reads.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fake_ollama::{FakeOllama, Options};
use crate::util::{read_jsonl, spawn_until_line, wait_for, write_questions, ConfigBuilder, Dir};

/// Starts a run with `--serve ADDR`; returns it, the URL it printed and its later stderr lines.
fn start(dir: &Dir, serve: &str) -> (Child, String, mpsc::Receiver<String>) {
    spawn_until_line(dir, &["--config", "run.toml", "--progress", "none", "--serve", serve], "live view: ")
}

/// host:port and the token of a printed URL.
pub(crate) fn parts(url: &str) -> (String, Option<String>) {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, query) = rest.split_once('/').expect("path");
    (host.to_owned(), query.strip_prefix("?token=").map(str::to_owned))
}

/// A plain HTTP/1.0 request: status and body (read to the end).
pub(crate) fn get(host: &str, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(host).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").expect("write");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|b| b.1.to_owned()).unwrap_or_default();
    (status, body)
}

/// The event stream, read until the run's last word (or the connection's end): (event, data).
fn read_events(host: &str, path: &str) -> Vec<(String, Value)> {
    let mut s = TcpStream::connect(host).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").expect("write");
    let mut r = BufReader::new(s);
    let mut events = Vec::new();
    let (mut name, mut data) = (String::new(), String::new());
    let mut line = String::new();
    while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        let l = line.trim_end_matches(['\r', '\n']).to_owned();
        line.clear();
        if let Some(v) = l.strip_prefix("event: ").or_else(|| l.strip_prefix("event:")) {
            name = v.to_owned();
        } else if let Some(v) = l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")) {
            data.push_str(v);
        } else if l.is_empty() && !data.is_empty() {
            let v: Value = serde_json::from_str(&data).expect("event data is JSON");
            let ended = v["ended"].is_object();
            events.push((std::mem::take(&mut name), v));
            data.clear();
            if ended {
                break;
            }
        }
    }
    events
}

/// What a page makes of an event stream: each request's text (snapshot, then the deltas in
/// order), its label, and the finished rows (label, response).
struct Replay {
    text: HashMap<String, String>,
    label: HashMap<String, String>,
    finished: Vec<(String, String)>,
}

fn replay(events: &[(String, Value)]) -> Replay {
    let mut r = Replay { text: HashMap::new(), label: HashMap::new(), finished: Vec::new() };
    let mut last_seq = 0;
    for (name, v) in events {
        let seq = v["seq"].as_u64().unwrap_or(0);
        assert!(seq > last_seq || name == "snapshot", "batches in order");
        last_seq = seq;
        let (jobs, appended) = if name == "snapshot" { (&v["jobs"], &Value::Null) } else { (&v["started"], &v["appended"]) };
        for j in jobs.as_array().into_iter().flatten() {
            let id = j["id"].to_string();
            r.text.insert(id.clone(), j["job"]["text"].as_str().unwrap_or_default().to_owned());
            r.label.insert(id, j["job"]["label"].as_str().unwrap_or_default().to_owned());
        }
        for (id, a) in appended.as_object().into_iter().flatten() {
            r.text.entry(id.clone()).or_default().push_str(a["text"].as_str().unwrap_or_default());
        }
        // The snapshot's finished rows: those before the page connected.
        for row in v["finished"].as_array().into_iter().flatten() {
            r.finished.push((row["label"].as_str().unwrap_or_default().to_owned(), row["response"].as_str().unwrap_or_default().to_owned()));
        }
    }
    r
}

#[test]
fn the_event_stream_adds_up_to_the_stored_responses() {
    // Slow enough that the first page connects before the first row finishes, even on a busy
    // machine; a second page connects while requests stream.
    let fake = FakeOllama::start(Options { token_delay: Duration::from_millis(10), ..Default::default() });
    let dir = Dir::new();
    write_questions(&dir, &["Pourquoi le ciel est-il bleu ? 日本", "<img src=x onerror=alert(1)></script>", "Why?", "Wie?", "Comment ?", "Perché?"]);
    dir.write("run.toml", ConfigBuilder::new(&fake.url()).toml());
    let (mut child, url, _stderr) = start(&dir, "127.0.0.1:0");
    let (host, token) = parts(&url);
    assert!(token.is_none(), "no token on loopback");
    let first = {
        let host = host.clone();
        std::thread::spawn(move || read_events(&host, "/api/events"))
    };
    wait_for("a request", Duration::from_secs(30), || !fake.generations().is_empty());
    std::thread::sleep(Duration::from_millis(150));
    let late = read_events(&host, "/api/events");
    let events = first.join().expect("the first page");
    assert_eq!(child.wait().ok().and_then(|s| s.code()), Some(0));

    assert_eq!(events.first().map(|e| e.0.as_str()), Some("snapshot"), "a snapshot first");
    let last = &events.last().expect("events").1;
    assert_eq!(last["ended"]["status"], "completed");
    assert_eq!(last["ended"]["exit_code"], 0);
    assert!(last["ended"]["summary"].as_array().is_some_and(|s| !s.is_empty()));

    let records = read_jsonl(&dir.join("out/dataset.jsonl"));
    let stored: HashMap<String, String> = records.iter().map(|r| (format!("row {}", r["id"].as_str().unwrap_or_default()), r["response"].as_str().unwrap_or_default().to_owned())).collect();
    let mut mid_stream = 0;
    for (page, events) in [("first", &events), ("second", &late)] {
        let r = replay(events);
        assert_eq!(r.finished.len(), 6, "{page} page: every finished row in the feed, once (in the snapshot or a batch after it)");
        for (l, response) in &r.finished {
            assert_eq!(stored.get(l), Some(response), "{page} page, {l}: the feed's finished text is the stored one");
        }
        // The text of each request seen streaming adds up to its stored response, whether the
        // page saw it from its start or from the middle (snapshot, then deltas).
        let mut checked = 0;
        for (id, t) in &r.text {
            if let Some(want) = r.label.get(id).and_then(|l| stored.get(l)) {
                assert_eq!(t, want, "{page} page, {}: the text adds up to the stored response", r.label[id]);
                checked += 1;
            }
        }
        assert!(checked >= 3, "{page} page: most requests were seen streaming ({checked})");
        if page == "second" {
            mid_stream = events[0].1["jobs"].as_array().map_or(0, |j| j.iter().filter(|j| j["job"]["text"].as_str().is_some_and(|t| !t.is_empty())).count());
        }
    }
    eprintln!("the second page connected with {mid_stream} requests part-way through their text");
}

#[test]
fn off_loopback_every_request_needs_the_token_which_is_never_written() {
    let fake = FakeOllama::start(Options { token_delay: Duration::from_millis(40), ..Default::default() });
    let dir = Dir::new();
    write_questions(&dir, &["a?", "b?", "c?", "d?"]);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 1\n".into();
    dir.write("run.toml", cfg.toml());
    let (mut child, url, _stderr) = start(&dir, "0.0.0.0:0");
    let (host, token) = parts(&url);
    let token = token.expect("a token off loopback");
    assert_eq!(token.len(), 32);
    let port = host.rsplit(':').next().unwrap_or_default();
    let local = format!("127.0.0.1:{port}");
    for path in ["/", "/api/snapshot", "/api/events"] {
        assert_eq!(get(&local, "GET", path).0, 401, "{path} without the token");
        assert_eq!(get(&local, "GET", &format!("{path}?token=nope")).0, 401, "{path} with a wrong token");
    }
    // The page's own script and style (no data in them) load without it: a <script> cannot send it.
    assert_eq!(get(&local, "GET", "/app.js").0, 200);
    assert_eq!(get(&local, "GET", "/app.css").0, 200);
    let (status, body) = get(&local, "GET", &format!("/api/snapshot?token={token}"));
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<Value>(&body).is_ok());
    crate::util::wait_for("the run's log", Duration::from_secs(20), || dir.join("out/run.log").exists());
    std::thread::sleep(Duration::from_millis(200));
    let _ = child.kill();
    let _ = child.wait();
    for f in ["out/run.log", "out/manifest.json"] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        assert!(!text.contains(&token), "{f} never holds the token");
    }
    assert!(dir.read("out/run.log").contains("live view"), "the log has the URL, without its token");
}

#[test]
fn only_the_fixed_routes_answer_with_the_security_headers() {
    let fake = FakeOllama::start(Options { token_delay: Duration::from_millis(40), ..Default::default() });
    let dir = Dir::new();
    write_questions(&dir, &["a?", "b?", "c?"]);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 1\n".into();
    dir.write("run.toml", cfg.toml());
    let (mut child, url, _stderr) = start(&dir, "127.0.0.1:0");
    let (host, _) = parts(&url);
    for path in ["/etc/passwd", "/../Cargo.toml", "/api/snapshot/../../run.toml", "/api", "/out/dataset.jsonl"] {
        assert_eq!(get(&host, "GET", path).0, 404, "{path}");
    }
    assert_eq!(get(&host, "POST", "/api/snapshot").0, 405, "read-only");
    let mut s = TcpStream::connect(&host).expect("connect");
    write!(s, "GET / HTTP/1.0\r\nHost: {host}\r\n\r\n").expect("write");
    let mut page = String::new();
    let _ = s.read_to_string(&mut page);
    let head = page.split("\r\n\r\n").next().unwrap_or_default().to_lowercase();
    assert!(head.contains("content-security-policy: default-src 'none'; script-src 'self'"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"));
    assert!(!page.contains("innerHTML") && get(&host, "GET", "/app.js").1.contains("textContent") && !get(&host, "GET", "/app.js").1.contains("innerHTML"));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_busy_address_is_an_error_before_any_request() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_questions(&dir, &["a?"]);
    dir.write("run.toml", ConfigBuilder::new(&fake.url()).toml());
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr").to_string();
    dir.run(&["--config", "run.toml", "--serve", &addr], &[]).expect_code(1).expect_stderr(&format!("--serve {addr}: cannot listen there"));
    assert!(fake.generations().is_empty(), "no request");
}

#[test]
fn a_page_that_never_reads_does_not_hold_the_run() {
    let fake = FakeOllama::start(Options { token_delay: Duration::from_millis(1), ..Default::default() });
    let dir = Dir::new();
    let qs: Vec<String> = (0..40).map(|i| format!("question {i} {}", "x".repeat(200))).collect();
    write_questions(&dir, &qs.iter().map(String::as_str).collect::<Vec<_>>());
    dir.write("run.toml", ConfigBuilder::new(&fake.url()).toml());
    let (mut child, url, _stderr) = start(&dir, "127.0.0.1:0");
    let (host, _) = parts(&url);
    // Connects, asks for the stream, never reads a byte.
    let mut stalled = TcpStream::connect(&host).expect("connect");
    write!(stalled, "GET /api/events HTTP/1.0\r\nHost: {host}\r\n\r\n").expect("write");
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            assert_eq!(status.code(), Some(0));
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the run finished despite the stalled page");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(read_jsonl(&dir.join("out/dataset.jsonl")).len(), 40);
    drop(stalled);
}
