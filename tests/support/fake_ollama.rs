//! A fake Ollama server that misbehaves like real networks do. It speaks just enough HTTP/1.1
//! (one request per connection, chunked replies) to serve `/api/version`, `/api/show`,
//! `/api/chat` and `/api/generate`, and cuts every reply into random small writes so that lines
//! and multi-byte characters straddle reads and several lines share one read.
//!
//! What a reply does is steered by directives in the user prompt, `[[name]]` (every attempt) or
//! `[[namexN]]` (the first N attempts of that prompt, then normal):
//! `503`, `500`, `400`, `429` (with `retry-after: 0`), `error` (an error line mid-stream),
//! `truncate` (ends without `done`), `drop` (connection closed mid-chunk), `stall` (goes silent),
//! `keepalive` (halfway, only keep-alives: SSE `: keep-alive` comments or blank NDJSON lines, a
//! few a second, never data), `wait3600` (429 with `Retry-After: 3600`),
//! `think` (thinking text first), `length` (`done_reason: length`), `slow` (a pause per token).
//!
//! Every answer carries the header `x-data-generator-fake: 1`, so that the tool can mark a
//! dataset made from its made-up text.
//!
//! It also speaks the OpenAI-compatible API (`GET /v1/models`, `POST /v1/chat/completions`,
//! answered in Server-Sent Events with comments, `event:` lines, CRLF line ends and multi-line
//! data mixed in), with the same directives plus `nousage` (no usage chunk, as
//! llama-cpp-python streams).
//!
//! Shared by the integration tests and `examples/fake_ollama.rs`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The text the fake answers to a prompt: deterministic, with accents, CJK, emoji, quotes,
/// commas, newlines, CR and trailing spaces, so any mangling shows.
pub fn expected_response(prompt: &str) -> String {
    let h = prompt.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    format!(
        "Réponse n°{h} à «{prompt}»: 日本語のテキスト, emoji 🎉🚀👩‍🔬, \"quoted\", a,b;c\nsecond line\r\n\ttabbed  \nlast line with trailing spaces   "
    )
}

pub const THINKING: &str = "Let me think… 🤔 step one, step two.";

#[derive(Clone, Debug)]
pub struct Options {
    /// Models `/api/show` knows.
    pub models: Vec<String>,
    /// Pause between tokens (applies to every reply).
    pub token_delay: Duration,
    /// Pause per token for prompts with `[[slow]]`.
    pub slow_delay: Duration,
    /// How long `stall` stays silent.
    pub stall: Duration,
    /// Seed of the piece sizes.
    pub seed: u64,
    /// Like llama-cpp-python's server: `response_format` of type `json_schema` is refused (500).
    pub json_object_only: bool,
    /// Speed mode, for the benchmarks: every streamed reply is the same pre-rendered text of
    /// `fast_tokens` tokens (or N with `[[tokens=N]]` in the prompt), one write per token as a
    /// real server sends them, the connection kept for the next request, nothing recorded
    /// (`seen` stays empty) and no directives.
    pub fast: bool,
    pub fast_tokens: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            models: vec!["fake-model:latest".into(), "fake-model".into()],
            token_delay: Duration::ZERO,
            slow_delay: Duration::from_millis(50),
            stall: Duration::from_secs(30),
            seed: 1,
            json_object_only: false,
            fast: false,
            fast_tokens: 80,
        }
    }
}

/// One request the fake saw.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub body: Value,
    /// The user prompt (chat: last message; generate: `prompt`).
    pub prompt: Option<String>,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

#[derive(Default)]
struct State {
    attempts: HashMap<String, u32>,
    seen: Vec<SeenRequest>,
    /// Generation requests being answered now, and the most at once, per model.
    active: HashMap<String, usize>,
    peak: HashMap<String, usize>,
}

/// Counts a generation request as in progress until dropped.
struct Active {
    state: Arc<Mutex<State>>,
    model: String,
}

