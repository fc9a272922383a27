//! The run configuration: `run.toml` parsed into typed structs, checked as a whole, and resolved
//! (paths made absolute against the config's folder, the server URL chosen, prompt files read)
//! before anything talks to a server. Every error names the file and the key to fix.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::input::InputFormat;

/// Default Ollama address when neither the config nor `OLLAMA_HOST` gives one.
pub const DEFAULT_OLLAMA_URL: &str = "http://127.0.0.1:11434";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: `{key}`: {message}")]
    Invalid { path: PathBuf, key: String, message: String },
    /// A bad value given on the command line (named by its flag, not by run.toml).
    #[error("{flag}: {message}")]
    Flag { flag: String, message: String },
    #[error("{path}: `{key}`: cannot read {file}: {source}")]
    File { path: PathBuf, key: String, file: PathBuf, source: std::io::Error },
}

/// `run.toml` as written. Unknown keys are rejected: they are typos.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The run's name; output defaults to `output/<name>/`.
    pub name: String,
    pub backend: BackendConfig,
    /// Sampling options, passed to Ollama's `options` as they are.
    #[serde(default)]
    pub options: Map<String, Value>,
    /// One stage: today's single-stage run. Either this or `stages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<PromptsConfig>,
    /// Several stages, each row flowing through them in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<StageConfig>>,
    pub input: InputConfig,
    #[serde(default)]
    pub run: RunSettings,
    #[serde(default)]
    pub output: OutputConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Ollama,
    Openai,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OllamaApi {
    /// `/api/chat`: system and user messages; the model's chat template applies.
    #[default]
    Chat,
    /// `/api/generate`: a prompt and a `system` field.
    Generate,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub kind: BackendKind,
    /// Server address; for Ollama, absent means `$OLLAMA_HOST` by Ollama's rules, else localhost.
    /// For `openai`, the API base as OpenAI SDKs take it (`http://127.0.0.1:8000/v1`).
    pub url: Option<String>,
    /// Several servers of the same model, each with `run.concurrency` requests in flight.
    pub urls: Option<Vec<String>>,
    /// Several servers, each with its own `concurrency`.
    pub endpoints: Option<Vec<EndpointConfig>>,
    pub model: String,
    #[serde(default)]
    pub api: OllamaApi,
    /// How long Ollama keeps the model loaded after a request: `"30m"`, or seconds.
    pub keep_alive: Option<Value>,
    /// Reasoning models: `true`/`false` or `"low" | "medium" | "high"`.
    pub think: Option<Value>,
    /// Name of the environment variable that holds an API key (never the key itself).
    pub api_key_env: Option<String>,
    /// openai: how a schema is sent (`json_schema`, or `json_object` for llama-cpp-python).
    pub response_format: Option<ResponseFormat>,
}

/// The OpenAI-compatible dialects of structured output (protocol.md, section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict": true}}`: vLLM,
    /// llama.cpp's llama-server, LM Studio, OpenAI.
    #[default]
    JsonSchema,
    /// `{"type": "json_object", "schema": ...}`: llama-cpp-python's server.
    JsonObject,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub url: String,
    /// Requests in flight on this server (default: `run.concurrency`).
    pub concurrency: Option<usize>,
}

/// A user name and optional password, for HTTP basic auth.
pub type Credentials = (String, Option<String>);

/// A server the run sends requests to, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The URL without credentials: what records, the manifest, the log and messages show.
    pub url: String,
    /// `user:password` from the URL as written, sent as HTTP basic auth and shown nowhere.
    pub credentials: Option<Credentials>,
    pub concurrency: usize,
    /// Where the URL came from, for messages: `--url`, `backend.url`, `backend.urls[1]`, `OLLAMA_HOST`.
    pub source: String,
}

