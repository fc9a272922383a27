//! Streaming client for OpenAI-compatible servers (vLLM, SGLang, llama.cpp's `llama-server`,
//! llama-cpp-python, LM Studio, Ollama's `/v1`): `POST {url}/chat/completions` with
//! `stream: true`, answered in Server-Sent Events.
//!
//! Bytes go through the same idle timer and line framer as Ollama's replies, then the SSE parser.
//! A `data: {"error":...}` event fails the attempt even when `[DONE]` follows; a stream that ends
//! without `[DONE]` or a `finish_reason` is truncated. When the server sends no usage, the content
//! pieces are counted instead and the count is marked estimated.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::time::Duration;

use data_generator::backend::{
    self, body_bytes, error_chain, error_message, idle_chunks, Chunk, ChunkStream, ClientError, LineDecoder, ModelClient, Request,
    ServerInfo, Stats,
};
use data_generator::config::{self, Config, Endpoint, ResponseFormat};
use data_generator::sse::{SseEvent, SseParser};
use futures::future::BoxFuture;
use futures::stream::{Stream, StreamExt};
use futures::FutureExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};

pub struct OpenAiClient {
    http: reqwest::Client,
    /// The URL without credentials (those go in `basic`).
    base: String,
    basic: Option<config::Credentials>,
    model: String,
    /// Where the model is set, for messages.
    model_key: String,
    api_key: Option<String>,
    idle: Duration,
    /// Where the URL came from (`--url`, `backend.url`, ...), for messages.
    url_source: String,
    response_format: ResponseFormat,
    /// The `json_schema.name` servers want: the run's name, in the characters they accept.
    schema_name: String,
    /// The run's schema: the startup check tries the dialect once with it.
    schema: Option<Value>,
}

impl OpenAiClient {
    pub fn new(cfg: &Config, ep: &Endpoint) -> anyhow::Result<OpenAiClient> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs_f64(cfg.run().connect_timeout_secs))
            .pool_max_idle_per_host(ep.concurrency)
            .user_agent(concat!("data_generator/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(OpenAiClient {
            http,
            base: ep.url.clone(),
            basic: ep.credentials.clone(),
            model: cfg.backend().model.clone(),
            model_key: cfg.model_key.clone(),
            api_key: cfg.api_key.clone(),
            idle: Duration::from_secs_f64(cfg.run().idle_timeout_secs),
            url_source: ep.source.clone(),
            response_format: cfg.backend().response_format.unwrap_or_default(),
            schema_name: schema_name(cfg.name()),
            schema: cfg.schema.as_ref().map(|s| s.value.clone()),
        })
    }

    fn authed(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match (&self.api_key, &self.basic) {
            (Some(k), _) => req.bearer_auth(k),
            (None, Some((user, pass))) => req.basic_auth(user, pass.as_ref()),
            (None, None) => req,
        }
    }

    /// `GET {url}/models` lists the model.
    async fn check_server(&self) -> Result<ServerInfo, ClientError> {
        let url = format!("{}/models", self.base);
        let resp = tokio::time::timeout(self.idle, self.authed(self.http.get(&url)).send())
            .await
            .map_err(|_| ClientError::Check(format!("{url} did not answer within {:?}", self.idle)))?
            .map_err(|e| {
                ClientError::Check(format!(
                    "cannot reach the server at {} (from {}): {}\nIs it running, and is {} the API base (e.g. http://127.0.0.1:8000/v1)?",
                    self.base,
                    self.url_source,
                    error_chain(&e),
                    self.url_source
                ))
            })?;
        let fake = resp.headers().contains_key(crate::ollama_client::FAKE_HEADER);
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(ClientError::Check(format!(
                "{url} answered HTTP {status}: {} (set backend.api_key_env to the name of the variable holding the key)",
                error_message(&body)
            )));
        }
        if !status.is_success() {
            return Err(ClientError::Check(format!(
                "{url} answered HTTP {status}: {}; is {} the API base (it usually ends in /v1)?",
                error_message(&body),
                self.url_source
            )));
        }
        let ids: Vec<String> = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("data").and_then(Value::as_array).cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_owned))
            .collect();
        if !ids.contains(&self.model) {
            let ids = config::nearest_first(&self.model, ids);
            return Err(ClientError::Check(format!(
                "model {:?} is not served at {} (it serves: {}); set {} to one of those",
                self.model,
                self.base,
                if ids.is_empty() { "nothing it lists".to_owned() } else { ids.join(", ") },
                self.model_key
            )));
        }
        if let Some(schema) = &self.schema {
            self.check_dialect(schema).await?;
        }
        Ok(ServerInfo { version: None, capabilities: Vec::new(), fake })
    }

    /// One short structured request: a server that does not take the `response_format` dialect
    /// stops the run here, with the setting to try, instead of failing every row.
    async fn check_dialect(&self, schema: &Value) -> Result<(), ClientError> {
        let url = format!("{}/chat/completions", self.base);
        let mut body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": "Reply with JSON."}],
            "max_tokens": 4,
            "stream": false,
        });
        body["response_format"] = self.response_format_value(schema);
        let resp = tokio::time::timeout(self.idle, self.authed(self.http.post(&url)).json(&body).send())
            .await
            .map_err(|_| ClientError::Check(format!("{url} did not answer a short structured request within {:?}", self.idle)))?
            .map_err(|e| ClientError::Check(format!("cannot reach {url}: {}", error_chain(&e))))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let message = error_message(&resp.bytes().await.unwrap_or_default());
        let (now, other) = match self.response_format {
            ResponseFormat::JsonSchema => ("json_schema", "json_object"),
            ResponseFormat::JsonObject => ("json_object", "json_schema"),
        };
        Err(ClientError::Check(format!(
            "{url} refused a structured request (response_format {now:?}): HTTP {status}: {message}\nThe server may speak the \
             other dialect: set [backend] response_format = \"{other}\" (llama-cpp-python's server takes \"json_object\"; vLLM, \
             llama-server, LM Studio and OpenAI take \"json_schema\")"
        )))
    }

    fn response_format_value(&self, schema: &Value) -> Value {
        match self.response_format {
            ResponseFormat::JsonSchema => json!({"type": "json_schema", "json_schema": {"name": self.schema_name, "schema": schema, "strict": true}}),
            ResponseFormat::JsonObject => json!({"type": "json_object", "schema": schema}),
        }
    }

    fn body(&self, req: &Request<'_>) -> Value {
        let mut body = json!({
            "model": self.model,
            "messages": req.messages,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let Some(obj) = body.as_object_mut() {
            obj.extend(map_options(req.options));
        }
        if let Some(schema) = req.schema {
            body["response_format"] = self.response_format_value(schema);
        }
        body
    }

    async fn send(&self, req: Request<'_>) -> Result<ChunkStream, ClientError> {
        let url = format!("{}/chat/completions", self.base);
        let http = self.authed(self.http.post(&url)).json(&self.body(&req));
        let resp = backend::open_stream(http, &url, self.idle).await?;
        Ok(idle_chunks(decode_sse(body_bytes(resp)).boxed(), self.idle))
    }
}

/// `json_schema.name` takes letters, digits, `_` and `-` (64 at most).
fn schema_name(run: &str) -> String {
    let n: String = run.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).take(64).collect();
    if n.is_empty() { "output".into() } else { n }
}

