//! Multi-stage pipelines (`[[stages]]`): questions -> answer -> judge against the fake, with
//! explode and keep, a model per stage, resume per stage, kill -9 safety and config errors.

use std::collections::{BTreeMap, HashSet};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};

use crate::fake_ollama::{expected_response, FakeOllama, Options};
use crate::util::{read_csv, read_jsonl, spawn_with, Dir};

const QUESTIONS_SCHEMA: &str = r#"{"type": "object", "properties": {"questions": {"type": "array", "items": {"type": "string"}}}, "required": ["questions"]}"#;
const JUDGE_SCHEMA: &str = r#"{"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}, "reason": {"type": "string"}}, "required": ["score", "reason"]}"#;

/// The fake with a teacher model beside the default one.
pub(crate) fn fake(delay_ms: u64) -> FakeOllama {
    let mut opts = Options { token_delay: Duration::from_millis(delay_ms), ..Default::default() };
    opts.models.push("teacher-model".into());
    FakeOllama::start(opts)
}

/// `n` topics, ids t1..tN.
pub(crate) fn write_topics(dir: &Dir, n: usize) {
    let mut s = String::new();
    for i in 1..=n {
        s.push_str(&json!({"id": format!("t{i}"), "topic": format!("sujet n°{i}: l'optique 日本 🎉"), "level": "year 10"}).to_string());
        s.push('\n');
    }
    dir.write("topics.jsonl", s);
}

/// A three-stage config: the teacher (its own model) writes questions (the fake writes two per
/// topic), the student answers each, the judge scores each answer; only the first question of
/// each topic passes `keep` (the fake's score is always 5).
pub(crate) fn three_stages(url: &str, judge_template: &str, concurrency: usize) -> String {
    format!(
        r#"name = "distill"
[backend]
kind = "ollama"
url = "{url}"
model = "fake-model"
[options]
temperature = 0.7
seed = 42
[input]
path = "topics.jsonl"
id_field = "id"
[run]
concurrency = {concurrency}
max_retries = 2
retry_base_delay_ms = 10
[output]
dir = "out"

[[stages]]
name = "questions"
model = "teacher-model"
system_text = "You write exam questions."
template_text = "Write questions about {{{{ topic }}}}."
schema_text = '{QUESTIONS_SCHEMA}'
explode = "questions"
concurrency = 1
[stages.options]
temperature = 1.0

[[stages]]
name = "answer"
template_text = "[{{{{ id }}}} #{{{{ questions.item_index }}}}] {{{{ questions.item }}}}"

[[stages]]
name = "judge"
system_text = "You are a strict examiner."
template_text = "{judge_template}"
schema_text = '{JUDGE_SCHEMA}'
keep = "judge.parsed.score >= 5 and questions.item_index == 0"
"#
    )
}

pub(crate) const JUDGE_TEMPLATE: &str = "Question: {{ questions.item }}\\nAnswer: {{ answer.response }}";

/// What a dataset row says, without the times that differ between runs.
fn row_gist(r: &Value) -> Value {
    let mut g = json!({"id": r["id"], "input": r["input"]});
    for s in ["questions", "answer", "judge"] {
        let o = &r[s];
        g[s] = json!({"prompt": o["prompt"], "response": o["response"], "parsed": o["parsed"], "item": o["item"], "item_index": o["item_index"], "model": o["model"], "system": o["system"]});
    }
    g
}

