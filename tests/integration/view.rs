//! `data_generator view DIR` at the HTTP level: records paged, searched and filtered against what
//! the files hold; one record whole; a folder a run is still writing; a multi-stage folder by
//! stage and keep; the summary; the token off loopback; fixed routes; errors that name the folder.

use std::process::Child;
use std::time::Duration;

use serde_json::Value;

use crate::fake_ollama::{FakeOllama, Options};
use crate::live::{get, parts};
use crate::util::{read_jsonl, spawn_until_line, wait_for, write_questions, ConfigBuilder, Dir};

/// `view` of `folder` (relative to `dir`) at `serve`: the child and the URL it printed.
fn start_view(dir: &Dir, folder: &str, serve: &str) -> Viewer {
    let (child, url, _) = spawn_until_line(dir, &["view", folder, "--serve", serve], "view: ");
    let (host, token) = parts(&url);
    Viewer { child, host, token, url }
}

struct Viewer {
    child: Child,
    host: String,
    token: Option<String>,
    url: String,
}

impl Drop for Viewer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Viewer {
    /// GET `path` (with the token when there is one): status and body.
    fn get(&self, path: &str) -> (u16, String) {
        let path = match &self.token {
            Some(t) => format!("{path}{}token={t}", if path.contains('?') { '&' } else { '?' }),
            None => path.to_owned(),
        };
        get(&self.host, "GET", &path)
    }

    fn json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// Waits for the first pass of the index.
    fn indexed(&self) -> Value {
        let mut info = Value::Null;
        wait_for("the index", Duration::from_secs(20), || {
            info = self.json("/api/info");
            info["indexing"] == false
        });
        info
    }
}

fn ids(page: &Value) -> Vec<String> {
    page["rows"].as_array().expect("rows").iter().map(|r| r["id"].as_str().unwrap_or_default().to_owned()).collect()
}

/// Percent-encoding for a query value.
fn enc(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

#[test]
fn view_pages_searches_and_filters_what_the_dataset_holds() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    let mut questions: Vec<String> = (1..=120).map(|i| format!("question n°{i} about optics")).collect();
    questions[41] = "Pourquoi le CIEL est-il bleu ? 日本 🎉".into();
    questions[77] = "<img src=x onerror=alert(1)></script> and a needle".into();
    let refs: Vec<&str> = questions.iter().map(String::as_str).collect();
    write_questions(&dir, &refs);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = cfg.run.replace("concurrency = 3", "concurrency = 8");
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(0);
    let stored = read_jsonl(&dir.join("out/dataset.jsonl"));
    assert_eq!(stored.len(), 120);

    let v = start_view(&dir, "out", "127.0.0.1:0");
    assert!(v.token.is_none(), "no token on loopback");
    let info = v.indexed();
    assert_eq!(info["records"], 120);
    assert_eq!(info["failures"], 0);
    assert_eq!(info["files"][0]["file"], "dataset.jsonl");

    // Pages, in file order, 50 a page: every stored record once.
    let mut seen = Vec::new();
    for page in 1..=3 {
        let p = v.json(&format!("/api/records?page={page}"));
        assert_eq!((p["total"].as_u64(), p["pages"].as_u64()), (Some(120), Some(3)));
        seen.extend(ids(&p));
    }
    let want: Vec<String> = stored.iter().map(|r| r["id"].as_str().unwrap_or_default().to_owned()).collect();
    assert_eq!(seen, want, "the pages list the file's records in order");
    let newest = v.json("/api/records?order=newest&per=2");
    assert_eq!(ids(&newest), [want[119].clone(), want[118].clone()]);

    // Search: case, non-ASCII, markup as text, several words, a phrase.
    let hit = |q: &str| ids(&v.json(&format!("/api/records?q={}", enc(q))));
    assert_eq!(hit("ciel bleu"), ["r42"]);
    assert_eq!(hit("POURQUOI 日本"), ["r42"]);
    // Every response of the fake holds 日本語 and 🎉.
    assert_eq!(v.json(&format!("/api/records?q={}", enc("日本語 🎉")))["total"], 120);
    assert_eq!(hit("onerror=alert(1)"), ["r78"]);
    assert_eq!(hit("</script> NEEDLE"), ["r78"]);
    assert_eq!(hit("\"n°7 about\""), ["r7"]);
    assert!(hit("nowhere-to-be-found").is_empty());
    assert_eq!(v.json(&format!("/api/records?q={}", enc("optics")))["total"], 118);
    // A row shows heads of the texts, as data.
    let row = &v.json(&format!("/api/records?q={}", enc("onerror")))["rows"][0];
    assert!(row["prompt"].as_str().unwrap_or_default().contains("<img src=x onerror=alert(1)></script>"));
    assert_eq!(row["done_reason"], "stop");

    // Filters.
    assert_eq!(v.json("/api/records?done_reason=stop")["total"], 120);
    assert_eq!(v.json("/api/records?done_reason=length")["total"], 0);
    assert_eq!(v.json("/api/records?status=failed")["total"], 0);
    let (status, body) = v.get("/api/records?status=bogus");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("status=bogus"), "{body}");

    // One record whole: what the file holds, named by where its line is.
    let loc = v.json(&format!("/api/records?q={}", enc("ciel")))["rows"][0]["loc"].as_str().expect("loc").to_owned();
    let r = v.json(&format!("/api/record?loc={loc}"));
    let stored_r = stored.iter().find(|s| s["id"] == "r42").expect("r42");
    assert_eq!(&r["record"], stored_r, "the record as stored");
    assert_eq!(r["file"], "dataset.jsonl");
    assert_eq!(v.get("/api/record?loc=0:1").0, 404, "not where a line starts");
    assert_eq!(v.get("/api/record?loc=../run.toml").0, 404);
    assert_eq!(v.get("/api/record").0, 400);
    // An id, exactly (r1 is not r10..r19).
    assert_eq!(ids(&v.json("/api/records?id=r1")), ["r1"]);
    assert_eq!(v.get("/api/records?order=sideways").0, 400);

    // The summary is the inspect report.
    let mut sum = Value::Null;
    wait_for("the summary", Duration::from_secs(20), || {
        sum = v.json("/api/summary");
        sum["ready"] == true
    });
    assert_eq!(sum["report"]["records"], 120);
    assert_eq!(sum["report"]["done_reasons"]["stop"], 120);
    assert!(sum["report"]["completion_tokens"]["histogram"].as_array().is_some_and(|h| !h.is_empty()));

    // Fixed routes only; nothing from the URL names a file; read-only.
    for path in ["/../run.toml", "/out/dataset.jsonl", "/api/file?path=run.toml", "/%2e%2e/run.toml", "/api/records/../../run.toml"] {
        assert_eq!(v.get(path).0, 404, "{path}");
    }
    assert_eq!(get(&v.host, "POST", "/api/records").0, 405);
    assert_eq!(get(&v.host, "DELETE", "/api/record?loc=0:0").0, 405);
    // Another name for this machine (DNS rebinding: a web site's page reading this one) is refused.
    let mut s = std::net::TcpStream::connect(&v.host).expect("connect");
    use std::io::{Read, Write};
    write!(s, "GET /api/records HTTP/1.0\r\nHost: evil.example:8765\r\n\r\n").expect("write");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.0 403") || answer.starts_with("HTTP/1.1 403"), "{answer}");
    let (status, page) = v.get("/");
    assert_eq!(status, 200);
    assert!(page.contains("view.js"), "{page}");
    assert_eq!(v.get("/view.js").0, 200);
    assert_eq!(read_jsonl(&dir.join("out/dataset.jsonl")), stored, "nothing written");
}