/// Sampling options from Ollama's names to OpenAI's: `num_predict` is `max_tokens`; the common
/// ones keep their names; the rest go in the body as the server's extensions (vLLM and llama.cpp
/// take `top_k`, `min_p`, `repeat_penalty`, ...). Ollama's load-time options mean nothing here.
pub fn map_options(options: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in options {
        match k.as_str() {
            "num_predict" => {
                out.insert("max_tokens".into(), v.clone());
            }
            "num_ctx" | "num_batch" | "num_gpu" | "main_gpu" | "low_vram" | "vocab_only" | "use_mmap" | "use_mlock"
            | "num_thread" | "numa" | "num_keep" => {}
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

/// What the stream has said so far.
#[derive(Default)]
struct Reply {
    finish_reason: Option<String>,
    usage: Option<(Option<u64>, Option<u64>)>,
    predicted_ms: Option<f64>,
    pieces: u64,
    done: bool,
}

impl Reply {
    fn stats(&self) -> Stats {
        let (prompt, completion) = self.usage.unwrap_or((None, None));
        Stats {
            done_reason: self.finish_reason.clone(),
            prompt_tokens: prompt,
            completion_tokens: completion.or(Some(self.pieces)),
            completion_tokens_estimated: completion.is_none(),
            eval_duration_ns: self.predicted_ms.map(|ms| (ms * 1e6) as u64),
            ..Stats::default()
        }
    }
}

/// A streamed chat completion chunk, as servers send it (unknown fields skipped).
#[derive(Deserialize)]
struct TypedEvent<'a> {
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
    #[serde(default, borrow)]
    choices: Option<Vec<TypedChoice<'a>>>,
    #[serde(default)]
    usage: Option<TypedUsage>,
    #[serde(default)]
    timings: Option<TypedTimings>,
}

#[derive(Deserialize)]
struct TypedChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<TypedDelta<'a>>,
    #[serde(default, borrow)]
    message: Option<TypedDelta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct TypedDelta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct TypedUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct TypedTimings {
    predicted_ms: Option<f64>,
}

impl TypedEvent<'_> {
    /// What [`decode_event`]'s lenient path does with the same event.
    fn apply(self, reply: &mut Reply) -> Vec<Chunk> {
        let mut out = Vec::new();
        if let Some(choice) = self.choices.and_then(|c| c.into_iter().next()) {
            if let Some(d) = choice.delta.or(choice.message) {
                if let Some(t) = d.reasoning_content.or(d.reasoning).filter(|t| !t.is_empty()) {
                    out.push(Chunk::Thinking(t.into_owned()));
                }
                if let Some(c) = d.content.filter(|c| !c.is_empty()) {
                    reply.pieces += 1;
                    out.push(Chunk::Content(c.into_owned()));
                }
            }
            if let Some(r) = choice.finish_reason {
                reply.finish_reason = Some(r.into_owned());
            }
        }
        if let Some(u) = self.usage {
            reply.usage = Some((u.prompt_tokens, u.completion_tokens));
        }
        if let Some(ms) = self.timings.and_then(|t| t.predicted_ms) {
            reply.predicted_ms = Some(ms);
        }
        out
    }
}

/// Turns one SSE event into chunks; Err for an error event.
fn decode_event(ev: &SseEvent, reply: &mut Reply) -> Result<Vec<Chunk>, ClientError> {
    let data = ev.data.trim();
    if data == "[DONE]" {
        reply.done = true;
        return Ok(Vec::new());
    }
    if data.is_empty() {
        return Ok(Vec::new());
    }
    // The usual event, decoded typed and borrowed (no `Value` tree, no copy of unescaped text);
    // anything it does not fit (an error, odd types) goes the lenient way below.
    if let Ok(e) = serde_json::from_str::<TypedEvent>(data) {
        if e.error.is_none() && ev.event != "error" {
            return Ok(e.apply(reply));
        }
    }
    let v: Value = serde_json::from_str(data).map_err(|e| ClientError::Decode {
        message: e.to_string(),
        start: data.chars().take(80).collect(),
    })?;
    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
        let msg = match err {
            Value::String(s) => s.clone(),
            Value::Object(o) => o.get("message").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| err.to_string()),
            other => other.to_string(),
        };
        return Err(ClientError::StreamError(msg));
    }
    if ev.event == "error" {
        return Err(ClientError::StreamError(data.chars().take(300).collect()));
    }
    let mut out = Vec::new();
    if let Some(choice) = v.get("choices").and_then(Value::as_array).and_then(|c| c.first()) {
        let delta = choice.get("delta").or_else(|| choice.get("message"));
        if let Some(d) = delta {
            let thinking = d.get("reasoning_content").or_else(|| d.get("reasoning")).and_then(Value::as_str);
            if let Some(t) = thinking.filter(|t| !t.is_empty()) {
                out.push(Chunk::Thinking(t.to_owned()));
            }
            if let Some(c) = d.get("content").and_then(Value::as_str).filter(|c| !c.is_empty()) {
                reply.pieces += 1;
                out.push(Chunk::Content(c.to_owned()));
            }
        }
        if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
            reply.finish_reason = Some(r.to_owned());
        }
    }
    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
        reply.usage = Some((
            u.get("prompt_tokens").and_then(Value::as_u64),
            u.get("completion_tokens").and_then(Value::as_u64),
        ));
    }
    if let Some(ms) = v.get("timings").and_then(|t| t.get("predicted_ms")).and_then(Value::as_f64) {
        reply.predicted_ms = Some(ms);
    }
    Ok(out)
}

