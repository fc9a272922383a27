//! The faults of issue 9, section 3, and the counts of section 4, each through the real binary:
//! secrets never echoed, credentials kept out of every file, a lost JSONL not silently redone, an
//! unterminated last record kept, a kill -9 counted, a corrupt manifest moved aside, empty ports
//! refused, fake datasets marked, progress counts (plain lines and the bar) with failed rows beside
//! the done count and earlier runs included, and a full disk recorded as `failed` in the manifest.


use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::fake_ollama::{expected_response, FakeOllama, Options};
use crate::util::{complete_records, check_records, read_csv, read_jsonl, spawn_with, wait_for, write_questions, ConfigBuilder, Dir, BIN};

fn questions(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("faulty question {i}: pourquoi ? 日本 🎉")).collect()
}

fn write_n_questions(dir: &Dir, n: usize) {
    let qs = questions(n);
    write_questions(dir, &qs.iter().map(String::as_str).collect::<Vec<_>>());
}

/// The config as an OpenAI-compatible one (same fake, `/v1` API base).
fn openai_toml(cfg: &ConfigBuilder) -> String {
    cfg.toml().replace("kind = \"ollama\"", "kind = \"openai\"").replace("keep_alive = \"30m\"\n", "")
}

fn manifest(dir: &Dir, path: &str) -> Value {
    let text = dir.read(path);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}\n{text}"))
}

/// Every (non-directory) file under `dir`, with its bytes.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            out.push((path, bytes));
        }
    }
    out
}

fn contains_bytes(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The plain progress lines of a run's stderr (`[5s] 2/6 done, 1 failed, ...`), without the clock.
fn plain_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.starts_with('['))
        .filter_map(|l| l.split_once("] ").map(|(_, rest)| rest.to_owned()))
        .filter(|rest| rest.split_once('/').is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))
        .collect()
}

/// What the live bar says in each frame of a `--progress bars` run: for every `N/total done` in
/// stderr, N and the text after it up to the next ` · ` separator.
fn bar_counts(stderr: &str, total: usize) -> Vec<(u64, String)> {
    let pat = format!("/{total} done");
    let mut out = Vec::new();
    for (i, _) in stderr.match_indices(&pat) {
        let digits: String = stderr[..i].chars().rev().take_while(char::is_ascii_digit).collect();
        let Ok(n) = digits.chars().rev().collect::<String>().parse::<u64>() else { continue };
        let rest = &stderr[i + pat.len()..];
        let end = [rest.find(" \u{b7}"), rest.find(['\r', '\n', '\x1b'])].into_iter().flatten().min().unwrap_or(rest.len());
        out.push((n, rest[..end].to_owned()));
    }
    out
}

// 1. A key pasted into `api_key_env` is never echoed.
#[test]
fn api_key_pasted_into_api_key_env_is_refused_without_echoing_it() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_questions(&dir, &["one"]);
    let mut cfg = ConfigBuilder::new(&format!("{}/v1", fake.url()));
    cfg.backend_extra = "api_key_env = \"sk-abc123secretvalue\"\n".into();
    dir.write("run.toml", openai_toml(&cfg));
    for args in [&["--config", "run.toml"][..], &["check", "--config", "run.toml"][..]] {
        let run = dir.run(args, &[]);
        run.expect_code(1).expect_stderr("not a valid environment variable name").expect_stderr("the key itself must not be in the config");
        let all = format!("{}{}", run.stdout(), run.stderr());
        assert!(!all.contains("abc123secretvalue"), "the key is echoed\n{all}");
        assert!(!all.contains("sk-abc"), "part of the key is echoed\n{all}");
    }
    assert!(fake.generations().is_empty(), "nothing was asked");
    assert!(!dir.join("out").exists(), "nothing was created");

    // A valid name whose variable is unset: naming the variable is fine (it is no secret).
    cfg.backend_extra = "api_key_env = \"DG_FAULTS_TEST_KEY_NOT_SET\"\n".into();
    dir.write("run.toml", openai_toml(&cfg));
    dir.run(&["--config", "run.toml"], &[])
        .expect_code(1)
        .expect_stderr("DG_FAULTS_TEST_KEY_NOT_SET")
        .expect_stderr("not set");
    assert!(fake.generations().is_empty());
}

