//! The pages in a real browser: headless Chromium, driven over WebDriver (chromedriver). The live
//! view opens during a run against the fake, sees the requests in flight with their streamed
//! text, shows an `<img onerror>` payload as text without making an element of it, and sees the
//! end. `view` lists a finished dataset, finds a record typed into its search box, opens it, and
//! keeps all of that in a link that opens the same again.
//! Ignored by a plain `cargo test` (it needs Debian's `chromium` and `chromium-driver`);
//! `scripts/browser-test.sh` installs them when missing and runs it, and so does `.ci/run`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fake_ollama::{FakeOllama, Options};
use crate::util::{read_jsonl, spawn_until_line, write_questions, ConfigBuilder, Dir};

const PAYLOAD: &str = "<img src=x onerror=alert(1)></script> 日本語 🎉";

/// One WebDriver command over plain HTTP/1.1: the `value` of the answer.
fn wd(port: u16, method: &str, path: &str, body: Option<Value>) -> Value {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to chromedriver");
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).expect("write");
    // The answer's head, then exactly Content-Length bytes (chromedriver keeps the connection).
    let mut r = std::io::BufReader::new(s);
    let mut len = 0usize;
    let mut line = String::new();
    use std::io::BufRead;
    while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        line.clear();
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap_or_else(|e| panic!("chromedriver {method} {path}: {e}"));
    let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("chromedriver {method} {path}: {e}: {}", String::from_utf8_lossy(&body)));
    v["value"].clone()
}

struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn driver() -> Driver {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port");
    let child = Command::new("chromedriver").arg(format!("--port={port}")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("chromedriver (scripts/browser-test.sh installs it)");
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Driver { child, port }
}

/// A headless Chromium session: its id.
fn session(d: &Driver) -> String {
    let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
        "binary": "/usr/bin/chromium", "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"]}}}});
    let t = Instant::now();
    let session = wd(d.port, "POST", "/session", Some(caps));
    eprintln!("browser session in {:?}", t.elapsed());
    session["sessionId"].as_str().expect("a session").to_owned()
}

/// Saves what the browser shows to the test's temporary folder (`target/tmp/NAME`).
fn screenshot(d: &Driver, sid: &str, name: &str) {
    let shot = wd(d.port, "GET", &format!("/session/{sid}/screenshot"), None);
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&out, base64_decode(shot.as_str().unwrap_or_default())).expect("screenshot");
    eprintln!("screenshot: {}", out.display());
}

/// Runs a script in the page: its value.
fn exec(d: &Driver, sid: &str, script: &str) -> Value {
    wd(d.port, "POST", &format!("/session/{sid}/execute/sync"), Some(json!({"script": script, "args": []})))
}