/// `--shard K/N`: this machine runs the rows whose id hashes to K of N (K from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Shard, String> {
        let (k, n) = s.split_once('/').ok_or_else(|| format!("{s:?}: write K/N, e.g. 0/4 (K counts from 0)"))?;
        let index: u64 = k.trim().parse().map_err(|_| format!("{k:?} is not a whole number"))?;
        let count: u64 = n.trim().parse().map_err(|_| format!("{n:?} is not a whole number"))?;
        if count == 0 || index >= count {
            return Err(format!("shard {index}/{count}: K must be from 0 to N-1 (K counts from 0)"));
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// Whether a row belongs to this shard: a stable hash of its id, so every machine agrees.
    pub fn has(&self, id: &str) -> bool {
        crate::record::fnv1a64(&[id.as_bytes()]) % self.count == self.index
    }

    pub fn folder(&self) -> String {
        format!("shard-{}-of-{}", self.index, self.count)
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PromptsConfig {
    /// File holding the system prompt.
    pub system: Option<PathBuf>,
    /// The system prompt inline.
    pub system_text: Option<String>,
    /// File holding the user-prompt template (minijinja).
    pub template: Option<PathBuf>,
    /// The user-prompt template inline.
    pub template_text: Option<String>,
    /// File holding a JSON schema the replies must follow.
    pub schema: Option<PathBuf>,
    /// The JSON schema inline.
    pub schema_text: Option<String>,
}

/// One `[[stages]]` entry as written: its prompts, and whatever it sets apart from the run's
/// `[backend]`, `[options]` and `[run]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// `[a-z_][a-z0-9_]*`: the template variable, the file name under `stages/`, the label.
    pub name: String,
    /// Shorthand for `[stages.backend] model`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Keys merged over `[backend]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<Map<String, Value>>,
    /// Keys merged over `[options]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub options: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template_text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema_text: Option<String>,
    /// An array field of `parsed`: one downstream row per element.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explode: Option<String>,
    /// A minijinja expression over the row; false ends the row at this stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples_per_prompt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_invalid: Option<u32>,
    /// Requests of this stage in flight at most (within `run.concurrency` over all stages).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
}

/// A stage of a multi-stage run, resolved.
#[derive(Debug, Clone)]
pub struct StageSpec {
    pub name: String,
    /// The stage seen as a one-stage run: its backend, endpoints, options, prompts, schema and
    /// run settings (what a request of the stage needs), the rest the run's.
    pub cfg: Box<Config>,
    pub explode: Option<String>,
    pub keep: Option<String>,
    /// The stage's own cap on requests in flight (`stages[i].concurrency`).
    pub concurrency: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    pub path: PathBuf,
    /// Field holding each row's id; default: the line the row starts on.
    pub id_field: Option<String>,
    /// `jsonl` | `csv` | `txt`; default: from the file's extension.
    pub format: Option<InputFormat>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSettings {
    /// Requests in flight.
    pub concurrency: usize,
    pub samples_per_prompt: u32,
    /// Retries after the first attempt of a row.
    pub max_retries: u32,
    pub connect_timeout_secs: f64,
    /// No byte for this long is a stalled attempt (covers model load and prompt evaluation).
    pub idle_timeout_secs: f64,
    /// First retry delay; doubles each retry (capped at 60 s), with jitter.
    pub retry_base_delay_ms: u64,
    /// Only the first N rows.
    pub limit: Option<u64>,
    /// After Ctrl-C (or SIGTERM), how long requests in flight may take to finish before they are
    /// abandoned.
    pub stop_grace_secs: f64,
    /// How long the run waits, paused, while every server is down before it stops (exit 1);
    /// 0 = no pause: connection errors are retried and fail rows as any other error.
    pub outage_wait_secs: f64,
    /// A server's `Retry-After` longer than this is capped to it (and logged).
    pub max_retry_after_secs: f64,
    /// With a schema: re-asks after a reply that does not validate, per row and sample.
    pub max_invalid: u32,
}

impl Default for RunSettings {
    fn default() -> Self {
        RunSettings {
            concurrency: 4,
            samples_per_prompt: 1,
            max_retries: 4,
            connect_timeout_secs: 10.0,
            idle_timeout_secs: 120.0,
            retry_base_delay_ms: 500,
            limit: None,
            stop_grace_secs: 30.0,
            outage_wait_secs: 3600.0,
            max_retry_after_secs: 120.0,
            max_invalid: 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Jsonl,
    Csv,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    pub dir: Option<PathBuf>,
    pub formats: Vec<OutputFormat>,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig { dir: None, formats: vec![OutputFormat::Jsonl, OutputFormat::Csv] }
    }
}

/// Command-line values that take precedence over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub output: Option<PathBuf>,
    pub limit: Option<u64>,
    pub concurrency: Option<usize>,
    pub model: Option<String>,
    pub url: Option<String>,
    pub shard: Option<Shard>,
}

/// A checked configuration, ready to run: paths resolved, prompt texts loaded.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file it came from.
    pub path: PathBuf,
    /// The file's contents after overrides (for the manifest).
    pub raw: RunConfig,
    /// The servers, at least one.
    pub endpoints: Vec<Endpoint>,
    /// The API key read from `backend.api_key_env` (never written anywhere).
    pub api_key: Option<String>,
    pub shard: Option<Shard>,
    pub system: Option<String>,
    /// The schema replies must follow, compiled.
    pub schema: Option<std::sync::Arc<crate::schema::OutputSchema>>,
    pub template: String,
    /// Where the template came from, for error messages.
    pub template_origin: String,
    pub input_path: PathBuf,
    pub input_format: InputFormat,
    pub output_dir: PathBuf,
    /// The stages of a `[[stages]]` config, in order; empty for a `[prompts]` one.
    pub stages: Vec<StageSpec>,
    /// Where the model name is set, for messages: `backend.model (or --model)`, or a stage's key.
    pub model_key: String,
}

impl Config {
    pub fn name(&self) -> &str {
        &self.raw.name
    }
    pub fn backend(&self) -> &BackendConfig {
        &self.raw.backend
    }
    pub fn run(&self) -> &RunSettings {
        &self.raw.run
    }
    pub fn options(&self) -> &Map<String, Value> {
        &self.raw.options
    }
    /// The servers' URLs, comma-separated, for messages.
    pub fn urls(&self) -> String {
        self.endpoints.iter().map(|e| e.url.as_str()).collect::<Vec<_>>().join(", ")
    }
    /// Requests in flight over all servers.
    pub fn total_concurrency(&self) -> usize {
        self.endpoints.iter().map(|e| e.concurrency).sum()
    }
}

/// Reads, parses, overrides, validates and resolves a config file.
/// `env_host` is the value of `OLLAMA_HOST` (passed in so that tests need not touch the environment).
pub fn load(path: &Path, overrides: &Overrides, env_host: Option<&str>) -> Result<Config, ConfigError> {
    load_with_env(path, overrides, &|name| match name {
        "OLLAMA_HOST" => env_host.map(str::to_owned),
        other => std::env::var(other).ok(),
    })
}

/// [`load`] with the environment given as a function (for tests).
pub fn load_with_env(path: &Path, overrides: &Overrides, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    let mut raw: RunConfig = toml::from_str(&text)
        .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string().trim_end().to_owned() })?;
    apply_overrides(&mut raw, overrides);
    let mut cfg = resolve(path, raw, env, overrides.url.as_deref())?;
    if let Some(dir) = &overrides.output {
        // As the user typed it: relative to the working directory.
        cfg.output_dir = dir.clone();
        cfg.raw.output.dir = Some(dir.clone());
    }
    if let Some(shard) = overrides.shard {
        cfg.output_dir = cfg.output_dir.join(shard.folder());
        cfg.shard = Some(shard);
    }
    Ok(cfg)
}

fn apply_overrides(raw: &mut RunConfig, o: &Overrides) {
    if let Some(limit) = o.limit {
        raw.run.limit = Some(limit);
    }
    if let Some(c) = o.concurrency {
        raw.run.concurrency = c;
    }
    if let Some(m) = &o.model {
        raw.backend.model = m.clone();
    }
    if let Some(u) = &o.url {
        raw.backend.url = Some(u.clone());
        raw.backend.urls = None;
        raw.backend.endpoints = None;
    }
}