/// The dataset's rows by id (each id once), and the CSV holds the same rows.
fn dataset_gist(dir: &Dir) -> BTreeMap<String, Value> {
    let rows = read_jsonl(&dir.join("out/dataset.jsonl"));
    let gist: BTreeMap<String, Value> = rows.iter().map(|r| (r["id"].as_str().unwrap_or_default().to_owned(), row_gist(r))).collect();
    assert_eq!(gist.len(), rows.len(), "no row twice in dataset.jsonl");
    let (header, csv_rows) = read_csv(&dir.join("out/dataset.csv"));
    let col = header.iter().position(|h| h == "judge.prompt").expect("judge.prompt column");
    let csv: BTreeMap<String, String> = csv_rows.iter().map(|r| (r[0].clone(), r[col].clone())).collect();
    assert_eq!(csv.len(), csv_rows.len(), "no row twice in dataset.csv");
    let json: BTreeMap<String, String> = gist.iter().map(|(id, g)| (id.clone(), g["judge"]["prompt"].as_str().unwrap_or_default().to_owned())).collect();
    assert_eq!(csv, json, "the CSV has the JSONL's rows");
    assert!(!dir.join("out/dataset.jsonl.next").exists() && !dir.join("out/dataset.csv.next").exists(), "no rebuild left behind");
    gist
}

