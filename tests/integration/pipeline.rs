//! A run end to end: requests on the wire, records byte-exact in JSONL and CSV, retries,
//! failures, exit codes.

use std::collections::{BTreeMap, HashSet};

use serde_json::Value;

use crate::fake_ollama::{expected_response, FakeOllama, Options, THINKING};
use crate::util::{read_csv, write_questions, ConfigBuilder, Dir};

const QUESTIONS: &[&str] = &[
    "Pourquoi le ciel est-il bleu ?",
    "日本の首都はどこですか？",
    "Explain \"quotes\", commas, and\nnewlines in CSV",
    "Emoji 🎉🚀 and combining é (e\u{301})",
    "What is 2+2?",
    "Straße, Ærø, Ελληνικά, русский, עברית, العربية",
    "Tabs\there and trailing spaces   ",
    "Why do leaves change colour?",
];

fn prompt_for(q: &str) -> String {
    format!("Q: {q}")
}

/// Checks every record against what the fake sent, and the CSV against the JSONL.
fn check_dataset(dir: &Dir, expected_rows: usize, samples: u32) -> Vec<Value> {
    let recs = dir.jsonl("out/dataset.jsonl");
    assert_eq!(recs.len(), expected_rows * samples as usize, "one record per row and sample");
    let mut seen = HashSet::new();
    for r in &recs {
        let prompt = r["prompt"].as_str().expect("prompt");
        assert_eq!(r["response"].as_str(), Some(expected_response(prompt).as_str()), "byte-exact response for {prompt:?}");
        assert!(seen.insert((r["id"].as_str().unwrap_or_default().to_owned(), r["sample"].as_u64())), "duplicate {r}");
        for field in [
            "id", "sample", "model", "system", "prompt", "response", "thinking", "done_reason", "prompt_tokens",
            "completion_tokens", "duration_ms", "attempts", "finished_at", "input",
        ] {
            assert!(r.get(field).is_some(), "record lacks {field}: {r}");
        }
        assert_eq!(r["model"], "fake-model");
        assert_eq!(r["done_reason"], "stop");
        assert!(r["finished_at"].as_str().is_some_and(|t| t.ends_with('Z') && t.contains('T')));
    }
    // CSV: same records, same text, same order.
    let (header, rows) = read_csv(&dir.join("out/dataset.csv"));
    assert_eq!(&header[..6], ["id", "sample", "model", "system", "prompt", "response"]);
    assert_eq!(rows.len(), recs.len());
    let col = |name: &str| header.iter().position(|h| h == name).expect(name);
    for (row, rec) in rows.iter().zip(&recs) {
        assert_eq!(row[col("id")], rec["id"].as_str().unwrap_or_default());
        assert_eq!(row[col("sample")], rec["sample"].to_string());
        assert_eq!(row[col("prompt")], rec["prompt"].as_str().unwrap_or_default());
        assert_eq!(row[col("response")], rec["response"].as_str().unwrap_or_default(), "CSV response byte-exact");
        assert_eq!(row[col("system")], rec["system"].as_str().unwrap_or_default());
        assert_eq!(row[col("attempts")], rec["attempts"].to_string());
    }
    recs
}

#[test]
fn chat_run_writes_byte_exact_jsonl_and_csv() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_questions(&dir, QUESTIONS);
    dir.write("run.toml", ConfigBuilder::new(&fake.url()).toml());
    let run = dir.run(&["--config", "run.toml"], &[]);
    run.expect_code(0).expect_stdout("8 of 8 requests done, 0 failed");

    let recs = check_dataset(&dir, QUESTIONS.len(), 1);
    let by_id: BTreeMap<&str, &Value> = recs.iter().map(|r| (r["id"].as_str().unwrap_or_default(), r)).collect();
    let r3 = by_id["r3"];
    assert_eq!(r3["prompt"], prompt_for(QUESTIONS[2]));
    assert_eq!(r3["system"], "Tu es un élève. Réponds brièvement.");
    assert_eq!(r3["input"]["question"], QUESTIONS[2]);
    assert_eq!(r3["thinking"], Value::Null);
    assert_eq!(r3["attempts"], 1);
    assert_eq!(r3["seed"], 42);
    assert!(r3["completion_tokens"].as_u64().is_some_and(|n| n > 10));

    // What went over the wire.
    let gens = fake.generations();
    assert_eq!(gens.len(), QUESTIONS.len());
    let body = &gens[0].body;
    assert_eq!(gens[0].path, "/api/chat");
    assert_eq!(body["stream"], true);
    assert_eq!(body["model"], "fake-model");
    assert_eq!(body["keep_alive"], "30m");
    assert_eq!(body["options"]["temperature"], 0.7);
    assert_eq!(body["options"]["num_predict"], 256);
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(body["messages"][1]["role"], "user");
    assert!(body.get("think").is_none());
    let paths: Vec<String> = fake.seen().iter().map(|r| r.path.clone()).collect();
    assert_eq!(&paths[..2], ["/api/version", "/api/show"], "server and model checked first");

    let manifest: Value = serde_json::from_str(&dir.read("out/manifest.json")).expect("manifest json");
    assert_eq!(manifest["runs"][0]["status"], "completed");
    assert_eq!(manifest["counts"]["done"], 8);
    assert_eq!(manifest["counts"]["failed"], 0);
    assert_eq!(manifest["config"]["backend"]["model"], "fake-model");
    assert_eq!(manifest["server"]["version"], "0.12.6-fake");
    assert!(manifest["runs"][0]["ended_at"].is_string());
    assert_eq!(manifest["counts"]["remaining"], 0);
    assert!(dir.read("out/run.log").contains("run finished"));
    assert_eq!(dir.read("out/failures.jsonl"), "");
}