// 2. Credentials in a URL reach the server and nothing else.
#[test]
fn credentials_in_the_url_are_sent_but_never_written_or_printed() {
    let fake = FakeOllama::start(Options::default());
    let port = fake.addr.port();
    let dir = Dir::new();
    // One row that gets a 500 once: the retry is logged with the endpoint's URL.
    write_questions(&dir, &["with credentials", "hiccup once [[500x1]]", "third"]);
    let cfg = ConfigBuilder::new(&format!("http://user:s3cretpw@127.0.0.1:{port}"));
    dir.write("run.toml", cfg.toml());
    let run = dir.run(&["--config", "run.toml", "--progress", "plain"], &[]);
    run.expect_code(0);
    assert!(!run.stdout().contains("s3cretpw"), "stdout\n{}", run.stdout());
    assert!(!run.stderr().contains("s3cretpw"), "stderr\n{}", run.stderr());
    for name in ["out/manifest.json", "out/dataset.jsonl", "out/dataset.csv", "out/run.log"] {
        assert!(dir.join(name).exists(), "{name} was written");
    }
    for (path, bytes) in files_under(&dir.join("out")) {
        assert!(!contains_bytes(&bytes, "s3cretpw"), "{} holds the password:\n{}", path.display(), String::from_utf8_lossy(&bytes));
        assert!(!contains_bytes(&bytes, "user:"), "{} holds the user name with its colon", path.display());
    }
    let recs = check_records(&dir, 3);
    for r in &recs {
        assert_eq!(r["endpoint"].as_str(), Some(format!("http://127.0.0.1:{port}").as_str()), "{r}");
    }
    let gens = fake.generations();
    assert_eq!(gens.len(), 4, "three rows, one retried");
    for g in &gens {
        assert_eq!(g.authorization.as_deref(), Some("Basic dXNlcjpzM2NyZXRwdw=="), "user:s3cretpw as Basic auth on {}", g.path);
    }

    // The same URL on a server that is gone: the error names host:port, not the password.
    let mut gone = FakeOllama::start(Options::default());
    let gone_port = gone.addr.port();
    gone.stop();
    let dir = Dir::new();
    write_questions(&dir, &["one"]);
    let cfg = ConfigBuilder::new(&format!("http://user:s3cretpw@127.0.0.1:{gone_port}"));
    dir.write("run.toml", cfg.toml());
    let run = dir.run(&["--config", "run.toml"], &[]);
    run.expect_code(1).expect_stderr(&format!("127.0.0.1:{gone_port}"));
    assert!(!run.stderr().contains("s3cretpw") && !run.stdout().contains("s3cretpw"), "{}\n{}", run.stdout(), run.stderr());
}

// 2b. The same for a URL that comes from OLLAMA_HOST: whether or not it is accepted, the password
// is not printed.
#[test]
fn credentials_in_ollama_host_are_never_printed() {
    let fake = FakeOllama::start(Options::default());
    let port = fake.addr.port();
    let dir = Dir::new();
    write_questions(&dir, &["one"]);
    let mut cfg = ConfigBuilder::new("unused");
    cfg.url = None;
    dir.write("run.toml", cfg.toml());
    for host in [format!("http://user:s3cretpw@127.0.0.1:{port}"), format!("user:s3cretpw@127.0.0.1:{port}")] {
        let run = dir.run(&["--config", "run.toml", "--progress", "none"], &[("OLLAMA_HOST", host.as_str())]);
        let all = format!("{}{}", run.stdout(), run.stderr());
        assert!(!all.contains("s3cretpw"), "OLLAMA_HOST={host}: the password is printed\n{all}");
        if dir.join("out").exists() {
            for (path, bytes) in files_under(&dir.join("out")) {
                assert!(!contains_bytes(&bytes, "s3cretpw"), "{} holds the password", path.display());
            }
        }
    }
}