#[test]
fn three_stages_with_explode_and_keep_write_every_stage_and_the_dataset() {
    let fake = fake(1);
    let dir = Dir::new();
    write_topics(&dir, 4);
    dir.write("run.toml", three_stages(&fake.url(), JUDGE_TEMPLATE, 4));
    dir.run(&["--config", "run.toml", "--progress", "plain"], &[]).expect_code(0).expect_stdout("4 dataset rows");

    // Per stage: one record per request, byte-exact, with its stage and parent.
    let questions = read_jsonl(&dir.join("out/stages/questions.jsonl"));
    let answers = read_jsonl(&dir.join("out/stages/answer.jsonl"));
    let judges = read_jsonl(&dir.join("out/stages/judge.jsonl"));
    assert_eq!((questions.len(), answers.len(), judges.len()), (4, 8, 8));
    for q in &questions {
        assert_eq!(q["stage"], "questions");
        assert_eq!(q["model"], "teacher-model", "the stage's own model");
        assert!(q.get("parent").is_none(), "the first stage has no parent");
        assert_eq!(q["parsed"]["questions"].as_array().map(Vec::len), Some(2));
    }
    let answer_ids: HashSet<&str> = answers.iter().filter_map(|a| a["id"].as_str()).collect();
    let want: HashSet<String> = (1..=4).flat_map(|t| (0..2).map(move |i| format!("t{t}/{i}"))).collect();
    assert_eq!(answer_ids, want.iter().map(String::as_str).collect(), "ids: the parent's, then the item's index");
    for a in &answers {
        assert_eq!(a["stage"], "answer");
        assert_eq!(a["model"], "fake-model");
        assert_eq!(a["response"].as_str(), Some(expected_response(a["prompt"].as_str().unwrap_or_default()).as_str()), "byte-exact");
        let id = a["id"].as_str().unwrap_or_default();
        assert_eq!(a["parent"].as_str(), id.split('/').next(), "parent: the topic's row");
        assert!(a["prompt"].as_str().unwrap_or_default().starts_with(&format!("[{} #", id.split('/').next().unwrap_or_default())));
    }
    let kept: Vec<&Value> = judges.iter().filter(|j| j["kept"] == json!(true)).collect();
    assert_eq!(kept.len(), 4, "keep: the first question of each topic");
    assert!(judges.iter().all(|j| j["kept"].is_boolean() && j["stage"] == "judge" && j["parent"] == j["id"]));

    // The dataset: one row per kept answer, with every stage's object.
    let rows = read_jsonl(&dir.join("out/dataset.jsonl"));
    assert_eq!(rows.len(), 4);
    for r in &rows {
        let id = r["id"].as_str().unwrap_or_default();
        assert!(id.ends_with("/0"), "{id}");
        assert_eq!(r["input"]["id"].as_str(), id.split('/').next());
        assert_eq!(r["questions"]["item_index"], 0);
        assert_eq!(r["questions"]["item"], r["questions"]["parsed"]["questions"][0]);
        assert_eq!(r["answer"]["prompt"].as_str().map(|p| p.ends_with(r["questions"]["item"].as_str().unwrap_or("?"))), Some(true));
        let judge_prompt = r["judge"]["prompt"].as_str().unwrap_or_default();
        assert!(judge_prompt.contains(r["answer"]["response"].as_str().unwrap_or("?")), "the judge saw the answer");
        assert_eq!(r["judge"]["parsed"]["score"], 5);
        for s in ["questions", "answer", "judge"] {
            for f in ["system", "prompt", "response", "thinking", "parsed", "item", "model", "done_reason", "prompt_tokens", "completion_tokens", "duration_ms", "attempts", "finished_at"] {
                assert!(r[s].get(f).is_some(), "{s}.{f} in the dataset row");
            }
        }
    }
    let (header, csv_rows) = read_csv(&dir.join("out/dataset.csv"));
    assert_eq!(csv_rows.len(), 4);
    assert!(header.contains(&"answer.response".to_owned()) && header.contains(&"judge.parsed".to_owned()), "{header:?}");
    let col = header.iter().position(|h| h == "answer.response").unwrap_or(0);
    for (row, rec) in csv_rows.iter().zip(&rows) {
        assert_eq!(row[col], rec["answer"]["response"].as_str().unwrap_or_default(), "the CSV keeps text exact");
    }
    assert_eq!(read_csv(&dir.join("out/stages/answer.csv")).1.len(), 8);

    // Each request once, to its stage's model.
    let gens = fake.generations();
    assert_eq!(gens.len(), 20);
    assert_eq!(gens.iter().filter(|g| g.body["model"] == "teacher-model").count(), 4);
    assert!(gens.iter().filter(|g| g.body["model"] == "teacher-model").all(|g| g.body["options"]["temperature"] == 1.0), "stage options merged over [options]");

    let m: Value = serde_json::from_str(&dir.read("out/manifest.json")).expect("manifest");
    assert_eq!(m["dataset_rows"], 4);
    let st = &m["stages"];
    assert_eq!((st[0]["name"].as_str(), st[0]["requested"].as_u64(), st[0]["exploded_into"].as_u64()), (Some("questions"), Some(4), Some(8)));
    assert_eq!((st[2]["done"].as_u64(), st[2]["dropped"].as_u64()), (Some(8), Some(4)));
    assert_eq!(m["runs"][0]["status"], "completed");

    // inspect: one report per stage, with the judge's keep rate.
    let run = dir.run(&["inspect", "out"], &[]);
    run.expect_code(0).expect_stdout("dataset.jsonl: 4 rows").expect_stdout("── stage questions ──").expect_stdout("── stage judge ──").expect_stdout("keep: 4 of 8 rows went on (50.0%)");
    let report: Value = serde_json::from_str(&dir.run(&["inspect", "out", "--json", "--stage", "answer"], &[]).expect_code(0).stdout()).expect("json");
    assert_eq!((report["dataset_rows"].as_u64(), report["stages"]["answer"]["records"].as_u64()), (Some(4), Some(8)));

    // export --stage answer: the questions as user turns, the answers kept by the judge as the
    // assistant's, in every format.
    let out = dir.run(&["export", "out", "--stage", "answer", "-f", "messages"], &[]);
    out.expect_code(0);
    let lines: Vec<Value> = out.stdout().lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines.len(), 4);
    for (l, r) in lines.iter().zip(&rows) {
        let m = l["messages"].as_array().expect("messages");
        assert_eq!(m.last().map(|a| &a["content"]), Some(&r["answer"]["response"]));
        assert_eq!(m[m.len() - 2]["content"], r["answer"]["prompt"]);
    }
    for f in ["sharegpt", "alpaca", "jsonl", "csv"] {
        dir.run(&["export", "out", "--stage", "answer", "-f", f, "-o", &format!("answer.{f}")], &[]).expect_code(0);
    }
    assert_eq!(read_csv(&dir.join("answer.csv")).1.len(), 4);
    dir.run(&["export", "out", "-f", "messages"], &[]).expect_code(1).expect_stderr("--stage (questions, answer, judge)");
    dir.run(&["export", "out", "--stage", "nope", "-f", "messages"], &[]).expect_code(1).expect_stderr("no such stage");
}

