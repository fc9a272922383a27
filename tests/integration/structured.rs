//! Structured output: a JSON schema per run, sent in each server's dialect, every reply validated,
//! invalid replies re-asked with a new seed, `parsed` and `invalid` in the records.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::fake_ollama::{FakeOllama, Options};
use crate::util::{read_csv, read_jsonl, spawn, wait_for, write_questions, ConfigBuilder, Dir};

const JUDGE: &str = r#"{"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}, "reason": {"type": "string"}}, "required": ["score", "reason"], "additionalProperties": false}"#;

fn judge_config(url: &str) -> ConfigBuilder {
    let mut cfg = ConfigBuilder::new(url);
    cfg.prompts.push_str(&format!("schema_text = '{JUDGE}'\n"));
    cfg.run = "max_retries = 2\nretry_base_delay_ms = 5\nmax_invalid = 2\n".into();
    cfg
}

fn by_question(recs: &[Value]) -> BTreeMap<String, Value> {
    recs.iter().map(|r| (r["input"]["question"].as_str().unwrap_or_default().to_owned(), r.clone())).collect()
}

#[test]
fn replies_are_validated_and_invalid_ones_asked_again() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    let qs = ["good", "cut once [[badjsonx1]]", "out of range once [[outofrangex1]]", "fenced [[fenced]]", "never valid [[outofrange]]"];
    write_questions(&dir, &qs);
    dir.write("run.toml", judge_config(&fake.url()).toml());
    let run = dir.run(&["--config", "run.toml"], &[]);
    run.expect_code(3).expect_stdout("4 of 5 requests done, 1 failed");

    let recs = read_jsonl(&dir.join("out/dataset.jsonl"));
    let by_q = by_question(&recs);
    assert_eq!(by_q.len(), 4);
    for (q, invalid) in [("good", 0), ("cut once [[badjsonx1]]", 1), ("out of range once [[outofrangex1]]", 1), ("fenced [[fenced]]", 0)] {
        let r = &by_q[q];
        assert_eq!(r["parsed"]["score"], 5, "{q}: {r}");
        assert!(r["parsed"]["reason"].is_string(), "{q}");
        assert_eq!(r["invalid"], invalid, "{q}");
    }
    // The response is kept as the model sent it, fence and all.
    assert!(by_q["fenced [[fenced]]"]["response"].as_str().is_some_and(|t| t.starts_with("```json\n{")));
    assert_eq!(by_q["cut once [[badjsonx1]]"]["attempts"], 2, "a re-ask is one more attempt");

    // On the wire: Ollama's `format` is the schema; a re-ask gets a new seed.
    let gens = fake.generations();
    let schema: Value = serde_json::from_str(JUDGE).expect("schema");
    assert!(gens.iter().all(|g| g.body["format"] == schema), "every request carries the schema");
    let seeds: Vec<&Value> = gens.iter().filter(|g| g.prompt.as_deref() == Some("Q: cut once [[badjsonx1]]")).map(|g| &g.body["options"]["seed"]).collect();
    assert_eq!(seeds.len(), 2);
    assert_eq!(seeds[0], 42);
    assert_ne!(seeds[0], seeds[1], "a re-ask is sent with a new seed");
    assert_eq!(&by_q["cut once [[badjsonx1]]"]["seed"], seeds[1], "the record keeps the seed of the reply it holds");

    // The one that never validates: re-asked max_invalid times, then a failure that says why.
    let fails = read_jsonl(&dir.join("out/failures.jsonl"));
    assert_eq!(fails.len(), 1);
    let f = &fails[0];
    assert_eq!(f["attempts"], 3, "1 + max_invalid re-asks");
    let errors: Vec<&str> = f["validation_errors"].as_array().expect("validation_errors").iter().filter_map(Value::as_str).collect();
    assert!(errors.iter().any(|e| e.starts_with("/score: 100 is greater than the maximum of 10")), "{errors:?}");
    assert!(f["last_reply"].as_str().is_some_and(|t| t.contains("\"score\":100")), "{f}");
    assert!(f["error"].as_str().is_some_and(|e| e.contains("did not validate")), "{f}");

    // CSV: `parsed` (compact JSON) and `invalid` at the end.
    let (header, rows) = read_csv(&dir.join("out/dataset.csv"));
    assert_eq!(&header[header.len() - 2..], ["parsed", "invalid"]);
    for row in &rows {
        let parsed: Value = serde_json::from_str(&row[header.len() - 2]).expect("parsed column is JSON");
        assert_eq!(parsed["score"], 5);
    }
    // inspect tells the re-asks and the fields, from the JSONL and from the CSV alike.
    let text = dir.run(&["inspect", "out"], &[]).expect_code(0).stdout();
    assert!(text.contains("structured: 4 records with parsed JSON; 2 needed a re-ask (2 invalid replies re-asked in all)"), "{text}");
    assert!(text.contains("  score: number 4 · min 5 · mean 5.00 · max 5"), "{text}");
    assert!(text.contains("  reason: string 4 · most common: \"a made-up reason, «quoted» and 日本語\" 4"), "{text}");
    let csv_report: Value = serde_json::from_str(&dir.run(&["inspect", "out/dataset.csv", "--json"], &[]).expect_code(0).stdout()).expect("json");
    assert_eq!(csv_report["structured"]["fields"]["score"]["mean"], 5.0, "{csv_report}");
    assert_eq!(csv_report["structured"]["invalid_replies"], 2);

    // Resuming keeps it as it is: nothing asked again but the failed row, the CSV untouched.
    let csv = dir.read("out/dataset.csv");
    let asked = fake.generations().len();
    dir.run(&["--config", "run.toml", "--no-retry-failed"], &[]).expect_code(3).expect_stdout("nothing to do");
    assert_eq!(fake.generations().len(), asked);
    assert_eq!(dir.read("out/dataset.csv"), csv);
}

