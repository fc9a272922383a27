//! OpenAI-compatible servers, several endpoints at once, sharding and merging.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use serde_json::Value;

use crate::fake_ollama::{expected_response, FakeOllama, Options, THINKING};
use crate::util::{read_csv, read_jsonl, write_questions, ConfigBuilder, Dir};

fn openai_config(urls: &[String]) -> ConfigBuilder {
    let mut cfg = ConfigBuilder::new("unused");
    cfg.url = None;
    cfg.backend_extra = match urls {
        [one] => format!("url = \"{one}/v1\"\n"),
        many => format!("urls = [{}]\n", many.iter().map(|u| format!("\"{u}/v1\"")).collect::<Vec<_>>().join(", ")),
    };
    cfg
}

fn set_kind_openai(toml: String) -> String {
    toml.replace("kind = \"ollama\"", "kind = \"openai\"").replace("api = \"chat\"\n", "")
}

#[test]
fn openai_backend_streams_sse_byte_exact() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    let qs = [
        "plain 日本 🎉",
        "reasons first [[think]]",
        "cut by max_tokens [[length]]",
        "no usage chunk [[nousage]]",
        "error event then DONE [[errorx1]]",
        "rate limited [[429x1]]",
        "ends without DONE [[truncatex1]]",
        "connection dropped [[dropx1]]",
    ];
    write_questions(&dir, &qs);
    let mut cfg = openai_config(&[fake.url()]);
    cfg.backend_extra.push_str("api_key_env = \"TEST_API_KEY\"\n");
    dir.write("run.toml", set_kind_openai(cfg.toml()));
    let run = dir.run(&["--config", "run.toml"], &[("TEST_API_KEY", "sk-secret-123")]);
    run.expect_code(0);

    let recs = read_jsonl(&dir.join("out/dataset.jsonl"));
    assert_eq!(recs.len(), qs.len());
    let by_q: BTreeMap<String, &Value> = recs.iter().map(|r| (r["input"]["question"].as_str().unwrap_or_default().to_owned(), r)).collect();
    for r in &recs {
        let prompt = r["prompt"].as_str().unwrap_or_default();
        assert_eq!(r["response"].as_str(), Some(expected_response(prompt).as_str()), "byte-exact over SSE");
        assert_eq!(r["endpoint"], format!("{}/v1", fake.url()));
    }
    assert_eq!(by_q["reasons first [[think]]"]["thinking"], THINKING);
    assert_eq!(by_q["plain 日本 🎉"]["thinking"], Value::Null);
    assert_eq!(by_q["cut by max_tokens [[length]]"]["done_reason"], "length");
    assert_eq!(by_q["plain 日本 🎉"]["done_reason"], "stop");
    assert_eq!(by_q["no usage chunk [[nousage]]"]["tokens_estimated"], true);
    assert!(by_q["no usage chunk [[nousage]]"]["completion_tokens"].as_u64().is_some_and(|n| n > 10));
    assert_eq!(by_q["plain 日本 🎉"]["tokens_estimated"], false);
    for q in ["error event then DONE [[errorx1]]", "rate limited [[429x1]]", "ends without DONE [[truncatex1]]", "connection dropped [[dropx1]]"] {
        assert_eq!(by_q[q]["attempts"], 2, "{q} failed once, then succeeded");
    }

    // The wire: OpenAI names, usage asked for, the key in the header and nowhere else.
    let gens = fake.generations();
    let body = &gens[0].body;
    assert_eq!(gens[0].path, "/v1/chat/completions");
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["max_tokens"], 256);
    assert_eq!(body["temperature"], 0.7);
    assert_eq!(body["seed"], 42);
    assert!(body.get("num_predict").is_none() && body.get("options").is_none());
    assert!(gens.iter().all(|g| g.authorization.as_deref() == Some("Bearer sk-secret-123")));
    let models_check = fake.seen().into_iter().find(|r| r.path == "/v1/models").expect("GET /v1/models first");
    assert_eq!(models_check.authorization.as_deref(), Some("Bearer sk-secret-123"));
    for f in ["out/manifest.json", "out/run.log", "out/dataset.jsonl", "out/dataset.csv"] {
        assert!(!dir.read(f).contains("sk-secret-123"), "the key leaked into {f}");
    }
    assert!(!run.stdout().contains("sk-secret") && !run.stderr().contains("sk-secret"));
    assert!(dir.read("out/manifest.json").contains("TEST_API_KEY"), "the variable's name is recorded");
}

#[test]
fn openai_startup_checks() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_questions(&dir, &["one"]);
    let mut cfg = openai_config(&[fake.url()]);
    cfg.model = "not-served".into();
    dir.write("run.toml", set_kind_openai(cfg.toml()));
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("model \"not-served\" is not served").expect_stderr("fake-model");

    let mut cfg = openai_config(&[fake.url()]);
    cfg.backend_extra.push_str("api_key_env = \"UNSET_KEY_VAR\"\n");
    dir.write("run.toml", set_kind_openai(cfg.toml()));
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("UNSET_KEY_VAR, which is not set");

    let mut cfg = openai_config(&[fake.url()]);
    cfg.backend_extra.push_str("keep_alive = \"5m\"\n");
    dir.write("run.toml", set_kind_openai(cfg.toml()));
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("backend.keep_alive");
}