#[test]
fn rerun_asks_nothing_and_an_edited_last_stage_alone_runs_again() {
    let fake = fake(0);
    let dir = Dir::new();
    write_topics(&dir, 3);
    dir.write("run.toml", three_stages(&fake.url(), JUDGE_TEMPLATE, 4));
    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(0);
    let first = dataset_gist(&dir);
    assert_eq!(first.len(), 3);
    let n = fake.generations().len();
    assert_eq!(n, 15);

    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(0).expect_stdout("0 requests done");
    assert_eq!(fake.generations().len(), n, "an unchanged config asks nothing");
    assert_eq!(dataset_gist(&dir), first, "the dataset is the same");

    dir.write("run.toml", three_stages(&fake.url(), "Grade this. Q: {{ questions.item }}\\nA: {{ answer.response }}", 4));
    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(0);
    let again = &fake.generations()[n..];
    assert_eq!(again.len(), 6, "only the judge runs again");
    assert!(again.iter().all(|g| g.prompt.as_deref().is_some_and(|p| p.starts_with("Grade this."))));
    let edited = dataset_gist(&dir);
    assert_eq!(edited.len(), 3, "the dataset holds the edited config's rows, once each");
    for (id, r) in &edited {
        assert!(r["judge"]["prompt"].as_str().is_some_and(|p| p.starts_with("Grade this.")), "{id}: the new judge");
        assert_eq!(r["answer"], first[id]["answer"], "{id}: the answer is the one asked before");
    }
    // Editing the first stage re-runs everything below it.
    let cfg = dir.read("run.toml").replace("Write questions about", "Write two questions about");
    dir.write("run.toml", cfg);
    let before = fake.generations().len();
    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(0);
    assert_eq!(fake.generations().len() - before, 15);
}

/// A request's identity at the fake: (model, prompt, seed).
fn identity(model: &Value, prompt: &str, seed: &Value) -> (String, String, i64) {
    (model.as_str().unwrap_or_default().to_owned(), prompt.to_owned(), seed.as_i64().unwrap_or(-1))
}

/// The complete records of every stage file (a torn last line is not one).
fn written_requests(dir: &Dir) -> HashSet<(String, String, i64)> {
    let mut set = HashSet::new();
    for s in ["questions", "answer", "judge"] {
        let Ok(text) = std::fs::read_to_string(dir.join(&format!("out/stages/{s}.jsonl"))) else { continue };
        for l in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            if let Ok(r) = serde_json::from_str::<Value>(l) {
                set.insert(identity(&r["model"], r["prompt"].as_str().unwrap_or_default(), &r["seed"]));
            }
        }
    }
    set
}

#[test]
fn sigkill_at_random_points_then_the_same_dataset_as_a_clean_run() {
    let clean_fake = fake(0);
    let clean = Dir::new();
    write_topics(&clean, 12);
    clean.write("run.toml", three_stages(&clean_fake.url(), JUDGE_TEMPLATE, 4));
    clean.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(0);
    let want = dataset_gist(&clean);
    assert_eq!(want.len(), 12);

    let fake = fake(3);
    let dir = Dir::new();
    write_topics(&dir, 12);
    dir.write("run.toml", three_stages(&fake.url(), JUDGE_TEMPLATE, 4));
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut kills = 0;
    for round in 0.. {
        assert!(round < 30, "the run never completed");
        let before = fake.generations().len();
        let written = written_requests(&dir);
        let mut child = spawn_with(&dir, &["--config", "run.toml", "--progress", "none"], Stdio::null(), Stdio::null());
        let done = if kills < 5 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            std::thread::sleep(Duration::from_millis(100 + x % 600));
            let exited = child.try_wait().ok().flatten().is_some();
            if !exited {
                let _ = child.kill();
                kills += 1;
            }
            let _ = child.wait();
            exited
        } else {
            assert_eq!(child.wait().ok().and_then(|s| s.code()), Some(0), "the last run finishes");
            true
        };
        for g in &fake.generations()[before..] {
            let id = identity(&g.body["model"], g.prompt.as_deref().unwrap_or_default(), &g.body["options"]["seed"]);
            assert!(!written.contains(&id), "asked again for a record written before the kill: {id:?}");
        }
        if done && kills >= 5 {
            break;
        }
    }
    assert!(kills >= 3, "the kills happened mid-run ({kills})");
    assert_eq!(dataset_gist(&dir), want, "the same dataset as a clean run");
    for s in ["questions", "answer", "judge"] {
        let recs = read_jsonl(&dir.join(&format!("out/stages/{s}.jsonl")));
        let keys: HashSet<&str> = recs.iter().filter_map(|r| r["key"].as_str()).collect();
        assert_eq!(keys.len(), recs.len(), "{s}: no request written twice");
    }
}