#[test]
fn openai_servers_get_the_schema_in_either_dialect() {
    let fake = FakeOllama::start(Options::default());
    let schema: Value = serde_json::from_str(JUDGE).expect("schema");
    for (dialect, want) in [
        (None, json!({"type": "json_schema", "json_schema": {"name": "test", "schema": schema, "strict": true}})),
        (Some("json_object"), json!({"type": "json_object", "schema": schema})),
    ] {
        let dir = Dir::new();
        let q = format!("dialect {dialect:?}");
        write_questions(&dir, &[q.as_str()]);
        let mut cfg = judge_config(&format!("{}/v1", fake.url()));
        cfg.backend_extra = dialect.map(|d| format!("response_format = \"{d}\"\n")).unwrap_or_default();
        dir.write("run.toml", cfg.toml().replace("kind = \"ollama\"", "kind = \"openai\""));
        dir.run(&["--config", "run.toml"], &[]).expect_code(0);
        let recs = read_jsonl(&dir.join("out/dataset.jsonl"));
        assert_eq!(recs[0]["parsed"]["score"], 5);
        let sent = fake.generations().into_iter().find(|g| g.prompt.as_deref() == Some(&format!("Q: {q}"))).expect("request");
        assert_eq!(sent.body["response_format"], want, "{dialect:?}");
    }
}

#[test]
fn a_schema_is_part_of_the_key_and_runs_without_one_keep_their_keys() {
    let fake = FakeOllama::start(Options::default());
    // A dataset written before schemas existed resumes untouched.
    let dir = Dir::new();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pre-schema");
    let read = |name: &str| std::fs::read_to_string(fixture.join(name)).expect("fixture");
    dir.write("questions.jsonl", read("questions.jsonl"));
    dir.write("run.toml", read("run.toml").replace("FAKE_URL", &fake.url()));
    dir.write("out/dataset.jsonl", read("dataset.jsonl"));
    dir.write("out/dataset.csv", read("dataset.csv"));
    dir.run(&["--config", "run.toml"], &[]).expect_code(0).expect_stdout("nothing to do: 6 of 6 requests already in out");
    assert_eq!(fake.generations().len(), 0, "no request asked again");
    assert_eq!(dir.read("out/dataset.jsonl"), read("dataset.jsonl"));

    // Adding a schema changes what is asked: the rows run again (and the CSV gains its columns).
    let toml = dir.read("run.toml").replace("[prompts]\n", &format!("[prompts]\nschema_text = '{JUDGE}'\n"));
    dir.write("run.toml", toml);
    dir.run(&["--config", "run.toml"], &[]).expect_code(0).expect_stdout("6 of 6 requests done");
    assert_eq!(fake.generations().len(), 6);
    let (header, rows) = read_csv(&dir.join("out/dataset.csv"));
    assert_eq!(header.last().map(String::as_str), Some("invalid"));
    assert_eq!(rows.len(), 12, "old and new records, one CSV");
}