// 3. A deleted dataset.jsonl beside a full dataset.csv: refuse, say what to do, redo nothing.
#[test]
fn a_deleted_jsonl_beside_its_csv_is_refused_and_the_advice_works() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_n_questions(&dir, 4);
    dir.write("run.toml", ConfigBuilder::new(&fake.url()).toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    assert_eq!(fake.generations().len(), 4);
    let csv_before = std::fs::read(dir.join("out/dataset.csv")).expect("csv");
    std::fs::remove_file(dir.join("out/dataset.jsonl")).expect("rm jsonl");

    let run = dir.run(&["--config", "run.toml"], &[]);
    run.expect_code(1)
        .expect_stderr("dataset.jsonl is missing")
        .expect_stderr("data_generator export")
        .expect_stderr("--format jsonl")
        .expect_stderr("--fresh");
    assert_eq!(fake.generations().len(), 4, "nothing was asked again");
    assert_eq!(std::fs::read(dir.join("out/dataset.csv")).expect("csv"), csv_before, "the CSV is untouched");
    assert!(!dir.join("out/dataset.jsonl").exists() || dir.read("out/dataset.jsonl").is_empty());

    // The advice, as printed: rebuild the JSONL from the CSV; then there is nothing to do.
    dir.run(&["export", "out/dataset.csv", "--format", "jsonl", "-o", "out/dataset.jsonl"], &[]).expect_code(0);
    assert_eq!(read_jsonl(&dir.join("out/dataset.jsonl")).len(), 4);
    dir.run(&["--config", "run.toml"], &[]).expect_code(0).expect_stdout("nothing to do");
    assert_eq!(fake.generations().len(), 4, "still nothing asked again");
}

// 4. A last record without its newline (an editor) is complete: kept, newline added.
#[test]
fn a_final_record_without_its_newline_is_kept_not_torn() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_n_questions(&dir, 4);
    dir.write("run.toml", ConfigBuilder::new(&fake.url()).toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    let before = read_jsonl(&dir.join("out/dataset.jsonl"));
    let jsonl = dir.join("out/dataset.jsonl");
    let mut bytes = std::fs::read(&jsonl).expect("read");
    assert_eq!(bytes.pop(), Some(b'\n'));
    std::fs::write(&jsonl, &bytes).expect("write");

    dir.run(&["--config", "run.toml"], &[]).expect_code(0).expect_stdout("nothing to do");
    assert_eq!(fake.generations().len(), 4, "nothing was asked again");
    let torn: Vec<String> = std::fs::read_dir(dir.join("out"))
        .expect("ls out")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.contains("torn"))
        .collect();
    assert!(torn.is_empty(), "the record was treated as torn: {torn:?}");
    let text = dir.read("out/dataset.jsonl");
    assert!(text.ends_with('\n'), "the newline is back");
    assert_eq!(read_jsonl(&jsonl), before, "the same records");
    check_records(&dir, 4);
}