#[test]
fn stage_config_errors_name_the_stage_and_the_key() {
    let dir = Dir::new();
    write_topics(&dir, 2);
    let base = three_stages("http://127.0.0.1:9", JUDGE_TEMPLATE, 2);
    let cases: Vec<(String, &str)> = vec![
        (base.replace("[output]", "[prompts]\ntemplate_text = \"x\"\n[output]"), "`stages`: give `[prompts]`"),
        (base.replace("template_text = \"[{{ id }} #{{ questions.item_index }}] {{ questions.item }}\"", "template_text = \"{{ judge.response }}\""), "`stages[1].template`"),
        (base.replace("name = \"answer\"", "name = \"Answer\""), "`stages[1].name`"),
        (base.replace("explode = \"questions\"", "explode = \"items\""), "`stages[0].explode`"),
        (base.replace("keep = \"judge.parsed.score >= 5 and questions.item_index == 0\"", "keep = \"judge.parsed.score >=\""), "`stages[2].keep`"),
        (base.replace("[stages.options]\ntemperature = 1.0", "[stages.options]\ntemperatur = 1.0"), "`stages[0].options.temperatur`"),
        (base.replace("{{ questions.item }}\\nAnswer", "{{ questoins.item }}\\nAnswer"), "`stages[2].template`"),
        (base.replace("name = \"answer\"", "name = \"level\"").replace("answer.", "level."), "`stages[1].name`"),
    ];
    for (toml, want) in cases {
        dir.write("run.toml", &toml);
        let run = dir.run(&["--config", "run.toml"], &[]);
        run.expect_code(1).expect_stderr(want);
        assert!(!dir.join("out").exists(), "nothing written for {want}");
    }
}

