//! Figures, not pass/fail: `cargo bench` prints how fast the real binary drives a server that
//! answers instantly (so the client is the bottleneck), how much memory it holds, and how fast
//! `inspect` and `export` stream a large dataset.
//!
//!   cargo bench                          # defaults: 2,000 requests, 200,000-record dataset
//!   BENCH_REQUESTS=20000 BENCH_RECORDS=1000000 cargo bench

#[path = "../tests/support/fake_ollama.rs"]
mod fake_ollama;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_data_generator");

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs the binary, sampling its peak resident memory from /proc while it runs.
fn run_measured(args: &[&str], dir: &Path) -> (Duration, u64, bool) {
    let start = Instant::now();
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn data_generator");
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0u64;
    let ok = loop {
        if let Ok(s) = std::fs::read_to_string(&status_path) {
            if let Some(kb) = s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()) {
                peak_kb = peak_kb.max(kb);
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            break status.success();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    (start.elapsed(), peak_kb, ok)
}

fn main() {
    let requests = env_num("BENCH_REQUESTS", 2_000);
    let records = env_num("BENCH_RECORDS", 200_000);
    let dir = tempfile::tempdir().expect("tempdir");

    // 1. Generation: a fake Ollama answering at once, ~80 tokens a reply, cut into small writes.
    let fake = fake_ollama::FakeOllama::start(fake_ollama::Options::default());
    let mut rows = std::io::BufWriter::new(std::fs::File::create(dir.path().join("rows.jsonl")).expect("rows"));
    for i in 0..requests {
        writeln!(rows, "{{\"id\":\"r{i}\",\"question\":\"Question number {i}: why?\"}}").expect("write");
    }
    rows.flush().expect("flush");
    drop(rows);
    for concurrency in [1u64, 8, 32] {
        let out = format!("out-c{concurrency}");
        std::fs::write(
            dir.path().join("run.toml"),
            format!(
                "name = \"bench\"\n[backend]\nkind = \"ollama\"\nurl = \"{}\"\nmodel = \"fake-model\"\n[options]\nseed = 1\n\
                 [prompts]\ntemplate_text = \"{{{{ question }}}}\"\n[input]\npath = \"rows.jsonl\"\nid_field = \"id\"\n\
                 [run]\nconcurrency = {concurrency}\n[output]\ndir = \"{out}\"\n",
                fake.url()
            ),
        )
        .expect("config");
        let (took, peak_kb, ok) = run_measured(&["--config", "run.toml", "--progress", "none"], dir.path());
        let text = std::fs::read_to_string(dir.path().join(&out).join("dataset.jsonl")).unwrap_or_default();
        let tokens: u64 = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|r| r["completion_tokens"].as_u64())
            .sum();
        println!(
            "generate  concurrency {concurrency:>2}: {requests} requests in {:>6.2} s = {:>7.0} req/s, {:>8.0} tokens/s streamed; peak RSS {:>5.1} MB{}",
            took.as_secs_f64(),
            requests as f64 / took.as_secs_f64(),
            tokens as f64 / took.as_secs_f64(),
            peak_kb as f64 / 1024.0,
            if ok { "" } else { "  (FAILED)" }
        );
    }
    drop(fake);

    // 2. A large dataset through inspect and export.
    let ds = dir.path().join("big");
    std::fs::create_dir_all(&ds).expect("mkdir");
    let mut f = std::io::BufWriter::new(std::fs::File::create(ds.join("dataset.jsonl")).expect("dataset"));
    for i in 0..records {
        writeln!(
            f,
            r#"{{"id":"row-{i}","sample":0,"model":"m","system":null,"prompt":"Question {i}?","response":"Answer {i}: the quick brown fox jumps over the lazy dog.","thinking":null,"done_reason":"stop","prompt_tokens":9,"completion_tokens":{},"duration_ms":900,"attempts":1,"finished_at":"2026-11-22T00:00:00.000Z","seed":1,"eval_duration_ms":800.0,"key":"{i:032x}","input":{{}}}}"#,
            20 + i % 50
        )
        .expect("write");
    }
    f.flush().expect("flush");
    drop(f);
    let size_mb = std::fs::metadata(ds.join("dataset.jsonl")).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0;
    for (name, args) in [
        ("inspect", vec!["inspect", "big", "--json"]),
        ("export ", vec!["export", "big", "--format", "messages", "-o", "train.jsonl"]),
    ] {
        let (took, peak_kb, ok) = run_measured(&args, dir.path());
        println!(
            "{name} {records} records ({size_mb:.0} MB): {:>6.2} s = {:>7.0} records/s, {:>6.1} MB/s; peak RSS {:>5.1} MB{}",
            took.as_secs_f64(),
            records as f64 / took.as_secs_f64(),
            size_mb / took.as_secs_f64(),
            peak_kb as f64 / 1024.0,
            if ok { "" } else { "  (FAILED)" }
        );
    }
}
