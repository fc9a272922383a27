//! Overnight safety: kills, Ctrl-C, torn files, edited templates, failures, --fresh (a full disk: faults.rs).

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fake_ollama::{expected_response, FakeOllama, Options};
use crate::util::{complete_records, read_csv, read_jsonl, wait_for, write_questions, ConfigBuilder, Dir, Run, BIN};

fn questions(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("Question n°{i}: pourquoi ? 日本 🎉")).collect()
}

fn spawn(dir: &Dir, args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .current_dir(dir.path())
        .env_remove("OLLAMA_HOST")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn data_generator")
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill").args([sig, &child.id().to_string()]).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "kill {sig} failed");
}

/// Waits for the child with a limit; returns (exit code, stdout, stderr, how long it took).
fn wait(child: Child, limit: Duration) -> (i32, String, String, Duration) {
    let start = Instant::now();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("data_generator did not exit within {limit:?}");
        }
    };
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

/// Waits (20 s at most) until the fake has seen `n` generation requests.
fn wait_for_requests(fake: &FakeOllama, n: usize) {
    let start = Instant::now();
    while fake.generations().len() < n && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A request's identity on the wire and in the dataset: (prompt, seed).
fn identity(prompt: &str, seed: &Value) -> (String, i64) {
    (prompt.to_owned(), seed.as_i64().unwrap_or(-1))
}

/// The dataset holds every (row, sample) exactly once, byte-exact, and the CSV says the same.
fn check_complete(dir: &Dir, rows: usize, samples: u64) {
    let recs = read_jsonl(&dir.join("out/dataset.jsonl"));
    let mut seen = HashMap::new();
    for r in &recs {
        let k = (r["id"].as_str().unwrap_or_default().to_owned(), r["sample"].as_u64().unwrap_or(99));
        *seen.entry(k).or_insert(0) += 1;
        let prompt = r["prompt"].as_str().unwrap_or_default();
        assert_eq!(r["response"].as_str(), Some(expected_response(prompt).as_str()), "byte-exact");
    }
    assert_eq!(seen.len(), rows * samples as usize, "every (row, sample) present");
    assert!(seen.values().all(|n| *n == 1), "no (row, sample) twice: {seen:?}");
    let (header, csv_rows) = read_csv(&dir.join("out/dataset.csv"));
    let key_col = header.iter().position(|h| h == "key").expect("key column");
    let resp_col = header.iter().position(|h| h == "response").expect("response column");
    assert_eq!(csv_rows.len(), recs.len(), "CSV has the JSONL's records");
    for (row, rec) in csv_rows.iter().zip(&recs) {
        assert_eq!(row[key_col], rec["key"].as_str().unwrap_or_default());
        assert_eq!(row[resp_col], rec["response"].as_str().unwrap_or_default());
    }
}

#[test]
fn sigkill_at_random_points_then_resume() {
    let fake = FakeOllama::start(Options { token_delay: Duration::from_millis(2), ..Default::default() });
    let dir = Dir::new();
    let qs = questions(24);
    write_questions(&dir, &qs.iter().map(String::as_str).collect::<Vec<_>>());
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 4\nsamples_per_prompt = 2\nmax_retries = 2\nretry_base_delay_ms = 10\n".into();
    dir.write("run.toml", cfg.toml());

    // Kill points spread over the run, from a fixed seed so failures repeat.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut kills = 0;
    let mut runs = 0;
    loop {
        runs += 1;
        assert!(runs < 30, "the run never completed");
        let before = fake.generations().len();
        let written: HashSet<(String, i64)> =
            complete_records(&dir).iter().map(|r| identity(r["prompt"].as_str().unwrap_or_default(), &r["seed"])).collect();
        let child = spawn(&dir, &["--config", "run.toml"]);
        let finished = if kills < 5 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let after = Duration::from_millis(150 + x % 700);
            std::thread::sleep(after);
            let mut child = child;
            let exited = child.try_wait().ok().flatten().is_some();
            if !exited {
                let _ = child.kill(); // SIGKILL
                kills += 1;
            }
            let _ = child.wait();
            exited
        } else {
            let (code, out, err, _) = wait(child, Duration::from_secs(60));
            assert_eq!(code, 0, "final run\n{out}\n{err}");
            true
        };
        // No request already written before this run was asked again.
        for g in &fake.generations()[before..] {
            let id = identity(g.prompt.as_deref().unwrap_or_default(), &g.body["options"]["seed"]);
            assert!(!written.contains(&id), "asked again for a record written before the kill: {id:?}");
        }
        if finished && kills >= 5 {
            break;
        }
    }
    assert!(kills >= 3, "the kills happened mid-run ({kills})");
    check_complete(&dir, 24, 2);
    let manifest: Value = serde_json::from_str(&dir.read("out/manifest.json")).expect("manifest");
    let statuses: Vec<&str> = manifest["runs"].as_array().map(|r| r.iter().filter_map(|x| x["status"].as_str()).collect()).unwrap_or_default();
    assert!(statuses.contains(&"killed"), "killed runs are marked: {statuses:?}");
    assert_eq!(statuses.last(), Some(&"completed"));
}

