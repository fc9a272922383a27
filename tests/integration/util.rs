//! Test helpers: a temporary project folder, running the binary, reading what it wrote.
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_data_generator");

/// A temporary folder holding a config, its prompts and its input.
pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        Dir { tmp: tempfile::tempdir().expect("tempdir") }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    pub fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let p = self.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, content).expect("write");
        p
    }

    /// Runs the binary in this folder (OLLAMA_HOST cleared unless given in `env`).
    pub fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(BIN);
        cmd.args(args).current_dir(self.path()).env_remove("OLLAMA_HOST").env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let desc = format!("{cmd:?}");
        let output = cmd.output().expect("run data_generator");
        Run { desc, output }
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
    }

    pub fn jsonl(&self, name: &str) -> Vec<Value> {
        read_jsonl(&self.join(name))
    }
}

pub fn read_jsonl(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(text.is_empty() || text.ends_with('\n'), "{} does not end with a newline", path.display());
    text.lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}:{}: {e}: {l}", path.display(), i + 1)))
        .collect()
}

/// CSV parsed back: header and rows.
pub fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let mut r = csv::Reader::from_path(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let header = r.headers().expect("csv header").iter().map(str::to_owned).collect();
    let rows = r.records().map(|rec| rec.expect("csv record").iter().map(str::to_owned).collect()).collect();
    (header, rows)
}

/// A finished command, whose failing assertions show the command, stdout and stderr.
pub struct Run {
    pub desc: String,
    pub output: Output,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.output.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    fn context(&self) -> String {
        format!("\ncommand: {}\nexit: {:?}\n--- stdout\n{}\n--- stderr\n{}\n", self.desc, self.output.status, self.stdout(), self.stderr())
    }
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Run {
        assert_eq!(self.code(), code, "unexpected exit code{}", self.context());
        self
    }
    #[track_caller]
    pub fn expect_stderr(&self, needle: &str) -> &Run {
        assert!(self.stderr().contains(needle), "stderr lacks {needle:?}{}", self.context());
        self
    }
    #[track_caller]
    pub fn expect_stdout(&self, needle: &str) -> &Run {
        assert!(self.stdout().contains(needle), "stdout lacks {needle:?}{}", self.context());
        self
    }
}

/// A config for the fake server; `extra` is appended (TOML tables after the defaults are not allowed
/// twice, so callers pass whole sections they want to replace via `sections`).
pub struct ConfigBuilder {
    pub url: Option<String>,
    pub model: String,
    pub api: &'static str,
    pub options: String,
    pub prompts: String,
    pub input: String,
    pub run: String,
    pub output: String,
    pub backend_extra: String,
}

impl ConfigBuilder {
    pub fn new(url: &str) -> ConfigBuilder {
        ConfigBuilder {
            url: Some(url.to_owned()),
            model: "fake-model".into(),
            api: "chat",
            options: "temperature = 0.7\nseed = 42\nnum_predict = 256\n".into(),
            prompts: "system_text = \"Tu es un élève. Réponds brièvement.\"\ntemplate_text = \"Q: {{ question }}\"\n".into(),
            input: "path = \"questions.jsonl\"\nid_field = \"id\"\n".into(),
            run: "concurrency = 3\nmax_retries = 3\nretry_base_delay_ms = 10\nidle_timeout_secs = 2\nconnect_timeout_secs = 2\n".into(),
            output: "dir = \"out\"\n".into(),
            backend_extra: "keep_alive = \"30m\"\n".into(),
        }
    }

    pub fn toml(&self) -> String {
        let url = self.url.as_ref().map(|u| format!("url = \"{u}\"\n")).unwrap_or_default();
        format!(
            "name = \"test\"\n\n[backend]\nkind = \"ollama\"\n{url}model = \"{}\"\napi = \"{}\"\n{}\n[options]\n{}\n[prompts]\n{}\n[input]\n{}\n[run]\n{}\n[output]\n{}",
            self.model, self.api, self.backend_extra, self.options, self.prompts, self.input, self.run, self.output
        )
    }
}

/// Writes `questions.jsonl` with one row per question, ids r1..rN.
pub fn write_questions(dir: &Dir, questions: &[&str]) {
    let mut s = String::new();
    for (i, q) in questions.iter().enumerate() {
        s.push_str(&serde_json::json!({"id": format!("r{}", i + 1), "question": q}).to_string());
        s.push('\n');
    }
    dir.write("questions.jsonl", s);
}

/// Starts the binary in `dir` without waiting (for kills, signals and runs side by side).
pub fn spawn_with(dir: &Dir, args: &[&str], stdout: Stdio, stderr: Stdio) -> Child {
    Command::new(BIN)
        .args(args)
        .current_dir(dir.path())
        .env_remove("OLLAMA_HOST")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("spawn data_generator")
}

/// Starts the binary in `dir` and waits for the line of its stderr that starts with `prefix`
/// (where a page's URL is printed): the child, the rest of that line, and stderr's later lines
/// (read by a thread to the end, so the child never blocks on a full pipe).
#[allow(clippy::zombie_processes)] // every caller waits for or kills the child
pub fn spawn_until_line(dir: &Dir, args: &[&str], prefix: &str) -> (Child, String, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = spawn_with(dir, args, Stdio::null(), Stdio::piped());
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|e| panic!("no line starting {prefix:?} on stderr: {e}"));
        if let Some(rest) = line.strip_prefix(prefix) {
            return (child, rest.trim().to_owned(), rx);
        }
    }
}

/// [`spawn_with`], output captured.
pub fn spawn(dir: &Dir, args: &[&str]) -> Child {
    spawn_with(dir, args, Stdio::piped(), Stdio::piped())
}

/// The complete records of `out/dataset.jsonl` so far: a torn last line (a run killed while
/// writing it, or still writing it) is not one.
pub fn complete_records(dir: &Dir) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(dir.join("out/dataset.jsonl")) else { return Vec::new() };
    text.split_inclusive('\n').filter(|l| l.ends_with('\n')).filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Waits until `ok`, failing the test after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `out/dataset.jsonl` holds `n` records, each (row, sample) once, each with the fake's exact text.
pub fn check_records(dir: &Dir, n: usize) -> Vec<Value> {
    let recs = read_jsonl(&dir.join("out/dataset.jsonl"));
    assert_eq!(recs.len(), n, "one record per row");
    let ids: HashSet<(String, u64)> =
        recs.iter().map(|r| (r["id"].as_str().unwrap_or_default().to_owned(), r["sample"].as_u64().unwrap_or(99))).collect();
    assert_eq!(ids.len(), n, "no (row, sample) twice");
    for r in &recs {
        let want = crate::fake_ollama::expected_response(r["prompt"].as_str().unwrap_or_default());
        assert_eq!(r["response"].as_str(), Some(want.as_str()), "byte-exact");
    }
    recs
}