fn resolve(path: &Path, raw: RunConfig, env: &dyn Fn(&str) -> Option<String>, url_flag: Option<&str>) -> Result<Config, ConfigError> {
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        path: path.to_owned(),
        key: key.to_owned(),
        message,
    };
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let rel = |p: &Path| if p.is_absolute() { p.to_owned() } else { base.join(p) };

    if raw.name.trim().is_empty() {
        return Err(invalid("name", "must not be empty".into()));
    }
    if raw.name.contains(['/', '\\']) || raw.name == "." || raw.name == ".." {
        return Err(invalid("name", format!("{:?} is used as a folder name: no slashes", raw.name)));
    }
    let b = &raw.backend;
    if b.model.trim().is_empty() {
        return Err(invalid("backend.model", "must not be empty".into()));
    }
    let given = [b.url.is_some(), b.urls.is_some(), b.endpoints.is_some()].iter().filter(|x| **x).count();
    if given > 1 {
        return Err(invalid("backend.url", "give one of `url`, `urls` or `[[backend.endpoints]]`, not several".into()));
    }
    let per = raw.run.concurrency;
    let mut endpoints = Vec::new();
    if let Some(u) = &b.url {
        let (url, credentials) = split_url(u).map_err(|m| match url_flag {
            Some(_) => ConfigError::Flag { flag: "--url".into(), message: m },
            None => invalid("backend.url", m),
        })?;
        let source = if url_flag.is_some() { "--url" } else { "backend.url" }.to_owned();
        endpoints.push(Endpoint { url, credentials, concurrency: per, source });
    }
    for (i, u) in b.urls.iter().flatten().enumerate() {
        let source = format!("backend.urls[{i}]");
        let (url, credentials) = split_url(u).map_err(|m| invalid(&source, m))?;
        endpoints.push(Endpoint { url, credentials, concurrency: per, source });
    }
    for (i, e) in b.endpoints.iter().flatten().enumerate() {
        let (url, credentials) = split_url(&e.url).map_err(|m| invalid(&format!("backend.endpoints[{i}].url"), m))?;
        let concurrency = e.concurrency.unwrap_or(per);
        if concurrency == 0 || concurrency > 1024 {
            return Err(invalid(&format!("backend.endpoints[{i}].concurrency"), format!("{concurrency} must be from 1 to 1024")));
        }
        endpoints.push(Endpoint { url, credentials, concurrency, source: format!("backend.endpoints[{i}].url") });
    }
    if b.urls.as_ref().is_some_and(Vec::is_empty) || b.endpoints.as_ref().is_some_and(Vec::is_empty) {
        return Err(invalid("backend.urls", "the list of servers is empty".into()));
    }
    let mut seen_urls = std::collections::HashSet::new();
    for e in &endpoints {
        if !seen_urls.insert(e.url.clone()) {
            return Err(invalid("backend.urls", format!("{} is listed twice", e.url)));
        }
    }
    if endpoints.is_empty() {
        match b.kind {
            BackendKind::Ollama => {
                let host = env("OLLAMA_HOST").unwrap_or_default();
                let url = ollama_host_url(&host).map_err(|m| invalid("backend.url", format!("from OLLAMA_HOST: {m}")))?;
                let (url, credentials) = split_url(&url).map_err(|m| invalid("backend.url", format!("from OLLAMA_HOST: {m}")))?;
                let source = if host.trim().is_empty() { "backend.url or OLLAMA_HOST" } else { "OLLAMA_HOST" }.to_owned();
                endpoints.push(Endpoint { url, credentials, concurrency: per, source });
            }
            BackendKind::Openai => {
                return Err(invalid("backend.url", "missing: the API base, e.g. \"http://127.0.0.1:8000/v1\"".into()))
            }
        }
    }
    if b.kind == BackendKind::Openai {
        for (key, set) in [("backend.keep_alive", b.keep_alive.is_some()), ("backend.think", b.think.is_some())] {
            if set {
                return Err(invalid(key, "is for kind = \"ollama\" only".into()));
            }
        }
    }
    if let Some(name) = &b.api_key_env {
        // Checked before the variable is looked up, and the value is never echoed: a pasted key
        // must not end up in a terminal, a log or a bug report.
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) || name.chars().any(|c| !(c.is_ascii_alphanumeric() || c == '_')) {
            return Err(invalid(
                "backend.api_key_env",
                "the value is not a valid environment variable name (letters, digits and _). It must be the NAME of \
                 the variable that holds the key, e.g. \"OPENAI_API_KEY\"; the key itself must not be in the config \
                 (if you pasted it here, remove it and consider it exposed)"
                    .into(),
            ));
        }
    }
    if b.kind == BackendKind::Ollama && b.api_key_env.is_some() {
        return Err(invalid(
            "backend.api_key_env",
            "is for kind = \"openai\" only (Ollama takes no key; for a proxy in front of it, put user:password in the URL)".into(),
        ));
    }
    let api_key = match &b.api_key_env {
        None => None,
        Some(name) => match env(name) {
            Some(k) if !k.trim().is_empty() => Some(k.trim().to_owned()),
            _ => {
                return Err(invalid(
                    "backend.api_key_env",
                    format!("names the environment variable {name}, which is not set (set it to the API key)"),
                ))
            }
        },
    };
    if let Some(k) = &b.keep_alive {
        let ok = match k {
            Value::String(s) => valid_go_duration(s),
            Value::Number(_) => true,
            _ => false,
        };
        if !ok {
            return Err(invalid(
                "backend.keep_alive",
                format!("{k} is not a duration: write \"30m\", \"1h\", \"-1\" (forever) or a number of seconds"),
            ));
        }
    }
    if let Some(t) = &b.think {
        let ok = matches!(t, Value::Bool(_))
            || matches!(t, Value::String(s) if ["low", "medium", "high"].contains(&s.as_str()));
        if !ok {
            return Err(invalid("backend.think", format!("{t} must be true, false, \"low\", \"medium\" or \"high\"")));
        }
    }
    validate_options(&raw.options).map_err(|(k, m)| invalid(&format!("options.{k}"), m))?;

    let r = &raw.run;
    if r.concurrency == 0 {
        return Err(invalid("run.concurrency", "must be at least 1".into()));
    }
    if r.concurrency > 1024 {
        return Err(invalid("run.concurrency", format!("{} is more than 1024", r.concurrency)));
    }
    if r.samples_per_prompt == 0 {
        return Err(invalid("run.samples_per_prompt", "must be at least 1".into()));
    }
    for (key, v) in [("run.connect_timeout_secs", r.connect_timeout_secs), ("run.idle_timeout_secs", r.idle_timeout_secs)] {
        if !(v.is_finite() && v > 0.0) {
            return Err(invalid(key, format!("{v} must be a positive number of seconds")));
        }
    }
    for (key, v) in [
        ("run.stop_grace_secs", r.stop_grace_secs),
        ("run.outage_wait_secs", r.outage_wait_secs),
        ("run.max_retry_after_secs", r.max_retry_after_secs),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(invalid(key, format!("{v} must be zero or a positive number of seconds")));
        }
    }
    if r.limit == Some(0) {
        return Err(invalid("run.limit", "must be at least 1 (leave it out for all rows)".into()));
    }

    if raw.prompts.is_some() && raw.stages.is_some() {
        return Err(invalid("stages", "give `[prompts]` (one stage) or `[[stages]]`, not both".into()));
    }
    if let Some(list) = &raw.stages {
        return resolve_stages(path, &raw, list, env, url_flag);
    }
    let no_prompts = PromptsConfig::default();
    let p = raw.prompts.as_ref().unwrap_or(&no_prompts);
    let system = match (&p.system, &p.system_text) {
        (Some(_), Some(_)) => return Err(invalid("prompts.system", "give `system` (a file) or `system_text`, not both".into())),
        (Some(f), None) => Some(read_prompt_file(path, "prompts.system", &rel(f))?),
        (None, Some(t)) => Some(t.clone()),
        (None, None) => None,
    };
    let (template, template_origin) = match (&p.template, &p.template_text) {
        (Some(_), Some(_)) => {
            return Err(invalid("prompts.template", "give `template` (a file) or `template_text`, not both".into()))
        }
        (Some(f), None) => {
            let file = rel(f);
            (read_prompt_file(path, "prompts.template", &file)?, file.display().to_string())
        }
        (None, Some(t)) => (t.clone(), format!("{}: prompts.template_text", path.display())),
        (None, None) => {
            return Err(invalid("prompts.template", "missing: give `template` (a file) or `template_text`".into()))
        }
    };

    let schema = match (&p.schema, &p.schema_text) {
        (Some(_), Some(_)) => return Err(invalid("prompts.schema", "give `schema` (a file) or `schema_text`, not both".into())),
        (Some(f), None) => Some(crate::schema::OutputSchema::load(&rel(f)).map_err(|m| invalid("prompts.schema", m))?),
        (None, Some(t)) => Some(crate::schema::OutputSchema::parse(t, "prompts.schema_text").map_err(|m| invalid("prompts.schema_text", m))?),
        (None, None) => None,
    };
    if b.response_format.is_some() && b.kind != BackendKind::Openai {
        return Err(invalid("backend.response_format", "is for kind = \"openai\" only (Ollama takes the schema as `format`)".into()));
    }

    let input_path = rel(&raw.input.path);
    let input_format = match raw.input.format {
        Some(f) => f,
        None => InputFormat::from_path(&input_path).ok_or_else(|| {
            invalid(
                "input.path",
                format!("cannot tell the format of {} from its extension: use .jsonl, .csv or .txt, or set input.format", input_path.display()),
            )
        })?,
    };
    if !input_path.is_file() {
        return Err(invalid("input.path", format!("no such file: {}", input_path.display())));
    }
    if let Some(f) = &raw.input.id_field {
        if f.is_empty() {
            return Err(invalid("input.id_field", "must not be empty".into()));
        }
        if input_format == InputFormat::Txt && f != "prompt" {
            return Err(invalid("input.id_field", "a .txt input has one field, `prompt`: leave id_field out".into()));
        }
    }

    if raw.output.formats.is_empty() {
        return Err(invalid("output.formats", "must name at least one of \"jsonl\", \"csv\"".into()));
    }
    let mut seen = std::collections::HashSet::new();
    for f in &raw.output.formats {
        if !seen.insert(f) {
            return Err(invalid("output.formats", format!("{f:?} is listed twice")));
        }
    }
    // A folder written in the file is relative to the file; the default is relative to the cwd.
    let output_dir = match &raw.output.dir {
        Some(d) => rel(d),
        None => PathBuf::from("output").join(&raw.name),
    };

    Ok(Config {
        path: path.to_owned(),
        endpoints,
        api_key,
        shard: None,
        system,
        schema: schema.map(std::sync::Arc::new),
        template,
        template_origin,
        input_path,
        input_format,
        output_dir,
        raw,
        stages: Vec::new(),
        model_key: "backend.model (or --model)".into(),
    })
}