#[test]
fn sigint_once_lets_requests_in_flight_finish() {
    let fake = FakeOllama::start(Options { token_delay: Duration::from_millis(15), ..Default::default() });
    let dir = Dir::new();
    let qs = questions(8);
    write_questions(&dir, &qs.iter().map(String::as_str).collect::<Vec<_>>());
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 2\nstop_grace_secs = 30\n".into();
    dir.write("run.toml", cfg.toml());

    let child = spawn(&dir, &["--config", "run.toml"]);
    // Once two requests are streaming, Ctrl-C.
    wait_for_requests(&fake, 2);
    std::thread::sleep(Duration::from_millis(200));
    signal(&child, "-INT");
    let (code, out, err, _) = wait(child, Duration::from_secs(40));
    assert_eq!(code, 130, "exit 130 after Ctrl-C\n{out}\n{err}");
    assert!(err.contains("stopping (SIGINT at ") && err.contains("waiting up to 30s for the "), "the display says it is stopping\n{err}");
    assert!(out.contains("interrupted by SIGINT"), "{out}");
    let recs = read_jsonl(&dir.join("out/dataset.jsonl"));
    assert!(recs.len() >= 2 && recs.len() < 8, "the requests in flight finished, no new ones began: {}", recs.len());
    assert_eq!(fake.generations().len(), recs.len(), "nothing dispatched after the signal was left unwritten");
    let manifest: Value = serde_json::from_str(&dir.read("out/manifest.json")).expect("manifest");
    assert_eq!(manifest["runs"][0]["status"], "interrupted");

    dir.run(&["--config", "run.toml"], &[]).expect_code(0).expect_stdout("already done");
    check_complete(&dir, 8, 1);
}

