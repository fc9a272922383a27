//! `inspect`, `export` and `check` through the real binary, on datasets the tests write.

use std::collections::HashSet;
use std::io::Read;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::fake_ollama::{FakeOllama, Options};
use crate::util::{read_csv, read_jsonl, write_questions, ConfigBuilder, Dir, BIN};

fn key(n: u32) -> String {
    format!("{n:032x}")
}

#[allow(clippy::too_many_arguments)]
fn rec(id: &str, sample: u32, model: &str, prompt: &str, response: &str, reason: &str, tokens: u64, n: u32) -> Value {
    json!({
        "id": id, "sample": sample, "model": model, "system": "Sys, \"quoted\"\nline 2",
        "prompt": prompt, "response": response, "thinking": if n == 3 { json!("hmm… 🤔") } else { Value::Null },
        "done_reason": reason, "prompt_tokens": 5, "completion_tokens": tokens, "duration_ms": 1000,
        "attempts": 1, "finished_at": "2026-11-22T00:00:00.000Z", "seed": 42, "eval_duration_ms": 500.0,
        "key": key(n), "endpoint": "http://127.0.0.1:1", "tokens_estimated": false,
        "input": {"question": format!("q-{id}"), "context": "ctx"},
    })
}

/// Ten records with one of each thing inspect looks for, two malformed lines, and a torn tail.
fn write_dataset(dir: &Dir) -> Vec<Value> {
    let recs = vec![
        rec("a", 0, "m1", "Why?", "Because, \"it\" is\nso.", "stop", 10, 1),
        rec("a", 1, "m1", "Why?", "Another answer 日本 🎉", "stop", 20, 2),
        rec("b", 0, "m1", "How?", "Like this.", "length", 30, 3),
        rec("c", 0, "m2", "What?", "", "stop", 0, 4),
        rec("d", 0, "m2", "Who?", "Because, \"it\" is\nso.", "stop", 10, 5),
        rec("e", 0, "m1", "Echo me", "You said: Echo me", "stop", 40, 6),
        rec("f", 0, "m1", "Broken", "lost \u{fffd} char", "stop", 50, 7),
        rec("g", 0, "m1", "Long?", "A fairly long answer that goes on and on.", "length", 60, 8),
        rec("h", 0, "m1", "Short", "ok", "stop", 70, 9),
        rec("i", 0, "m1", "Last", "last one", "stop", 80, 10),
    ];
    let mut text = String::new();
    for (i, r) in recs.iter().enumerate() {
        text.push_str(&r.to_string());
        text.push('\n');
        if i == 3 {
            text.push_str("{not json\n");
        }
        if i == 6 {
            text.push_str("[1,2,3]\n");
        }
    }
    text.push_str("{\"id\":\"torn");
    dir.write("ds/dataset.jsonl", text);
    dir.write(
        "ds/failures.jsonl",
        format!(
            "{}\n{}\n{}\n",
            json!({"id":"x","sample":0,"model":"m1","error":"HTTP 503: busy","attempts":5,"retryable":true,"key":key(99),"when":"t"}),
            json!({"id":"y","sample":0,"model":"m1","error":"HTTP 503: busy","attempts":5,"retryable":true,"key":key(98),"when":"t"}),
            json!({"id":"a","sample":0,"model":"m1","error":"truncated","attempts":5,"retryable":true,"key":key(1),"when":"t"}),
        ),
    );
    recs
}

fn inspect_json(dir: &Dir, args: &[&str]) -> Value {
    let run = dir.run(&[&["inspect"], args, &["--json"]].concat(), &[]);
    run.expect_code(0);
    serde_json::from_str(&run.stdout()).unwrap_or_else(|e| panic!("inspect --json: {e}\n{}", run.stdout()))
}

