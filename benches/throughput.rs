//! Figures, not pass/fail: `cargo bench` prints how fast the real binary drives a server that
//! answers instantly (so the client is the bottleneck), how much memory it holds, how fast
//! `inspect` and `export` stream a large dataset, what a multi-stage pipeline keeps of that
//! speed, and what a large batch costs before its first
//! request: the input check, a re-run of a finished dataset, a restart after a kill half-way.
//!
//!   cargo bench                          # defaults: 2,000 requests, 200,000-record dataset,
//!                                        # resume figures at 100,000 rows
//!   BENCH_REQUESTS=20000 BENCH_RECORDS=1000000 BENCH_RESUME_ROWS=100000,1000000 cargo bench
//!   BENCH_ONLY=resume BENCH_KEEP=1 cargo bench   # one section; keep the resume folder to profile
//!   BENCH_SERVE=1 cargo bench                    # only the fake server, to profile the binary by hand
//!   BENCH_ONLY=live,view BENCH_LIVE_ROWS=10000 BENCH_VIEW_MB=1000 cargo bench   # the browser pages
//!   BENCH_ONLY=fake,linear BENCH_LINEAR_ROWS=1000,10000,100000 cargo bench   # the fake alone; costs as sizes grow

#[path = "../tests/support/fake_ollama.rs"]
mod fake_ollama;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use data_generator::config::{self, Overrides};
use data_generator::dataset::{Dataset, OutputPaths};
use data_generator::plan::{Planner, Redo};
use data_generator::record::Record;
use data_generator::resume::Prior;

const BIN: &str = env!("CARGO_BIN_EXE_data_generator");

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// What one run of the binary cost.
struct Measured {
    took: Duration,
    /// User and system CPU time of the process (from wait4's rusage).
    cpu: Duration,
    peak_kb: u64,
    ok: bool,
}

/// Runs the binary, sampling its peak resident memory from /proc while it runs, and reaping it
/// with wait4 for its CPU time.
fn run_measured(args: &[&str], dir: &Path) -> Measured {
    run_measured_with(args, dir, Stdio::null(), |_| ()).0
}

/// [`run_measured`], with `started` given the child as soon as it runs (to read its stderr, to
/// connect to it); what `started` returns is kept until the child ends.
#[allow(clippy::zombie_processes)] // reaped by wait4, which std's Child does not know of
fn run_measured_with<T>(args: &[&str], dir: &Path, stderr: Stdio, started: impl FnOnce(&mut std::process::Child) -> T) -> (Measured, T) {
    let start = Instant::now();
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn data_generator");
    let kept = started(&mut child);
    let pid = child.id() as libc::pid_t;
    let mut peak = 0u64;
    loop {
        peak = peak.max(peak_kb(child.id()).unwrap_or(0));
        let mut status = 0;
        // SAFETY: a plain syscall on our own child, with out-pointers to locals.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
            let cpu = tv(usage.ru_utime) + tv(usage.ru_stime);
            let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
            // (Not ru_maxrss: it counts the bench's own pages that the child held between fork and exec.)
            return (Measured { took: start.elapsed(), cpu, peak_kb: peak, ok }, kept);
        }
        assert!(r == 0, "wait4 failed: {}", std::io::Error::last_os_error());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The pinned official Python clients, in a virtualenv of the bench's own (made once, in the
/// same cache as the real-model server's): the interpreter's path.
fn python_venv() -> Result<std::path::PathBuf, String> {
    let cache = std::env::var_os("DATA_GENERATOR_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/data_generator")))
        .ok_or("no HOME")?;
    let venv = cache.join("venv-bench");
    let python = venv.join("bin/python");
    let pins = ["ollama==0.6.3", "openai==3.57.0"];
    let stamp = venv.join(format!(".installed-{}", pins.join("-")));
    if stamp.exists() {
        return Ok(python);
    }
    eprintln!("bench: installing {} into {} (once)", pins.join(" "), venv.display());
    let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
    if !ok(Command::new("python3").args(["-m", "venv"]).arg(&venv)) {
        return Err("python3 -m venv failed".into());
    }
    if !ok(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "--disable-pip-version-check"]).args(pins)) {
        return Err(format!("pip install {} failed (it needs PyPI)", pins.join(" ")));
    }
    std::fs::write(&stamp, b"").map_err(|e| e.to_string())?;
    Ok(python)
}