#[test]
fn sigint_twice_aborts_at_once() {
    let fake = FakeOllama::start(Options { token_delay: Duration::from_millis(100), ..Default::default() });
    let dir = Dir::new();
    let qs = questions(4);
    write_questions(&dir, &qs.iter().map(String::as_str).collect::<Vec<_>>());
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 2\nstop_grace_secs = 60\n".into();
    dir.write("run.toml", cfg.toml());

    let child = spawn(&dir, &["--config", "run.toml"]);
    wait_for_requests(&fake, 2);
    signal(&child, "-INT");
    // The second Ctrl-C once the first was seen (signals that arrive together count as one).
    wait_for("the first Ctrl-C seen", Duration::from_secs(30), || dir.read("out/run.log").contains("stopping: no new requests"));
    let t = Instant::now();
    signal(&child, "-INT");
    let (code, out, err, _) = wait(child, Duration::from_secs(30));
    assert_eq!(code, 130, "{out}\n{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "the second Ctrl-C stops at once, not after the grace period");
    let manifest: Value = serde_json::from_str(&dir.read("out/manifest.json")).expect("manifest");
    assert_eq!(manifest["runs"][0]["status"], "aborted");
    // Nothing torn; a re-run (with a faster server it would not matter) completes the set.
    let _ = read_jsonl(&dir.join("out/dataset.jsonl"));
}

#[test]
fn torn_files_are_repaired_on_start() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    let qs = questions(5);
    write_questions(&dir, &qs.iter().map(String::as_str).collect::<Vec<_>>());
    dir.write("run.toml", ConfigBuilder::new(&fake.url()).toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    let asked = fake.generations().len();

    // A torn JSONL line (written by a crash mid-write): cut off and kept aside, nothing re-asked.
    let jsonl = dir.join("out/dataset.jsonl");
    let mut bytes = std::fs::read(&jsonl).expect("read");
    bytes.extend_from_slice(b"{\"id\":\"r9\",\"sample\":0,\"response\":\"half");
    std::fs::write(&jsonl, &bytes).expect("write");
    dir.run(&["--config", "run.toml"], &[]).expect_code(0).expect_stderr("torn").expect_stdout("nothing to do");
    assert_eq!(dir.read("out/dataset.jsonl.torn-1"), "{\"id\":\"r9\",\"sample\":0,\"response\":\"half");
    assert_eq!(fake.generations().len(), asked);
    check_complete(&dir, 5, 1);

    // A torn CSV record: cut, and the record re-appended from the JSONL.
    let csv = dir.join("out/dataset.csv");
    let len = std::fs::metadata(&csv).expect("csv").len();
    let f = std::fs::OpenOptions::new().write(true).open(&csv).expect("open csv");
    f.set_len(len - 40).expect("truncate");
    drop(f);
    dir.run(&["--config", "run.toml"], &[]).expect_code(0).expect_stderr("dataset.csv");
    check_complete(&dir, 5, 1);

    // A crash between the JSONL line and its CSV row, the other way round: the CSV has a record
    // the JSONL lacks (the JSONL is the truth): the CSV is cut to match and the row runs again.
    let text = dir.read("out/dataset.jsonl");
    let keep: String = text.lines().take(4).map(|l| format!("{l}\n")).collect();
    let dropped: Value = serde_json::from_str(text.lines().nth(4).expect("5th line")).expect("json");
    std::fs::write(&jsonl, keep).expect("write");
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    check_complete(&dir, 5, 1);
    let again: Vec<String> = fake.generations()[asked..].iter().filter_map(|g| g.prompt.clone()).collect();
    assert_eq!(again, vec![dropped["prompt"].as_str().unwrap_or_default().to_owned()], "only the lost row ran again");
}

#[test]
fn changed_template_reruns_exactly_the_changed_rows() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    let qs = questions(4);
    write_questions(&dir, &qs.iter().map(String::as_str).collect::<Vec<_>>());
    let mut cfg = ConfigBuilder::new(&fake.url());
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    assert_eq!(fake.generations().len(), 4);

    cfg.prompts = "system_text = \"Tu es un élève. Réponds brièvement.\"\ntemplate_text = \"{% if id == 'r2' %}Question{% else %}Q{% endif %}: {{ question }}\"\n".into();
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(0).expect_stdout("1 of 1 requests done").expect_stdout("3 of 4 requests were already done");
    let gens = fake.generations();
    assert_eq!(gens.len(), 5);
    assert_eq!(gens[4].prompt.as_deref(), Some(format!("Question: {}", qs[1]).as_str()));
    let recs = read_jsonl(&dir.join("out/dataset.jsonl"));
    assert_eq!(recs.len(), 5, "the old record is kept");
    let r2: Vec<&Value> = recs.iter().filter(|r| r["id"] == "r2").collect();
    assert_eq!(r2.len(), 2);
    assert_ne!(r2[0]["key"], r2[1]["key"]);

    // A third run has nothing to do.
    dir.run(&["--config", "run.toml"], &[]).expect_code(0).expect_stdout("nothing to do");
    assert_eq!(fake.generations().len(), 5);
}