// 5. After kill -9, the next run says how many requests the killed run finished.
#[test]
fn after_kill_9_the_next_run_counts_what_the_killed_run_finished() {
    let fake = FakeOllama::start(Options { token_delay: Duration::from_millis(5), ..Default::default() });
    let dir = Dir::new();
    write_n_questions(&dir, 30);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 2\n".into();
    dir.write("run.toml", cfg.toml());
    let mut child = spawn_with(&dir, &["--config", "run.toml", "--progress", "none"], Stdio::null(), Stdio::null());
    wait_for("5 records", Duration::from_secs(60), || {
        std::fs::read_to_string(dir.join("out/dataset.jsonl")).is_ok_and(|t| t.lines().count() >= 5)
    });
    assert!(child.try_wait().expect("try_wait").is_none(), "the run ended before the kill");
    child.kill().expect("kill -9");
    let _ = child.wait();
    let written: Vec<String> = complete_records(&dir).iter().map(|r| r["prompt"].as_str().expect("prompt").to_owned()).collect();
    let n = written.len();
    assert!((5..30).contains(&n), "{n} records at the kill");
    let killed_manifest = manifest(&dir, "out/manifest.json");
    assert_eq!(killed_manifest["runs"][0]["status"], "running", "the killed run had no time to say more");

    let run = dir.run(&["--config", "run.toml", "--progress", "none"], &[]);
    run.expect_code(0).expect_stderr(&format!("after finishing {n} requests"));
    let m = manifest(&dir, "out/manifest.json");
    assert_eq!(m["runs"][0]["status"], "killed", "{m}");
    assert_eq!(m["runs"][0]["done"], n as u64, "the killed run's count comes from the dataset\n{m}");
    assert_eq!(m["runs"][1]["status"], "completed", "{m}");
    check_records(&dir, 30);
    // What was written before the kill is never asked again. More than the two in flight can be:
    // a reply is finished (its slot free, the next request sent) before it is written.
    let mut asked: HashMap<String, usize> = HashMap::new();
    for g in fake.generations() {
        *asked.entry(g.prompt.clone().expect("prompt")).or_default() += 1;
    }
    assert!(written.iter().all(|p| asked[p] == 1), "a record written before the kill was asked again: {asked:?}");
    assert_eq!(asked.len(), 30);
    assert!(asked.values().all(|&n| n <= 2), "only the requests around the kill were asked twice: {asked:?}");
}

// 6. A corrupt manifest is moved aside with a warning naming where to.
#[test]
fn a_corrupt_manifest_is_moved_aside_with_a_warning() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_n_questions(&dir, 3);
    dir.write("run.toml", ConfigBuilder::new(&fake.url()).toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    dir.write("out/manifest.json", "{not json");

    dir.run(&["--config", "run.toml"], &[]).expect_code(0).expect_stderr("manifest.json.corrupt-1").expect_stdout("nothing to do");
    assert_eq!(dir.read("out/manifest.json.corrupt-1"), "{not json", "the bad manifest is kept as it was");
    let m = manifest(&dir, "out/manifest.json");
    assert!(m["runs"].as_array().is_some_and(|r| !r.is_empty()), "a new manifest with this run\n{m}");
    assert_eq!(fake.generations().len(), 3, "the dataset was untouched: nothing asked again");
    check_records(&dir, 3);
}

// 7. An empty port is an error (not port 80), named by where it came from.
#[test]
fn an_empty_port_is_an_error_named_by_its_source() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_questions(&dir, &["one"]);
    dir.write("run.toml", ConfigBuilder::new(&fake.url()).toml());
    let run = dir.run(&["--config", "run.toml", "--url", "http://127.0.0.1:"], &[]);
    run.expect_code(1);
    let err = run.stderr();
    assert!(err.starts_with("Error: --url:"), "the flag is named first\n{err}");
    assert!(err.contains("port"), "says the port is missing\n{err}");
    assert!(!err.contains("run.toml"), "the flag's error does not blame run.toml\n{err}");

    let mut cfg = ConfigBuilder::new("http://127.0.0.1:");
    cfg.model = "fake-model".into();
    dir.write("run.toml", cfg.toml());
    let run = dir.run(&["--config", "run.toml"], &[]);
    run.expect_code(1).expect_stderr("backend.url").expect_stderr("port");
    assert!(fake.generations().is_empty());
    assert!(!dir.join("out").exists());
}

// 8. A dataset made from the fake says so.
#[test]
fn a_dataset_from_the_fake_is_marked_as_fake() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_questions(&dir, &["one", "two"]);
    dir.write("run.toml", ConfigBuilder::new(&fake.url()).toml());
    let run = dir.run(&["--config", "run.toml"], &[]);
    run.expect_code(0);
    let err = run.stderr();
    assert!(err.contains("fake") && (err.contains("made up") || err.contains("made-up")), "stderr says the answers are made up\n{err}");
    let m = manifest(&dir, "out/manifest.json");
    assert_eq!(m["server"]["fake"], true, "{m}");
}