/// Frames reply bytes into lines, lines into events, events into chunks.
pub fn decode_sse<S>(bytes: S) -> impl Stream<Item = Result<Chunk, ClientError>> + Send
where
    S: Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
{
    backend::decode_lines(bytes, Sse { parser: SseParser::new(), reply: Reply::default() })
}

/// Server-Sent Events of chat completion chunks, ending in `data: [DONE]`.
struct Sse {
    parser: SseParser,
    reply: Reply,
}

impl LineDecoder for Sse {
    fn line(&mut self, line: &[u8], out: &mut VecDeque<Chunk>) -> Result<bool, ClientError> {
        let text = std::str::from_utf8(line).map_err(|e| ClientError::Decode { message: e.to_string(), start: String::new() })?;
        let Some(ev) = self.parser.line(text) else { return Ok(false) };
        out.extend(decode_event(&ev, &mut self.reply)?);
        if !self.reply.done {
            return Ok(false);
        }
        // A finished completion always says why it finished; `[DONE]` without a `finish_reason`
        // is a reply cut off (llama-cpp-python ends an interrupted request that way).
        if self.reply.finish_reason.is_none() {
            return Err(ClientError::Truncated);
        }
        out.push_back(Chunk::Done(self.reply.stats()));
        Ok(true)
    }