/// One run of benches/python_clients.py, printed in the shape of data_generator's lines.
fn python_figures(python: &Path, dir: &Path, kind: &str, client: &str, url: &str, concurrency: u64) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/python_clients.py");
    let out = Command::new(python)
        .arg(script)
        .args(["--kind", kind, "--url", url, "--rows", "rows.jsonl", "--out", "py-out.jsonl", "--concurrency"])
        .arg(concurrency.to_string())
        .current_dir(dir)
        .stderr(Stdio::inherit())
        .output()
        .expect("run python");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let num = |k: &str| v[k].as_f64().unwrap_or(0.0);
    if !out.status.success() || num("requests") == 0.0 {
        println!("generate python {kind} {client} concurrency {concurrency:>2}: FAILED ({})", out.status);
        return;
    }
    let (requests, tokens, secs, cpu_us) = (num("requests"), num("tokens"), num("secs"), num("cpu_secs") * 1e6);
    println!(
        "generate {:<19} concurrency {concurrency:>2}: {requests} requests in {secs:>6.2} s = {:>5.0} req/s, {:>6.0} tokens/s; \
         CPU {:>5.1} us/token, {:>5.0} us/request; peak RSS {:>5.1} MB",
        format!("py {client}"),
        requests / secs,
        tokens / secs,
        cpu_us / tokens.max(1.0),
        cpu_us / requests.max(1.0),
        num("peak_kb") / 1024.0
    );
}

/// The peak resident memory of a process so far (VmHWM), in kB.
fn peak_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok())
}