// 9a. Plain progress lines carry the bar's counts: failed rows beside `done`, not inside.
#[test]
fn plain_progress_lines_show_failed_rows_beside_the_done_count() {
    // r1 fails at once (400); r2 streams for ~8 s (token by token, 120 ms each), r3..r6 at once.
    // With one request at a time, the first plain line (after 5 s) comes while r2 streams.
    let fake = FakeOllama::start(Options { slow_delay: Duration::from_millis(120), ..Default::default() });
    let dir = Dir::new();
    write_questions(&dir, &["bad request [[400]]", "slow one [[slow]]", "three", "four", "five", "six"]);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 1\nmax_retries = 1\nretry_base_delay_ms = 10\nidle_timeout_secs = 5\n".into();
    dir.write("run.toml", cfg.toml());
    let run = dir.run(&["--config", "run.toml", "--progress", "plain"], &[]);
    run.expect_code(3).expect_stderr("failed: ").expect_stdout("5 of 6 requests done, 1 failed");
    let lines = plain_lines(&run.stderr());
    assert!(!lines.is_empty(), "a plain line every 5 s\n{}", run.stderr());
    assert!(
        lines[0].starts_with("0/6 done, 1 failed"),
        "the failed row is beside the done count, not in it: {:?}\n{}",
        lines[0],
        run.stderr()
    );
    for l in &lines {
        let done: u64 = l.split('/').next().and_then(|n| n.parse().ok()).expect("count");
        assert!(done <= 5, "only 5 rows can be done: {l}");
    }
    assert_eq!(dir.jsonl("out/dataset.jsonl").len(), 5);
    assert_eq!(dir.jsonl("out/failures.jsonl").len(), 1);
}

// 9b. On a resumed batch the plain line covers the whole batch and says how much came before.
#[test]
fn plain_progress_lines_on_a_resumed_batch_count_earlier_runs() {
    let fake = FakeOllama::start(Options { token_delay: Duration::from_millis(30), ..Default::default() });
    let dir = Dir::new();
    write_n_questions(&dir, 8);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 3\n".into();
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml", "--limit", "3", "--progress", "none"], &[]).expect_code(0);
    assert_eq!(dir.jsonl("out/dataset.jsonl").len(), 3);

    // Five rows one at a time, ~2 s each: the run lasts well over the 5 s between plain lines.
    let run = dir.run(&["--config", "run.toml", "--concurrency", "1", "--progress", "plain"], &[]);
    run.expect_code(0).expect_stdout("5 of 5 requests done");
    let lines = plain_lines(&run.stderr());
    assert!(!lines.is_empty(), "a plain line every 5 s\n{}", run.stderr());
    for l in &lines {
        assert!(l.contains("/8 done (3 from earlier runs)"), "the whole batch, with the earlier runs: {l}\n{}", run.stderr());
        assert!(!l.contains("failed"), "{l}");
    }
    let first: u64 = lines[0].split('/').next().and_then(|n| n.parse().ok()).expect("count");
    assert!((3..8).contains(&first), "the count starts from the earlier runs' 3: {}", lines[0]);
    check_records(&dir, 8);
}

