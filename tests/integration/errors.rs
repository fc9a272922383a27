//! Bad input gets a clear error naming what to fix, exit 1, and no request is made.

use crate::fake_ollama::{FakeOllama, Options};
use crate::util::{write_questions, ConfigBuilder, Dir};

fn setup() -> (FakeOllama, Dir, ConfigBuilder) {
    let fake = FakeOllama::start(Options::default());
    let dir = Dir::new();
    write_questions(&dir, &["one", "two"]);
    let cfg = ConfigBuilder::new(&fake.url());
    (fake, dir, cfg)
}

#[test]
fn unknown_config_key_names_file_and_key() {
    let (fake, dir, cfg) = setup();
    let toml = cfg.toml().replace("concurrency = 3", "concurency = 3");
    dir.write("run.toml", toml);
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("run.toml").expect_stderr("concurency");
    assert!(fake.seen().is_empty(), "no request before the config is valid");
}

#[test]
fn toml_syntax_error_shows_line_and_column() {
    let (_fake, dir, _) = setup();
    dir.write("run.toml", "name = \"x\"\n[backend\nkind = \"ollama\"\n");
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("run.toml").expect_stderr("line 2");
}

#[test]
fn invalid_values_name_their_key() {
    let (_fake, dir, mut cfg) = setup();
    cfg.run = "concurrency = 0\n".into();
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("`run.concurrency`: must be at least 1");

    cfg.run = String::new();
    cfg.options = "temprature = 0.5\n".into();
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("options.temprature").expect_stderr("temperature");
}

#[test]
fn missing_config_and_input_files() {
    let (_fake, dir, mut cfg) = setup();
    dir.run(&["--config", "nope.toml"], &[]).expect_code(1).expect_stderr("nope.toml");
    cfg.input = "path = \"missing.jsonl\"\n".into();
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("input.path").expect_stderr("missing.jsonl");
}

#[test]
fn malformed_input_line_is_named_before_any_request() {
    let (fake, dir, cfg) = setup();
    dir.write("questions.jsonl", "{\"id\":\"a\",\"question\":\"q\"}\n{\"id\":\"b\",\"question\":\n{\"id\":\"c\",\"question\":\"q\"}\n");
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("questions.jsonl:2: malformed JSON");
    assert!(fake.seen().is_empty(), "input is checked before the server is asked anything");
    assert!(!dir.join("out/dataset.jsonl").exists());
}

#[test]
fn duplicate_ids_are_an_error() {
    let (_fake, dir, cfg) = setup();
    dir.write("questions.jsonl", "{\"id\":\"a\",\"question\":\"q\"}\n{\"id\":\"b\",\"question\":\"q\"}\n{\"id\":\"a\",\"question\":\"q\"}\n");
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("questions.jsonl:3: duplicate id \"a\" (first at line 1)");
}

#[test]
fn input_errors_on_a_resume_are_found_too_and_keep_the_dataset() {
    // A folder to resume is read while the input is checked (two threads): the input's errors
    // still stop the run before any request, and the records stay.
    let (fake, dir, cfg) = setup();
    dir.write("questions.jsonl", "{\"id\":\"a\",\"question\":\"q\"}\n{\"id\":\"b\",\"question\":\"q\"}\n");
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    let before = dir.read("out/dataset.jsonl");
    let asked = fake.generations().len();
    dir.write("questions.jsonl", "{\"id\":\"a\",\"question\":\"q\"}\n{\"id\":\"b\",\"question\":\"q\"}\n{\"id\":\"c\",\"question\":\"q\"}\n{\"id\":\"a\",\"question\":\"q\"}\n");
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("questions.jsonl:4: duplicate id \"a\" (first at line 1)");
    dir.write("questions.jsonl", "{\"id\":\"a\",\"question\":\"q\"}\n{\"id\":\"b\",\"question\":\"q\"}\n{\"id\":\"c\",\"nope\":1}\n");
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("row c (line 3)");
    assert_eq!(fake.generations().len(), asked, "no request");
    assert_eq!(dir.read("out/dataset.jsonl"), before, "the records stay");
    // Fixed, it resumes: only the new row is asked.
    dir.write("questions.jsonl", "{\"id\":\"a\",\"question\":\"q\"}\n{\"id\":\"b\",\"question\":\"q\"}\n{\"id\":\"c\",\"question\":\"q\"}\n");
    dir.run(&["--config", "run.toml"], &[]).expect_code(0);
    assert_eq!(fake.generations().len(), asked + 1);
}

#[test]
fn template_field_missing_from_a_row() {
    let (fake, dir, mut cfg) = setup();
    dir.write("questions.jsonl", "{\"id\":\"a\",\"question\":\"q\",\"topic\":\"t\"}\n{\"id\":\"b\",\"question\":\"q\"}\n");
    cfg.prompts = "template_text = \"{{ topic }}: {{ question }}\"\n".into();
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("row b (line 2)").expect_stderr("`topic`");
    assert!(fake.generations().is_empty());
}

#[test]
fn missing_model_says_how_to_pull_it() {
    let (fake, dir, mut cfg) = setup();
    cfg.model = "llama3.2:3b".into();
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("ollama pull llama3.2:3b");
    assert!(fake.generations().is_empty());
}

#[test]
fn unreachable_server_names_the_url() {
    let (_fake, dir, mut cfg) = setup();
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(9);
    let url = format!("http://127.0.0.1:{port}");
    cfg.url = Some(url.clone());
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr(&url).expect_stderr("ollama serve");
}

#[test]
fn usage_errors_exit_2() {
    let dir = Dir::new();
    dir.run(&[], &[]).expect_code(2);
    dir.run(&["--config", "x.toml", "--concurrency", "0"], &[]).expect_code(2);
}

#[test]
fn unwritable_output_fails_before_work() {
    let (fake, dir, mut cfg) = setup();
    dir.write("blocker", "a file where a folder should be");
    cfg.output = "dir = \"blocker/out\"\n".into();
    dir.write("run.toml", cfg.toml());
    dir.run(&["--config", "run.toml"], &[]).expect_code(1).expect_stderr("blocker");
    assert!(fake.generations().is_empty());
}