/// Runs the binary until the fake server sees its first generation request (then stops it):
/// the time a batch takes to get going, and the memory that took.
fn run_until_first_request(args: &[&str], dir: &Path, fake: &fake_ollama::FakeOllama) -> (Option<Duration>, u64) {
    let before = fake.generations().len();
    let start = Instant::now();
    let mut child = Command::new(BIN).args(args).current_dir(dir).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn data_generator");
    let mut peak = 0u64;
    let first = loop {
        peak = peak.max(peak_kb(child.id()).unwrap_or(0));
        if fake.generations().len() > before {
            break Some(start.elapsed());
        }
        if let Ok(Some(_)) = child.try_wait() {
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    peak = peak.max(peak_kb(child.id()).unwrap_or(0));
    let _ = child.kill();
    let _ = child.wait();
    (first, peak)
}

/// A batch of `rows` input rows and a config for it, in `dir`, its output in `dir/out`; the first
/// `done` requests are written to the dataset as a finished run would have (keys and all), made
/// by the library's own planner so that the binary takes them as done.
fn resume_folder(dir: &Path, url: &str, rows: u64, done: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("rows.jsonl")).expect("rows"));
    for i in 0..rows {
        writeln!(f, "{{\"id\":\"r{i}\",\"question\":\"Question number {i}: why is the sky blue at noon?\"}}").expect("write");
    }
    f.flush().expect("flush");
    drop(f);
    std::fs::write(
        dir.join("run.toml"),
        format!(
            "name = \"resume\"\n[backend]\nkind = \"ollama\"\nurl = \"{url}\"\nmodel = \"fake-model\"\n[options]\nseed = 1\n\
             [prompts]\nsystem_text = \"You answer briefly.\"\ntemplate_text = \"Answer: {{{{ question }}}}\"\n\
             [input]\npath = \"rows.jsonl\"\nid_field = \"id\"\n[run]\nconcurrency = 8\n[output]\ndir = \"out\"\n"
        ),
    )
    .expect("config");
    let _ = std::fs::remove_dir_all(dir.join("out"));
    if done == 0 {
        return;
    }
    let cfg = config::load(&dir.join("run.toml"), &Overrides::default(), None).expect("config loads");
    let planner = Planner::new(&cfg).expect("planner");
    let paths = OutputPaths::new(&cfg.output_dir);
    let mut ds = Dataset::open(&paths, &cfg.raw.output.formats, false).expect("dataset");
    let prior = Prior::default();
    for job in planner.jobs(&prior, Redo { failed: true, truncated: false }, None).take(done as usize) {
        let job = job.expect("job");
        let r = Record {
            id: job.row_id,
            sample: job.sample,
            model: "fake-model".into(),
            system: job.system,
            response: format!("An answer to {}: the light scatters, the short waves most.", job.prompt),
            prompt: job.prompt,
            done_reason: Some("stop".into()),
            prompt_tokens: Some(20),
            completion_tokens: Some(24),
            duration_ms: 500,
            attempts: 1,
            finished_at: "2026-12-01T00:00:00.000Z".into(),
            seed: job.seed,
            key: job.key,
            endpoint: Some(url.to_owned()),
            input: job.input,
            ..Record::default()
        };
        ds.write_record(&r).expect("write");
    }
    ds.sync().expect("sync");
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Before the first request, at `rows` input rows: the input check alone (`check`, the server's
/// answer included), a fresh run to its first request, a re-run of the finished dataset (nothing
/// to do), a restart with half of it done (a kill half-way) to its first new request, and a
/// second restart after that one is killed.
fn resume_figures(rows: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = fake_ollama::FakeOllama::start(fake_ollama::Options::default());
    let args = ["--config", "run.toml", "--progress", "none"];
    resume_folder(dir.path(), &fake.url(), rows, 0);
    let Measured { took, peak_kb: peak, ok, .. } = run_measured(&["check", "--config", "run.toml"], dir.path());
    println!("resume {rows:>8} rows: input check (check)        {:>6.2} s, peak RSS {:>6.1} MB{}", took.as_secs_f64(), mb(peak), if ok { "" } else { "  (FAILED)" });
    let (first, peak) = run_until_first_request(&args, dir.path(), &fake);
    match first {
        Some(t) => println!("resume {rows:>8} rows: fresh run, first request   {:>6.2} s, peak RSS {:>6.1} MB", t.as_secs_f64(), mb(peak)),
        None => println!("resume {rows:>8} rows: fresh run (FAILED: ended before any request)"),
    }
    resume_folder(dir.path(), &fake.url(), rows, rows);
    let Measured { took, peak_kb: peak, ok, .. } = run_measured(&args, dir.path());
    println!("resume {rows:>8} rows: re-run, nothing to do      {:>6.2} s, peak RSS {:>6.1} MB{}", took.as_secs_f64(), mb(peak), if ok { "" } else { "  (FAILED)" });
    // That run recorded that it left nothing to do: the next one, with nothing changed, need
    // not read the input or the dataset.
    let Measured { took, peak_kb: peak, ok, .. } = run_measured(&args, dir.path());
    println!("resume {rows:>8} rows: again, nothing changed     {:>6.2} s, peak RSS {:>6.1} MB{}", took.as_secs_f64(), mb(peak), if ok { "" } else { "  (FAILED)" });
    resume_folder(dir.path(), &fake.url(), rows, rows / 2);
    let (first, peak) = run_until_first_request(&args, dir.path(), &fake);
    match first {
        Some(t) => println!("resume {rows:>8} rows: half done, first new request {:>4.2} s, peak RSS {:>6.1} MB", t.as_secs_f64(), mb(peak)),
        None => println!("resume {rows:>8} rows: half done (FAILED: ended before any request)"),
    }
    // That restart kept the input's keys (`.data_generator.asked`): killed again, the next
    // restart, with the input and the config unchanged, takes them instead of checking every row.
    let (first, peak) = run_until_first_request(&args, dir.path(), &fake);
    match first {
        Some(t) => println!("resume {rows:>8} rows: killed again, restart      {:>6.2} s, peak RSS {:>6.1} MB", t.as_secs_f64(), mb(peak)),
        None => println!("resume {rows:>8} rows: killed again (FAILED: ended before any request)"),
    }
    if std::env::var_os("BENCH_KEEP").is_some() {
        // The half-done folder, its input and config, to profile by hand.
        println!("resume {rows:>8} rows: kept in {}", dir.keep().display());
    }
}

fn main() {
    if std::env::var_os("BENCH_SERVE").is_some() {
        // Only the fake server, until killed: to drive and profile the binary by hand.
        let fake = fake_ollama::FakeOllama::start(fake_ollama::Options::default());
        println!("fake server on {} (Ollama) and {}/v1 (OpenAI-compatible); Ctrl-C stops it", fake.url(), fake.url());
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let requests = env_num("BENCH_REQUESTS", 2_000);
    let records = env_num("BENCH_RECORDS", 200_000);
    let dir = tempfile::tempdir().expect("tempdir");
    // BENCH_ONLY=fake,generate,linear,stages,dataset,resume,live,view picks sections (default: all).
    let only = std::env::var("BENCH_ONLY").ok();
    let want = |section: &str| only.as_deref().is_none_or(|o| o.split(',').any(|s| s.trim() == section));

    // 1. Generation: the fake in speed mode, answering at once with 80 pre-rendered tokens a
    // reply, one write per token (as a real server streams them).
    let fake = fast_fake();
    if want("generate") || want("fake") {
        for kind in ["ollama", "openai"] {
            let (tps, rps) = fake_alone(&fake, kind, 8, Duration::from_secs(3));
            println!("fake server alone, {kind:<6}: {rps:>6.0} req/s, {tps:>8.0} tokens/s (8 raw clients that only read, each on a kept connection; 80 tokens a reply)");
        }
    }
    let mut rows = std::io::BufWriter::new(std::fs::File::create(dir.path().join("rows.jsonl")).expect("rows"));
    for i in 0..requests {
        writeln!(rows, "{{\"id\":\"r{i}\",\"question\":\"Question number {i}: why?\"}}").expect("write");
    }
    rows.flush().expect("flush");
    drop(rows);
    // Both wire formats, the live display off and on (bars, drawn to stderr as on a terminal:
    // it redraws as often as it would), several requests in flight. CPU is the process's own
    // (user + system), so the figures hold on a busy machine too.
    let runs = [("ollama", "none"), ("ollama", "bars"), ("openai", "none"), ("openai", "bars")];
    for ((kind, display), concurrency) in runs.iter().flat_map(|r| [1u64, 8, 32].map(|c| (*r, c))).filter(|_| want("generate")) {
        let out = format!("out-{kind}-{display}-c{concurrency}");
        let url = if kind == "openai" { format!("{}/v1", fake.url()) } else { fake.url() };
        std::fs::write(
            dir.path().join("run.toml"),
            format!(
                "name = \"bench\"\n[backend]\nkind = \"{kind}\"\nurl = \"{url}\"\nmodel = \"fake-model\"\n[options]\nseed = 1\n\
                 [prompts]\ntemplate_text = \"{{{{ question }}}}\"\n[input]\npath = \"rows.jsonl\"\nid_field = \"id\"\n\
                 [run]\nconcurrency = {concurrency}\n[output]\ndir = \"{out}\"\n"
            ),
        )
        .expect("config");
        let fake_before = fake_ollama::FakeOllama::cpu();
        let m = run_measured(&["--config", "run.toml", "--progress", display], dir.path());
        let fake_cpu_us = (fake_ollama::FakeOllama::cpu().saturating_sub(fake_before)).as_secs_f64() * 1e6;
        let text = std::fs::read_to_string(dir.path().join(&out).join("dataset.jsonl")).unwrap_or_default();
        let tokens: u64 = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|r| r["completion_tokens"].as_u64())
            .sum();
        let secs = m.took.as_secs_f64();
        let cpu_us = m.cpu.as_secs_f64() * 1e6;
        println!(
            "generate {kind:<6} display {display:<4} concurrency {concurrency:>2}: {requests} requests in {secs:>6.2} s = {:>5.0} req/s, {:>6.0} tokens/s; \
             CPU {:>5.1} us/token, {:>5.0} us/request (the fake's own: {:>4.0} us/request); peak RSS {:>5.1} MB{}",
            requests as f64 / secs,
            tokens as f64 / secs,
            cpu_us / tokens.max(1) as f64,
            cpu_us / requests.max(1) as f64,
            fake_cpu_us / requests.max(1) as f64,
            m.peak_kb as f64 / 1024.0,
            if m.ok { "" } else { "  (FAILED)" }
        );
    }
    // The same job with the official Python clients, as users write it by hand.
    if want("generate") {
        match python_venv() {
            Err(e) => println!("generate python: skipped ({e})"),
            Ok(python) => {
                for (kind, client) in [("ollama", "AsyncClient"), ("openai", "AsyncOpenAI")] {
                    for concurrency in [1u64, 8, 32] {
                        python_figures(&python, dir.path(), kind, client, &fake.url(), concurrency);
                    }
                }
            }
        }
    }
    drop(fake);

    // Cost per token and per request as replies grow and as the batch grows.
    if want("linear") {
        linear_figures(dir.path());
    }

    // 2. A large dataset through inspect and export.
    if want("dataset") {
        dataset_figures(dir.path(), records);
    }

    // 3. A three-stage pipeline (questions -> answer -> judge) beside one stage, and its memory as
    // the explode factor grows.
    if want("stages") {
        stage_figures(dir.path(), requests);
    }

    // 4. The browser pages: a run with --serve and a page that never reads; view of a large dataset.
    if want("live") {
        live_figures(dir.path(), env_num("BENCH_LIVE_ROWS", 10_000));
    }
    if want("view") {
        view_figures(dir.path(), env_num("BENCH_VIEW_MB", 1000));
    }

    // 5. Large batches before their first request.
    let sizes = std::env::var("BENCH_RESUME_ROWS").unwrap_or_else(|_| "100000".into());
    for rows in sizes.split(',').filter_map(|n| n.trim().parse::<u64>().ok()).filter(|_| want("resume")) {
        resume_figures(rows);
    }
}

/// Tokens/s and memory of a three-stage pipeline (a teacher's questions exploded into rows, a
/// student's answer to each, a judge's score of each, with `keep`) against the same number of
/// requests in one stage; then the pipeline at explode factors 2, 20 and 200 with the same total.
fn stage_figures(dir: &Path, requests: u64) {
    let fake = fake_ollama::FakeOllama::start(fake_ollama::Options::default());
    let url = fake.url();
    let run = |label: &str, name: &str, config: String| {
        std::fs::write(dir.join("stages.toml"), config).expect("config");
        let m = run_measured(&["--config", "stages.toml", "--progress", "none"], dir);
        let out = dir.join(format!("out-{name}"));
        let files: Vec<std::path::PathBuf> = match std::fs::read_dir(out.join("stages")) {
            Ok(d) => d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "jsonl")).collect(),
            Err(_) => vec![out.join("dataset.jsonl")],
        };
        let (mut n, mut tokens) = (0u64, 0u64);
        for f in files {
            for l in std::fs::read_to_string(f).unwrap_or_default().lines() {
                n += 1;
                tokens += serde_json::from_str::<serde_json::Value>(l).ok().and_then(|r| r["completion_tokens"].as_u64()).unwrap_or(0);
            }
        }
        let (secs, cpu_us) = (m.took.as_secs_f64(), m.cpu.as_secs_f64() * 1e6);
        println!(
            "stages {label:<28}: {n} requests in {secs:>6.2} s = {:>5.0} req/s, {:>6.0} tokens/s; CPU {:>5.1} us/token; peak RSS {:>5.1} MB{}",
            n as f64 / secs,
            tokens as f64 / secs,
            cpu_us / tokens.max(1) as f64,
            m.peak_kb as f64 / 1024.0,
            if m.ok { "" } else { "  (FAILED)" }
        );
    };
    let rows = |topics: u64, explode: u64| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("topics.jsonl")).expect("topics"));
        for i in 0..topics {
            writeln!(f, "{{\"id\":\"t{i}\",\"topic\":\"topic number {i} [[array{explode}]]\"}}").expect("write");
        }
        f.flush().expect("flush");
    };
    let head = |name: &str| {
        format!(
            "name = \"{name}\"\n[backend]\nkind = \"ollama\"\nurl = \"{url}\"\nmodel = \"fake-model\"\n[options]\nseed = 1\n\
             [input]\npath = \"topics.jsonl\"\nid_field = \"id\"\n[run]\nconcurrency = 8\n[output]\ndir = \"out-{name}\"\n"
        )
    };
    let pipeline = |name: &str| {
        head(name)
            + "[[stages]]\nname = \"questions\"\ntemplate_text = \"Questions about {{ topic }}\"\n\
               schema_text = '{\"type\": \"object\", \"properties\": {\"questions\": {\"type\": \"array\", \"items\": {\"type\": \"string\"}}}, \"required\": [\"questions\"]}'\n\
               explode = \"questions\"\n\
               [[stages]]\nname = \"answer\"\ntemplate_text = \"{{ id }}: {{ questions.item }}\"\n\
               [[stages]]\nname = \"judge\"\ntemplate_text = \"Grade {{ id }}: {{ answer.response }}\"\n\
               schema_text = '{\"type\": \"object\", \"properties\": {\"score\": {\"type\": \"integer\", \"minimum\": 1, \"maximum\": 10}}, \"required\": [\"score\"]}'\n\
               keep = \"judge.parsed.score >= 5\"\n"
    };
    // One stage: as many rows as the pipeline has requests, each answered.
    let total = requests.max(60) / 5 * 5;
    let one_rows = total;
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("topics.jsonl")).expect("topics"));
        for i in 0..one_rows {
            writeln!(f, "{{\"id\":\"t{i}\",\"topic\":\"topic number {i}\"}}").expect("write");
        }
        f.flush().expect("flush");
    }
    run("one stage", "one-stage", head("one-stage") + "[prompts]\ntemplate_text = \"{{ id }}: {{ topic }}\"\n");
    // Three stages, explode 2: topics + 2 answers + 2 judges = 5 requests a topic.
    rows(total / 5, 2);
    run("three stages, explode 2", "explode-2", pipeline("explode-2"));
    for explode in [20u64, 200] {
        let topics = (total / (1 + 2 * explode)).max(1);
        rows(topics, explode);
        let name = format!("explode-{explode}");
        run(&format!("three stages, explode {explode}"), &name, pipeline(&name));
    }
}