#[test]
fn bad_schemas_are_config_errors_that_say_where() {
    let dir = Dir::new();
    write_questions(&dir, &["q"]);
    dir.write("judge.schema.json", "{\n  \"type\": \"object\",\n  \"properties\": {\n    \"score\": {\"type\": \"integer\",}\n  }\n}\n");
    let mut cfg = ConfigBuilder::new("http://127.0.0.1:9");
    cfg.prompts.push_str("schema = \"judge.schema.json\"\n");
    dir.write("run.toml", cfg.toml());
    dir.run(&["check", "--config", "run.toml"], &[]).expect_code(1).expect_stderr("prompts.schema").expect_stderr("judge.schema.json:4:");
    dir.write("judge.schema.json", r#"{"type": "objekt"}"#);
    dir.run(&["check", "--config", "run.toml"], &[]).expect_code(1).expect_stderr("not a valid JSON schema");
    dir.write("judge.schema.json", JUDGE);
    cfg.backend_extra.push_str("response_format = \"json_object\"\n");
    dir.write("run.toml", cfg.toml());
    dir.run(&["check", "--config", "run.toml"], &[]).expect_code(1).expect_stderr("backend.response_format");
}

#[test]
fn a_server_that_refuses_the_dialect_stops_the_run_before_the_batch() {
    let fake = FakeOllama::start(Options { json_object_only: true, ..Default::default() });
    let dir = Dir::new();
    write_questions(&dir, &["q1", "q2"]);
    let mut cfg = judge_config(&format!("{}/v1", fake.url()));
    cfg.backend_extra = String::new();
    dir.write("run.toml", cfg.toml().replace("kind = \"ollama\"", "kind = \"openai\""));
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("response_format = \"json_object\"");
    assert!(!dir.join("out").exists(), "stopped before anything was written");
    assert!(fake.generations().iter().all(|g| g.body["stream"] == false), "no row was asked");
    // With the setting it names, the run goes through.
    cfg.backend_extra = "response_format = \"json_object\"\n".into();
    dir.write("run.toml", cfg.toml().replace("kind = \"ollama\"", "kind = \"openai\""));
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    assert_eq!(read_jsonl(&dir.join("out/dataset.jsonl")).len(), 2);
}

#[test]
fn a_schema_run_killed_midway_resumes_without_loss_or_doubles() {
    let fake = FakeOllama::start(Options { token_delay: std::time::Duration::from_millis(3), ..Default::default() });
    let dir = Dir::new();
    let qs: Vec<String> = (1..=30).map(|i| if i % 3 == 0 { format!("q{i} [[outofrangex1]]") } else { format!("q{i}") }).collect();
    write_questions(&dir, &qs.iter().map(String::as_str).collect::<Vec<_>>());
    let mut cfg = judge_config(&fake.url());
    cfg.run.push_str("concurrency = 2\n");
    dir.write("run.toml", cfg.toml());
    let mut child = spawn(&dir, &["--config", "run.toml", "--progress", "none"]);
    wait_for("some records", std::time::Duration::from_secs(30), || {
        std::fs::read_to_string(dir.join("out/dataset.jsonl")).is_ok_and(|t| t.lines().count() >= 6)
    });
    child.kill().expect("kill -9");
    let _ = child.wait();
    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(0);
    let recs = read_jsonl(&dir.join("out/dataset.jsonl"));
    assert_eq!(recs.len(), 30, "every row once");
    let by_q = by_question(&recs);
    assert_eq!(by_q.len(), 30, "no row twice");
    for (q, r) in &by_q {
        assert_eq!(r["parsed"]["score"], 5, "{q}");
        // The fake counts attempts per prompt: a row cut by the kill after its invalid reply
        // gets a valid one on the next run, so 0 or 1 re-asks; never more.
        let want = if q.contains("outofrange") { [0, 1] } else { [0, 0] };
        assert!(want.contains(&r["invalid"].as_u64().unwrap_or(9)), "{q}: {r}");
    }
    let (_, rows) = read_csv(&dir.join("out/dataset.csv"));
    assert_eq!(rows.len(), 30);
}
