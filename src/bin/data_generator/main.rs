//! `data_generator --config run.toml`: parse the command line, load the config, run, exit code.
//! Subcommands: `run` (the same), `check` (dry run), `inspect`, `export`, `merge`, `view`.

/// `println!` for what a command says on stdout when it is done (a run's summary): a closed
/// pipe (`| head`) or a full disk behind a redirect does not turn a finished run into a panic or
/// a failure.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

mod ollama_client;
mod openai_client;
mod pipeline;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use data_generator::config::{self, Config, Overrides};
use data_generator::export::{self, ExportFormat, Filters};
use data_generator::inspect::{self, InspectOptions, Source};
use data_generator::progress::DisplayMode;

/// Turn a batch of prompts into a training dataset by streaming completions from a local LLM server.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:
  data_generator --config configs/example.toml
      Run the batch. The same command again resumes it where it stopped.
  data_generator check --config configs/example.toml
      Dry run: config, input, templates, server and model; nothing is sent.
  data_generator inspect output/example --sample 3
      What the dataset holds, with 3 records chosen at random.
  data_generator view output/example
      Browse the records in the browser (http://127.0.0.1:8765/): search, filters, summary."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a config (the same as without a subcommand).
    Run(RunArgs),
    /// Dry run: check the config, input, templates, output folder, server and model; send nothing.
    Check(ConfigArgs),
    /// What a dataset holds: counts, done reasons, distributions, quality checks, samples.
    Inspect(InspectArgs),
    /// Write the dataset for a trainer: chat messages, ShareGPT, Alpaca, JSONL or CSV.
    Export(ExportArgs),
    /// Combine shard folders (from --shard K/N) into one dataset, without duplicates.
    Merge(MergeArgs),
    /// Browse a run's output in the browser: records, search, filters, the inspect summary.
    View(ViewArgs),
}

#[derive(Args, Debug)]
struct ViewArgs {
    /// An output folder (of a finished run, or of one still going: new records show as they
    /// come), or a dataset file in one.
    dir: PathBuf,
    /// Where to serve the page (port 0 picks a free one). Any address but loopback needs a
    /// token: one is made (or give --serve-token).
    #[arg(long, value_name = "ADDR", default_value = data_generator::web::DEFAULT_ADDR)]
    serve: String,
    /// The page's token, at least 16 characters (default: made at random when the address is
    /// not loopback).
    #[arg(long, value_name = "TOKEN", env = "DATA_GENERATOR_SERVE_TOKEN", hide_env_values = true)]
    serve_token: Option<String>,
}

#[derive(Args, Debug)]
struct MergeArgs {
    /// The folders to combine (e.g. output/demo/shard-*-of-4).
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// The new folder for the merged dataset.
    #[arg(long, short = 'o', value_name = "OUTDIR")]
    output: PathBuf,
}