/// Runs `script` in the page until it returns something true (or fails the test after `limit`).
fn wait_for(port: u16, sid: &str, what: &str, script: &str, limit: Duration) -> Value {
    let start = Instant::now();
    loop {
        let v = wd(port, "POST", &format!("/session/{sid}/execute/sync"), Some(json!({"script": script, "args": []})));
        if v.as_bool() == Some(true) || v.is_object() || v.as_array().is_some_and(|a| !a.is_empty()) {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what} (last: {v})");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "a real browser: run with scripts/browser-test.sh"]
fn the_live_page_shows_requests_streaming_and_model_text_as_text() {
    // Slow enough (~20 s in all) that the browser is up while requests stream.
    let fake = FakeOllama::start(Options { token_delay: Duration::from_millis(60), ..Default::default() });
    let dir = Dir::new();
    write_questions(&dir, &["Pourquoi le ciel est-il bleu ?", "Why is the sea salty?", PAYLOAD, "Wie hoch ist der Mount Everest?", "¿Por qué?", "为什么?"]);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 2\n".into();
    dir.write("run.toml", cfg.toml());
    // The browser first, so that none of the run passes while it starts.
    let d = driver();
    let sid = session(&d);
    let (mut run, url, _stderr) = spawn_until_line(&dir, &["--config", "run.toml", "--progress", "none", "--serve", "127.0.0.1:0"], "live view: ");
    let t = Instant::now();
    wd(d.port, "POST", &format!("/session/{sid}/url"), Some(json!({"url": url})));
    eprintln!("page loaded in {:?}", t.elapsed());

    // Requests in flight, their text streaming in.
    let flight = wait_for(d.port, &sid, "a request streaming", "const t = [...document.querySelectorAll('.job pre.text')].map(p => p.textContent).filter(t => t.length > 12); return t.length ? t : false;", Duration::from_secs(30));
    assert!(flight.as_array().is_some_and(|t| t.iter().any(|x| x.as_str().is_some_and(|s| s.starts_with("Réponse")))), "{flight}");
    screenshot(&d, &sid, "live-view.png");

    // The end, with the status; the payload is text, and no element came of it.
    let end = wait_for(d.port, &sid, "the end of the run", "return document.getElementById('state').textContent === 'ended' ? {ended: document.getElementById('ended').textContent} : false;", Duration::from_secs(60));
    assert!(end["ended"].as_str().is_some_and(|t| t.contains("Run ended: completed (exit 0)")), "{end}");
    let dom = wd(d.port, "POST", &format!("/session/{sid}/execute/sync"), Some(json!({"script":
        "document.querySelectorAll('#finished li').forEach(li => li.click()); return {imgs: document.querySelectorAll('img').length, scripts: document.scripts.length, text: document.body.textContent, rows: document.querySelectorAll('#finished li').length, alerted: typeof window.alerted !== 'undefined'};", "args": []})));
    assert_eq!(dom["imgs"], 0, "no element made of model or input text");
    assert_eq!(dom["scripts"], 1, "only the page's own script");
    assert_eq!(dom["rows"], 6);
    let text = dom["text"].as_str().unwrap_or_default();
    assert!(text.contains(PAYLOAD), "the payload shows as text");
    let stored = read_jsonl(&dir.join("out/dataset.jsonl"));
    for r in &stored {
        assert!(text.contains(r["response"].as_str().unwrap_or("?").lines().next().unwrap_or("?")), "every finished response is on the page");
    }
    // What streamed on the page when it connected mid-run is a piece of a stored reply (none of
    // it shown twice: the snapshot and the batch after it once overlapped).
    for t in flight.as_array().into_iter().flatten().filter_map(Value::as_str) {
        assert!(stored.iter().any(|r| r["response"].as_str().is_some_and(|s| s.contains(t))), "{t:?} is not a piece of any stored reply");
    }
    wd(d.port, "DELETE", &format!("/session/{sid}"), None);
    assert_eq!(run.wait().ok().and_then(|s| s.code()), Some(0));
}

#[test]
#[ignore = "a real browser: run with scripts/browser-test.sh"]
fn the_view_page_lists_a_finished_dataset_and_finds_a_record_by_search() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    let mut questions: Vec<String> = (1..=80).map(|i| format!("Question n°{i}: why is the sky blue at hour {i}?")).collect();
    questions[10] = PAYLOAD.into();
    questions[57] = "Combien de lunes a Jupiter ? 木星 🪐".into();
    let refs: Vec<&str> = questions.iter().map(String::as_str).collect();
    write_questions(&dir, &refs);
    dir.write("run.toml", ConfigBuilder::new(&fake.url()).toml());
    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(0);
    let stored = read_jsonl(&dir.join("out/dataset.jsonl"));

    // With a token (as off loopback): the page, its scripts and its data all load.
    let (mut view, url, _stderr) = spawn_until_line(&dir, &["view", "out", "--serve", "127.0.0.1:0", "--serve-token", "0123456789abcdef-browser-test"], "view: ");
    let d = driver();
    let sid = session(&d);
    wd(d.port, "POST", &format!("/session/{sid}/url"), Some(json!({"url": url})));

    // The first page of the table: 50 rows, the file's first records, the payload as text.
    let first = wait_for(d.port, &sid, "the table", "const r = document.querySelectorAll('#rows tr'); return r.length === 50 ? [...r].map(tr => tr.children[1].textContent) : false;", Duration::from_secs(30));
    let want: Vec<Value> = stored.iter().take(50).map(|r| r["id"].clone()).collect();
    assert_eq!(first.as_array().cloned().unwrap_or_default(), want);
    let text = exec(&d, &sid, "return document.getElementById('table').textContent;");
    assert!(text.as_str().is_some_and(|t| t.contains("<img src=x onerror=alert(1)></script>")), "the payload shows as text");
    assert!(exec(&d, &sid, "return document.getElementById('page-info').textContent;").as_str().is_some_and(|t| t.contains("80 matching")));
    screenshot(&d, &sid, "view-records.png");

    // Typed in the search box as a user would: one row, and the search is in the URL.
    let q = wd(d.port, "POST", &format!("/session/{sid}/element"), Some(json!({"using": "css selector", "value": "#q"})));
    let qid = q.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).expect("the search box").to_owned();
    wd(d.port, "POST", &format!("/session/{sid}/element/{qid}/value"), Some(json!({"text": "JUPITER 木星"})));
    let found = wait_for(d.port, &sid, "the search's one row", "const r = document.querySelectorAll('#rows tr'); return r.length === 1 ? {id: r[0].children[1].textContent, hash: decodeURIComponent(location.hash), url: location.href} : false;", Duration::from_secs(30));
    assert!(found["url"].as_str().is_some_and(|u| u.contains("?token=0123456789abcdef-browser-test")), "{found}");
    assert_eq!(found["id"], "r58");
    assert!(found["hash"].as_str().is_some_and(|h| h.contains("q=JUPITER+木星") || h.contains("q=JUPITER 木星")), "{found}");

    // Its record, whole: the response as stored.
    exec(&d, &sid, "document.querySelector('#rows tr').click(); return true;");
    let rec = wait_for(d.port, &sid, "the record view", "const b = document.getElementById('record-body'); return !document.getElementById('record').hidden && b.querySelectorAll('pre').length >= 2 ? {pres: [...b.querySelectorAll('pre')].map(p => p.textContent), hash: location.hash} : false;", Duration::from_secs(30));
    let r58 = stored.iter().find(|r| r["id"] == "r58").expect("r58");
    assert!(rec["pres"].as_array().is_some_and(|p| p.iter().any(|x| x == &r58["response"])), "{rec}");
    assert!(rec["hash"].as_str().is_some_and(|h| h.contains("rec=0%3A") || h.contains("rec=0:")), "the open record is in the URL too: {rec}");
    screenshot(&d, &sid, "view-record.png");

    // A shared link: the same URL in a new page shows the same row and record.
    let link = exec(&d, &sid, "return location.href;");
    wd(d.port, "POST", &format!("/session/{sid}/url"), Some(json!({"url": "about:blank"})));
    wd(d.port, "POST", &format!("/session/{sid}/url"), Some(json!({"url": link})));
    let again = wait_for(d.port, &sid, "the shared link", "const r = document.querySelectorAll('#rows tr'); return r.length === 1 && !document.getElementById('record').hidden ? {id: r[0].children[1].textContent} : false;", Duration::from_secs(30));
    assert_eq!(again["id"], "r58");

    // The summary, its histograms drawn.
    exec(&d, &sid, "document.getElementById('tab-summary').click(); return true;");
    let bars = wait_for(d.port, &sid, "the summary's charts", "const c = document.querySelectorAll('svg.hist rect').length; return c > 0 ? {count: c, text: document.getElementById('summary').textContent} : false;", Duration::from_secs(30));
    assert!(bars["text"].as_str().is_some_and(|t| t.contains("80 records")), "{bars}");
    screenshot(&d, &sid, "view-summary.png");
    assert_eq!(exec(&d, &sid, "return document.querySelectorAll('img').length;"), 0, "no element made of model or input text");
    wd(d.port, "DELETE", &format!("/session/{sid}"), None);
    let _ = view.kill();
    let _ = view.wait();
}

/// Standard base64 (the screenshot WebDriver sends) to bytes.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
