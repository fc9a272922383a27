//! Streaming client for Ollama's native API (`/api/chat`, `/api/generate`), and the checks made
//! before a run (is the server up, is the model there).
//!
//! Reply bytes go through an idle timer (no byte for `idle_timeout_secs` is a stall; there is no
//! deadline on the whole reply), then the line framer, then JSON per complete line. Every line is
//! checked for `error`; a reply that ends without `done: true` is truncated, not a success.

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use bytes::Bytes;
use data_generator::backend::{
    self, body_bytes, error_chain, error_message, idle_chunks, Chunk, ChunkStream, ClientError, LineDecoder, ModelClient, Request,
    ServerInfo, Stats,
};
use data_generator::config::{self, Config, Endpoint, OllamaApi};
use futures::future::BoxFuture;
use futures::stream::{Stream, StreamExt};
use futures::FutureExt;
use serde::Deserialize;
use serde_json::{json, Value};

/// A `ClientError::Check` with a formatted message.
macro_rules! check_err {
    ($($t:tt)*) => { ClientError::Check(format!($($t)*)) };
}

pub struct OllamaClient {
    http: reqwest::Client,
    /// The URL without credentials (those go in `auth`).
    base: String,
    auth: Option<config::Credentials>,
    api: OllamaApi,
    model: String,
    /// Where the model is set, for messages.
    model_key: String,
    keep_alive: Option<Value>,
    think: Option<Value>,
    idle: Duration,
    /// Where the URL came from (`--url`, `backend.url`, `OLLAMA_HOST`), for messages.
    url_source: String,
}