#[derive(Args, Debug)]
struct ConfigArgs {
    /// The run config (TOML).
    #[arg(long, short = 'c', value_name = "FILE", required = true)]
    config: Option<PathBuf>,
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
    /// Server URL (overrides backend.url, urls, endpoints and OLLAMA_HOST).
    #[arg(long)]
    url: Option<String>,
    /// Run only shard K of N (K from 0): the rows whose id hashes there, into <output>/shard-K-of-N/.
    #[arg(long, value_name = "K/N")]
    shard: Option<config::Shard>,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Progress display: bars on a terminal, plain lines otherwise (auto), or forced.
    #[arg(long, value_enum, default_value_t = DisplayMode::Auto)]
    progress: DisplayMode,
    /// Start over: move the output folder aside to <dir>.old-N first (nothing is deleted).
    #[arg(long)]
    fresh: bool,
    /// Serve a live view of the run in the browser at ADDR (default 127.0.0.1:8765; port 0 picks
    /// a free one). Any address but loopback needs a token: one is made (or give --serve-token).
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = data_generator::web::DEFAULT_ADDR)]
    serve: Option<String>,
    /// The live view's token, at least 16 characters (default: made at random when the address
    /// is not loopback).
    #[arg(long, value_name = "TOKEN", env = "DATA_GENERATOR_SERVE_TOKEN", hide_env_values = true)]
    serve_token: Option<String>,
    /// Do not retry the requests that failed in earlier runs (in failures.jsonl).
    #[arg(long)]
    no_retry_failed: bool,
    /// Run again the requests whose record was cut off by num_predict (done_reason "length").
    #[arg(long)]
    redo_truncated: bool,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// An output folder, a dataset.jsonl or a dataset.csv.
    path: PathBuf,
    /// Tell the records that match this config's requests from stale ones.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Show N records chosen at random (repeatable with --seed).
    #[arg(long, value_name = "N")]
    sample: Option<usize>,
    /// Seed for --sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Show the records of this id.
    #[arg(long)]
    id: Option<String>,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
    /// A multi-stage run: only this stage (default: every stage, in order).
    #[arg(long, value_name = "NAME")]
    stage: Option<String>,
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// An output folder, a dataset.jsonl or a dataset.csv.
    path: PathBuf,
    /// A multi-stage run: training rows from this stage's prompt and response, for the rows of
    /// dataset.jsonl (those that went through every stage and passed every `keep`).
    #[arg(long, value_name = "NAME")]
    stage: Option<String>,
    #[arg(long, short = 'f', value_enum)]
    format: ExportFormat,
    /// Output file, written atomically; `-` or none for stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: Option<PathBuf>,
    /// Only the records that match this config's requests.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Keep only records with this done_reason (repeatable), e.g. `stop`.
    #[arg(long, value_name = "REASON")]
    only_done_reason: Vec<String>,
    /// Drop responses shorter than this many characters.
    #[arg(long, value_name = "N")]
    min_chars: Option<usize>,
    /// Drop responses longer than this many characters.
    #[arg(long, value_name = "N")]
    max_chars: Option<usize>,
    /// Drop exact duplicate responses (the first is kept).
    #[arg(long)]
    dedupe: bool,
    /// Put thinking text before the answer as <think>...</think> (chat and Alpaca formats).
    #[arg(long)]
    include_thinking: bool,
    /// Alpaca: the input-row field for `instruction` (default: the rendered prompt).
    #[arg(long, value_name = "FIELD")]
    instruction_field: Option<String>,
    /// Alpaca: the input-row field for `input` (default: empty).
    #[arg(long, value_name = "FIELD")]
    input_field: Option<String>,
}

/// Exit codes of the design brief.
const EXIT_FATAL: u8 = 1;
const EXIT_SOME_FAILED: u8 = 3;
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    // A long reply's buffers (over 256 KB) get pages of their own, handed back to the system
    // when freed. glibc would otherwise raise this threshold after the first such free, and keep
    // every later long reply's memory in its heap: peak memory would grow with the longest reply
    // seen, not with the replies in flight.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        None => run(cli.run),
        Some(Command::Run(args)) => run(args),
        Some(Command::Check(args)) => check(args),
        Some(Command::Inspect(args)) => inspect(args),
        Some(Command::Export(args)) => export(args),
        Some(Command::Merge(args)) => merge(args),
        Some(Command::View(args)) => view(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("Error: {}", pipeline::error_text(&e));
            ExitCode::from(EXIT_FATAL)
        }
    }
}

fn load_config(args: ConfigArgs) -> anyhow::Result<Config> {
    let path = args.config.context("--config FILE is required")?;
    let overrides = Overrides {
        output: args.output,
        limit: args.limit,
        concurrency: args.concurrency.map(|c| c as usize),
        model: args.model,
        url: args.url,
        shard: args.shard,
    };
    let host = std::env::var("OLLAMA_HOST").ok();
    Ok(config::load(&path, &overrides, host.as_deref())?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn run(args: RunArgs) -> anyhow::Result<u8> {
    let cfg = load_config(args.config)?;
    let opts = pipeline::RunOptions {
        display: args.progress,
        redo: data_generator::plan::Redo { failed: !args.no_retry_failed, truncated: args.redo_truncated },
        fresh: args.fresh,
        serve: args.serve.map(|addr| data_generator::live::ServeOptions { addr, token: args.serve_token.clone() }),
    };
    let outcome = runtime()?.block_on(pipeline::run(cfg, opts))?;
    Ok(if outcome.interrupted {
        EXIT_INTERRUPTED
    } else if outcome.failed > 0 {
        EXIT_SOME_FAILED
    } else {
        0
    })
}

fn check(args: ConfigArgs) -> anyhow::Result<u8> {
    let cfg = load_config(args)?;
    runtime()?.block_on(pipeline::check(cfg))?;
    Ok(0)
}

/// Keys of a config's requests (for inspect and export `--config`).
fn config_keys(path: Option<&Path>) -> anyhow::Result<Option<std::collections::HashSet<u128>>> {
    let Some(path) = path else { return Ok(None) };
    let host = std::env::var("OLLAMA_HOST").ok();
    let cfg = config::load(path, &Overrides::default(), host.as_deref())?;
    Ok(Some(data_generator::plan::Planner::new(&cfg)?.keys()?))
}

/// The lines of a file, streamed (a dataset may not fit in memory).
fn count_lines(path: &Path) -> std::io::Result<usize> {
    use std::io::BufRead;
    let mut r = std::io::BufReader::with_capacity(1 << 16, std::fs::File::open(path)?);
    let mut n = 0;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(n);
        }
        n += buf.iter().filter(|c| **c == b'\n').count();
        let len = buf.len();
        r.consume(len);
    }
}