// 9c. The live bar (forced with --progress bars, drawn to the pipe) shows the same counts.
#[test]
fn the_bar_counts_finished_rows_with_failed_rows_beside() {
    let fake = FakeOllama::start(Options { slow_delay: Duration::from_millis(40), ..Default::default() });
    let dir = Dir::new();
    write_questions(&dir, &["bad request [[400]]", "slow one [[slow]]", "three", "four", "five", "six"]);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 1\nmax_retries = 1\nretry_base_delay_ms = 10\nidle_timeout_secs = 5\n".into();
    dir.write("run.toml", cfg.toml());
    let run = dir.run(&["--config", "run.toml", "--progress", "bars"], &[]);
    run.expect_code(3).expect_stdout("5 of 6 requests done, 1 failed");
    let frames = bar_counts(&run.stderr(), 6);
    assert!(!frames.is_empty(), "the bar was drawn\n{}", run.stderr());
    assert!(
        frames.iter().any(|(n, rest)| *n == 0 && rest == ", 1 failed"),
        "while the slow row streams the bar says 0/6 done, 1 failed: {frames:?}"
    );
    assert!(frames.iter().all(|(n, _)| *n <= 5), "a failed row is not counted as done: {frames:?}");
}

// 9d. On a resumed batch the bar covers the whole batch, not the remaining rows.
#[test]
fn the_bar_on_a_resumed_batch_covers_the_whole_batch() {
    let fake = FakeOllama::start(Options { token_delay: Duration::from_millis(20), ..Default::default() });
    let dir = Dir::new();
    write_n_questions(&dir, 8);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 3\n".into();
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml", "--limit", "3", "--progress", "none"], &[]).expect_code(0);
    let run = dir.run(&["--config", "run.toml", "--progress", "bars"], &[]);
    run.expect_code(0).expect_stdout("5 of 5 requests done");
    let frames = bar_counts(&run.stderr(), 8);
    assert!(!frames.is_empty(), "the bar was drawn over the whole batch of 8\n{}", run.stderr());
    for (n, rest) in &frames {
        assert!((3..=8).contains(n) && rest == " (3 from earlier runs)", "{n}/8 done{rest}: {frames:?}");
    }
    assert!(bar_counts(&run.stderr(), 5).is_empty(), "no bar over the 5 remaining rows only");
    check_records(&dir, 8);
}