/// Stage names: template variables and file names.
fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Names a stage may not take: the dataset record's own fields, and words minijinja reads as
/// something else than a variable.
const RESERVED_STAGE_NAMES: &[&str] = &[
    "id", "input", "loop", "true", "false", "none", "and", "or", "not", "in", "is", "if", "else", "self", "super", "caller", "varargs", "kwargs",
];

/// A `[[stages]]` config: each stage resolved as a one-stage config of its own (the run's
/// `[backend]`, `[options]` and `[run]` with the stage's keys merged over them), errors renamed to
/// the stage's keys; the run's own config is the first stage's, with every stage beside it.
fn resolve_stages(path: &Path, raw: &RunConfig, list: &[StageConfig], env: &dyn Fn(&str) -> Option<String>, url_flag: Option<&str>) -> Result<Config, ConfigError> {
    let invalid = |key: String, message: String| ConfigError::Invalid { path: path.to_owned(), key, message };
    if list.is_empty() {
        return Err(invalid("stages".into(), "the list of stages is empty".into()));
    }
    let names: Vec<&str> = list.iter().map(|s| s.name.as_str()).collect();
    let mut specs: Vec<StageSpec> = Vec::new();
    for (i, st) in list.iter().enumerate() {
        let at = |k: &str| format!("stages[{i}].{k}");
        if !valid_stage_name(&st.name) {
            return Err(invalid(at("name"), format!("{:?}: a stage name is lower-case letters, digits and _, not starting with a digit (it is a template variable and a file name)", st.name)));
        }
        if RESERVED_STAGE_NAMES.contains(&st.name.as_str()) {
            return Err(invalid(at("name"), format!("{:?} is reserved (a field of every dataset record, or a word of the template language): pick another name", st.name)));
        }
        if names[..i].contains(&st.name.as_str()) {
            return Err(invalid(at("name"), format!("{:?} is the name of an earlier stage too", st.name)));
        }
        let mut sr = raw.clone();
        sr.stages = None;
        sr.prompts = Some(PromptsConfig {
            system: st.system.clone(),
            system_text: st.system_text.clone(),
            template: st.template.clone(),
            template_text: st.template_text.clone(),
            schema: st.schema.clone(),
            schema_text: st.schema_text.clone(),
        });
        if let Some(table) = &st.backend {
            let mut merged = serde_json::to_value(&raw.backend).unwrap_or_default();
            // `--url` is every stage's server: a stage's own servers give way to it.
            let servers = ["url", "urls", "endpoints"];
            let table: Map<String, Value> = table.iter().filter(|(k, _)| url_flag.is_none() || !servers.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
            if let Some(m) = merged.as_object_mut() {
                if servers.iter().any(|k| table.contains_key(*k)) {
                    for k in ["url", "urls", "endpoints"] {
                        m.remove(k);
                    }
                }
                for (k, v) in table {
                    m.insert(k, v);
                }
            }
            sr.backend = serde_json::from_value(merged).map_err(|e| invalid(at("backend"), e.to_string()))?;
        }
        if let Some(m) = &st.model {
            sr.backend.model = m.clone();
        }
        if let Some(o) = &st.options {
            for (k, v) in o {
                sr.options.insert(k.clone(), v.clone());
            }
        }
        if let Some(n) = st.samples_per_prompt {
            sr.run.samples_per_prompt = n;
        }
        if let Some(n) = st.max_invalid {
            sr.run.max_invalid = n;
        }
        if let Some(c) = st.concurrency {
            if c == 0 || c > raw.run.concurrency {
                return Err(invalid(at("concurrency"), format!("{c} must be from 1 to run.concurrency ({})", raw.run.concurrency)));
            }
            sr.run.concurrency = c;
        }
        let mut cfg = resolve(path, sr, env, url_flag).map_err(|e| rename_stage_keys(e, i, st))?;
        // Messages name the stage's own keys.
        if st.model.is_some() {
            cfg.model_key = at("model");
        } else if st.backend.as_ref().is_some_and(|b| b.contains_key("model")) {
            cfg.model_key = at("backend.model");
        }
        if url_flag.is_none() && st.backend.as_ref().is_some_and(|b| ["url", "urls", "endpoints"].iter().any(|k| b.contains_key(*k))) {
            for e in &mut cfg.endpoints {
                e.source = at(&e.source);
            }
        }
        cfg.template_origin = cfg.template_origin.replace("prompts.", &at(""));
        if let Some(f) = &st.explode {
            let Some(schema) = &cfg.schema else {
                return Err(invalid(at("explode"), format!("{f:?} names a field of `parsed`: the stage needs a `schema` (an object with the array `{f}`)")));
            };
            let declared = schema.value.pointer("/properties").and_then(Value::as_object);
            if let Some(props) = declared {
                match props.get(f) {
                    None => return Err(invalid(at("explode"), format!("the stage's schema has no property {f:?} (it has: {})", props.keys().cloned().collect::<Vec<_>>().join(", ")))),
                    Some(p) if p.get("type").is_some_and(|t| t != "array") => {
                        return Err(invalid(at("explode"), format!("the schema's property {f:?} is not an array")))
                    }
                    Some(_) => {}
                }
            }
        }
        // Templates and `keep` read earlier stages only.
        let template = crate::template::PromptTemplate::new(cfg.template.clone(), &cfg.template_origin).map_err(|e| invalid(at("template"), e.to_string()))?;
        check_stage_refs(template.variables(), &names, i, false).map_err(|m| invalid(at("template"), m))?;
        if let Some(k) = &st.keep {
            let vars = crate::template::expression_variables(k).map_err(|m| invalid(at("keep"), m))?;
            check_stage_refs(&vars, &names, i, true).map_err(|m| invalid(at("keep"), m))?;
        }
        specs.push(StageSpec { name: st.name.clone(), cfg: Box::new(cfg), explode: st.explode.clone(), keep: st.keep.clone(), concurrency: st.concurrency });
    }
    // The run's own config: input, output, endpoints and settings as written at the top.
    let mut r = raw.clone();
    r.stages = None;
    r.prompts = Some(PromptsConfig { template_text: Some(String::new()), ..Default::default() });
    let mut cfg = resolve(path, r, env, url_flag)?;
    cfg.raw = raw.clone();
    cfg.stages = specs;
    Ok(cfg)
}

/// A template's (or `keep`'s) variables against the stages: naming a later stage (or, for a
/// template, its own) is an error.
fn check_stage_refs(vars: &[String], names: &[&str], i: usize, own_ok: bool) -> Result<(), String> {
    for v in vars {
        if let Some(j) = names.iter().position(|n| n == v) {
            if j > i || (j == i && !own_ok) {
                let when = if j == i {
                    "the stage's own name (if it is a field of the input, rename the stage)".to_owned()
                } else {
                    format!("stage {v:?} (stages[{j}]), which comes later (if `{v}` is a field of the input, rename stages[{j}])")
                };
                return Err(format!("uses `{v}`: {when}; a stage reads the input row and the stages before it"));
            }
        }
    }
    Ok(())
}

/// An error of a stage's own config, with the key it names moved under `stages[i]`.
fn rename_stage_keys(e: ConfigError, i: usize, st: &StageConfig) -> ConfigError {
    let rekey = |key: String| -> String {
        let sub = |k: &str| format!("stages[{i}].{k}");
        if let Some(rest) = key.strip_prefix("prompts.") {
            sub(rest)
        } else if let Some(rest) = key.strip_prefix("options.") {
            if st.options.as_ref().is_some_and(|o| o.contains_key(rest)) { sub(&key) } else { key }
        } else if key == "backend.model" && st.model.is_some() {
            sub("model")
        } else if let Some(rest) = key.strip_prefix("backend.") {
            let own = st.backend.as_ref().is_some_and(|b| b.contains_key(rest.split(['.', '[']).next().unwrap_or(rest)));
            if own { sub(&key) } else { key }
        } else if let Some(rest) = key.strip_prefix("run.") {
            let own = match rest {
                "samples_per_prompt" => st.samples_per_prompt.is_some(),
                "max_invalid" => st.max_invalid.is_some(),
                "concurrency" => st.concurrency.is_some(),
                _ => false,
            };
            if own { sub(rest) } else { key }
        } else {
            key
        }
    };
    let named = |m: String| format!("stage {:?}: {m}", st.name);
    match e {
        ConfigError::Invalid { path, key, message } => ConfigError::Invalid { path, key: rekey(key), message: named(message) },
        ConfigError::File { path, key, file, source } => ConfigError::File { path, key: rekey(key), file, source },
        other => other,
    }
}

fn read_prompt_file(cfg: &Path, key: &str, file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|source| ConfigError::File {
        path: cfg.to_owned(),
        key: key.to_owned(),
        file: file.to_owned(),
        source,
    })
}