/// `inspect` of a multi-stage folder: the composed dataset's size, then each stage's report.
fn inspect_stages(args: &InspectArgs, names: &[String]) -> anyhow::Result<u8> {
    let dir = &args.path;
    let wanted: Vec<&String> = match &args.stage {
        Some(s) if !names.contains(s) => anyhow::bail!("{}: no stage {s:?} (its stages: {})", dir.display(), names.join(", ")),
        Some(s) => vec![s],
        None => names.iter().collect(),
    };
    let rows = count_lines(&dir.join("dataset.jsonl")).unwrap_or(0);
    let failures = Some(dir.join("failures.jsonl")).filter(|f| f.is_file());
    let mut reports = serde_json::Map::new();
    let mut text = format!("multi-stage run: {} ({}); dataset.jsonl: {rows} rows that went through every stage\n", dir.display(), names.join(" -> "));
    // The last run's own counts, for its config: the stage files also keep records of earlier
    // configs (a reverted edit finds them again), which the per-stage figures below include.
    let manifest: serde_json::Value = std::fs::read(dir.join("manifest.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    for st in manifest["stages"].as_array().into_iter().flatten() {
        let n = |k: &str| st[k].as_u64().unwrap_or(0);
        text.push_str(&format!(
            "  last run, {}: {} requests for its config ({} read back, {} asked, {} failed), {} dropped by keep{}\n",
            st["name"].as_str().unwrap_or("?"),
            n("requested"),
            n("already_done"),
            n("done"),
            n("failed"),
            n("dropped"),
            if n("exploded_into") + n("exploded_empty") > 0 { format!(", exploded into {} rows", n("exploded_into")) } else { String::new() }
        ));
    }
    text.push_str("  (the per-stage figures below count every record in the stage's file, earlier configs' too)\n");
    for name in wanted {
        let src = Source { dataset: data_generator::stages::stage_jsonl(dir, name), csv: false, failures: failures.clone(), stage: Some(name.clone()) };
        let opts = InspectOptions { sample: args.sample.unwrap_or(0), seed: args.seed, id: args.id.clone(), current_keys: None };
        let report = inspect::inspect(&src, &opts)?;
        text.push_str(&format!("\n── stage {name} ──\n{}", report.to_text()));
        reports.insert(name.clone(), serde_json::to_value(&report)?);
    }
    let out = if args.json {
        serde_json::to_string_pretty(&serde_json::json!({"dataset_rows": rows, "stages": reports}))? + "\n"
    } else {
        text
    };
    write_stdout(out.as_bytes())?;
    Ok(0)
}

fn inspect(args: InspectArgs) -> anyhow::Result<u8> {
    if let Some(names) = data_generator::stages::stage_names(&args.path) {
        return inspect_stages(&args, &names);
    }
    if let Some(s) = &args.stage {
        anyhow::bail!("--stage {s}: {} is not the output folder of a multi-stage run", args.path.display());
    }
    let src = Source::locate(&args.path)?;
    let opts = InspectOptions {
        sample: args.sample.unwrap_or(0),
        seed: args.seed,
        id: args.id,
        current_keys: config_keys(args.config.as_deref())?,
    };
    let report = inspect::inspect(&src, &opts)?;
    let text = if args.json { serde_json::to_string_pretty(&report)? + "\n" } else { report.to_text() };
    write_stdout(text.as_bytes())?;
    Ok(0)
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn export(args: ExportArgs) -> anyhow::Result<u8> {
    let mut src = Source::locate(&args.path)?;
    let dir = if args.path.is_dir() { args.path.clone() } else { args.path.parent().map(Path::to_path_buf).unwrap_or_default() };
    match (data_generator::stages::stage_names(&dir), &args.stage) {
        (Some(names), Some(s)) if !names.contains(s) => anyhow::bail!("--stage {s}: {} has no such stage (its stages: {})", dir.display(), names.join(", ")),
        (Some(_), Some(s)) => src.stage = Some(s.clone()),
        (Some(names), None) => anyhow::bail!(
            "{} is a multi-stage run: say which stage's prompts and responses make the training rows with --stage ({})",
            dir.display(),
            names.join(", ")
        ),
        (None, Some(s)) => anyhow::bail!("--stage {s}: {} is not the output folder of a multi-stage run", dir.display()),
        (None, None) => {}
    }
    if src.stage.is_some() && src.csv {
        anyhow::bail!("--stage reads dataset.jsonl (the CSV flattens the stages): give the folder or its dataset.jsonl");
    }
    let filters = Filters {
        done_reasons: args.only_done_reason,
        min_chars: args.min_chars,
        max_chars: args.max_chars,
        dedupe: args.dedupe,
        include_thinking: args.include_thinking,
        instruction_field: args.instruction_field,
        input_field: args.input_field,
        keys: config_keys(args.config.as_deref())?,
    };
    let to_file = args.output.as_ref().filter(|p| p.as_os_str() != "-");
    let stats = match to_file {
        None => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            match export::export(&src, args.format, &filters, &mut out, Path::new("stdout")) {
                Err(e) if export::is_broken_pipe(&e) => return Ok(0),
                r => r?,
            }
        }
        Some(path) => {
            // Atomic: a temp file beside the target, renamed over it once complete.
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("export");
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
            let file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
            let mut out = std::io::BufWriter::new(file);
            let result = export::export(&src, args.format, &filters, &mut out, path).and_then(|s| {
                let file = out.into_inner().map_err(|e| export::ExportError::Write { path: path.clone(), source: e.into_error() })?;
                file.sync_all().map_err(|source| export::ExportError::Write { path: path.clone(), source })?;
                Ok(s)
            });
            let stats = match result {
                Ok(s) => s,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e.into());
                }
            };
            std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
            stats
        }
    };
    let dest = to_file.map(|p| p.display().to_string()).unwrap_or_else(|| "stdout".into());
    let mut skipped = Vec::new();
    for (n, what) in [
        (stats.superseded, "superseded by a newer record"),
        (stats.other_config, "made by another config"),
        (stats.filtered, "filtered out"),
        (stats.duplicates, "duplicate responses"),
    ] {
        if n > 0 {
            skipped.push(format!("{n} {what}"));
        }
    }
    eprintln!(
        "exported {} of {} records to {dest}{}",
        stats.written,
        stats.read,
        if skipped.is_empty() { String::new() } else { format!(" (skipped: {})", skipped.join(", ")) }
    );
    if let Some(m) = stats.malformed.first() {
        eprintln!("warning: {} malformed lines skipped (first: line {}: {})", stats.malformed.len(), m.line, m.error);
    }
    Ok(0)
}