impl Active {
    fn start(state: &Arc<Mutex<State>>, model: &str) -> Active {
        if let Ok(mut st) = state.lock() {
            let n = st.active.entry(model.to_owned()).or_insert(0);
            *n += 1;
            let n = *n;
            let p = st.peak.entry(model.to_owned()).or_insert(0);
            *p = (*p).max(n);
        }
        Active { state: state.clone(), model: model.to_owned() }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        if let Ok(mut st) = self.state.lock() {
            if let Some(n) = st.active.get_mut(&self.model) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

pub struct FakeOllama {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeOllama {
    /// Starts on 127.0.0.1 with a free port, in a thread of its own.
    pub fn start(opts: Options) -> FakeOllama {
        Self::start_on("127.0.0.1:0", opts)
    }

    pub fn start_on(bind: &str, opts: Options) -> FakeOllama {
        let std_listener = std::net::TcpListener::bind(bind).expect("bind fake server");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State::default()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("fake-ollama").enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("listener");
                let opts = Arc::new(opts);
                let mut conn_no = 0u64;
                let serve = async {
                    loop {
                        let Ok((sock, _)) = listener.accept().await else { continue };
                        conn_no += 1;
                        let (st, opts) = (st.clone(), opts.clone());
                        let seed = opts.seed.wrapping_mul(6364136223846793005).wrapping_add(conn_no);
                        tokio::spawn(async move {
                            let _ = handle(sock, st, opts, seed).await;
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = rx => {}
                }
            });
            rt.shutdown_timeout(Duration::from_millis(100));
        });
        FakeOllama { addr, state, shutdown: Some(tx), thread: Some(thread) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// CPU time (user + system) the fake's threads have used so far, when it runs in this
    /// process (Linux: from /proc/self/task; its threads are named `fake-ollama`).
    pub fn cpu() -> Duration {
        let tick = 100.0; // USER_HZ on Linux
        let mut total = 0.0;
        for t in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
            if std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "fake-ollama") {
                if let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) {
                    // After the command name in parentheses: fields 14 and 15 are utime, stime.
                    let rest = stat.rsplit(") ").next().unwrap_or_default();
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                    total += ticks / tick;
                }
            }
        }
        Duration::from_secs_f64(total)
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.state.lock().map(|s| s.seen.clone()).unwrap_or_default()
    }

    /// Generation requests seen (chat, generate, OpenAI chat completions).
    pub fn generations(&self) -> Vec<SeenRequest> {
        self.seen().into_iter().filter(|r| is_generation(&r.path)).collect()
    }

    /// The most generation requests for `model` it was answering at once.
    pub fn peak_concurrency(&self, model: &str) -> usize {
        self.state.lock().map(|s| s.peak.get(model).copied().unwrap_or(0)).unwrap_or(0)
    }

    /// Stops at once, as a crashed server does: open connections are cut, new ones refused.
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn is_generation(path: &str) -> bool {
    matches!(path, "/api/chat" | "/api/generate" | "/v1/chat/completions")
}

impl Drop for FakeOllama {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Small, fast, seeded randomness for piece sizes.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

async fn read_request(sock: &mut TcpStream) -> std::io::Result<Option<(String, String, Vec<u8>, Option<String>)>> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let mut lines = head.lines();
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned())).collect();
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let len = header("content-length").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
    let authorization = header("authorization");
    let mut body = buf[header_end..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    Ok(Some((method, path, body, authorization)))
}

async fn respond_json(sock: &mut TcpStream, status: u16, extra: &str, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n{extra}{FAKE_HEADER}Connection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

/// The header that says an answer came from this fake.
const FAKE_HEADER: &str = "x-data-generator-fake: 1\r\n";

/// Directive `name` in the prompt: Some(true) when it applies to this attempt.
fn directive(prompt: &str, name: &str, attempt: u32) -> bool {
    let always = format!("[[{name}]]");
    if prompt.contains(&always) {
        return true;
    }
    let prefix = format!("[[{name}x");
    if let Some(i) = prompt.find(&prefix) {
        let rest = &prompt[i + prefix.len()..];
        if let Some(end) = rest.find("]]") {
            if let Ok(n) = rest[..end].parse::<u32>() {
                return attempt <= n;
            }
        }
    }
    false
}

fn user_prompt(path: &str, body: &Value) -> Option<String> {
    if path == "/api/generate" {
        return body.get("prompt")?.as_str().map(str::to_owned);
    }
    let msgs = body.get("messages")?.as_array()?;
    msgs.iter().rev().find(|m| m["role"] == "user")?.get("content")?.as_str().map(str::to_owned)
}

/// What the fake answers: its fixed text, or, when the request carries a JSON schema (Ollama's
/// `format`, OpenAI's `response_format`), JSON made to fit it, broken when a directive says so:
/// `badjson` (cut in half), `outofrange` (numbers 90 above their maximum), `fenced` (in a
/// Markdown code fence, as unconstrained models write it), `emptyarrays` (every array empty),
/// `arrayN` (every array N items long, e.g. `[[array50]]`).
pub fn answer(prompt: &str, schema: Option<&Value>, attempt: u32) -> String {
    let Some(schema) = schema.filter(|s| s.is_object()) else { return expected_response(prompt) };
    let mut value = fitting(schema, directive(prompt, "outofrange", attempt));
    if directive(prompt, "emptyarrays", attempt) {
        resize_arrays(&mut value, 0);
    } else if let Some(n) = prompt.split("[[array").nth(1).and_then(|r| r.split("]]").next()).and_then(|n| n.parse().ok()) {
        resize_arrays(&mut value, n);
    }
    let text = value.to_string();
    if directive(prompt, "badjson", attempt) {
        text[..text.len() / 2].to_owned()
    } else if directive(prompt, "fenced", attempt) {
        format!("```json\n{text}\n```\n")
    } else {
        text
    }
}

/// A value that fits a (simple) schema: every property, two items per array, the middle of a
/// number's range, the first of an enum.
pub fn fitting(schema: &Value, out_of_range: bool) -> Value {
    if let Some(first) = schema.get("enum").and_then(Value::as_array).and_then(|e| e.first()) {
        return first.clone();
    }
    let num = |key: &str| schema.get(key).and_then(Value::as_f64);
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let mut o = serde_json::Map::new();
            for (k, v) in schema.get("properties").and_then(Value::as_object).into_iter().flatten() {
                o.insert(k.clone(), fitting(v, out_of_range));
            }
            Value::Object(o)
        }
        Some("array") => {
            let item = schema.get("items").map(|i| fitting(i, out_of_range)).unwrap_or(Value::Null);
            Value::Array(vec![item.clone(), item])
        }
        Some(t @ ("integer" | "number")) => {
            let lo = num("minimum").unwrap_or(0.0);
            let hi = num("maximum").unwrap_or(lo + 10.0);
            let v = if out_of_range { hi + 90.0 } else { ((lo + hi) / 2.0).floor() };
            if t == "integer" { json!(v as i64) } else { json!(v) }
        }
        Some("boolean") => json!(true),
        Some("string") => json!("a made-up reason, «quoted» and 日本語"),
        _ => Value::Null,
    }
}

/// Every array `n` items long (copies of its first item).
fn resize_arrays(v: &mut Value, n: usize) {
    match v {
        Value::Array(a) => {
            let first = a.first().cloned().unwrap_or(Value::Null);
            a.resize(n, first);
            a.truncate(n);
        }
        Value::Object(o) => o.values_mut().for_each(|x| resize_arrays(x, n)),
        _ => {}
    }
}

/// Splits text into 1-3 character tokens (whole characters: JSON carries text, not bytes).
fn tokens(text: &str, rng: &mut Rng) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let n = 1 + rng.below(3) as usize;
        let end = (i + n).min(chars.len());
        out.push(chars[i..end].iter().collect());
        i = end;
    }
    out
}