#[test]
fn failed_rows_are_retried_next_run_unless_told_not_to() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_questions(&dir, &["fine", "busy [[503x3]]"]);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "max_retries = 1\nretry_base_delay_ms = 5\n".into();
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(3);
    assert_eq!(dir.jsonl("out/failures.jsonl").len(), 1);

    dir.run(&["--config", "run.toml", "--no-retry-failed"], &[]).expect_code(3).expect_stdout("failed before and skipped");
    assert_eq!(fake.generations().len(), 3, "--no-retry-failed asks nothing");

    // Attempt 3 is still busy, attempt 4 succeeds.
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    check_complete(&dir, 2, 1);
    dir.run(&["--config", "run.toml", "--no-retry-failed"], &[]).expect_code(0).expect_stdout("nothing to do");
}

#[test]
fn redo_truncated_replaces_length_records() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_questions(&dir, &["fine", "cut once [[lengthx1]]"]);
    dir.write("run.toml", ConfigBuilder::new(&fake.url()).toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    dir.run(&["--config", "run.toml"], &[]).expect_code(0).expect_stdout("nothing to do");
    dir.run(&["--config", "run.toml", "--redo-truncated"], &[]).expect_code(0).expect_stdout("1 of 1 requests done");
    let recs = dir.jsonl("out/dataset.jsonl");
    let r2: Vec<&Value> = recs.iter().filter(|r| r["id"] == "r2").collect();
    assert_eq!(r2.len(), 2);
    assert_eq!(r2[0]["done_reason"], "length");
    assert_eq!(r2[1]["done_reason"], "stop", "the newer record is the one that counts");
    dir.run(&["--config", "run.toml", "--redo-truncated"], &[]).expect_code(0).expect_stdout("nothing to do");
}

#[test]
fn fresh_moves_the_old_folder_aside() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_questions(&dir, &["a", "b"]);
    dir.write("run.toml", ConfigBuilder::new(&fake.url()).toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    dir.run(&["--config", "run.toml", "--fresh"], &[]).expect_code(0).expect_stderr("out.old-1");
    assert_eq!(read_jsonl(&dir.join("out.old-1/dataset.jsonl")).len(), 2, "the old data is kept");
    check_complete(&dir, 2, 1);
    assert_eq!(fake.generations().len(), 4);
}

#[test]
fn a_rerun_with_nothing_changed_answers_from_the_manifest_and_any_change_is_seen() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    let qs = questions(6);
    write_questions(&dir, &qs.iter().map(String::as_str).collect::<Vec<_>>());
    dir.write("run.toml", ConfigBuilder::new(&fake.url()).toml());
    let run = |dir: &Dir| {
        let out = Command::new(BIN).args(["--config", "run.toml", "--progress", "none"]).current_dir(dir.path()).env_remove("OLLAMA_HOST").output().expect("run");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&dir);
    assert_eq!(fake.generations().len(), 6);
    let fast = "nothing changed since the last run";
    assert!(run(&dir).contains(fast), "unchanged: answered from the manifest");
    let m: Value = serde_json::from_str(&dir.read("out/manifest.json")).expect("manifest");
    assert_eq!(m["runs"].as_array().map(Vec::len), Some(2));
    assert_eq!((m["counts"]["requests"].as_u64(), m["counts"]["already_done"].as_u64()), (Some(6), Some(6)));

    // A record lost (the dataset cut): seen, and asked again.
    let text = dir.read("out/dataset.jsonl");
    let cut = text[..text.len() - 1].rfind('\n').map(|i| i + 1).unwrap_or(0);
    std::fs::write(dir.join("out/dataset.jsonl"), &text[..cut]).expect("cut");
    assert!(!run(&dir).contains(fast));
    assert_eq!(fake.generations().len(), 7);
    assert!(run(&dir).contains(fast));

    // A row added to the input: run.
    let mut rows = dir.read("questions.jsonl");
    rows.push_str("{\"id\": \"r99\", \"question\": \"one more?\"}\n");
    dir.write("questions.jsonl", rows);
    assert!(!run(&dir).contains(fast));
    assert_eq!(fake.generations().len(), 8);

    // The template edited: every row again.
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.prompts = "template_text = \"Question: {{ question }}\"\n".into();
    dir.write("run.toml", cfg.toml());
    assert!(!run(&dir).contains(fast));
    assert_eq!(fake.generations().len(), 15);
    assert!(run(&dir).contains(fast));
    check_complete_rows(&dir, 7);
}