/// Sampling and load options Ollama knows (api/types.go). Others pass through, but one that is
/// a near miss of a known name is a typo and an error.
const KNOWN_OPTIONS: &[&str] = &[
    "num_keep", "seed", "num_predict", "top_k", "top_p", "min_p", "typical_p", "repeat_last_n",
    "temperature", "repeat_penalty", "presence_penalty", "frequency_penalty", "penalize_newline",
    "stop", "tfs_z", "mirostat", "mirostat_tau", "mirostat_eta", "numa", "num_ctx", "num_batch",
    "num_gpu", "main_gpu", "low_vram", "vocab_only", "use_mmap", "use_mlock", "num_thread",
];

fn validate_options(opts: &Map<String, Value>) -> Result<(), (String, String)> {
    for (k, v) in opts {
        let err = |m: &str| Err((k.clone(), m.to_owned()));
        match k.as_str() {
            "temperature" | "top_p" | "min_p" | "typical_p" | "repeat_penalty" | "presence_penalty"
            | "frequency_penalty" | "tfs_z" | "mirostat_tau" | "mirostat_eta" => {
                if !v.is_number() {
                    return err("must be a number");
                }
            }
            "seed" | "num_predict" | "top_k" | "num_ctx" | "num_keep" | "repeat_last_n" | "num_batch"
            | "num_gpu" | "main_gpu" | "num_thread" | "mirostat" => {
                if !(v.is_i64() || v.is_u64()) {
                    return err("must be a whole number");
                }
            }
            "stop" => {
                let ok = match v {
                    Value::String(_) => true,
                    Value::Array(a) => a.iter().all(Value::is_string),
                    _ => false,
                };
                if !ok {
                    return err("must be a string or a list of strings");
                }
            }
            _ if KNOWN_OPTIONS.contains(&k.as_str()) => {}
            _ => {
                if let Some(near) = KNOWN_OPTIONS.iter().find(|known| edit_distance(k, known) <= 2) {
                    return Err((k.clone(), format!("unknown option; did you mean `{near}`?")));
                }
            }
        }
    }
    Ok(())
}