#[test]
fn failover_when_an_endpoint_dies_mid_run() {
    let opts = Options { token_delay: Duration::from_millis(3), ..Default::default() };
    let mut a = FakeOllama::start(opts.clone());
    let b = FakeOllama::start(opts);
    let dir = Dir::new();
    let qs: Vec<String> = (1..=24).map(|i| format!("question {i}")).collect();
    write_questions(&dir, &qs.iter().map(String::as_str).collect::<Vec<_>>());
    let mut cfg = ConfigBuilder::new("unused");
    cfg.url = None;
    cfg.backend_extra = format!(
        "[[backend.endpoints]]\nurl = \"{}\"\nconcurrency = 2\n\n[[backend.endpoints]]\nurl = \"{}\"\nconcurrency = 2\n",
        a.url(),
        b.url()
    );
    cfg.run = "max_retries = 4\nretry_base_delay_ms = 20\n".into();
    dir.write("run.toml", cfg.toml());

    let child = std::process::Command::new(crate::util::BIN)
        .args(["--config", "run.toml", "--progress", "plain"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // Let both serve a while, then A crashes.
    let start = std::time::Instant::now();
    while a.generations().len() < 3 && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    a.stop();
    let out = child.wait_with_output().expect("wait");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "all rows done despite the crash\n{stdout}\n{stderr}");

    let recs = read_jsonl(&dir.join("out/dataset.jsonl"));
    assert_eq!(recs.len(), 24, "each row once");
    let ids: HashSet<&str> = recs.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(ids.len(), 24);
    for r in &recs {
        assert_eq!(r["response"].as_str(), Some(expected_response(r["prompt"].as_str().unwrap_or_default()).as_str()));
    }
    let served: BTreeMap<String, usize> = recs.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r["endpoint"].as_str().unwrap_or_default().to_owned()).or_insert(0) += 1;
        m
    });
    assert!(served.get(&b.url()).is_some_and(|n| *n > 0), "B served rows: {served:?}");
    assert!(served.get(&b.url()).is_some_and(|n| *n >= 12), "B took over: {served:?}");
    let log = dir.read("out/run.log");
    assert!(log.contains("retrying"), "A's requests were retried");
}

#[test]
fn shards_merge_into_the_unsharded_dataset() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    let qs: Vec<String> = (1..=30).map(|i| format!("question {i} «ü»")).collect();
    write_questions(&dir, &qs.iter().map(String::as_str).collect::<Vec<_>>());
    let mut cfg = ConfigBuilder::new(&fake.url());
    cfg.run = "samples_per_prompt = 2\n".into();
    dir.write("run.toml", cfg.toml());

    dir.run(&["--config", "run.toml", "--output", "full"], &[]).expect_code(0);
    let mut shard_sizes = Vec::new();
    for k in 0..3 {
        dir.run(&["--config", "run.toml", "--output", "sharded", "--shard", &format!("{k}/3")], &[]).expect_code(0);
        shard_sizes.push(read_jsonl(&dir.join(&format!("sharded/shard-{k}-of-3/dataset.jsonl"))).len());
    }
    assert_eq!(shard_sizes.iter().sum::<usize>(), 60, "every request in exactly one shard: {shard_sizes:?}");
    assert!(shard_sizes.iter().all(|n| *n > 0 && n % 2 == 0), "whole rows per shard: {shard_sizes:?}");
    dir.run(&["--shard", "3/3", "--config", "run.toml"], &[]).expect_code(2);

    // A shard run twice (resumed) adds nothing; merging gives the unsharded dataset.
    dir.run(&["--config", "run.toml", "--output", "sharded", "--shard", "1/3"], &[]).expect_code(0).expect_stdout("nothing to do");
    let run = dir.run(
        &["merge", "sharded/shard-0-of-3", "sharded/shard-1-of-3", "sharded/shard-2-of-3", "-o", "merged"],
        &[],
    );
    run.expect_code(0).expect_stdout("60 records");
    let set = |path: &str| -> BTreeSet<(String, u64, String, String)> {
        read_jsonl(&dir.join(path))
            .iter()
            .map(|r| {
                (
                    r["id"].as_str().unwrap_or_default().to_owned(),
                    r["sample"].as_u64().unwrap_or(0),
                    r["key"].as_str().unwrap_or_default().to_owned(),
                    r["response"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(set("merged/dataset.jsonl"), set("full/dataset.jsonl"));
    assert_eq!(read_jsonl(&dir.join("merged/dataset.jsonl")).len(), 60, "no duplicates");
    let (_, rows) = read_csv(&dir.join("merged/dataset.csv"));
    assert_eq!(rows.len(), 60, "CSV rebuilt");
    let manifest: Value = serde_json::from_str(&dir.read("merged/manifest.json")).expect("manifest");
    assert_eq!(manifest["merged_from"].as_array().map(Vec::len), Some(3));
    assert_eq!(manifest["counts"]["records"], 60);
    // Merging the same shard twice drops the duplicates.
    dir.run(&["merge", "sharded/shard-0-of-3", "sharded/shard-0-of-3", "-o", "twice"], &[])
        .expect_code(0)
        .expect_stdout(&format!("{} records ({} duplicates dropped)", shard_sizes[0], shard_sizes[0]));
    dir.run(&["merge", "sharded/shard-0-of-3", "-o", "merged"], &[]).expect_code(1).expect_stderr("not empty");
}