#[test]
fn view_follows_a_run_that_is_still_writing() {
    let fake = FakeOllama::start(Options { token_delay: Duration::from_millis(2), ..Default::default() });
    let dir = Dir::new();
    let questions: Vec<String> = (1..=40).map(|i| format!("question {i}")).collect();
    let refs: Vec<&str> = questions.iter().map(String::as_str).collect();
    write_questions(&dir, &refs);
    dir.write("run.toml", ConfigBuilder::new(&fake.url()).toml());
    dir.run(&["--config", "run.toml", "--progress", "none", "--limit", "5"], &[]).expect_code(0);

    let v = start_view(&dir, "out", "127.0.0.1:0");
    assert_eq!(v.indexed()["records"], 5);
    // A search kept from before the run goes on finds the new records too.
    assert_eq!(v.json("/api/records?q=question")["total"], 5);
    // The same command again resumes the run, which appends to the file the view follows.
    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(0);
    wait_for("the new records in the view", Duration::from_secs(20), || v.json("/api/info")["records"] == 40);
    assert_eq!(v.json("/api/records?q=question")["total"], 40);
    assert_eq!(ids(&v.json(&format!("/api/records?q={}", enc("\"question 40\"")))), ["r40"]);

    // A line the run is still writing (no newline yet) is not a record yet.
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(dir.join("out/dataset.jsonl")).expect("open");
    f.write_all(br#"{"id": "partial", "prompt": "half a li"#).expect("write");
    f.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(2500));
    let info = v.json("/api/info");
    assert_eq!((info["records"].as_u64(), info["files"][0]["malformed"].as_u64()), (Some(40), Some(0)), "{info}");
}