/// A large dataset through inspect and export.
fn dataset_figures(dir: &Path, records: u64) {
    let ds = dir.join("big");
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
        let Measured { took, peak_kb, ok, .. } = run_measured(&args, dir);
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

/// Reads the child's stderr until a line starting with `prefix`: the rest of it (a URL). The
/// rest of stderr is drained by a thread, so the child never blocks on it.
fn url_from_stderr(child: &mut std::process::Child, prefix: &str) -> String {
    use std::io::BufRead;
    let mut r = std::io::BufReader::new(child.stderr.take().expect("stderr piped"));
    let mut line = String::new();
    let url = loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("the binary ended before printing {prefix:?}");
        }
        if let Some(u) = line.trim_end().strip_prefix(prefix) {
            break u.to_owned();
        }
    };
    std::thread::spawn(move || std::io::copy(&mut r, &mut std::io::sink()));
    url
}

/// host:port of a printed http:// URL.
fn host_of(url: &str) -> String {
    url.trim_start_matches("http://").split('/').next().unwrap_or_default().to_owned()
}

/// A plain HTTP/1.0 GET: the body.
fn http_get(host: &str, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(host).expect("connect");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").expect("write");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.split_once("\r\n\r\n").map(|b| b.1.to_owned()).unwrap_or_default()
}