#[test]
fn inspect_counts_what_matters() {
    let dir = Dir::new();
    write_dataset(&dir);
    let r = inspect_json(&dir, &["ds"]);
    assert_eq!(r["records"], 10);
    assert_eq!(r["unique"], 10);
    assert_eq!(r["malformed"], 3, "two bad lines and a torn tail");
    let lines: Vec<u64> = r["malformed_lines"].as_array().expect("lines").iter().filter_map(|m| m["line"].as_u64()).collect();
    assert_eq!(lines, vec![5, 9, 13]);
    assert_eq!(r["done_reasons"]["stop"], 8);
    assert_eq!(r["done_reasons"]["length"], 2);
    assert!((r["length_share"].as_f64().unwrap_or(0.0) - 0.2).abs() < 1e-9);
    assert_eq!(r["empty_responses"], 1);
    assert_eq!(r["duplicate_responses"], 1);
    assert_eq!(r["contains_prompt"], 1);
    assert_eq!(r["replacement_chars"], 1);
    assert_eq!(r["with_thinking"], 1);
    assert_eq!(r["models"]["m1"], 8);
    assert_eq!(r["models"]["m2"], 2);
    assert_eq!(r["samples"]["1"], 1);
    let t = &r["completion_tokens"];
    assert_eq!((t["min"].as_f64(), t["max"].as_f64(), t["count"].as_u64()), (Some(0.0), Some(80.0), Some(10)));
    let median = t["median"].as_f64().unwrap_or(0.0);
    assert!((29.0..=41.0).contains(&median), "median {median} (histogram quantiles are within about 2%)");
    assert_eq!(r["tokens_per_sec"]["max"].as_f64(), Some(160.0), "80 tokens in 500 ms of generation");
    assert_eq!(r["failures"]["lines"], 3);
    assert_eq!(r["failures"]["resolved"], 1, "a's failure has a record since");
    assert_eq!(r["failures"]["top_errors"][0][0], "HTTP 503: busy");
    assert_eq!(r["failures"]["top_errors"][0][1], 2);

    let text = dir.run(&["inspect", "ds"], &[]);
    text.expect_code(0)
        .expect_stdout("records: 10")
        .expect_stdout("malformed lines: 3 (line 5, 9, 13)")
        .expect_stdout("warning: 20.0% of responses were cut off")
        .expect_stdout("models: m1 8, m2 2");
}

#[test]
fn inspect_reads_csv_like_jsonl() {
    let dir = Dir::new();
    write_dataset(&dir);
    // The CSV of the same records, through export.
    dir.run(&["export", "ds", "--format", "csv", "-o", "csv/dataset.csv"], &[]).expect_code(0);
    let j = inspect_json(&dir, &["ds"]);
    let c = inspect_json(&dir, &["csv/dataset.csv"]);
    for k in ["records", "unique", "done_reasons", "empty_responses", "duplicate_responses", "contains_prompt", "replacement_chars", "models", "completion_tokens", "response_chars"] {
        assert_eq!(j[k], c[k], "{k} differs between JSONL and CSV");
    }
    assert_eq!(c["malformed"], 0);
}

#[test]
fn inspect_sample_and_id() {
    let dir = Dir::new();
    write_dataset(&dir);
    let a = inspect_json(&dir, &["ds", "--sample", "3", "--seed", "7"]);
    let b = inspect_json(&dir, &["ds", "--sample", "3", "--seed", "7"]);
    assert_eq!(a["sampled"], b["sampled"], "the same seed shows the same records");
    assert_eq!(a["sampled"].as_array().map(Vec::len), Some(3));
    let ids = |v: &Value| -> Vec<String> { v["sampled"].as_array().into_iter().flatten().filter_map(|r| r["id"].as_str().map(str::to_owned)).collect() };
    let differs = (0..10).any(|s| ids(&inspect_json(&dir, &["ds", "--sample", "3", "--seed", &s.to_string()])) != ids(&a));
    assert!(differs, "other seeds show other records");
    let one = inspect_json(&dir, &["ds", "--id", "a"]);
    assert_eq!(one["by_id"].as_array().map(Vec::len), Some(2), "both samples of id a");
    dir.run(&["inspect", "ds", "--id", "b"], &[]).expect_code(0).expect_stdout("[thinking]\nhmm… 🤔").expect_stdout("[response]\nLike this.");
}

#[test]
fn inspect_streams_a_large_dataset() {
    // Made on the fly; the million-record memory bound is checked in-process by `memory.rs`,
    // here that the binary streams a large file through and counts right.
    let dir = Dir::new();
    let path = dir.join("big/dataset.jsonl");
    crate::memory::write_big_dataset(&path, 200_000);
    let r = inspect_json(&dir, &["big"]);
    assert_eq!(r["records"], 200_000);
    assert_eq!(r["unique"], 200_000);
    assert_eq!(r["done_reasons"]["length"], 20_000);
}