#[test]
fn empty_explodes_end_rows_samples_fan_out_and_failures_name_their_stage() {
    let fake = fake(0);
    let dir = Dir::new();
    let topics = [("t1", "optics"), ("t2", "nothing to ask [[emptyarrays]]"), ("t3", "refused [[400]]"), ("t4", "waves")];
    let rows: String = topics.iter().map(|(id, t)| json!({"id": id, "topic": t}).to_string() + "\n").collect();
    dir.write("topics.jsonl", rows);
    let cfg = three_stages(&fake.url(), JUDGE_TEMPLATE, 4)
        .replace("[[stages]]\nname = \"judge\"", "[[stages]]\nname = \"unused\"")
        .split("[[stages]]\nname = \"unused\"")
        .next()
        .unwrap_or_default()
        .replace("name = \"answer\"\n", "name = \"answer\"\nsamples_per_prompt = 2\n");
    dir.write("run.toml", &cfg);
    let run = dir.run(&["--config", "run.toml", "--progress", "none"], &[]);
    run.expect_code(3);

    // t1 and t4: two questions each, each answered twice: ids ID/i#k.
    let rows = read_jsonl(&dir.join("out/dataset.jsonl"));
    let ids: HashSet<String> = rows.iter().filter_map(|r| r["id"].as_str().map(str::to_owned)).collect();
    let want: HashSet<String> = ["t1", "t4"].iter().flat_map(|t| (0..2).flat_map(move |i| (0..2).map(move |k| format!("{t}/{i}#{k}")))).collect();
    assert_eq!(ids, want);
    let answers = read_jsonl(&dir.join("out/stages/answer.jsonl"));
    let sampled: HashSet<(String, u64, i64)> = answers.iter().map(|a| (a["id"].as_str().unwrap_or_default().to_owned(), a["sample"].as_u64().unwrap_or(9), a["seed"].as_i64().unwrap_or(0))).collect();
    assert_eq!(sampled.len(), 8, "two samples per question, each with its own seed: {sampled:?}");

    // t2: an empty array ends the row, counted; t3: the teacher's request failed, in failures.jsonl.
    let fails = read_jsonl(&dir.join("out/failures.jsonl"));
    assert_eq!(fails.len(), 1);
    assert_eq!((fails[0]["id"].as_str(), fails[0]["stage"].as_str()), (Some("t3"), Some("questions")));
    let m: Value = serde_json::from_str(&dir.read("out/manifest.json")).expect("manifest");
    let q = &m["stages"][0];
    assert_eq!((q["done"].as_u64(), q["failed"].as_u64(), q["exploded_into"].as_u64(), q["exploded_empty"].as_u64()), (Some(3), Some(1), Some(4), Some(1)));
    assert_eq!(m["runs"][0]["status"], "completed_with_failures");
}

#[test]
fn an_explode_field_missing_from_the_reply_is_re_asked_then_a_failure() {
    let fake = fake(0);
    let dir = Dir::new();
    write_topics(&dir, 2);
    // A schema that does not require the array: the reply `{}` is valid JSON, but has nothing to explode.
    let cfg = three_stages(&fake.url(), JUDGE_TEMPLATE, 2).replace(&format!("schema_text = '{QUESTIONS_SCHEMA}'"), "schema_text = '{\"type\": \"object\"}'\nmax_invalid = 1");
    dir.write("run.toml", &cfg);
    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(3);
    let fails = read_jsonl(&dir.join("out/failures.jsonl"));
    assert_eq!(fails.len(), 2);
    for f in &fails {
        assert_eq!(f["stage"], "questions");
        assert!(f["validation_errors"][0].as_str().is_some_and(|e| e.contains("/questions: missing")), "{f}");
    }
    assert_eq!(fake.generations().len(), 4, "each asked again once (max_invalid = 1)");
    assert_eq!(read_jsonl(&dir.join("out/dataset.jsonl")).len(), 0);
}

#[test]
fn a_run_that_cannot_start_keeps_the_dataset_as_it_was() {
    let mut fake = fake(0);
    let dir = Dir::new();
    write_topics(&dir, 3);
    dir.write("run.toml", three_stages(&fake.url(), JUDGE_TEMPLATE, 4));
    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(0);
    let before = dir.read("out/dataset.jsonl");
    let csv_before = dir.read("out/dataset.csv");
    // The judge edited, and the server gone: the run fails at its first request's check.
    dir.write("run.toml", three_stages(&fake.url(), "Grade: {{ answer.response }}", 4));
    fake.stop();
    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(1).expect_stderr("cannot reach Ollama");
    assert_eq!(dir.read("out/dataset.jsonl"), before, "the dataset is untouched");
    assert_eq!(dir.read("out/dataset.csv"), csv_before);
    assert!(!dir.join("out/dataset.jsonl.next").exists());
    let m: Value = serde_json::from_str(&dir.read("out/manifest.json")).expect("manifest");
    assert_eq!(m["runs"][1]["status"], "failed");
}

