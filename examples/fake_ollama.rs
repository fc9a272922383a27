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
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage(&format!("{a} needs a value")));
        match a.as_str() {
            "--port" => port = value().parse().unwrap_or_else(|_| usage("--port takes a number")),
            "--token-delay-ms" => delay_ms = value().parse().unwrap_or_else(|_| usage("--token-delay-ms takes a number")),
            "--model" => models.push(value()),
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let mut opts = fake_ollama::Options { token_delay: Duration::from_millis(delay_ms), ..Default::default() };
    opts.models.extend(models);
    let fake = fake_ollama::FakeOllama::start_on(&format!("127.0.0.1:{port}"), opts);
    eprintln!("fake Ollama listening on {} (Ctrl-C to stop)", fake.url());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("error: {msg}");
    }
    eprintln!("usage: fake_ollama [--port 11434] [--token-delay-ms 20] [--model NAME]...");
    std::process::exit(2)
}