impl OllamaClient {
    pub fn new(cfg: &Config, ep: &Endpoint) -> anyhow::Result<OllamaClient> {
        let b = cfg.backend();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs_f64(cfg.run().connect_timeout_secs))
            .pool_max_idle_per_host(ep.concurrency)
            .user_agent(concat!("data_generator/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(OllamaClient {
            http,
            base: ep.url.clone(),
            auth: ep.credentials.clone(),
            url_source: ep.source.clone(),
            api: b.api,
            model: b.model.clone(),
            model_key: cfg.model_key.clone(),
            keep_alive: b.keep_alive.clone(),
            think: b.think.clone(),
            idle: Duration::from_secs_f64(cfg.run().idle_timeout_secs),
        })
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        self.with_auth(self.http.get(url))
    }

    fn post(&self, url: &str) -> reqwest::RequestBuilder {
        self.with_auth(self.http.post(url))
    }

    fn with_auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Some((user, pass)) => req.basic_auth(user, pass.as_ref()),
            None => req,
        }
    }

    /// The models the server has, nearest to the configured name first.
    async fn models_near(&self) -> Vec<String> {
        let url = format!("{}/api/tags", self.base);
        let Ok(Ok(resp)) = tokio::time::timeout(self.idle, self.get(&url).send()).await else { return Vec::new() };
        let body = resp.bytes().await.unwrap_or_default();
        let names: Vec<String> = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("models").and_then(Value::as_array).cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|m| m.get("name").or_else(|| m.get("model")).and_then(Value::as_str).map(str::to_owned))
            .collect();
        config::nearest_first(&self.model, names)
    }

    /// Before the first row: the server answers, the model exists and can do what is asked.
    async fn check_server(&self) -> Result<ServerInfo, ClientError> {
        let url = format!("{}/api/version", self.base);
        let resp = tokio::time::timeout(self.idle, self.get(&url).send())
            .await
            .map_err(|_| check_err!("Ollama at {} did not answer within {:?}", self.base, self.idle))?
            .map_err(|e| {
                check_err!(
                    "cannot reach Ollama at {} (from {}): {}\nIs it running? Start it with `ollama serve`, or point {} at \
                     the right address.",
                    self.base,
                    self.url_source,
                    error_chain(&e),
                    self.url_source
                )
            })?;
        let fake = resp.headers().contains_key(FAKE_HEADER);
        if !resp.status().is_success() {
            return Err(check_err!("{url} answered HTTP {}: is {} an Ollama server?", resp.status(), self.base));
        }
        let version = resp.json::<Value>().await.ok().and_then(|v| v.get("version")?.as_str().map(str::to_owned));

        let show = format!("{}/api/show", self.base);
        let resp = tokio::time::timeout(self.idle, self.post(&show).json(&json!({ "model": self.model })).send())
            .await
            .map_err(|_| check_err!("{show} did not answer within {:?}", self.idle))?
            .map_err(|e| check_err!("cannot reach Ollama at {}: {}", self.base, error_chain(&e)))?;
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(ClientError::Check(missing_model_message(&self.model, &self.base, &self.models_near().await, &self.model_key)));
        }
        if !status.is_success() {
            return Err(check_err!("{show} answered HTTP {status} for model {:?}: {}", self.model, error_message(&body)));
        }
        let capabilities: Vec<String> = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("capabilities").cloned())
            .and_then(|c| serde_json::from_value(c).ok())
            .unwrap_or_default();
        if !capabilities.is_empty() {
            if !capabilities.iter().any(|c| c == "completion") {
                return Err(check_err!(
                    "model {:?} cannot generate text (its capabilities: {}): pick a chat or completion model",
                    self.model,
                    capabilities.join(", ")
                ));
            }
            let wants_thinking = matches!(&self.think, Some(Value::Bool(true)) | Some(Value::String(_)));
            if wants_thinking && !capabilities.iter().any(|c| c == "thinking") {
                return Err(check_err!("backend.think is set, but model {:?} cannot think: remove `think` or pick a reasoning model", self.model));
            }
        }
        Ok(ServerInfo { version, capabilities, fake })
    }

    fn body(&self, req: &Request<'_>) -> Value {
        let (options, schema) = (req.options, req.schema);
        let mut body = match self.api {
            OllamaApi::Chat => json!({ "model": self.model, "messages": req.messages, "stream": true }),
            // One prompt and a system field: the last user message and the system prompt.
            OllamaApi::Generate => {
                let mut b = json!({ "model": self.model, "prompt": req.prompt(), "stream": true });
                if let Some(s) = req.system() {
                    b["system"] = json!(s);
                }
                b
            }
        };
        if !options.is_empty() {
            body["options"] = Value::Object(options.clone());
        }
        if let Some(k) = &self.keep_alive {
            body["keep_alive"] = k.clone();
        }
        if let Some(t) = &self.think {
            body["think"] = t.clone();
        }
        if let Some(s) = schema {
            body["format"] = s.clone();
        }
        body
    }

    /// Sends one request; the reply comes as a stream of chunks ending in `Chunk::Done`, or an error.
    async fn send(&self, req: Request<'_>) -> Result<ChunkStream, ClientError> {
        let path = match self.api {
            OllamaApi::Chat => "/api/chat",
            OllamaApi::Generate => "/api/generate",
        };
        let url = format!("{}{}", self.base, path);
        let http = self.post(&url).json(&self.body(&req));
        let resp = match backend::open_stream(http, &url, self.idle).await {
            Err(ClientError::Status { status: 404, message, .. }) if message.contains("not found") => {
                return Err(ClientError::ModelNotFound { url: self.base.clone(), model: self.model.clone() })
            }
            r => r?,
        };
        Ok(idle_chunks(decode_reply(body_bytes(resp)).boxed(), self.idle))
    }
}

/// Answers from the test suite's fake server carry this header, so a dataset made from made-up
/// text says so in its manifest.
pub const FAKE_HEADER: &str = "x-data-generator-fake";

/// What to say when the model is not on the server: the nearest names it has, and `ollama pull`
/// only for a name that looks like a real tag rather than a slip of a model that is there.
fn missing_model_message(model: &str, base: &str, near: &[String], key: &str) -> String {
    let mut msg = format!("model {model:?} is not on the Ollama server at {base}");
    let close = near.first().filter(|n| config::edit_distance(&config::strip_latest(n), &config::strip_latest(model)) <= 3);
    if let Some(n) = close {
        msg.push_str(&format!(": did you mean {n:?}? Set {key} to it"));
    } else if looks_like_ollama_tag(model) {
        msg.push_str(&format!(": pull it with `ollama pull {model}`, or set {key} to one the server has"));
    } else {
        msg.push_str(&format!(": set {key} to one the server has"));
    }
    if near.is_empty() {
        msg.push_str(" (it has none; `ollama list` shows what is pulled)");
    } else {
        let shown: Vec<&str> = near.iter().take(8).map(String::as_str).collect();
        msg.push_str(&format!(" (it has: {}{})", shown.join(", "), if near.len() > 8 { ", ..." } else { "" }));
    }
    msg
}