fn merge(args: MergeArgs) -> anyhow::Result<u8> {
    if let Some(d) = args.dirs.iter().find(|d| data_generator::stages::stage_names(d).is_some()) {
        anyhow::bail!(
            "{} is the output of a multi-stage run: merge takes one-stage folders (merging shards of a multi-stage run is not supported yet; \
             export each shard with --stage and concatenate the files)",
            d.display()
        );
    }
    let stats = data_generator::merge::merge(&args.dirs, &args.output)?;
    say!(
        "merged {} folders into {}: {} records ({} duplicates dropped), {} unresolved failures",
        args.dirs.len(),
        args.output.display(),
        stats.records,
        stats.duplicates_dropped,
        stats.failures
    );
    if stats.malformed_lines > 0 {
        eprintln!("warning: {} malformed lines were skipped", stats.malformed_lines);
    }
    Ok(0)
}

/// `view DIR`: serves the dataset browser until Ctrl-C (or SIGTERM). The index is built in the
/// background: the page opens at once and fills in.
fn view(args: ViewArgs) -> anyhow::Result<u8> {
    // A dataset file stands for its folder.
    let dir = if args.dir.is_file() { args.dir.parent().map(Path::to_path_buf).unwrap_or_default() } else { args.dir.clone() };
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    let ds = data_generator::view::Dataset::open(&dir)?;
    ds.follow();
    let opts = data_generator::web::ServeOptions { addr: args.serve, token: args.serve_token };
    runtime()?.block_on(async {
        let server = data_generator::view::serve(&opts, ds.clone()).await?;
        eprintln!("view: {}", server.url_with_token);
        if let Some(h) = data_generator::web::url_hint(&server) {
            eprintln!("{h}");
        }
        eprintln!("serving {} (read-only) until Ctrl-C", dir.display());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        ds.shut_down();
        Ok(0)
    })
}