async fn handle(mut sock: TcpStream, state: Arc<Mutex<State>>, opts: Arc<Options>, seed: u64) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    // Speed mode keeps the connection for the next request, as real servers do; otherwise one
    // request a connection.
    loop {
        let Some((method, path, body, authorization)) = read_request(&mut sock).await? else { return Ok(()) };
        if !(opts.fast && fast_answer(&mut sock, &opts, &method, &path, &body).await?) {
            return handle_one(sock, state, opts, seed, method, path, body, authorization).await;
        }
    }
}

/// Speed mode's answer to a streamed generation request; false when it is not one.
async fn fast_answer(sock: &mut TcpStream, opts: &Options, method: &str, path: &str, body: &[u8]) -> std::io::Result<bool> {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let prompt = user_prompt(path, &body);
    if method == "POST" && body.get("stream") != Some(&json!(false)) {
        let model = body.get("model").and_then(Value::as_str).unwrap_or_default();
        let kind = match path {
            "/api/chat" => Some(FastKind::Chat),
            "/api/generate" => Some(FastKind::Generate),
            "/v1/chat/completions" => Some(FastKind::OpenAi),
            _ => None,
        };
        if let Some(kind) = kind.filter(|_| opts.models.iter().any(|m| m == model)) {
            let n = prompt.as_deref().and_then(|p| p.split("[[tokens=").nth(1)).and_then(|r| r.split("]]").next()).and_then(|n| n.parse().ok()).unwrap_or(opts.fast_tokens);
            let reply = fast_reply(kind, model, n);
            sock.write_all(&reply.head).await?;
            for c in &reply.chunks {
                sock.write_all(c).await?;
            }
            return Ok(true);
        }
    }
    Ok(false)
}