/// `name`, `name:tag`, `namespace/name:tag`: lowercase letters, digits, `.`, `-`, `_`.
fn looks_like_ollama_tag(model: &str) -> bool {
    let (name, tag) = model.split_once(':').unwrap_or((model, "latest"));
    let part = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    let tag_ok = !tag.is_empty() && tag.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    let segments: Vec<&str> = name.split('/').collect();
    segments.len() <= 3 && segments.iter().all(|s| part(s)) && name.starts_with(|c: char| c.is_ascii_alphanumeric()) && tag_ok
}

/// One NDJSON line of a chat or generate reply.
#[derive(Deserialize, Default)]
struct ReplyLine {
    error: Option<Value>,
    message: Option<Message>,
    response: Option<String>,
    thinking: Option<String>,
    #[serde(default)]
    done: bool,
    done_reason: Option<String>,
    prompt_eval_count: Option<u64>,
    eval_count: Option<u64>,
    total_duration: Option<u64>,
    load_duration: Option<u64>,
    eval_duration: Option<u64>,
}

#[derive(Deserialize, Default)]
struct Message {
    content: Option<String>,
    thinking: Option<String>,
}

/// Frames reply bytes into lines and lines into chunks. Ends after `Done`, after the first error,
/// or with `Truncated` when the bytes run out before a `done: true` line.
pub fn decode_reply<S>(bytes: S) -> impl Stream<Item = Result<Chunk, ClientError>> + Send
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    backend::decode_lines(bytes, Ndjson)
}

/// Ollama's NDJSON: one JSON object a line, the last with `done: true`.
struct Ndjson;

impl LineDecoder for Ndjson {
    fn line(&mut self, line: &[u8], out: &mut VecDeque<Chunk>) -> Result<bool, ClientError> {
        let chunks = decode_line(line)?;
        let done = matches!(chunks.last(), Some(Chunk::Done(_)));
        out.extend(chunks);
        Ok(done)
    }

    fn end(&mut self, _out: &mut VecDeque<Chunk>) -> Result<(), ClientError> {
        Err(ClientError::Truncated)
    }
}

fn decode_line(line: &[u8]) -> Result<Vec<Chunk>, ClientError> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let l: ReplyLine = serde_json::from_slice(line).map_err(|e| ClientError::Decode {
        message: e.to_string(),
        start: String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned(),
    })?;
    if let Some(err) = l.error {
        let msg = match err {
            Value::String(s) => s,
            other => other.to_string(),
        };
        return Err(ClientError::StreamError(msg));
    }
    let (content, thinking) = match l.message {
        Some(m) => (m.content, m.thinking.or(l.thinking)),
        None => (l.response, l.thinking),
    };
    let mut out = Vec::with_capacity(1);
    if let Some(t) = thinking.filter(|t| !t.is_empty()) {
        out.push(Chunk::Thinking(t));
    }
    if let Some(c) = content.filter(|c| !c.is_empty()) {
        out.push(Chunk::Content(c));
    }
    if l.done {
        out.push(Chunk::Done(Stats {
            done_reason: l.done_reason,
            prompt_tokens: l.prompt_eval_count,
            completion_tokens: l.eval_count,
            total_duration_ns: l.total_duration,
            load_duration_ns: l.load_duration,
            eval_duration_ns: l.eval_duration,
            completion_tokens_estimated: false,
        }));
    }
    Ok(out)
}