#[test]
fn a_stage_cap_holds_whatever_the_endpoint_allows() {
    let fake = fake(5);
    let dir = Dir::new();
    write_topics(&dir, 6);
    // The server takes 6 at once; the teacher stage is capped at 1, the answer stage at 2.
    let cfg = three_stages(&fake.url(), JUDGE_TEMPLATE, 6)
        .replace(&format!("url = \"{}\"\n", fake.url()), "")
        .replace("[options]", &format!("[[backend.endpoints]]\nurl = \"{}\"\nconcurrency = 6\n[options]", fake.url()))
        .replace("name = \"answer\"\n", "name = \"answer\"\nconcurrency = 2\n");
    dir.write("run.toml", &cfg);
    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(0);
    // In flight at once, by the records' own times (sent = finished - duration; ms precision;
    // finished_at is stamped a little after the slot is freed, so 20 ms of slack: a request
    // lasts ~100 ms, an overlap past the cap would last about that long).
    let peak = |stage: &str| {
        let mut events: Vec<(i64, i32)> = Vec::new();
        for r in read_jsonl(&dir.join(&format!("out/stages/{stage}.jsonl"))) {
            let end = humantime::parse_rfc3339(r["finished_at"].as_str().unwrap_or_default()).expect("time");
            let end = end.duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_millis() as i64;
            let start = end - r["duration_ms"].as_i64().unwrap_or(0);
            events.push((start + 20, 1));
            events.push((end, -1));
        }
        events.sort();
        events.iter().scan(0, |n, (_, d)| {
            *n += d;
            Some(*n)
        }).max().unwrap_or(0)
    };
    assert_eq!(peak("questions"), 1, "the teacher's cap");
    assert_eq!(peak("answer"), 2, "the student's cap");
    assert!(fake.peak_concurrency("fake-model") >= 3, "the judge used the room left");
    assert_eq!(read_jsonl(&dir.join("out/stages/answer.jsonl")).len(), 12);
}

#[test]
fn a_folder_of_the_other_kind_is_refused_and_keep_names_are_checked_before_any_request() {
    let fake = fake(0);
    let dir = Dir::new();
    write_topics(&dir, 2);
    let one_stage = format!(
        "name = \"one\"\n[backend]\nkind = \"ollama\"\nurl = \"{}\"\nmodel = \"fake-model\"\n[prompts]\ntemplate_text = \"{{{{ topic }}}}\"\n[input]\npath = \"topics.jsonl\"\nid_field = \"id\"\n[output]\ndir = \"out\"\n",
        fake.url()
    );
    dir.write("one.toml", &one_stage);
    dir.run(&["--config", "one.toml", "--progress", "none"], &[]).expect_code(0);
    let before = dir.read("out/dataset.jsonl");
    dir.write("run.toml", three_stages(&fake.url(), JUDGE_TEMPLATE, 2));
    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(1).expect_stderr("holds a one-stage run");
    assert_eq!(dir.read("out/dataset.jsonl"), before, "the one-stage dataset is untouched");
    let n = fake.generations().len();
    dir.run(&["--config", "run.toml", "--progress", "none", "--fresh"], &[]).expect_code(0);
    dir.run(&["--config", "one.toml", "--progress", "none"], &[]).expect_code(1).expect_stderr("holds a multi-stage run");
    assert_eq!(fake.generations().len(), n + 10, "only the --fresh run asked anything");

    // A keep that reads a name no stage or field has: an error before the first request.
    let other = Dir::new();
    write_topics(&other, 2);
    other.write("run.toml", three_stages(&fake.url(), JUDGE_TEMPLATE, 2).replace("keep = \"judge.parsed.score", "keep = \"juge.parsed.score"));
    let n = fake.generations().len();
    other.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(1).expect_stderr("`stages[2].keep`").expect_stderr("`juge`");
    assert_eq!(fake.generations().len(), n);
}

