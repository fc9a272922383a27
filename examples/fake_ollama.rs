//! The test suite's fake Ollama as a standalone server, to try the tool (and its live display)
//! without a model: `cargo run --example fake_ollama -- --port 11434 --token-delay-ms 30`.
//! Directives such as `[[503x2]]` in a prompt make it misbehave (see tests/support/fake_ollama.rs).

#[path = "../tests/support/fake_ollama.rs"]
mod fake_ollama;

use std::time::Duration;

fn main() {
    let mut port = 11434u16;
    let mut delay_ms = 20u64;
    let mut models: Vec<String> = Vec::new();
    let mut fast = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage(&format!("{a} needs a value")));
        match a.as_str() {
            "--port" => port = value().parse().unwrap_or_else(|_| usage("--port takes a number")),
            "--token-delay-ms" => delay_ms = value().parse().unwrap_or_else(|_| usage("--token-delay-ms takes a number")),
            "--model" => models.push(value()),
            "--fast" => fast = true,
            "-h" | "--help" => help(),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let mut opts = fake_ollama::Options { token_delay: Duration::from_millis(delay_ms), fast, ..Default::default() };
    opts.models.extend(models);
    let addr = format!("127.0.0.1:{port}");
    // A port in use is the usual mistake: say so, instead of the test helper's panic.
    if let Err(e) = std::net::TcpListener::bind(&addr) {
        eprintln!("error: cannot listen on {addr}: {e} (another server there? pick another --port)");
        std::process::exit(1);
    }
    let fake = fake_ollama::FakeOllama::start_on(&addr, opts);
    eprintln!("fake Ollama listening on {} (Ctrl-C to stop)", fake.url());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

const USAGE: &str = "usage: fake_ollama [--port 11434] [--token-delay-ms 20] [--model NAME]... [--fast]";

const HELP: &str = "\
The test suite's fake Ollama, to try data_generator without a model: it answers every prompt
with made-up text, on Ollama's API (http://127.0.0.1:PORT) and an OpenAI-compatible one
(http://127.0.0.1:PORT/v1). Not for training: a dataset made with it says \"fake\": true under
\"server\" in its manifest.json, so write it to its own folder (--output).

Options:
  --port N             port on 127.0.0.1 (default 11434; 0 = any free port)
  --token-delay-ms MS  pause between streamed tokens (default 20)
  --model NAME         a model it knows, besides fake-model (repeatable)
  --fast               speed mode, for benchmarks: every reply is the same pre-rendered text,
                       80 tokens (or N with [[tokens=N]] in the prompt), at once, one write per
                       token; no directives, no delay
  -h, --help           this help

Directives in a prompt make it misbehave: [[NAME]] on every attempt, [[NAMExN]] on the first N
attempts of that prompt (e.g. [[503x2]]: busy twice, then a normal answer).
  [[503]]       HTTP 503, server busy
  [[500]]       HTTP 500, the runner crashed
  [[400]]       HTTP 400, bad request
  [[429]]       HTTP 429, rate limited (retry-after: 0)
  [[error]]     an error line mid-stream
  [[truncate]]  the stream ends without done
  [[drop]]      the connection is closed mid-chunk
  [[stall]]     goes silent mid-stream for 30 s, then closes
  [[keepalive]] from halfway, only keep-alives (SSE comments, blank NDJSON lines), no data
  [[wait3600]]  HTTP 429 with Retry-After: 3600
  [[think]]     thinking text first
  [[length]]    ends with done_reason: length
  [[slow]]      a pause per token
  [[nousage]]   OpenAI API only: no usage chunk (as llama-cpp-python streams)
With a JSON schema in the request (structured output), the reply is JSON made to fit it, and:
  [[badjson]]     the JSON cut in half
  [[outofrange]]  numbers 90 above their maximum
  [[fenced]]      the JSON in a Markdown code fence
  [[emptyarrays]] every array empty (a stage that explodes it ends the row)
  [[arrayN]]      every array N items long, e.g. [[array50]]

Examples:
  cargo run --release --example fake_ollama -- --port 11999 --model llama3.2:3b --model qwen3:8b &
  cargo run --release -- --config configs/example.toml --url http://127.0.0.1:11999 --output output/example-fake
  cargo run --release -- --config configs/distill.toml --url http://127.0.0.1:11999 --output output/distill-fake";

fn help() -> ! {
    println!("{USAGE}\n\n{HELP}");
    std::process::exit(0)
}

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("error: {msg}");
    }
    eprintln!("{USAGE}\n(--help for the options and the directives)");
    std::process::exit(2)
}
