//! A night's run against servers that go away: outages ride out (or stop the run cleanly after
//! `outage_wait_secs`), and one run per output folder.


use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fake_ollama::{FakeOllama, Options};
use crate::util::{check_records, read_jsonl, spawn, wait_for, write_questions, ConfigBuilder, Dir};

fn questions(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("question number {i}")).collect()
}

fn finish(child: Child) -> (Option<i32>, String, String) {
    let out = child.wait_with_output().expect("wait");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn slow_fake() -> Options {
    Options { token_delay: Duration::from_millis(4), ..Default::default() }
}

#[test]
fn a_server_outage_pauses_the_run_instead_of_failing_rows() {
    let mut fake = FakeOllama::start(slow_fake());
    let addr = fake.addr.to_string();
    let dir = Dir::new();
    let qs = questions(40);
    write_questions(&dir, &qs.iter().map(String::as_str).collect::<Vec<_>>());
    let mut cfg = ConfigBuilder::new(&fake.url());
    // Few retries and short backoff: without the pause every row would burn them in a second.
    cfg.run = "concurrency = 2\nmax_retries = 2\nretry_base_delay_ms = 20\nidle_timeout_secs = 5\n".into();
    dir.write("run.toml", cfg.toml());
    let child = spawn(&dir, &["--config", "run.toml", "--progress", "plain"]);
    wait_for("12 requests", Duration::from_secs(30), || fake.generations().len() >= 12);
    fake.stop();
    // Down for 40 s, then back on the same port.
    std::thread::sleep(Duration::from_secs(40));
    let fake = FakeOllama::start_on(&addr, slow_fake());
    let (code, stdout, stderr) = finish(child);
    assert_eq!(code, Some(0), "the run rides out the outage\n{stdout}\n{stderr}");
    check_records(&dir, 40);
    assert_eq!(dir.read("out/failures.jsonl"), "", "no row failed");
    let log = dir.read("out/run.log");
    assert!(log.contains("server down: requests wait for it"), "the pause is logged\n{log}");
    assert!(log.contains("server back after"), "and its end\n{log}");
    assert!(stderr.contains("server down since") && stderr.contains("server back after"), "the display says it\n{stderr}");
    assert!(!fake.generations().is_empty(), "the rest went to the server that came back");
}

#[test]
fn an_outage_longer_than_the_limit_stops_cleanly_and_the_next_run_goes_on() {
    let mut fake = FakeOllama::start(slow_fake());
    let addr = fake.addr.to_string();
    let dir = Dir::new();
    let qs = questions(30);
    write_questions(&dir, &qs.iter().map(String::as_str).collect::<Vec<_>>());
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 2\nmax_retries = 2\nretry_base_delay_ms = 20\noutage_wait_secs = 3\n".into();
    dir.write("run.toml", cfg.toml());
    let child = spawn(&dir, &["--config", "run.toml", "--progress", "plain"]);
    wait_for("6 requests", Duration::from_secs(30), || fake.generations().len() >= 6);
    fake.stop();
    let (code, stdout, stderr) = finish(child);
    assert_eq!(code, Some(1), "the outage outlasted outage_wait_secs\n{stdout}\n{stderr}");
    assert!(stderr.contains("has been down since") && stderr.contains("run.outage_wait_secs"), "{stderr}");
    let kept = read_jsonl(&dir.join("out/dataset.jsonl")).len();
    assert!(kept > 0 && kept < 30, "{kept} records kept");
    let failures = std::fs::read_to_string(dir.join("out/failures.jsonl")).unwrap_or_default();
    assert_eq!(failures, "", "rows not reached are not failures");
    let manifest: Value = serde_json::from_str(&dir.read("out/manifest.json")).expect("manifest");
    assert_eq!(manifest["runs"][0]["status"], "failed");
    assert!(manifest["runs"][0]["error"].as_str().is_some_and(|e| e.contains("down since")), "{manifest}");

    let _fake = FakeOllama::start_on(&addr, slow_fake());
    let run = dir.run(&["--config", "run.toml", "--progress", "none"], &[]);
    run.expect_code(0).expect_stdout(&format!("{} of {} requests done", 30 - kept, 30 - kept));
    check_records(&dir, 30);
}

#[test]
fn outage_wait_zero_fails_rows_at_once_as_before() {
    let mut fake = FakeOllama::start(slow_fake());
    let dir = Dir::new();
    let qs = questions(20);
    write_questions(&dir, &qs.iter().map(String::as_str).collect::<Vec<_>>());
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 1\nmax_retries = 1\nretry_base_delay_ms = 5\noutage_wait_secs = 0\n".into();
    dir.write("run.toml", cfg.toml());
    let child = spawn(&dir, &["--config", "run.toml", "--progress", "plain"]);
    wait_for("3 requests", Duration::from_secs(30), || fake.generations().len() >= 3);
    fake.stop();
    let (code, stdout, stderr) = finish(child);
    assert_eq!(code, Some(3), "{stdout}\n{stderr}");
    let fails = read_jsonl(&dir.join("out/failures.jsonl"));
    assert!(!fails.is_empty(), "rows fail on connection errors");
    assert!(fails.iter().all(|f| f["attempts"] == 2), "each spent its retries: {fails:?}");
}

#[test]
fn a_failed_server_check_creates_no_output_files() {
    let dir = Dir::new();
    write_questions(&dir, &["one"]);
    let mut fake = FakeOllama::start(Options::default());
    let url = fake.url();
    fake.stop();
    dir.write("run.toml", ConfigBuilder::new(&url).toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("cannot reach Ollama");
    assert!(!dir.join("out").exists(), "nothing created before the check passes");
    // Nor for a missing model, on a server that answers.
    let fake = FakeOllama::start(Options::default());
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.model = "llama3.2:3b".into();
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("ollama pull llama3.2:3b").expect_stderr("it has: fake-model");
    assert!(!dir.join("out").exists());
    cfg.model = "fake-modle".into();
    dir.write("run.toml", cfg.toml());
    let run = dir.run(&["--config", "run.toml"], &[]);
    run.expect_code(1).expect_stderr("did you mean \"fake-model");
    assert!(!run.stderr().contains("ollama pull"), "a typo is no tag to pull\n{}", run.stderr());
}

#[test]
fn two_runs_on_one_folder_one_runs_the_other_is_told_who_holds_it() {
    let fake = FakeOllama::start(Options { token_delay: Duration::from_millis(2), ..Default::default() });
    let dir = Dir::new();
    let qs = questions(30);
    write_questions(&dir, &qs.iter().map(String::as_str).collect::<Vec<_>>());
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 2\n".into();
    dir.write("run.toml", cfg.toml());
    let first = spawn(&dir, &["--config", "run.toml", "--progress", "none"]);
    wait_for("the first run to write", Duration::from_secs(30), || {
        std::fs::read_to_string(dir.join("out/dataset.jsonl")).is_ok_and(|t| t.lines().count() >= 2)
    });
    let second = dir.run(&["--config", "run.toml", "--progress", "none"], &[]);
    second.expect_code(1).expect_stderr("is in use by data_generator (pid ").expect_stderr(", started ");
    // Read-only commands work meanwhile; anything else that writes there is refused.
    dir.run(&["inspect", "out"], &[]).expect_code(0);
    dir.run(&["export", "out", "--format", "messages", "-o", "x.jsonl"], &[]).expect_code(0);
    dir.run(&["--config", "run.toml", "--fresh"], &[]).expect_code(1).expect_stderr("is in use");
    dir.run(&["check", "--config", "run.toml"], &[]).expect_code(1).expect_stderr("is in use");
    std::fs::create_dir_all(dir.join("other")).expect("mkdir");
    dir.run(&["merge", "other", "-o", "out"], &[]).expect_code(1).expect_stderr("is in use");
    let (code, stdout, stderr) = finish(first);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    check_records(&dir, 30);
    assert_eq!(fake.generations().len(), 30, "no request made twice");
    // Once it is done, the folder is free again.
    dir.run(&["--config", "run.toml"], &[]).expect_code(0).expect_stdout("nothing to do");
}

#[test]
fn streams_that_only_keep_alive_stall_out_and_are_retried() {
    let fake = FakeOllama::start(Options::default());
    for kind in ["ollama", "openai"] {
        let dir = Dir::new();
        // The fake counts attempts per prompt: one prompt per kind.
        let silent = format!("warm but silent ({kind}) [[keepalivex1]]");
        write_questions(&dir, &[silent.as_str(), "fine"]);
        let url = if kind == "openai" { format!("{}/v1", fake.url()) } else { fake.url() };
        let mut cfg = ConfigBuilder::new(&url);
        cfg.run = "max_retries = 2\nretry_base_delay_ms = 5\nidle_timeout_secs = 1\n".into();
        let mut toml = cfg.toml();
        if kind == "openai" {
            toml = toml.replace("kind = \"ollama\"", "kind = \"openai\"").replace("keep_alive = \"30m\"\n", "");
        }
        dir.write("run.toml", toml);
        let started = Instant::now();
        dir.run(&["--config", "run.toml"], &[]).expect_code(0);
        assert!(started.elapsed() < Duration::from_secs(20), "{kind}: the keep-alives did not keep it alive");
        let recs = check_records(&dir, 2);
        let silent = recs.iter().find(|r| r["id"] == "r1").expect("r1");
        assert_eq!(silent["attempts"], 2, "{kind}: stalled once, then answered");
        assert!(dir.read("out/run.log").contains("stalled"), "{kind}");
    }
}

#[test]
fn a_retry_after_of_an_hour_is_capped_and_ctrl_c_ends_the_wait_at_once() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_questions(&dir, &["come back later [[wait3600x1]]"]);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "max_retries = 2\nretry_base_delay_ms = 5\nmax_retry_after_secs = 1\n".into();
    dir.write("run.toml", cfg.toml());
    let started = Instant::now();
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    assert!(started.elapsed() < Duration::from_secs(15), "capped at 1 s, not an hour");
    let log = dir.read("out/run.log");
    assert!(log.contains("capped") && log.contains("asked_secs=3600"), "{log}");

    // With the default cap (120 s), Ctrl-C ends the wait at once, not after the grace period.
    let dir = Dir::new();
    write_questions(&dir, &["come back later [[wait3600]]"]);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "max_retries = 2\nstop_grace_secs = 60\n".into();
    dir.write("run.toml", cfg.toml());
    let child = spawn(&dir, &["--config", "run.toml", "--progress", "plain"]);
    wait_for("the retry wait", Duration::from_secs(20), || {
        std::fs::read_to_string(dir.join("out/run.log")).is_ok_and(|l| l.contains("retrying"))
    });
    let pid = child.id().to_string();
    let sent = Instant::now();
    Command::new("kill").args(["-INT", &pid]).status().expect("kill -INT");
    let (code, stdout, stderr) = finish(child);
    assert_eq!(code, Some(130), "{stdout}\n{stderr}");
    assert!(sent.elapsed() < Duration::from_secs(5), "took {:?}", sent.elapsed());
    assert_eq!(std::fs::read_to_string(dir.join("out/failures.jsonl")).unwrap_or_default(), "", "an abandoned wait is no failure");
}