/// Runs 60 rows into a 48 KiB tmpfs (a private mount namespace: nothing leaks out of the test);
/// what the folder held afterwards is copied to `saved/out` and its listing to `saved/listing`.
/// None when `unshare -rm` is not available here.
fn full_disk_run(dir: &Dir, fake: &FakeOllama) -> Option<(Option<i32>, String, String)> {
    let probe = Command::new("unshare").args(["-rm", "true"]).status();
    if !probe.map(|s| s.success()).unwrap_or(false) {
        eprintln!("full_disk test SKIPPED: it needs `unshare -rm` (mount namespaces) to make a small disk");
        return None;
    }
    write_n_questions(dir, 60);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.output = "dir = \"disk/out\"\n".into();
    cfg.run = "concurrency = 2\n".into();
    dir.write("run.toml", cfg.toml());
    std::fs::create_dir_all(dir.join("disk")).expect("mkdir");
    std::fs::create_dir_all(dir.join("saved")).expect("mkdir");
    let script = format!(
        "mount -t tmpfs -o size=48k tmpfs disk && {BIN} --config run.toml; code=$?; ls -a disk/out > saved/listing; cp -r disk/out saved/; exit $code"
    );
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .current_dir(dir.path())
        .env_remove("OLLAMA_HOST")
        .env("NO_COLOR", "1")
        .output()
        .expect("unshare");
    Some((out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

// 10. A full disk: the manifest says `failed` with the error, no temp file is left, one message.
#[test]
fn full_disk_leaves_a_failed_manifest_and_no_temp_file() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    let Some((code, stdout, stderr)) = full_disk_run(&dir, &fake) else { return };
    assert_eq!(code, Some(1), "exit 1 on a full disk\n{stdout}\n{stderr}");
    assert_eq!(stderr.matches("No space left on device").count(), 1, "the OS error once, not twice\n{stderr}");

    let m = manifest(&dir, "saved/out/manifest.json");
    let last = m["runs"].as_array().and_then(|r| r.last()).cloned().unwrap_or(Value::Null);
    assert_eq!(last["status"], "failed", "the manifest does not say running\n{m}");
    assert!(last["error"].as_str().is_some_and(|e| e.contains("No space left")), "the error is in the manifest\n{m}");

    let listing = dir.read("saved/listing");
    assert!(!listing.lines().any(|n| n.contains(".tmp")), "a temp file is left behind:\n{listing}");
    assert!(!dir.join("saved/out/.manifest.json.tmp").exists());
    let recs = read_jsonl(&dir.join("saved/out/dataset.jsonl")); // every line whole
    assert!(!recs.is_empty() && recs.len() < 60, "{} records", recs.len());
    for r in &recs {
        assert_eq!(r["response"].as_str(), Some(expected_response(r["prompt"].as_str().unwrap_or_default()).as_str()));
    }
    let (_, csv_rows) = read_csv(&dir.join("saved/out/dataset.csv"));
    assert!(csv_rows.len() <= recs.len());
}

// 10b. The failed run's counts in the manifest are what the dataset holds: a record that never
// reached the disk is not `done` (the next run does it).
#[test]
fn full_disk_manifest_counts_only_the_records_written() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    let Some((code, stdout, stderr)) = full_disk_run(&dir, &fake) else { return };
    assert_eq!(code, Some(1), "exit 1 on a full disk\n{stdout}\n{stderr}");
    let recs = read_jsonl(&dir.join("saved/out/dataset.jsonl"));
    let m = manifest(&dir, "saved/out/manifest.json");
    let last = m["runs"].as_array().and_then(|r| r.last()).cloned().unwrap_or(Value::Null);
    assert_eq!(last["done"], recs.len() as u64, "runs[-1].done vs the {} records in dataset.jsonl\n{m}", recs.len());
    assert_eq!(m["counts"]["done"], recs.len() as u64, "counts.done vs the {} records in dataset.jsonl\n{m}", recs.len());
    assert_eq!(m["counts"]["remaining"], 60 - recs.len() as u64, "counts.remaining\n{m}");
}

// --fresh moves the old folder aside only once the run can start: with the server down it stays.
#[test]
fn fresh_with_the_server_down_moves_nothing() {
    let mut fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_n_questions(&dir, 3);
    dir.write("run.toml", ConfigBuilder::new(&fake.url()).toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    fake.stop();
    dir.run(&["--config", "run.toml", "--fresh"], &[]).expect_code(1).expect_stderr("cannot reach Ollama");
    assert!(!dir.join("out.old-1").exists(), "nothing moved aside");
    check_records(&dir, 3);
}

// The live display: redrawn on a clock (at most ~15 times a second, however fast tokens come),
// and each request says what it is doing.
#[test]
fn the_live_display_is_paced_and_says_what_each_request_waits_for() {
    let fake = FakeOllama::start(Options { token_delay: Duration::from_millis(2), ..Default::default() });
    let dir = Dir::new();
    let qs: Vec<String> = (1..=12).map(|i| if i == 1 { "busy once [[503x1]]".to_owned() } else { format!("question {i}") }).collect();
    write_questions(&dir, &qs.iter().map(String::as_str).collect::<Vec<_>>());
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 2\nmax_retries = 2\nretry_base_delay_ms = 1500\n".into();
    dir.write("run.toml", cfg.toml());
    let started = std::time::Instant::now();
    let run = dir.run(&["--config", "run.toml", "--progress", "bars"], &[]);
    let secs = started.elapsed().as_secs_f64();
    run.expect_code(0);
    let err = run.stderr();
    // Every redraw starts by clearing what is below the cursor.
    let redraws = err.matches("\x1b[J").count() as f64;
    assert!(redraws <= 16.0 * secs + 5.0, "{redraws} redraws in {secs:.1} s");
    assert!(err.contains("streaming"), "a streaming request shows its tokens");
    assert!(err.contains("retry 1/2 in "), "a retry wait says so:\n{err}");
    assert!(err.contains("503"), "with its reason");
}