/// Options that are not in Ollama's list: passed through, but worth a line in the log.
pub fn unknown_options(opts: &Map<String, Value>) -> Vec<String> {
    opts.keys().filter(|k| !KNOWN_OPTIONS.contains(&k.as_str())).cloned().collect()
}

/// `names` sorted by closeness to `name` (edit distance, `:latest` ignored), nearest first.
pub fn nearest_first(name: &str, mut names: Vec<String>) -> Vec<String> {
    let want = strip_latest(name);
    names.sort_by_cached_key(|n| (edit_distance(&strip_latest(n), &want), n.clone()));
    names
}

/// A model name without Ollama's default `:latest` tag.
pub fn strip_latest(name: &str) -> String {
    name.strip_suffix(":latest").unwrap_or(name).to_lowercase()
}

pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A Go duration ("30m", "1h30m", "-1", "10s", "500ms") or a plain number of seconds.
fn valid_go_duration(s: &str) -> bool {
    let s = s.trim();
    let s = s.strip_prefix('-').unwrap_or(s);
    if s.is_empty() {
        return false;
    }
    if s.parse::<f64>().is_ok() {
        return true;
    }
    let mut rest = s;
    while !rest.is_empty() {
        let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if n == 0 {
            return false;
        }
        rest = &rest[n..];
        let unit = ["ns", "us", "µs", "ms", "s", "m", "h"].iter().find(|u| rest.starts_with(**u));
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}

/// A URL from the config or the command line: must be http(s) with a host and, when a port is
/// written, a port; a trailing slash is dropped. `user:password@` is taken out of the URL and
/// returned apart.
pub fn split_url(u: &str) -> Result<(String, Option<Credentials>), String> {
    let u = u.trim();
    let shown = scrub_credentials(u);
    let parsed = reqwest::Url::parse(u).map_err(|e| format!("{shown:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{shown:?}: only http:// and https:// are supported"));
    }
    // `http://host:` parses as the default port; a port left empty is a slip, not port 80.
    let authority = u.split_once("://").map(|(_, rest)| rest).unwrap_or(u);
    let authority = authority.split(['/', '?', '#']).next().unwrap_or("");
    if authority.ends_with(':') {
        return Err(format!("{shown:?}: the port after ':' is empty; write the port (e.g. :11434) or leave the ':' out"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{shown:?}: no host"));
    }
    let credentials = (!parsed.username().is_empty() || parsed.password().is_some())
        .then(|| (percent_decode(parsed.username()), parsed.password().map(percent_decode)));
    // The text as written (no normalizing), less the credentials.
    Ok((shown.trim_end_matches('/').to_owned(), credentials))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes `user:password@` from every URL in a text (messages, logs), keeping scheme, host,
/// port and path.
pub fn scrub_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail.find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"' || c == ')').unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => rest = &tail[at + 1..],
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// `OLLAMA_HOST` by Ollama's own rules: empty means localhost:11434; a bare host gets port 11434;
/// a scheme without a port means 80/443; a path is kept; bind addresses map to loopback.
pub fn ollama_host_url(raw: &str) -> Result<String, String> {
    let s = raw.trim().trim_matches(|c| c == '"' || c == '\'').trim();
    // Messages show the value without any `user:password@`.
    let shown = scrub_credentials(s);
    if s.is_empty() {
        return Ok(DEFAULT_OLLAMA_URL.to_owned());
    }
    let (scheme, rest, default_port) = match s.split_once("://") {
        Some((scheme, rest)) => {
            let scheme = scheme.to_ascii_lowercase();
            let port = match scheme.as_str() {
                "http" => "80",
                "https" => "443",
                _ => return Err(format!("{shown:?}: only http:// and https:// are supported")),
            };
            (scheme, rest, port)
        }
        None => ("http".to_owned(), s, "11434"),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    // Credentials are kept in the URL (the caller takes them out for basic auth).
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    let (host, port) = split_host_port(hostport).unwrap_or((hostport, default_port));
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = match host {
        "" | "0.0.0.0" => "127.0.0.1".to_owned(),
        "::" => "[::1]".to_owned(),
        h if h.contains(':') => format!("[{h}]"),
        h => h.to_owned(),
    };
    if port.parse::<u16>().is_err() {
        return Err(format!("{shown:?}: {port:?} is not a port"));
    }
    let url = format!("{scheme}://{userinfo}{host}:{port}{path}");
    split_url(&url).map(|_| url.clone()).map_err(|_| format!("{shown:?} does not make a URL ({})", scrub_credentials(&url)))
}

/// `host:port` or `[v6]:port`; None when there is no port.
fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        let port = rest[end + 1..].strip_prefix(':')?;
        return Some((&s[..end + 2], port));
    }
    let (h, p) = s.rsplit_once(':')?;
    if h.contains(':') {
        return None; // a bare IPv6 address
    }
    Some((h, p))
}

/// The config as written plus overrides, with nothing secret in it, for the manifest.
pub fn snapshot(cfg: &Config) -> Value {
    let mut v = serde_json::to_value(&cfg.raw).unwrap_or(Value::Null);
    if let Some(b) = v.get_mut("backend").and_then(Value::as_object_mut) {
        // URLs as written may hold `user:password@`: never in the manifest.
        let scrub = |v: &mut Value| {
            if let Value::String(s) = v {
                *s = scrub_credentials(s);
            }
        };
        if let Some(u) = b.get_mut("url") {
            scrub(u);
        }
        if let Some(Value::Array(us)) = b.get_mut("urls") {
            us.iter_mut().for_each(scrub);
        }
        if let Some(Value::Array(es)) = b.get_mut("endpoints") {
            es.iter_mut().filter_map(|e| e.get_mut("url")).for_each(scrub);
        }
        let eps: Vec<Value> =
            cfg.endpoints.iter().map(|e| serde_json::json!({"url": e.url, "concurrency": e.concurrency})).collect();
        b.insert("resolved_endpoints".into(), Value::Array(eps));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `[[stages]]` config in a temporary folder, loaded.
    fn load_stages(stages: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("in.jsonl"), "{\"id\": \"a\", \"topic\": \"t\"}\n").expect("input");
        let text = format!(
            "name = \"s\"\n[backend]\nkind = \"ollama\"\nurl = \"http://h:1\"\nmodel = \"base\"\nkeep_alive = \"5m\"\n\
             [options]\ntemperature = 0.5\nseed = 3\n[input]\npath = \"in.jsonl\"\n[run]\nconcurrency = 6\nmax_invalid = 4\n{stages}"
        );
        let path = dir.path().join("run.toml");
        std::fs::write(&path, text).expect("config");
        load_with_env(&path, &Overrides::default(), &|_| None)
    }

    #[test]
    fn stages_merge_their_keys_over_the_run_and_inherit_the_rest() {
        let cfg = load_stages(
            "[[stages]]\nname = \"q\"\nmodel = \"teacher\"\ntemplate_text = \"{{ topic }}\"\nconcurrency = 2\nsamples_per_prompt = 3\n\
             [stages.options]\ntemperature = 1.0\n[stages.backend]\nurl = \"http://other:2\"\n\
             [[stages]]\nname = \"a\"\ntemplate_text = \"{{ q.response }}\"\n",
        )
        .unwrap();
        assert_eq!(cfg.stages.len(), 2);
        let (q, a) = (&cfg.stages[0].cfg, &cfg.stages[1].cfg);
        assert_eq!((q.backend().model.as_str(), a.backend().model.as_str()), ("teacher", "base"));
        assert_eq!(q.options()["temperature"], 1.0);
        assert_eq!(q.options()["seed"], 3, "other options inherited");
        assert_eq!(a.options()["temperature"], 0.5);
        assert_eq!((q.endpoints[0].url.as_str(), a.endpoints[0].url.as_str()), ("http://other:2", "http://h:1"));
        assert_eq!((q.run().concurrency, a.run().concurrency, cfg.run().concurrency), (2, 6, 6));
        assert_eq!((q.run().samples_per_prompt, a.run().samples_per_prompt), (3, 1));
        assert_eq!(q.run().max_invalid, 4);
        assert_eq!(q.backend().keep_alive, Some(Value::from("5m")), "backend keys inherited");
    }

    #[test]
    fn stage_errors_name_the_stage_key() {
        let key = |stages: &str| match load_stages(stages) {
            Err(ConfigError::Invalid { key, .. }) | Err(ConfigError::File { key, .. }) => key,
            other => panic!("expected an error, got {other:?}"),
        };
        assert_eq!(key("[[stages]]\nname = \"q\"\n"), "stages[0].template");
        assert_eq!(key("[[stages]]\nname = \"q\"\ntemplate = \"missing.jinja\"\n"), "stages[0].template");
        assert_eq!(key("[[stages]]\nname = \"true\"\ntemplate_text = \"x\"\n"), "stages[0].name");
        assert_eq!(key("[[stages]]\nname = \"q\"\ntemplate_text = \"x\"\n[[stages]]\nname = \"q\"\ntemplate_text = \"x\"\n"), "stages[1].name");
        assert_eq!(key("[[stages]]\nname = \"q\"\ntemplate_text = \"x\"\nconcurrency = 7\n"), "stages[0].concurrency");
        assert_eq!(key("[[stages]]\nname = \"q\"\ntemplate_text = \"x\"\nsamples_per_prompt = 0\n"), "stages[0].samples_per_prompt");
        assert_eq!(key("[[stages]]\nname = \"q\"\ntemplate_text = \"x\"\n[stages.backend]\nthink = 3\n"), "stages[0].backend.think");
        assert_eq!(key("[[stages]]\nname = \"q\"\ntemplate_text = \"x\"\nkeep = \"q.parsed.x >\"\n"), "stages[0].keep");
        assert_eq!(key("[[stages]]\nname = \"q\"\ntemplate_text = \"{{ a.response }}\"\n[[stages]]\nname = \"a\"\ntemplate_text = \"x\"\n"), "stages[0].template");
        assert_eq!(key("[[stages]]\nname = \"q\"\ntemplate_text = \"x\"\nexplode = \"items\"\n"), "stages[0].explode");
    }

    #[test]
    fn ollama_host_rules() {
        let cases = [
            ("", "http://127.0.0.1:11434"),
            ("  \"\" ", "http://127.0.0.1:11434"),
            ("1.2.3.4", "http://1.2.3.4:11434"),
            ("example.com:1234", "http://example.com:1234"),
            ("http://example.com", "http://example.com:80"),
            ("https://example.com", "https://example.com:443"),
            ("https://x.com/ollama", "https://x.com:443/ollama"),
            ("[::1]", "http://[::1]:11434"),
            ("[::1]:56000", "http://[::1]:56000"),
            ("0.0.0.0", "http://127.0.0.1:11434"),
            ("0.0.0.0:9999", "http://127.0.0.1:9999"),
            ("[::]", "http://[::1]:11434"),
            (":1234", "http://127.0.0.1:1234"),
            ("'localhost:5'", "http://localhost:5"),
        ];
        for (input, want) in cases {
            assert_eq!(ollama_host_url(input).as_deref(), Ok(want), "OLLAMA_HOST={input:?}");
        }
        assert!(ollama_host_url("ftp://x").is_err());
        assert_eq!(ollama_host_url("http://u:pw@h:1").as_deref(), Ok("http://u:pw@h:1"));
        assert_eq!(ollama_host_url("u:pw@h").as_deref(), Ok("http://u:pw@h:11434"));
        assert!(!ollama_host_url("ftp://u:pw@h").unwrap_err().contains("pw"));
        assert!(ollama_host_url("host:notaport").is_err());
    }

    #[test]
    fn urls_lose_their_credentials_and_need_a_port_when_a_colon_says_so() {
        let (url, creds) = split_url("http://user:s%40cret@host:8000/v1/").unwrap();
        assert_eq!(url, "http://host:8000/v1");
        assert_eq!(creds, Some(("user".to_owned(), Some("s@cret".to_owned()))));
        assert_eq!(split_url("http://127.0.0.1:11434").unwrap(), ("http://127.0.0.1:11434".to_owned(), None));
        let err = split_url("http://127.0.0.1:").unwrap_err();
        assert!(err.contains("port"), "{err}");
        assert!(split_url("http://127.0.0.1:/v1").is_err());
        let err = split_url("ftp://u:topsecret@h").unwrap_err();
        assert!(!err.contains("topsecret"), "{err}");
        assert_eq!(
            scrub_credentials("error sending request for url (http://u:pw@h:1/v1/models): refused; see https://a@b/c"),
            "error sending request for url (http://h:1/v1/models): refused; see https://b/c"
        );
    }

    #[test]
    fn durations() {
        for ok in ["30m", "1h30m", "-1", "10s", "500ms", "0", "1.5h", "-1m"] {
            assert!(valid_go_duration(ok), "{ok}");
        }
        for bad in ["", "forever", "30 minutes", "m", "5d"] {
            assert!(!valid_go_duration(bad), "{bad}");
        }
    }

    #[test]
    fn option_typos_are_caught() {
        let mut m = Map::new();
        m.insert("temprature".into(), Value::from(0.5));
        let err = validate_options(&m).unwrap_err();
        assert!(err.1.contains("temperature"), "{err:?}");
        let mut m = Map::new();
        m.insert("my_server_extension".into(), Value::from(1));
        assert!(validate_options(&m).is_ok());
        let mut m = Map::new();
        m.insert("seed".into(), Value::from("x"));
        assert!(validate_options(&m).is_err());
    }
}