/// A run of `rows` short requests without --serve, with it and no page, and with a page that
/// connects to the event stream and never reads (its receive buffer as small as the kernel
/// allows): the page must cost neither time nor memory.
fn live_figures(dir: &Path, rows: u64) {
    let fake = fake_ollama::FakeOllama::start(fake_ollama::Options::default());
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("live-rows.jsonl")).expect("rows"));
    for i in 0..rows {
        writeln!(f, "{{\"id\":\"r{i}\",\"question\":\"Question number {i}: why?\"}}").expect("write");
    }
    f.flush().expect("flush");
    drop(f);
    for (label, serve, stalled) in [("no --serve", false, false), ("--serve, no page", true, false), ("--serve, a stalled page", true, true)] {
        let out = format!("out-live-{}", label.len());
        let _ = std::fs::remove_dir_all(dir.join(&out));
        std::fs::write(
            dir.join("live.toml"),
            format!(
                "name = \"live\"\n[backend]\nkind = \"ollama\"\nurl = \"{}\"\nmodel = \"fake-model\"\n[options]\nseed = 1\n\
                 [prompts]\ntemplate_text = \"{{{{ question }}}}\"\n[input]\npath = \"live-rows.jsonl\"\nid_field = \"id\"\n\
                 [run]\nconcurrency = 8\n[output]\ndir = \"{out}\"\n",
                fake.url()
            ),
        )
        .expect("config");
        let mut args = vec!["--config", "live.toml", "--progress", "none"];
        if serve {
            args.extend(["--serve", "127.0.0.1:0"]);
        }
        let (m, _page) = run_measured_with(&args, dir, if serve { Stdio::piped() } else { Stdio::null() }, |child| {
            if !serve {
                return None;
            }
            let host = host_of(&url_from_stderr(child, "live view: "));
            let s = std::net::TcpStream::connect(&host).expect("connect");
            if stalled {
                use std::os::fd::AsRawFd;
                let small: libc::c_int = 1;
                // SAFETY: setsockopt on our own socket with a pointer to a local int.
                unsafe { libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, (&small as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t) };
                let mut w = &s;
                write!(w, "GET /api/events HTTP/1.1\r\nHost: {host}\r\n\r\n").expect("write");
            }
            Some(s)
        });
        let secs = m.took.as_secs_f64();
        println!(
            "live {label:<24}: {rows} requests in {secs:>6.2} s = {:>5.0} req/s; CPU {:>5.2} s; peak RSS {:>5.1} MB{}",
            rows as f64 / secs,
            m.cpu.as_secs_f64(),
            m.peak_kb as f64 / 1024.0,
            if m.ok { "" } else { "  (FAILED)" }
        );
    }
}