#[test]
fn a_keep_that_fails_keeps_the_reply_and_a_fixed_keep_asks_nothing_again() {
    let fake = fake(0);
    let dir = Dir::new();
    write_topics(&dir, 2);
    // `parsed.grade` does not exist: every row fails at the judge's keep.
    dir.write("run.toml", three_stages(&fake.url(), JUDGE_TEMPLATE, 2).replace("judge.parsed.score >= 5", "judge.parsed.grade >= 5"));
    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(3);
    assert_eq!(read_jsonl(&dir.join("out/stages/judge.jsonl")).len(), 4, "the judge's replies are kept");
    let fails = read_jsonl(&dir.join("out/failures.jsonl"));
    assert!(fails.len() == 4 && fails.iter().all(|f| f["stage"] == "judge" && f["error"].as_str().is_some_and(|e| e.contains("keep"))), "{fails:?}");
    let n = fake.generations().len();
    dir.write("run.toml", three_stages(&fake.url(), JUDGE_TEMPLATE, 2));
    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(0);
    assert_eq!(fake.generations().len(), n, "the fixed keep reads the kept replies");
    assert_eq!(read_jsonl(&dir.join("out/dataset.jsonl")).len(), 2);
}

#[test]
fn torn_stage_files_are_repaired_and_the_csvs_match_the_jsonl() {
    let fake = fake(0);
    let dir = Dir::new();
    write_topics(&dir, 3);
    dir.write("run.toml", three_stages(&fake.url(), JUDGE_TEMPLATE, 2));
    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(0);
    // A kill mid-write: the last judge record and CSV row torn, the answer CSV one row short.
    for (f, cut) in [("out/stages/judge.jsonl", 30usize), ("out/stages/judge.csv", 40), ("out/stages/answer.csv", 0)] {
        let mut bytes = std::fs::read(dir.join(f)).expect("read");
        let keep = if cut == 0 {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let (header, rows) = read_csv(&dir.join(f));
            assert!(!rows.is_empty() && !header.is_empty());
            // Drop the last record whole.
            text.rfind("\nt").map(|i| i + 1).unwrap_or(text.len())
        } else {
            bytes.len() - cut
        };
        bytes.truncate(keep);
        std::fs::write(dir.join(f), bytes).expect("write");
    }
    let n = fake.generations().len();
    dir.run(&["--config", "run.toml", "--progress", "none"], &[]).expect_code(0).expect_stderr("repaired");
    assert_eq!(fake.generations().len(), n + 1, "only the torn judge record is asked again");
    for s in ["questions", "answer", "judge"] {
        let jsonl = read_jsonl(&dir.join(&format!("out/stages/{s}.jsonl")));
        let (header, rows) = read_csv(&dir.join(&format!("out/stages/{s}.csv")));
        let key = header.iter().position(|h| h == "key").expect("key column");
        assert_eq!(rows.iter().map(|r| r[key].clone()).collect::<Vec<_>>(), jsonl.iter().map(|r| r["key"].as_str().unwrap_or_default().to_owned()).collect::<Vec<_>>(), "{s}: the CSV holds the JSONL's records");
        assert!(rows.iter().all(|r| r.len() == header.len()));
    }
    assert_eq!(dataset_gist(&dir).len(), 3);
}

#[test]
fn a_missing_stage_model_names_the_stage_key_and_check_reports_every_stage() {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_topics(&dir, 2);
    dir.write("run.toml", three_stages(&fake.url(), JUDGE_TEMPLATE, 2));
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("teacher-model").expect_stderr("set stages[0].model");
    assert!(fake.generations().is_empty());
    let with_teacher = self::fake(0);
    dir.write("run.toml", three_stages(&with_teacher.url(), JUDGE_TEMPLATE, 2));
    let run = dir.run(&["check", "--config", "run.toml"], &[]);
    run.expect_code(0).expect_stdout("stage 1: questions (model teacher-model, explodes `questions`)").expect_stdout("keeps judge.parsed.score >= 5");
    assert!(with_teacher.generations().is_empty(), "check asks nothing");
}
