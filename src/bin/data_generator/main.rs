//! `data_generator --config run.toml`: parse the command line, load the config, run, exit code.

mod ollama_client;
mod pipeline;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use data_generator::config::{self, Overrides};
use data_generator::dataset;
use data_generator::progress::DisplayMode;

/// Turn a batch of prompts into a training dataset by streaming completions from a local LLM server.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The run config (TOML).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// Output folder (default: the config's output.dir, else output/<name>/).
    #[arg(long, short = 'o', value_name = "DIR")]
    output: Option<PathBuf>,
    /// Only the first N rows.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Requests in flight.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
    concurrency: Option<u64>,
    /// Model name (overrides backend.model).
    #[arg(long)]
    model: Option<String>,
    /// Server URL (overrides backend.url and OLLAMA_HOST).
    #[arg(long)]
    url: Option<String>,
    /// Progress display: bars on a terminal, plain lines otherwise (auto), or forced.
    #[arg(long, value_enum, default_value_t = DisplayMode::Auto)]
    progress: DisplayMode,
    /// Start over: move the output folder aside to <dir>.old-N first (nothing is deleted).
    #[arg(long)]
    fresh: bool,
    /// Do not retry the requests that failed in earlier runs (in failures.jsonl).
    #[arg(long)]
    no_retry_failed: bool,
    /// Run again the requests whose record was cut off by num_predict (done_reason "length").
    #[arg(long)]
    redo_truncated: bool,
}

/// Exit codes of the design brief.
const EXIT_FATAL: u8 = 1;
const EXIT_SOME_FAILED: u8 = 3;
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::from(EXIT_FATAL)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    let overrides = Overrides {
        output: cli.output,
        limit: cli.limit,
        concurrency: cli.concurrency.map(|c| c as usize),
        model: cli.model,
        url: cli.url,
    };
    let host = std::env::var("OLLAMA_HOST").ok();
    let cfg = config::load(&cli.config, &overrides, host.as_deref())?;
    if cli.fresh {
        let moved = dataset::move_aside(&cfg.output_dir)
            .with_context(|| format!("--fresh: cannot move {} aside", cfg.output_dir.display()))?;
        if let Some(to) = moved {
            eprintln!("--fresh: moved the old {} to {}", cfg.output_dir.display(), to.display());
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let opts = pipeline::RunOptions {
        display: cli.progress,
        retry_failed: !cli.no_retry_failed,
        redo_truncated: cli.redo_truncated,
    };
    let outcome = runtime.block_on(pipeline::run(cfg, opts))?;
    Ok(if outcome.interrupted {
        EXIT_INTERRUPTED
    } else if outcome.failed > 0 {
        EXIT_SOME_FAILED
    } else {
        0
    })
}