#[test]
fn view_of_a_multi_stage_run_filters_by_stage_and_keep() {
    let fake = crate::stages::fake(1);
    let dir = Dir::new();
    crate::stages::write_topics(&dir, 3);
    dir.write("run.toml", crate::stages::three_stages(&fake.url(), crate::stages::JUDGE_TEMPLATE, 4));
    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(0);
    let judges = read_jsonl(&dir.join("out/stages/judge.jsonl"));

    let v = start_view(&dir, "out", "127.0.0.1:0");
    let info = v.indexed();
    assert_eq!(info["stages"], serde_json::json!(["questions", "answer", "judge"]));
    assert_eq!(info["per_stage"], serde_json::json!([3, 6, 6]));
    assert_eq!(info["records"], 15);
    assert_eq!(v.json("/api/records?stage=judge")["total"], 6);
    let kept = judges.iter().filter(|j| j["kept"] == true).count();
    assert_eq!(v.json("/api/records?stage=judge&kept=yes")["total"].as_u64(), Some(kept as u64));
    assert_eq!(v.json("/api/records?stage=judge&kept=no")["total"].as_u64(), Some((6 - kept) as u64));
    assert_eq!(v.json("/api/records?kept=unjudged")["total"], 9);
    assert_eq!(v.json("/api/records?stage=nonesuch")["total"], 0);
    let row = &v.json("/api/records?stage=answer&per=1")["rows"][0];
    assert_eq!(row["stage"], "answer");

    // A judge record whole carries its parsed reply.
    let loc = v.json("/api/records?stage=judge&per=1")["rows"][0]["loc"].as_str().expect("loc").to_owned();
    let r = v.json(&format!("/api/record?loc={loc}"));
    assert!(r["record"]["parsed"]["score"].is_number(), "{r}");

    // The summary is per stage.
    assert_eq!(v.get("/api/summary").0, 400, "a multi-stage summary names its stage");
    let mut sum = Value::Null;
    wait_for("the judge summary", Duration::from_secs(20), || {
        sum = v.json("/api/summary?stage=judge");
        sum["ready"] == true
    });
    assert_eq!(sum["report"]["records"], 6);
    assert!(sum["report"]["structured"]["fields"]["score"].is_object(), "{sum}");
}

#[test]
fn view_off_loopback_asks_for_its_token_and_keeps_it_out_of_the_files() {
    let dir = Dir::new();
    dir.write("out/dataset.jsonl", "{\"id\":\"a\",\"prompt\":\"p\",\"response\":\"r\",\"key\":\"k\"}\n");
    let v = start_view(&dir, "out", "0.0.0.0:0");
    let token = v.token.clone().expect("a token is made off loopback");
    assert!(token.len() >= 32, "{token}");
    let port = v.host.rsplit(':').next().expect("port");
    let local = format!("127.0.0.1:{port}");
    for path in ["/", "/api/info", "/api/records", "/api/record?loc=0:0", "/api/summary", "/nonesuch"] {
        assert_eq!(get(&local, "GET", path).0, 401, "{path} without the token");
    }
    // What the page loads by itself (no data in it) needs no token: a <script> cannot send it.
    for path in ["/view.js", "/view.css", "/app.css"] {
        assert_eq!(get(&local, "GET", path).0, 200, "{path}");
    }
    assert_eq!(get(&local, "GET", "/api/info?token=wrong").0, 401);
    let (status, body) = get(&local, "GET", &format!("/api/records?token={token}"));
    assert_eq!(status, 200, "{body}");
    // Or as a bearer token; and every answer carries the CSP.
    let mut s = std::net::TcpStream::connect(&local).expect("connect");
    use std::io::{Read, Write};
    write!(s, "GET /api/info HTTP/1.0\r\nHost: {local}\r\nAuthorization: Bearer {token}\r\n\r\n").expect("write");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.contains(" 200 "), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("content-security-policy: default-src 'none'; script-src 'self'"), "{answer}");
    assert!(v.url.contains(&token));
    for entry in std::fs::read_dir(dir.join("out")).expect("out").flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        assert!(!text.contains(&token), "{} holds the token", entry.path().display());
    }
}

#[test]
fn view_errors_name_the_folder() {
    let dir = Dir::new();
    dir.run(&["view", "nowhere"], &[]).expect_code(1).expect_stderr("nowhere: no such folder");
    dir.write("empty/.keep", "");
    dir.run(&["view", "empty"], &[]).expect_code(1).expect_stderr("empty: no dataset here yet");
    dir.write("csvonly/dataset.csv", "id,prompt\n");
    dir.run(&["view", "csvonly"], &[]).expect_code(1).expect_stderr("has only dataset.csv");
    // A port in use: the error names the address.
    dir.write("out/dataset.jsonl", "");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr").to_string();
    dir.run(&["view", "out", "--serve", &addr], &[]).expect_code(1).expect_stderr(&format!("--serve {addr}: cannot listen there"));
    dir.run(&["view", "out", "--serve", "8765"], &[]).expect_code(1).expect_stderr("ADDR is IP:PORT");
    // A token anyone could guess is refused, given or from the environment.
    dir.run(&["view", "out", "--serve-token", ""], &[]).expect_code(1).expect_stderr("at least 16 characters");
    dir.run(&["view", "out", "--serve", "127.0.0.1:0"], &[("DATA_GENERATOR_SERVE_TOKEN", "secret")]).expect_code(1).expect_stderr("at least 16 characters");
}