#[test]
fn inspect_with_config_tells_stale_records_apart() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_questions(&dir, &["one", "two", "three"]);
    let mut cfg = ConfigBuilder::new(&fake.url());
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    cfg.prompts = cfg.prompts.replace("template_text = \"Q: {{ question }}\"", "template_text = \"{% if id == 'r1' %}Question{% else %}Q{% endif %}: {{ question }}\"");
    dir.write("run2.toml", cfg.toml());
    // Before re-running: the config's 3 requests, 2 records match, 1 stale, 1 missing.
    let r = inspect_json(&dir, &["out", "--config", "run2.toml"]);
    assert_eq!(r["config"], json!({"requests": 3, "matching": 2, "stale": 1, "missing": 1}));
    dir.run(&["--config", "run2.toml"], &[]).expect_code(0);
    let r = inspect_json(&dir, &["out", "--config", "run2.toml"]);
    assert_eq!(r["config"], json!({"requests": 3, "matching": 3, "stale": 1, "missing": 0}));
    // Export with the config: only what counts.
    dir.run(&["export", "out", "--format", "jsonl", "--config", "run2.toml", "-o", "counted.jsonl"], &[]).expect_code(0).expect_stderr("1 made by another config");
    let counted = read_jsonl(&dir.join("counted.jsonl"));
    assert_eq!(counted.len(), 3);
    assert!(counted.iter().any(|r| r["prompt"] == "Question: one"));
}

fn export_lines(dir: &Dir, args: &[&str]) -> Vec<Value> {
    let run = dir.run(&[&["export", "ds"], args].concat(), &[]);
    run.expect_code(0);
    run.stdout().lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

#[test]
fn export_formats_parse_back() {
    let dir = Dir::new();
    let recs = write_dataset(&dir);

    let msgs = export_lines(&dir, &["--format", "messages"]);
    assert_eq!(msgs.len(), 10);
    for (m, r) in msgs.iter().zip(&recs) {
        assert_eq!(m["messages"][0], json!({"role": "system", "content": r["system"]}));
        assert_eq!(m["messages"][1], json!({"role": "user", "content": r["prompt"]}));
        assert_eq!(m["messages"][2], json!({"role": "assistant", "content": r["response"]}));
    }
    let with_thinking = export_lines(&dir, &["--format", "messages", "--include-thinking"]);
    assert_eq!(with_thinking[2]["messages"][2]["content"], "<think>\nhmm… 🤔\n</think>\n\nLike this.");

    let share = export_lines(&dir, &["--format", "sharegpt"]);
    assert_eq!(share[1]["conversations"], json!([
        {"from": "system", "value": recs[1]["system"]},
        {"from": "human", "value": "Why?"},
        {"from": "gpt", "value": "Another answer 日本 🎉"},
    ]));

    let alpaca = export_lines(&dir, &["--format", "alpaca"]);
    assert_eq!(alpaca[0], json!({"instruction": "Why?", "input": "", "output": "Because, \"it\" is\nso."}));
    let alpaca = export_lines(&dir, &["--format", "alpaca", "--instruction-field", "question", "--input-field", "context"]);
    assert_eq!(alpaca[0], json!({"instruction": "q-a", "input": "ctx", "output": "Because, \"it\" is\nso."}));

    let plain = export_lines(&dir, &["--format", "jsonl"]);
    assert_eq!(plain, recs, "JSONL export gives the records back");

    // CSV and back to JSONL: every scalar field survives (CSV keeps no input rows).
    dir.run(&["export", "ds", "--format", "csv", "-o", "out.csv"], &[]).expect_code(0);
    let (header, rows) = read_csv(&dir.join("out.csv"));
    assert_eq!(rows.len(), 10);
    assert_eq!(rows[0][header.iter().position(|h| h == "response").unwrap_or(0)], "Because, \"it\" is\nso.");
    let back = {
        let run = dir.run(&["export", "out.csv", "--format", "jsonl"], &[]);
        run.expect_code(0);
        run.stdout().lines().map(|l| serde_json::from_str::<Value>(l).expect("json")).collect::<Vec<_>>()
    };
    for (b, r) in back.iter().zip(&recs) {
        for f in ["id", "sample", "model", "system", "prompt", "response", "thinking", "done_reason", "prompt_tokens", "completion_tokens", "duration_ms", "attempts", "finished_at", "seed", "eval_duration_ms", "key", "endpoint", "tokens_estimated"] {
            assert_eq!(b[f], r[f], "{f} survives CSV");
        }
    }
}

#[test]
fn export_filters() {
    let dir = Dir::new();
    write_dataset(&dir);
    let stop = export_lines(&dir, &["--format", "jsonl", "--only-done-reason", "stop"]);
    assert_eq!(stop.len(), 8);
    let sized = export_lines(&dir, &["--format", "jsonl", "--min-chars", "3", "--max-chars", "20"]);
    let lens: Vec<usize> = sized.iter().map(|r| r["response"].as_str().unwrap_or_default().chars().count()).collect();
    assert!(lens.iter().all(|l| (3..=20).contains(l)), "{lens:?}");
    assert_eq!(sized.len(), 7);
    let deduped = export_lines(&dir, &["--format", "jsonl", "--dedupe"]);
    assert_eq!(deduped.len(), 9);
    let responses: HashSet<&str> = deduped.iter().filter_map(|r| r["response"].as_str()).collect();
    assert_eq!(responses.len(), 9);
}

#[test]
fn export_keeps_the_newest_record_of_a_key() {
    let dir = Dir::new();
    let old = rec("a", 0, "m", "p", "old", "length", 1, 1);
    let new = rec("a", 0, "m", "p", "new", "stop", 1, 1);
    dir.write("ds/dataset.jsonl", format!("{old}\n{new}\n"));
    let out = export_lines(&dir, &["--format", "jsonl"]);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0]["response"], "new");
}