#[allow(clippy::too_many_arguments)]
async fn handle_one(
    mut sock: TcpStream,
    state: Arc<Mutex<State>>,
    opts: Arc<Options>,
    seed: u64,
    method: String,
    path: String,
    body: Vec<u8>,
    authorization: Option<String>,
) -> std::io::Result<()> {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let prompt = user_prompt(&path, &body);
    let attempt = {
        let mut st = state.lock().map_err(|_| std::io::Error::other("poisoned"))?;
        st.seen.push(SeenRequest { method: method.clone(), path: path.clone(), body: body.clone(), prompt: prompt.clone(), authorization });
        match &prompt {
            Some(p) if is_generation(&path) => {
                let a = st.attempts.entry(p.clone()).or_insert(0);
                *a += 1;
                *a
            }
            _ => 0,
        }
    };
    let model = body.get("model").and_then(Value::as_str).unwrap_or_default().to_owned();
    let _active = is_generation(&path).then(|| Active::start(&state, &model));
    match (method.as_str(), path.as_str()) {
        ("GET", "/") => respond_json(&mut sock, 200, "", &json!("Ollama is running")).await,
        ("GET", "/api/version") => respond_json(&mut sock, 200, "", &json!({"version": "0.12.6-fake"})).await,
        ("GET", "/api/tags") => {
            let models: Vec<Value> = opts.models.iter().map(|m| json!({"name": m, "model": m, "size": 1})).collect();
            respond_json(&mut sock, 200, "", &json!({ "models": models })).await
        }
        ("POST", "/api/show") => {
            if opts.models.contains(&model) {
                respond_json(&mut sock, 200, "", &json!({"capabilities": ["completion", "thinking"], "details": {"family": "fake"}})).await
            } else {
                respond_json(&mut sock, 404, "", &json!({"error": format!("model '{model}' not found")})).await
            }
        }
        ("POST", "/api/chat") | ("POST", "/api/generate") => {
            if !opts.models.contains(&model) {
                return respond_json(&mut sock, 404, "", &json!({"error": format!("model \"{model}\" not found, try pulling it first")})).await;
            }
            let p = prompt.unwrap_or_default();
            for (name, status, msg) in [
                ("503", 503, "server busy, please try again.  maximum pending requests exceeded"),
                ("500", 500, "llama runner process has terminated: exit status 2"),
                ("400", 400, "invalid options: bad request"),
                ("429", 429, "rate limited"),
                ("wait3600", 429, "rate limited: come back in an hour"),
            ] {
                if directive(&p, name, attempt) {
                    let extra = match name {
                        "429" => "Retry-After: 0\r\n",
                        "wait3600" => "Retry-After: 3600\r\n",
                        _ => "",
                    };
                    return respond_json(&mut sock, status, extra, &json!({ "error": msg })).await;
                }
            }
            let text = answer(&p, body.get("format"), attempt);
            stream_reply(&mut sock, &path, &model, &p, &text, attempt, &opts, seed).await
        }
        ("GET", "/v1/models") => {
            let data: Vec<Value> = opts.models.iter().map(|m| json!({"id": m, "object": "model", "owned_by": "fake"})).collect();
            respond_json(&mut sock, 200, "", &json!({"object": "list", "data": data})).await
        }
        ("POST", "/v1/chat/completions") => {
            if !opts.models.contains(&model) {
                let msg = format!("The model `{model}` does not exist.");
                return respond_json(&mut sock, 404, "", &json!({"error": {"message": msg, "type": "NotFoundError", "code": 404}})).await;
            }
            let p = prompt.unwrap_or_default();
            for (name, status) in [("503", 503), ("500", 500), ("400", 400), ("429", 429), ("wait3600", 429)] {
                if directive(&p, name, attempt) {
                    let extra = match name {
                        "429" => "retry-after-ms: 20\r\n",
                        "wait3600" => "Retry-After: 3600\r\n",
                        _ => "",
                    };
                    let body = json!({"error": {"message": format!("fake error {status}"), "type": "server_error", "code": status}});
                    return respond_json(&mut sock, status, extra, &body).await;
                }
            }
            let rf = body.get("response_format");
            if opts.json_object_only && rf.is_some_and(|f| f["type"] == "json_schema") {
                let msg = "1 validation error: response_format.type: Input should be 'text' or 'json_object'";
                return respond_json(&mut sock, 500, "", &json!({"error": {"message": msg, "type": "internal_server_error"}})).await;
            }
            if body.get("stream") == Some(&json!(false)) {
                // A short request, not streamed: the start-up check of a dialect.
                let content = answer(&p, rf.and_then(|f| f.pointer("/json_schema/schema").or_else(|| f.get("schema"))), 1);
                let reply = json!({"id": "chatcmpl-fake", "object": "chat.completion", "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "length"}]});
                return respond_json(&mut sock, 200, "", &reply).await;
            }
            let schema = rf.and_then(|f| f.pointer("/json_schema/schema").or_else(|| f.get("schema")));
            let text = answer(&p, schema, attempt);
            stream_sse(&mut sock, &model, &p, &text, attempt, &opts, seed).await
        }
        _ => respond_json(&mut sock, 404, "", &json!({"error": "404 page not found"})).await,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum FastKind {
    Chat,
    Generate,
    OpenAi,
}

/// A reply of speed mode, rendered once: the head, then one HTTP chunk per token (and the last
/// ones: the done line or the finish, usage and `[DONE]` events, and the chunked end).
struct FastReply {
    head: Vec<u8>,
    chunks: Vec<Vec<u8>>,
}

/// The words of speed mode's replies, one a token.
const FAST_WORDS: &[&str] = &["The ", "sky ", "is ", "blue ", "because ", "air ", "scatters ", "short ", "waves ", "more; ", "日本語 ", "café, ", "\"quoted\" ", "and\n", "🎉 "];

fn fast_reply(kind: FastKind, model: &str, n: usize) -> Arc<FastReply> {
    type Cache = Mutex<HashMap<(FastKind, String, usize), Arc<FastReply>>>;
    static CACHE: std::sync::LazyLock<Cache> = std::sync::LazyLock::new(Default::default);
    let key = (kind, model.to_owned(), n);
    if let Some(r) = CACHE.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return r;
    }
    let chunk = |frame: String| format!("{:x}\r\n{frame}\r\n", frame.len()).into_bytes();
    let words = (0..n).map(|i| FAST_WORDS[i % FAST_WORDS.len()]);
    let mut chunks = Vec::with_capacity(n + 4);
    let content_type = match kind {
        FastKind::OpenAi => {
            let ev = |delta: Value, finish: Value| {
                let v = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
                format!("data: {v}\n\n")
            };
            chunks.push(chunk(ev(json!({"role": "assistant", "content": ""}), Value::Null)));
            chunks.extend(words.map(|w| chunk(ev(json!({"content": w}), Value::Null))));
            chunks.push(chunk(ev(json!({}), json!("stop"))));
            let usage = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model, "choices": [],
                               "usage": {"prompt_tokens": 9, "completion_tokens": n, "total_tokens": n + 9}});
            chunks.push(chunk(format!("data: {usage}\n\ndata: [DONE]\n\n")));
            "text/event-stream"
        }
        FastKind::Chat | FastKind::Generate => {
            let line = |w: &str| -> Value {
                if kind == FastKind::Generate {
                    json!({"model": model, "created_at": "2025-10-26T17:15:24.09Z", "response": w, "done": false})
                } else {
                    json!({"model": model, "created_at": "2025-10-26T17:15:24.09Z", "message": {"role": "assistant", "content": w}, "done": false})
                }
            };
            chunks.extend(words.map(|w| chunk(format!("{}\n", line(w)))));
            let mut last = line("");
            last["done"] = json!(true);
            last["done_reason"] = json!("stop");
            last["total_duration"] = json!(4_883_583_458u64);
            last["prompt_eval_count"] = json!(9);
            last["eval_count"] = json!(n);
            last["eval_duration"] = json!(4_535_599_000u64);
            chunks.push(chunk(format!("{last}\n")));
            "application/x-ndjson"
        }
    };
    chunks.push(b"0\r\n\r\n".to_vec());
    let head = format!("HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n{FAKE_HEADER}\r\n").into_bytes();
    let r = Arc::new(FastReply { head, chunks });
    if let Ok(mut c) = CACHE.lock() {
        c.insert(key, r.clone());
    }
    r
}

/// An OpenAI-style streamed reply, in SSE with the variations servers use.
#[allow(clippy::too_many_arguments)]
async fn stream_sse(sock: &mut TcpStream, model: &str, prompt: &str, text: &str, attempt: u32, opts: &Options, seed: u64) -> std::io::Result<()> {
    let mut rng = Rng(seed | 1);
    let crlf = rng.below(2) == 0;
    let nl = if crlf { "\r\n" } else { "\n" };
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut events: Vec<String> = Vec::new();
    let data = |v: &Value, rng: &mut Rng| -> String {
        let text = v.to_string();
        match rng.below(6) {
            // Multi-line data: JSON cut after a comma, the newline joining them is whitespace.
            // (Cut between two top-level fields, never inside a string.)
            0 if text.contains(",\"id\":\"chatcmpl-fake\"") => {
                let i = text.find(",\"id\":\"chatcmpl-fake\"").map(|i| i + 1).unwrap_or(0);
                format!("data: {}{nl}data: {}{nl}{nl}", &text[..i], &text[i..])
            }
            1 => format!(": keep-alive{nl}{nl}event: message{nl}data: {text}{nl}{nl}"),
            2 => format!("data:{text}{nl}{nl}"),
            _ => format!("data: {text}{nl}{nl}"),
        }
    };
    events.push(data(&chunk(json!({"role": "assistant", "content": ""}), Value::Null), &mut rng));
    if directive(prompt, "think", attempt) {
        for t in tokens(THINKING, &mut rng) {
            events.push(data(&chunk(json!({"reasoning_content": t}), Value::Null), &mut rng));
        }
    }
    let toks = tokens(text, &mut rng);
    let n = toks.len();
    for t in toks {
        events.push(data(&chunk(json!({"content": t}), Value::Null), &mut rng));
    }
    let reason = if directive(prompt, "length", attempt) { "length" } else { "stop" };
    events.push(data(&chunk(json!({}), json!(reason)), &mut rng));
    if !directive(prompt, "nousage", attempt) {
        let usage = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model, "choices": [],
                           "usage": {"prompt_tokens": prompt.chars().count(), "completion_tokens": n, "total_tokens": n + 1}});
        events.push(data(&usage, &mut rng));
    }
    events.push(format!("data: [DONE]{nl}{nl}"));

    // vLLM's way of failing: an error event, then [DONE] as if all were well.
    let e = json!({"error": {"message": "fake engine error: out of memory", "type": "InternalServerError", "code": 500}});
    let stream = Stream {
        keepalive_frame: format!(": keep-alive{nl}{nl}").into_bytes(),
        content_type: "text/event-stream",
        frames: events.into_iter().map(String::into_bytes).collect(),
        error_frame: format!("data: {e}{nl}{nl}data: [DONE]{nl}{nl}").into_bytes(),
        drop_prefix: b"data: {\"id\"",
        delay: opts.token_delay,
    };
    stream.send(sock, prompt, attempt, opts, &mut rng).await
}