#[test]
fn generate_api_with_thinking_and_length() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_questions(&dir, &["plain one", "[[think]] thinks first", "[[length]] cut short"]);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.api = "generate";
    cfg.backend_extra = "think = true\n".into();
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);

    let recs = dir.jsonl("out/dataset.jsonl");
    assert_eq!(recs.len(), 3);
    for r in &recs {
        let prompt = r["prompt"].as_str().unwrap_or_default();
        assert_eq!(r["response"].as_str(), Some(expected_response(prompt).as_str()));
        let want_thinking = if prompt.contains("[[think]]") { Value::from(THINKING) } else { Value::Null };
        assert_eq!(r["thinking"], want_thinking, "thinking kept apart for {prompt}");
        let want_reason = if prompt.contains("[[length]]") { "length" } else { "stop" };
        assert_eq!(r["done_reason"], want_reason);
    }
    let gens = fake.generations();
    assert!(gens.iter().all(|g| g.path == "/api/generate"));
    assert_eq!(gens[0].body["system"], "Tu es un élève. Réponds brièvement.");
    assert_eq!(gens[0].body["think"], true);
}

#[test]
fn transient_failures_are_retried_until_they_succeed() {
    let fake = FakeOllama::start(Options { stall: std::time::Duration::from_secs(20), ..Default::default() });
    let dir = Dir::new();
    let qs = [
        "busy [[503x2]]",
        "crash [[500x1]]",
        "error line mid-stream [[errorx2]]",
        "no done line [[truncatex1]]",
        "connection dropped mid-chunk [[dropx1]]",
        "stalls [[stallx1]]",
        "rate limited [[429x1]]",
        "fine",
    ];
    write_questions(&dir, &qs);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 4\nmax_retries = 3\nretry_base_delay_ms = 10\nidle_timeout_secs = 1\n".into();
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);

    let recs = check_dataset(&dir, qs.len(), 1);
    let attempts: BTreeMap<String, u64> =
        recs.iter().map(|r| (r["input"]["question"].as_str().unwrap_or_default().to_owned(), r["attempts"].as_u64().unwrap_or(0))).collect();
    assert_eq!(attempts["busy [[503x2]]"], 3);
    assert_eq!(attempts["crash [[500x1]]"], 2);
    assert_eq!(attempts["error line mid-stream [[errorx2]]"], 3);
    assert_eq!(attempts["no done line [[truncatex1]]"], 2);
    assert_eq!(attempts["connection dropped mid-chunk [[dropx1]]"], 2);
    assert_eq!(attempts["stalls [[stallx1]]"], 2);
    assert_eq!(attempts["rate limited [[429x1]]"], 2);
    assert_eq!(attempts["fine"], 1);
    let log = dir.read("out/run.log");
    assert!(log.contains("retrying"), "retries are logged");
    assert_eq!(dir.read("out/failures.jsonl"), "");
}

