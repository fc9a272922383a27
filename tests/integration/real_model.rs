//! The whole tool against a real model: Gemma 3 270M served by llama-cpp-python, installed and
//! started by `scripts/real-model.sh` (the first install builds llama.cpp from source: ~8-25 min;
//! later runs reuse the cached virtualenv). Ignored by a plain `cargo test`, so that the README's
//! test command stays quick on a fresh machine; `scripts/real-model.sh test` runs it (setup first,
//! with progress), and so does `.ci/run`.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::Value;

use crate::util::{read_csv, read_jsonl, Dir, BIN};

const NUM_PREDICT: u64 = 48;

fn run_script(out: &std::path::Path) {
    // One request at a time, in the input's order: llama-cpp-python reuses the cached prefix of
    // the prompt before, so another order can shift the numbers enough to flip a near-tie at
    // temperature 0. (The other real-model tests run at the configs' concurrency of 2.)
    let output = script_output(out, "configs/llamacpp.toml", &["--concurrency", "1"]);
    assert!(
        output.status.success(),
        "scripts/real-model.sh failed ({:?})\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `scripts/real-model.sh run` with a config, into `out`.
fn script_output(out: &std::path::Path, config: &str, flags: &[&str]) -> std::process::Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/real-model.sh");
    Command::new("bash")
        .args([script, "run", "--output"])
        .arg(out)
        .args(["--progress", "plain"])
        .args(flags)
        .env("DATA_GENERATOR_BIN", BIN)
        .env("REAL_MODEL_CONFIG", config)
        .env_remove("OLLAMA_HOST")
        .output()
        .expect("run scripts/real-model.sh")
}

/// A schema batch on llama-cpp-python (`response_format = "json_object"`): its grammar keeps the
/// shape, not the range, so out-of-range scores are re-asked; whatever is in the dataset validates.
#[test]
#[ignore = "real model: run with scripts/real-model.sh test"]
fn real_model_follows_a_schema_and_every_record_validates() {
    let dir = Dir::new();
    let out = dir.join("judge");
    let output = script_output(&out, "configs/llamacpp-judge.toml", &[]);
    let code = output.status.code();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // 3: some row stayed invalid after its re-asks (a 270M model may); it is in failures.jsonl.
    assert!(matches!(code, Some(0) | Some(3)), "exit {code:?}\n{stderr}");
    let recs = read_jsonl(&out.join("dataset.jsonl"));
    let fails = if out.join("failures.jsonl").exists() { read_jsonl(&out.join("failures.jsonl")) } else { Vec::new() };
    // Gemma 3 270M is a tiny base model: even under the grammar it often writes raw newlines in
    // strings or scores of 100, and then the row ends in failures.jsonl after its re-asks. What
    // must hold is the tool's side: every row accounted for, no invalid record, failures that
    // say why and keep the reply.
    assert_eq!(recs.len() + fails.len(), 4, "every row is a record or a failure\n{stderr}");
    for r in &recs {
        let p = &r["parsed"];
        let score = p["score"].as_i64().unwrap_or(0);
        assert!((1..=10).contains(&score), "score in range: {r}");
        assert!(p["reason"].as_str().is_some_and(|t| !t.is_empty() && t.chars().count() <= 200), "{r}");
        assert_eq!(p.as_object().map(|o| o.len()), Some(2), "no other fields: {r}");
        assert!(r["invalid"].as_u64().is_some_and(|n| n <= 3), "{r}");
    }
    for f in &fails {
        assert!(f["validation_errors"].as_array().is_some_and(|e| !e.is_empty()), "{f}");
        assert!(f["last_reply"].is_string(), "{f}");
    }
}

/// Two stages on the real model: each topic's question (stage 1) is the prompt of its answer
/// (stage 2); a second run of the same command asks nothing and keeps the dataset.
#[test]
#[ignore = "real model: run with scripts/real-model.sh test"]
fn real_model_runs_a_two_stage_pipeline_and_resumes_it() {
    let dir = Dir::new();
    let out = dir.join("distill");
    for round in 0..2 {
        let output = script_output(&out, "configs/llamacpp-distill.toml", &[]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "round {round}: {:?}\n{stdout}\n{}", output.status, String::from_utf8_lossy(&output.stderr));
        if round == 1 {
            assert!(stdout.contains("0 requests done"), "the second run asks nothing:\n{stdout}");
        }
    }
    let questions = read_jsonl(&out.join("stages/question.jsonl"));
    let answers = read_jsonl(&out.join("stages/answer.jsonl"));
    assert_eq!((questions.len(), answers.len()), (3, 3), "one record per request, none repeated");
    let rows = read_jsonl(&out.join("dataset.jsonl"));
    assert_eq!(rows.len(), 3);
    for r in &rows {
        let q = r["question"]["response"].as_str().unwrap_or_default();
        assert!(!q.trim().is_empty(), "a question for {}", r["id"]);
        assert_eq!(r["answer"]["prompt"].as_str(), Some(q.trim()), "stage 2's prompt is stage 1's reply");
        assert!(r["answer"]["response"].as_str().is_some_and(|a| !a.trim().is_empty()), "an answer for {}", r["id"]);
        assert_eq!(r["input"]["id"], r["id"]);
        assert_eq!(r["answer"]["model"], "gemma3-270m");
    }
    for a in &answers {
        assert_eq!(a["stage"], "answer");
        assert_eq!(a["parent"], a["id"]);
    }
    let (header, csv_rows) = read_csv(&out.join("dataset.csv"));
    assert_eq!(csv_rows.len(), 3);
    assert!(header.contains(&"answer.response".to_owned()));
}

#[test]
#[ignore = "real model: run with scripts/real-model.sh test"]
fn real_model_generates_repeatably() {
    let dir = Dir::new();
    let (a, b) = (dir.join("first"), dir.join("second"));
    run_script(&a);
    run_script(&b);

    let first = read_jsonl(&a.join("dataset.jsonl"));
    assert_eq!(first.len(), 8, "configs/llamacpp.toml runs 8 prompts");
    for r in &first {
        let response = r["response"].as_str().unwrap_or_default();
        assert!(!response.trim().is_empty(), "empty response for {}", r["id"]);
        let reason = r["done_reason"].as_str().unwrap_or_default();
        assert!(reason == "stop" || reason == "length", "done_reason {reason:?}");
        let tokens = r["completion_tokens"].as_u64().unwrap_or(0);
        assert!(tokens > 0 && tokens <= NUM_PREDICT, "completion_tokens {tokens} within num_predict {NUM_PREDICT}");
        if reason == "length" && r["tokens_estimated"] == false {
            assert_eq!(tokens, NUM_PREDICT, "cut by length at exactly num_predict");
        }
        assert_eq!(r["model"], "gemma3-270m");
        assert!(r["endpoint"].as_str().is_some_and(|e| e.starts_with("http://127.0.0.1:") && e.ends_with("/v1")));
    }
    let (_, rows) = read_csv(&a.join("dataset.csv"));
    assert_eq!(rows.len(), 8);

    // Same seed, temperature 0, a fresh folder: the same text.
    let by_id = |recs: &[Value]| -> BTreeMap<String, String> {
        recs.iter().map(|r| (r["id"].as_str().unwrap_or_default().to_owned(), r["response"].as_str().unwrap_or_default().to_owned())).collect()
    };
    let second = read_jsonl(&b.join("dataset.jsonl"));
    assert_eq!(by_id(&first), by_id(&second), "a second run gives the same text");
}