impl ModelClient for OllamaClient {
    fn url(&self) -> &str {
        &self.base
    }
    fn kind(&self) -> &'static str {
        "ollama"
    }
    fn check(&self) -> BoxFuture<'_, Result<ServerInfo, ClientError>> {
        self.check_server().boxed()
    }
    fn stream<'a>(&'a self, req: Request<'a>) -> BoxFuture<'a, Result<ChunkStream, ClientError>> {
        self.send(req).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPLY: &str = concat!(
        r#"{"model":"m","message":{"role":"assistant","content":"","thinking":"Hmm, "},"done":false}"#, "\n",
        r#"{"model":"m","message":{"role":"assistant","content":"","thinking":"ça"},"done":false}"#, "\n",
        r#"{"model":"m","message":{"role":"assistant","content":"Héllo, "},"done":false}"#, "\n",
        r#"{"model":"m","message":{"role":"assistant","content":"日本 🎉\n\"q\""},"done":false}"#, "\n",
        r#"{"model":"m","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","prompt_eval_count":26,"eval_count":3,"eval_duration":1500000}"#, "\n",
    );

    async fn collect(pieces: Vec<Vec<u8>>) -> Vec<Result<Chunk, String>> {
        let s = futures::stream::iter(pieces.into_iter().map(|p| Ok(Bytes::from(p))));
        decode_reply(s).map(|r| r.map_err(|e| e.to_string())).collect().await
    }

    #[tokio::test]
    async fn one_byte_at_a_time_equals_one_read() {
        let whole = collect(vec![REPLY.as_bytes().to_vec()]).await;
        let bytewise = collect(REPLY.as_bytes().iter().map(|b| vec![*b]).collect()).await;
        assert_eq!(whole, bytewise);
        let text: String = whole
            .iter()
            .filter_map(|c| match c {
                Ok(Chunk::Content(t)) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(text, "Héllo, 日本 🎉\n\"q\"");
        assert!(whole.contains(&Ok(Chunk::Thinking("ça".into()))));
        match whole.last() {
            Some(Ok(Chunk::Done(s))) => {
                assert_eq!(s.done_reason.as_deref(), Some("stop"));
                assert_eq!((s.prompt_tokens, s.completion_tokens, s.eval_duration_ns), (Some(26), Some(3), Some(1_500_000)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn final_line_without_newline_is_parsed() {
        let r = collect(vec![REPLY.trim_end().as_bytes().to_vec()]).await;
        assert!(matches!(r.last(), Some(Ok(Chunk::Done(_)))));
    }

    #[tokio::test]
    async fn missing_done_is_truncated() {
        let cut: String = REPLY.lines().take(3).map(|l| format!("{l}\n")).collect();
        let r = collect(vec![cut.into_bytes()]).await;
        assert_eq!(r.last(), Some(&Err(ClientError::Truncated.to_string())));
    }

    #[tokio::test]
    async fn error_line_mid_stream_is_an_error() {
        let body = format!("{}{}\n", REPLY.lines().next().unwrap_or_default(), "\n{\"error\":\"runner crashed\"}");
        let r = collect(vec![body.into_bytes()]).await;
        assert!(matches!(r.last(), Some(Err(e)) if e.contains("runner crashed")), "{r:?}");
    }

    #[test]
    fn missing_models_name_the_nearest_and_pull_only_real_tags() {
        let near = vec!["llama3.2:3b".to_owned(), "qwen3:8b".to_owned()];
        let m = missing_model_message("llama3.2:3", "http://h", &near, "backend.model (or --model)");
        assert!(m.contains("did you mean \"llama3.2:3b\"") && !m.contains("ollama pull"), "{m}");
        let m = missing_model_message("mistral:7b", "http://h", &near, "backend.model (or --model)");
        assert!(m.contains("ollama pull mistral:7b") && m.contains("it has: llama3.2:3b, qwen3:8b"), "{m}");
        let m = missing_model_message("My Model!", "http://h", &[], "backend.model (or --model)");
        assert!(!m.contains("ollama pull") && m.contains("it has none"), "{m}");
    }

    #[tokio::test]
    async fn generate_replies_use_response() {
        let body = "{\"response\":\"a\",\"done\":false}\n{\"response\":\"b\",\"done\":true,\"context\":[1,2,3]}\n";
        let r = collect(vec![body.as_bytes().to_vec()]).await;
        assert_eq!(r[0], Ok(Chunk::Content("a".into())));
        assert_eq!(r[1], Ok(Chunk::Content("b".into())));
        assert!(matches!(r[2], Ok(Chunk::Done(_))));
        assert_eq!(r.len(), 3);
    }

}