/// `view` of a dataset of about `size_mb` MB (records of ~2.8 KB): the time to serve, to the
/// first page, to the whole index; searches (a word in one record, words in every record, the
/// next page of that); a filter; the memory it took.
fn view_figures(dir: &Path, size_mb: u64) {
    let ds = dir.join("view-big");
    std::fs::create_dir_all(&ds).expect("mkdir");
    let words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "river", "mountain", "日本語", "café", "neural", "network", "gradient", "descent"];
    let mut f = std::io::BufWriter::new(std::fs::File::create(ds.join("dataset.jsonl")).expect("dataset"));
    let (mut n, mut size, mut x) = (0u64, 0u64, 1u64);
    let mut response = String::new();
    while size < size_mb * 1_000_000 {
        response.clear();
        for _ in 0..300 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            response.push_str(words[(x >> 60) as usize]);
            response.push(' ');
        }
        if size + 4000 >= size_mb * 1_000_000 {
            response.push_str("zanzibar");
        }
        let line = format!(
            r#"{{"id":"row-{n}","sample":0,"model":"m","system":null,"prompt":"Question {n}: tell me about rivers?","response":"{response}","thinking":null,"done_reason":"{}","prompt_tokens":9,"completion_tokens":300,"duration_ms":900,"attempts":1,"finished_at":"2026-11-22T00:00:00.000Z","seed":1,"eval_duration_ms":800.0,"key":"{n:032x}","input":{{"q":"Question {n}"}}}}"#,
            if n % 17 == 0 { "length" } else { "stop" }
        );
        writeln!(f, "{line}").expect("write");
        size += line.len() as u64 + 1;
        n += 1;
    }
    f.flush().expect("flush");
    drop(f);
    let start = Instant::now();
    let mut child = Command::new(BIN).args(["view", "view-big", "--serve", "127.0.0.1:0"]).current_dir(dir).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn view");
    let host = host_of(&url_from_stderr(&mut child, "view: "));
    let served = start.elapsed();
    let first_page = loop {
        if http_get(&host, "/api/records?per=50").contains("\"id\":\"row-") {
            break start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let indexed = loop {
        if http_get(&host, "/api/info").contains("\"indexing\":false") {
            break start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let timed = |path: &str| {
        let t = Instant::now();
        let body = http_get(&host, path);
        let total = serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| v["total"].as_u64()).unwrap_or(0);
        (t.elapsed().as_secs_f64(), total)
    };
    let rare = timed("/api/records?q=zanzibar");
    let common = timed("/api/records?q=fox+river");
    let common_next = timed("/api/records?q=fox+river&page=2");
    let unicode = timed("/api/records?q=caf%C3%A9+%E6%97%A5%E6%9C%AC%E8%AA%9E");
    let filter = timed("/api/records?done_reason=length&page=100");
    let peak = peak_kb(child.id()).unwrap_or(0);
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "view {n} records ({:.0} MB): served in {:.2} s, first page {:.2} s, indexed {:.2} s; peak RSS {:.1} MB",
        size as f64 / 1e6,
        served.as_secs_f64(),
        first_page.as_secs_f64(),
        indexed.as_secs_f64(),
        mb(peak)
    );
    println!(
        "view search: a word in {} record {:.2} s; two words in {} records {:.2} s (its next page {:.3} s); two non-ASCII words in {} {:.2} s; a filter ({} records) {:.3} s",
        rare.1, rare.0, common.1, common.0, common_next.0, unicode.1, unicode.0, filter.1, filter.0
    );
}

/// The fake in speed mode (pre-rendered replies, one write per token, nothing recorded).
fn fast_fake() -> fake_ollama::FakeOllama {
    fake_ollama::FakeOllama::start(fake_ollama::Options { fast: true, ..Default::default() })
}

/// What the fake serves alone: `clients` threads that send a streamed chat request, read the
/// reply to its end and send the next, for `how_long`. Tokens/s and requests/s.
fn fake_alone(fake: &fake_ollama::FakeOllama, kind: &str, clients: usize, how_long: Duration) -> (f64, f64) {
    use std::io::Read;
    let (path, body) = match kind {
        "openai" => ("/v1/chat/completions", r#"{"model":"fake-model","messages":[{"role":"user","content":"hi"}],"stream":true}"#),
        _ => ("/api/chat", r#"{"model":"fake-model","messages":[{"role":"user","content":"hi"}],"stream":true}"#),
    };
    let req = format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let addr = fake.addr;
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let req = req.clone();
            std::thread::spawn(move || {
                // One kept connection, as an HTTP client keeps it: a request, its reply read to
                // the chunked end, the next request.
                let mut n = 0u64;
                let mut buf = [0u8; 1 << 16];
                let Ok(mut s) = std::net::TcpStream::connect(addr) else { return 0 };
                let mut tail: Vec<u8> = Vec::new();
                while start.elapsed() < how_long {
                    if s.write_all(req.as_bytes()).is_err() {
                        break;
                    }
                    tail.clear();
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return n,
                            Ok(k) => {
                                tail.extend_from_slice(&buf[..k]);
                                if tail.len() > 8 {
                                    tail.drain(..tail.len() - 8);
                                }
                                if tail.ends_with(b"\r\n0\r\n\r\n") {
                                    break;
                                }
                            }
                        }
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    let n: u64 = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    let secs = start.elapsed().as_secs_f64();
    (n as f64 * 80.0 / secs, n as f64 / secs)
}

/// One generation run against the fast fake: `rows` requests of `tokens` tokens each, at
/// `concurrency`. Prints CPU per token and per request and peak RSS.
fn linear_run(dir: &Path, fake: &fake_ollama::FakeOllama, kind: &str, label: &str, rows: u64, tokens: u64, concurrency: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("linear-rows.jsonl")).expect("rows"));
    for i in 0..rows {
        writeln!(f, "{{\"id\":\"r{i}\",\"question\":\"Question {i} [[tokens={tokens}]]\"}}").expect("write");
    }
    f.flush().expect("flush");
    drop(f);
    let out = "out-linear";
    let _ = std::fs::remove_dir_all(dir.join(out));
    std::fs::write(
        dir.join("linear.toml"),
        format!(
            "name = \"linear\"\n[backend]\nkind = \"{kind}\"\nurl = \"{}{}\"\nmodel = \"fake-model\"\n[options]\nseed = 1\n\
             [prompts]\ntemplate_text = \"{{{{ question }}}}\"\n[input]\npath = \"linear-rows.jsonl\"\nid_field = \"id\"\n\
             [run]\nconcurrency = {concurrency}\n[output]\ndir = \"{out}\"\nformats = [\"jsonl\"]\n",
            fake.url(),
            if kind == "openai" { "/v1" } else { "" }
        ),
    )
    .expect("config");
    let fake_before = fake_ollama::FakeOllama::cpu();
    let m = run_measured(&["--config", "linear.toml", "--progress", "none"], dir);
    let fake_us = fake_ollama::FakeOllama::cpu().saturating_sub(fake_before).as_secs_f64() * 1e6;
    let total = rows * tokens;
    let cpu_us = m.cpu.as_secs_f64() * 1e6;
    println!(
        "linear {kind:<6} {label:<34}: {rows:>7} requests x {tokens:>6} tokens in {:>6.2} s = {:>7.0} tokens/s; CPU {:>5.2} us/token, {:>6.0} us/request (the fake's own {:>5.0}); peak RSS {:>6.1} MB{}",
        m.took.as_secs_f64(),
        total as f64 / m.took.as_secs_f64(),
        cpu_us / total.max(1) as f64,
        cpu_us / rows.max(1) as f64,
        fake_us / rows.max(1) as f64,
        m.peak_kb as f64 / 1024.0,
        if m.ok { "" } else { "  (FAILED)" }
    );
}

/// Costs as the reply grows (10 to 10,000 tokens, 600,000 tokens a line; then one reply of
/// ~1 MB at a time) and as the batch grows (`BENCH_LINEAR_ROWS` requests of 80 tokens).
fn linear_figures(dir: &Path) {
    let fake = fast_fake();
    for kind in ["ollama", "openai"] {
        for tokens in [10u64, 100, 1000, 10_000] {
            linear_run(dir, &fake, kind, &format!("reply length {tokens}"), 600_000 / tokens, tokens, 8);
        }
    }
    // ~1.1 MB of text a reply (5.5 bytes a token), one at a time, against 10-token replies.
    linear_run(dir, &fake, "ollama", "memory: 10-token replies, one at a time", 20, 10, 1);
    linear_run(dir, &fake, "ollama", "memory: ~1 MB replies, one at a time", 4, 200_000, 1);
    let sizes = std::env::var("BENCH_LINEAR_ROWS").unwrap_or_else(|_| "1000,10000,100000".into());
    for rows in sizes.split(',').filter_map(|n| n.trim().parse::<u64>().ok()) {
        linear_run(dir, &fake, "ollama", &format!("batch of {rows}"), rows, 80, 8);
    }
}