/// The dataset holds `rows` records for the current template (and older ones), byte-exact.
fn check_complete_rows(dir: &Dir, rows: usize) {
    let recs = read_jsonl(&dir.join("out/dataset.jsonl"));
    let current: HashSet<&str> = recs.iter().filter(|r| r["prompt"].as_str().is_some_and(|p| p.starts_with("Question: "))).filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(current.len(), rows);
}

/// The last line of the run log that holds `needle`.
fn last_log_line(dir: &Dir, needle: &str) -> String {
    let log = dir.read("out/run.log");
    log.lines().rfind(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle:?} line in run.log:\n{log}")).to_owned()
}

/// The last "read back:" line of the run log: how the run read the folder.
fn read_back_line(dir: &Dir) -> String {
    last_log_line(dir, "read back:")
}

/// A fake server, a folder with `rows` questions and the config of a run over them.
fn questions_folder(rows: usize) -> (FakeOllama, Dir, ConfigBuilder) {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    let qs = questions(rows);
    write_questions(&dir, &qs.iter().map(String::as_str).collect::<Vec<_>>());
    let cfg = ConfigBuilder::new(&fake.url());
    dir.write("run.toml", cfg.toml());
    (fake, dir, cfg)
}

/// A run of `run.toml` with the display off, which must succeed.
fn run_ok(dir: &Dir) -> Run {
    let r = dir.run(&["--config", "run.toml", "--progress", "none"], &[]);
    r.expect_code(0);
    r
}

/// Makes a re-run read the folder (the manifest's fingerprint sees the dataset touched).
fn touch(path: &std::path::Path) {
    std::thread::sleep(Duration::from_millis(20));
    assert!(Command::new("touch").arg(path).status().expect("touch").success());
}