/// A streamed reply and how it misbehaves when a directive says so.
struct Stream {
    content_type: &'static str,
    frames: Vec<Vec<u8>>,
    /// Sent instead of the second half for `error`.
    error_frame: Vec<u8>,
    /// The start of a chunk that `drop` announces longer than it is.
    drop_prefix: &'static [u8],
    delay: Duration,
    /// What `keepalive` sends instead of data.
    keepalive_frame: Vec<u8>,
}

impl Stream {
    async fn send(self, sock: &mut TcpStream, prompt: &str, attempt: u32, opts: &Options, rng: &mut Rng) -> std::io::Result<()> {
        let fail_error = directive(prompt, "error", attempt);
        let fail_truncate = directive(prompt, "truncate", attempt);
        let fail_drop = directive(prompt, "drop", attempt);
        let fail_stall = directive(prompt, "stall", attempt);
        let fail_keepalive = directive(prompt, "keepalive", attempt);
        let cut = self.frames.len() / 2;
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nTransfer-Encoding: chunked\r\n{FAKE_HEADER}Connection: close\r\n\r\n",
            self.content_type
        );
        sock.write_all(head.as_bytes()).await?;
        let mut pending: Vec<u8> = Vec::new();
        for (i, frame) in self.frames.iter().enumerate() {
            if i == cut && (fail_error || fail_truncate || fail_drop || fail_stall || fail_keepalive) {
                flush_pieces(sock, &mut pending, rng).await?;
                if fail_keepalive {
                    // Alive to the byte, dead to the word: until the client gives up (bounded).
                    for _ in 0..600 {
                        send_chunk(sock, &self.keepalive_frame).await?;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    return finish_chunked(sock).await;
                }
                if fail_error {
                    send_chunk(sock, &self.error_frame).await?;
                    return finish_chunked(sock).await;
                }
                if fail_truncate {
                    return finish_chunked(sock).await;
                }
                if fail_drop {
                    // A chunk announced longer than what is sent, then the socket closes.
                    sock.write_all(b"40\r\n").await?;
                    sock.write_all(self.drop_prefix).await?;
                    sock.flush().await?;
                    return Ok(());
                }
                tokio::time::sleep(opts.stall).await;
                return Ok(());
            }
            pending.extend_from_slice(frame);
            // Several frames often go out in one write; sometimes a frame is cut into many.
            if rng.below(3) == 0 {
                flush_pieces(sock, &mut pending, rng).await?;
            }
            if !self.delay.is_zero() {
                flush_pieces(sock, &mut pending, rng).await?;
                tokio::time::sleep(self.delay).await;
            }
        }
        flush_pieces(sock, &mut pending, rng).await?;
        finish_chunked(sock).await
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream_reply(
    sock: &mut TcpStream,
    path: &str,
    model: &str,
    prompt: &str,
    text: &str,
    attempt: u32,
    opts: &Options,
    seed: u64,
) -> std::io::Result<()> {
    let mut rng = Rng(seed | 1);
    let generate = path == "/api/generate";
    let line = |content: &str, thinking: Option<&str>| -> Value {
        if generate {
            let mut v = json!({"model": model, "created_at": "2025-10-26T17:15:24.09Z", "response": content, "done": false});
            if let Some(t) = thinking {
                v["thinking"] = json!(t);
            }
            v
        } else {
            let mut m = json!({"role": "assistant", "content": content});
            if let Some(t) = thinking {
                m["thinking"] = json!(t);
            }
            json!({"model": model, "created_at": "2025-10-26T17:15:24.09Z", "message": m, "done": false})
        }
    };
    let mut lines: Vec<Value> = Vec::new();
    if directive(prompt, "think", attempt) {
        for t in tokens(THINKING, &mut rng) {
            lines.push(line("", Some(&t)));
        }
    }
    let toks = tokens(text, &mut rng);
    let n_tokens = toks.len();
    for t in toks {
        lines.push(line(&t, None));
    }
    let length = directive(prompt, "length", attempt);
    let mut last = line("", None);
    last["done"] = json!(true);
    last["done_reason"] = json!(if length { "length" } else { "stop" });
    last["total_duration"] = json!(4_883_583_458u64);
    last["load_duration"] = json!(1_334_875u64);
    last["prompt_eval_count"] = json!(prompt.chars().count());
    last["prompt_eval_duration"] = json!(342_546_000u64);
    last["eval_count"] = json!(n_tokens);
    last["eval_duration"] = json!(4_535_599_000u64);
    if generate {
        last["context"] = json!((0..2000).collect::<Vec<u32>>());
    }

    lines.push(last);
    let slow = directive(prompt, "slow", attempt);
    let stream = Stream {
        keepalive_frame: b"\n".to_vec(),
        content_type: "application/x-ndjson",
        frames: lines.iter().map(|l| format!("{l}\n").into_bytes()).collect(),
        error_frame: b"{\"error\":\"an error was encountered while running the model: unexpected EOF\"}\n".to_vec(),
        drop_prefix: b"{\"model\":\"",
        delay: if slow { opts.slow_delay } else { opts.token_delay },
    };
    stream.send(sock, prompt, attempt, opts, &mut rng).await
}

/// Writes the pending bytes as several HTTP chunks of random small sizes, each flushed.
async fn flush_pieces(sock: &mut TcpStream, pending: &mut Vec<u8>, rng: &mut Rng) -> std::io::Result<()> {
    let mut rest: &[u8] = pending;
    while !rest.is_empty() {
        let n = if rng.below(4) == 0 { 1 + rng.below(200) } else { 1 + rng.below(7) } as usize;
        let n = n.min(rest.len());
        send_chunk(sock, &rest[..n]).await?;
        rest = &rest[n..];
    }
    pending.clear();
    Ok(())
}

async fn send_chunk(sock: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    sock.write_all(format!("{:x}\r\n", data.len()).as_bytes()).await?;
    sock.write_all(data).await?;
    sock.write_all(b"\r\n").await?;
    sock.flush().await
}

async fn finish_chunked(sock: &mut TcpStream) -> std::io::Result<()> {
    sock.write_all(b"0\r\n\r\n").await?;
    sock.flush().await?;
    sock.shutdown().await
}