#[test]
fn export_to_a_file_is_atomic_and_to_a_closed_pipe_is_fine() {
    let dir = Dir::new();
    write_dataset(&dir);
    dir.write("train.jsonl", "previous content\n");
    // A bad field fails the export and leaves the old file as it was, with no temp file behind.
    dir.run(&["export", "ds", "--format", "alpaca", "--instruction-field", "nope", "-o", "train.jsonl"], &[])
        .expect_code(1)
        .expect_stderr("no field `nope`");
    assert_eq!(dir.read("train.jsonl"), "previous content\n");
    let leftovers: Vec<String> = std::fs::read_dir(dir.path()).expect("ls").filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.contains(".tmp")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    dir.run(&["export", "ds", "--format", "messages", "-o", "train.jsonl"], &[]).expect_code(0);
    assert_eq!(read_jsonl(&dir.join("train.jsonl")).len(), 10);

    // `| head -c 10`: the reader goes away early; the exporter exits 0 without a word.
    let big = dir.join("big/dataset.jsonl");
    crate::memory::write_big_dataset(&big, 50_000);
    let mut child = Command::new(BIN)
        .args(["export", "big", "--format", "messages"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 10];
    stdout.read_exact(&mut first).expect("read");
    drop(stdout);
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "closed pipe: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("Error"));
}

#[test]
fn check_reports_without_generating() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_questions(&dir, &["one", "two", "three"]);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "samples_per_prompt = 2\n".into();
    dir.write("run.toml", cfg.toml());
    dir.run(&["check", "--config", "run.toml"], &[])
        .expect_code(0)
        .expect_stdout("3 rows × 2 samples = 6 requests")
        .expect_stdout("Q: one")
        .expect_stdout("the run would make 6 requests");
    assert!(fake.generations().is_empty(), "check generates nothing");
    assert!(!dir.join("out").exists(), "check writes nothing");

    dir.run(&["--config", "run.toml", "--limit", "2"], &[]).expect_code(0);
    dir.run(&["check", "--config", "run.toml"], &[]).expect_code(0).expect_stdout("4 already done, 2 to run");

    cfg.model = "missing-model".into();
    dir.write("bad.toml", cfg.toml());
    dir.run(&["check", "--config", "bad.toml"], &[]).expect_code(1).expect_stderr("ollama pull missing-model");
    dir.write("questions.jsonl", "{\"id\":\"a\",\"question\":\"q\"}\n{oops\n");
    dir.run(&["check", "--config", "run.toml"], &[]).expect_code(1).expect_stderr("questions.jsonl:2");
}

#[test]
fn run_is_an_alias() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_questions(&dir, &["one"]);
    dir.write("run.toml", ConfigBuilder::new(&fake.url()).toml());
    dir.run(&["run", "--config", "run.toml"], &[]).expect_code(0);
    assert_eq!(read_jsonl(&dir.join("out/dataset.jsonl")).len(), 1);
}