#[test]
fn the_index_is_used_while_it_matches_the_dataset_and_rebuilt_when_not() {
    let (fake, dir, mut cfg) = questions_folder(12);
    let first = run_ok(&dir);
    assert!(!first.stderr().contains("repaired"), "a first run into a new folder repairs nothing:\n{}", first.stderr());
    assert!(!dir.read("out/run.log").lines().any(|l| l.contains("WARN") && !l.contains("fake")), "{}", dir.read("out/run.log"));
    let index = dir.join("out/.data_generator.index");
    let jsonl = dir.join("out/dataset.jsonl");
    let csv = dir.join("out/dataset.csv");
    let whole = std::fs::read(&index).expect("the run wrote the index");
    assert_eq!(whole.len(), 16 + 12 * 40, "a header and one entry a record");
    assert_eq!(fake.generations().len(), 12);

    // Unchanged: the records come from the index.
    touch(&jsonl);
    run_ok(&dir).expect_stdout("nothing to do");
    assert!(read_back_line(&dir).contains("12 records from its index .data_generator.index, 0 after it"), "{}", read_back_line(&dir));

    // Deleted: the dataset is read and the index written again, the same bytes.
    std::fs::remove_file(&index).expect("rm index");
    touch(&jsonl);
    run_ok(&dir).expect_stdout("nothing to do");
    assert!(read_back_line(&dir).contains("(no index yet); index written for 12 records"), "{}", read_back_line(&dir));
    assert_eq!(std::fs::read(&index).expect("index"), whole);

    // Its last entries lost and the last one torn (a crash between syncs): the records after it
    // are read from the dataset, and it is whole again.
    std::fs::write(&index, &whole[..whole.len() - 3 * 40 - 7]).expect("cut index");
    touch(&jsonl);
    run_ok(&dir).expect_stdout("nothing to do");
    assert!(read_back_line(&dir).contains("8 records from its index .data_generator.index, 4 after it"), "{}", read_back_line(&dir));
    assert_eq!(std::fs::read(&index).expect("index"), whole);
    assert_eq!(fake.generations().len(), 12, "nothing asked again");

    // A line deleted from the middle of the JSONL: the index does not match, the dataset is read,
    // the CSV is cut to match, and exactly that row runs again.
    let text = dir.read("out/dataset.jsonl");
    let lines: Vec<&str> = text.lines().collect();
    let dropped: Value = serde_json::from_str(lines[5]).expect("json");
    let kept: String = lines.iter().enumerate().filter(|(i, _)| *i != 5).map(|(_, l)| format!("{l}\n")).collect();
    std::fs::write(&jsonl, kept).expect("write");
    run_ok(&dir).expect_stdout("1 of 1 requests done");
    assert!(read_back_line(&dir).contains("11 records from ") && read_back_line(&dir).contains("dataset.jsonl (its index did not match it"), "{}", read_back_line(&dir));
    let again: Vec<String> = fake.generations()[12..].iter().filter_map(|g| g.prompt.clone()).collect();
    assert_eq!(again, vec![dropped["prompt"].as_str().unwrap_or_default().to_owned()], "only the deleted row ran again");
    check_complete(&dir, 12, 1);
    touch(&jsonl);
    run_ok(&dir).expect_stdout("nothing to do");
    assert!(read_back_line(&dir).contains("12 records from its index"), "the run extended the index it rewrote: {}", read_back_line(&dir));

    // A row deleted from the middle of the CSV: the index does not match; the CSV is repaired
    // from the JSONL and nothing is asked.
    let csv_text = dir.read("out/dataset.csv");
    // Rows start with their id and come in the JSONL's order (the order replies finished, not
    // the ids'): the third record's row ends where the fourth's starts, and nine rows follow it.
    let order: Vec<String> = read_jsonl(&jsonl).iter().map(|r| r["id"].as_str().expect("id").to_owned()).collect();
    let start = csv_text.find(&format!("\n{},", order[2])).expect("the third row") + 1;
    let end = csv_text.find(&format!("\n{},", order[3])).expect("the fourth row") + 1;
    std::fs::write(&csv, format!("{}{}", &csv_text[..start], &csv_text[end..])).expect("write csv");
    run_ok(&dir).expect_stdout("nothing to do").expect_stderr("dataset.csv");
    assert!(read_back_line(&dir).contains("its index did not match it"), "{}", read_back_line(&dir));
    assert_eq!(fake.generations().len(), 13);
    check_complete(&dir, 12, 1);

    // Another output format: an index written for JSONL and CSV is not used for JSONL alone (and
    // back), and the CSV, behind after the JSONL-only run, is caught up.
    cfg.output = "dir = \"out\"\nformats = [\"jsonl\"]\n".into();
    dir.write("run.toml", cfg.toml());
    let mut rows_in = dir.read("questions.jsonl");
    rows_in.push_str("{\"id\": \"r13\", \"question\": \"one more?\"}\n");
    dir.write("questions.jsonl", &rows_in);
    run_ok(&dir).expect_stdout("1 of 1 requests done");
    assert!(read_back_line(&dir).contains("its index did not match it"), "{}", read_back_line(&dir));
    cfg.output = "dir = \"out\"\n".into();
    dir.write("run.toml", cfg.toml());
    run_ok(&dir).expect_stdout("nothing to do").expect_stderr("re-appended 1 records");
    assert!(read_back_line(&dir).contains("its index did not match it"), "{}", read_back_line(&dir));
    check_complete(&dir, 13, 1);
    touch(&jsonl);
    run_ok(&dir).expect_stdout("nothing to do");
    assert!(read_back_line(&dir).contains("13 records from its index"), "{}", read_back_line(&dir));
    assert_eq!(fake.generations().len(), 14);

    // Blank lines after the last record (a hand edit): no record; the index is kept and extended
    // past them.
    let mut text = dir.read("out/dataset.jsonl");
    text.push_str("\n  \n");
    std::fs::write(&jsonl, &text).expect("blank lines");
    rows_in.push_str("{\"id\": \"r14\", \"question\": \"after the blank lines?\"}\n");
    dir.write("questions.jsonl", &rows_in);
    run_ok(&dir).expect_stdout("1 of 1 requests done");
    assert!(read_back_line(&dir).contains("13 records from its index"), "{}", read_back_line(&dir));
    touch(&jsonl);
    run_ok(&dir).expect_stdout("nothing to do");
    assert!(read_back_line(&dir).contains("14 records from its index .data_generator.index, 0 after it"), "{}", read_back_line(&dir));
    let recs: Vec<Value> = dir.read("out/dataset.jsonl").lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!((recs.len(), read_csv(&csv).1.len()), (14, 14));
    assert_eq!(recs[13]["id"], "r14");
}