    fn end(&mut self, out: &mut VecDeque<Chunk>) -> Result<(), ClientError> {
        // A last event without its blank line still counts.
        if let Some(ev) = self.parser.finish() {
            out.extend(decode_event(&ev, &mut self.reply)?);
        }
        if self.reply.finish_reason.is_none() {
            return Err(ClientError::Truncated);
        }
        out.push_back(Chunk::Done(self.reply.stats()));
        Ok(())
    }
}

impl ModelClient for OpenAiClient {
    fn url(&self) -> &str {
        &self.base
    }
    fn kind(&self) -> &'static str {
        "openai"
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
    use bytes::Bytes;

    const REPLY: &str = concat!(
        ": keep-alive\r\n\r\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\r\n\r\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"hmm \"},\"finish_reason\":null}]}\r\n\r\n",
        "event: message\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Héllo 日本\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" 🎉\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":44,\"completion_tokens\":48,\"total_tokens\":92}}\n\n",
        "data: [DONE]\n\n",
    );

    async fn collect(pieces: Vec<Vec<u8>>) -> Vec<Result<Chunk, String>> {
        let s = futures::stream::iter(pieces.into_iter().map(|p| Ok(Bytes::from(p))));
        decode_sse(s).map(|r| r.map_err(|e| e.to_string())).collect().await
    }

    #[tokio::test]
    async fn split_anywhere_gives_the_same_chunks() {
        let whole = collect(vec![REPLY.as_bytes().to_vec()]).await;
        let bytewise = collect(REPLY.as_bytes().iter().map(|b| vec![*b]).collect()).await;
        assert_eq!(whole, bytewise);
        assert_eq!(whole[0], Ok(Chunk::Thinking("hmm ".into())));
        assert_eq!(whole[1], Ok(Chunk::Content("Héllo 日本".into())));
        assert_eq!(whole[2], Ok(Chunk::Content(" 🎉".into())));
        match &whole[3] {
            Ok(Chunk::Done(s)) => {
                assert_eq!(s.done_reason.as_deref(), Some("length"));
                assert_eq!((s.prompt_tokens, s.completion_tokens, s.completion_tokens_estimated), (Some(44), Some(48), false));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(whole.len(), 4);
    }

    #[tokio::test]
    async fn error_event_fails_even_with_done_after() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"error\":{\"message\":\"out of memory\",\"type\":\"x\",\"code\":500}}\n\ndata: [DONE]\n\n";
        let r = collect(vec![body.as_bytes().to_vec()]).await;
        assert!(matches!(r.last(), Some(Err(e)) if e.contains("out of memory")), "{r:?}");
    }

    #[tokio::test]
    async fn no_usage_counts_pieces_and_marks_them() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
        let r = collect(vec![body.as_bytes().to_vec()]).await;
        match r.last() {
            Some(Ok(Chunk::Done(s))) => assert_eq!((s.completion_tokens, s.completion_tokens_estimated), (Some(2), true)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn done_without_finish_reason_is_truncated() {
        let body = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\ndata: [DONE]\n\n";
        let r = collect(vec![body.as_bytes().to_vec()]).await;
        assert_eq!(r, vec![Err(ClientError::Truncated.to_string())]);
    }

    #[tokio::test]
    async fn cut_before_any_finish_is_truncated() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
        let r = collect(vec![body.as_bytes().to_vec()]).await;
        assert_eq!(r.last(), Some(&Err(ClientError::Truncated.to_string())));
    }

    #[test]
    fn options_map_to_openai_names() {
        let mut o = Map::new();
        o.insert("num_predict".into(), json!(64));
        o.insert("temperature".into(), json!(0.0));
        o.insert("num_ctx".into(), json!(4096));
        o.insert("top_k".into(), json!(40));
        let m = map_options(&o);
        assert_eq!(m.get("max_tokens"), Some(&json!(64)));
        assert_eq!(m.get("temperature"), Some(&json!(0.0)));
        assert_eq!(m.get("top_k"), Some(&json!(40)));
        assert!(!m.contains_key("num_ctx") && !m.contains_key("num_predict"));
    }
}