#[test]
fn rows_that_keep_failing_go_to_failures_and_exit_3() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_questions(&dir, &["ok one", "always busy [[503]]", "bad request [[400]]", "ok two", "always cut [[truncate]]"]);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 2\nmax_retries = 2\nretry_base_delay_ms = 5\n".into();
    dir.write("run.toml", cfg.toml());
    let run = dir.run(&["--config", "run.toml"], &[]);
    run.expect_code(3).expect_stdout("2 of 5 requests done, 3 failed").expect_stdout("failures.jsonl");

    let recs = dir.jsonl("out/dataset.jsonl");
    let ids: HashSet<&str> = recs.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(ids, HashSet::from(["r1", "r4"]));
    let fails = dir.jsonl("out/failures.jsonl");
    assert_eq!(fails.len(), 3);
    let by_id: BTreeMap<&str, &Value> = fails.iter().map(|f| (f["id"].as_str().unwrap_or_default(), f)).collect();
    assert_eq!(by_id["r2"]["attempts"], 3, "503 retried up to max_retries");
    assert!(by_id["r2"]["error"].as_str().is_some_and(|e| e.contains("503") && e.contains("server busy")));
    assert_eq!(by_id["r3"]["attempts"], 1, "400 is not retried");
    assert_eq!(by_id["r3"]["retryable"], false);
    assert_eq!(by_id["r5"]["attempts"], 3);
    assert!(by_id["r5"]["error"].as_str().is_some_and(|e| e.contains("truncated")));
    for f in &fails {
        assert_eq!(f["sample"], 0);
        assert!(f["when"].is_string());
    }
    let manifest: Value = serde_json::from_str(&dir.read("out/manifest.json")).expect("manifest");
    assert_eq!(manifest["runs"][0]["status"], "completed_with_failures");
    assert_eq!(manifest["counts"]["failed"], 3);
}

#[test]
fn samples_get_distinct_stable_seeds() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_questions(&dir, &["one", "two"]);
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "concurrency = 4\nsamples_per_prompt = 3\n".into();
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    cfg.output = "dir = \"out2\"\n".into();
    dir.write("run2.toml", cfg.toml());
    dir.run(&["--config", "run2.toml"], &[]).expect_code(0);

    let recs = check_dataset(&dir, 2, 3);
    let seeds = |file: &str| -> BTreeMap<(String, u64), i64> {
        dir.jsonl(file)
            .iter()
            .map(|r| ((r["id"].as_str().unwrap_or_default().to_owned(), r["sample"].as_u64().unwrap_or(0)), r["seed"].as_i64().unwrap_or(-1)))
            .collect()
    };
    let first = seeds("out/dataset.jsonl");
    assert_eq!(first.len(), 6);
    let distinct: HashSet<i64> = first.values().copied().collect();
    assert_eq!(distinct.len(), 6, "every sample its own seed: {first:?}");
    assert_eq!(first, seeds("out2/dataset.jsonl"), "the same seeds on a re-run");
    // The seed on the wire is the one recorded.
    let sent: HashSet<i64> = fake.generations().iter().filter_map(|g| g.body["options"]["seed"].as_i64()).collect();
    assert_eq!(sent, distinct);
    assert!(recs.iter().all(|r| r["sample"].as_u64().is_some_and(|s| s < 3)));
}

#[test]
fn ollama_host_and_flags_override_the_config() {
    let fake = FakeOllama::start(Options { models: vec!["other-model".into()], ..Default::default() });
    let dir = Dir::new();
    write_questions(&dir, &["a", "b", "c", "d"]);
    let mut cfg = ConfigBuilder::new("unused");
    cfg.url = None;
    dir.write("run.toml", cfg.toml());
    let host = fake.addr.to_string();
    dir.run(&["--config", "run.toml", "--limit", "2", "--model", "other-model", "--output", "elsewhere", "--concurrency", "1"], &[("OLLAMA_HOST", &host)])
        .expect_code(0);
    let recs = dir.jsonl("elsewhere/dataset.jsonl");
    assert_eq!(recs.len(), 2);
    assert!(recs.iter().all(|r| r["model"] == "other-model"));
    assert!(!dir.join("out").exists());
}

#[test]
fn csv_and_txt_inputs() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    dir.write("rows.csv", "id,question,topic\nc1,\"Why, \"\"really\"\"?\nTwo lines\",physics\nc2,Plain,history\n");
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.input = "path = \"rows.csv\"\nid_field = \"id\"\n".into();
    cfg.prompts = "template_text = \"[{{ topic }}] {{ question }}\"\n".into();
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    let recs = dir.jsonl("out/dataset.jsonl");
    let c1 = recs.iter().find(|r| r["id"] == "c1").expect("c1");
    assert_eq!(c1["prompt"], "[physics] Why, \"really\"?\nTwo lines");
    assert_eq!(c1["system"], Value::Null);
    assert_eq!(c1["response"].as_str(), Some(expected_response("[physics] Why, \"really\"?\nTwo lines").as_str()));
    assert!(fake.generations()[0].body["messages"].as_array().is_some_and(|m| m.len() == 1), "no system message when none is set");

    let dir = Dir::new();
    dir.write("prompts.txt", "first prompt\n\nsecond prompt\n");
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.input = "path = \"prompts.txt\"\n".into();
    cfg.prompts = "template_text = \"{{ prompt }}\"\n".into();
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    let ids: Vec<String> = dir.jsonl("out/dataset.jsonl").iter().map(|r| r["id"].as_str().unwrap_or_default().to_owned()).collect();
    let ids: HashSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(ids, HashSet::from(["1", "3"]), "ids are line numbers");
}