/// The last "input:" line of the run log: how the run checked the input.
fn input_line(dir: &Dir) -> String {
    last_log_line(dir, " input: ")
}

#[test]
fn the_inputs_keys_are_kept_for_the_next_run_while_the_input_and_config_stay_as_they_were() {
    let (fake, dir, mut cfg) = questions_folder(8);
    let jsonl = dir.join("out/dataset.jsonl");
    let kept = dir.join("out/.data_generator.asked");
    run_ok(&dir);
    assert!(!kept.exists(), "a first run into a new folder checks the input as it streams, keeping nothing");

    touch(&jsonl);
    run_ok(&dir).expect_stdout("nothing to do");
    assert!(input_line(&dir).contains("checked: 8 requests, their keys kept in .data_generator.asked"), "{}", input_line(&dir));
    touch(&jsonl);
    run_ok(&dir).expect_stdout("nothing to do");
    assert!(input_line(&dir).contains("the keys of 8 requests from .data_generator.asked"), "{}", input_line(&dir));

    // A record lost from the dataset: the kept keys say which request it was.
    let text = dir.read("out/dataset.jsonl");
    let lines: Vec<&str> = text.lines().collect();
    let dropped: Value = serde_json::from_str(lines[2]).expect("json");
    std::fs::write(&jsonl, lines.iter().enumerate().filter(|(i, _)| *i != 2).map(|(_, l)| format!("{l}\n")).collect::<String>()).expect("write");
    run_ok(&dir).expect_stdout("1 of 1 requests done");
    assert!(input_line(&dir).contains("the keys of 8 requests from"), "{}", input_line(&dir));
    assert_eq!(fake.generations().last().and_then(|g| g.prompt.clone()).as_deref(), dropped["prompt"].as_str());
    assert_eq!(fake.generations().len(), 9);

    // A row added to the input: checked again, and the new row runs.
    let mut rows = dir.read("questions.jsonl");
    rows.push_str("{\"id\": \"r99\", \"question\": \"one more?\"}\n");
    dir.write("questions.jsonl", rows);
    run_ok(&dir).expect_stdout("1 of 1 requests done");
    assert!(input_line(&dir).contains("checked: 9 requests, their keys kept"), "{}", input_line(&dir));

    // The template edited: checked again, every row runs.
    cfg.prompts = "template_text = \"Question: {{ question }}\"\n".into();
    dir.write("run.toml", cfg.toml());
    run_ok(&dir).expect_stdout("9 of 9 requests done");
    assert!(input_line(&dir).contains("checked: 9 requests"), "{}", input_line(&dir));
    assert_eq!(fake.generations().len(), 19);

    // The kept keys cut short: not used, checked again.
    let bytes = std::fs::read(&kept).expect("kept keys");
    std::fs::write(&kept, &bytes[..bytes.len() - 16]).expect("cut");
    touch(&jsonl);
    run_ok(&dir).expect_stdout("nothing to do");
    assert!(input_line(&dir).contains("checked: 9 requests, their keys kept"), "{}", input_line(&dir));
    assert_eq!(std::fs::read(&kept).expect("kept keys"), bytes, "written again, the same");
    check_complete_rows(&dir, 9);
}
