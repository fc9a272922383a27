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
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/real-model.sh");
    let output = Command::new("bash")
        .args([script, "run", "--output"])
        .arg(out)
        .args(["--progress", "plain"])
        .env("DATA_GENERATOR_BIN", BIN)
        .env_remove("OLLAMA_HOST")
        .output()
        .expect("run scripts/real-model.sh");
    assert!(
        output.status.success(),
        "scripts/real-model.sh failed ({:?})\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
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
