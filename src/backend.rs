//! What every model-server client gives the pipeline: a stream of [`Chunk`]s per reply, and
//! errors that say whether another attempt could succeed. The wire formats live in the clients
//! (`ollama_client.rs`, `openai_client.rs`), both behind [`ModelClient`].

use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde_json::Value;

pub use crate::request::{Message, Request, Role};

/// A reply: chunks ending in `Chunk::Done`, or an error item.
pub type ChunkStream = BoxStream<'static, Result<Chunk, ClientError>>;

/// What the startup check learnt about a server.
#[derive(Debug, Clone, Default)]
pub struct ServerInfo {
    pub version: Option<String>,
    pub capabilities: Vec<String>,
    /// The server is the test suite's fake: its text is made up.
    pub fake: bool,
}

/// A model server. Implementations are cheap to share between concurrent requests.
pub trait ModelClient: Send + Sync {
    /// The endpoint, for records, logs and the display.
    fn url(&self) -> &str;
    /// `ollama` or `openai`.
    fn kind(&self) -> &'static str;
    /// Before the first request: the server answers and has the model.
    fn check(&self) -> BoxFuture<'_, Result<ServerInfo, ClientError>>;
    /// Sends one request; the reply streams.
    fn stream<'a>(&'a self, req: Request<'a>) -> BoxFuture<'a, Result<ChunkStream, ClientError>>;
}

/// One piece of a streamed reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    /// Response text.
    Content(String),
    /// Reasoning text, kept apart from the response.
    Thinking(String),
    /// The reply is complete; the server's figures.
    Done(Stats),
}

/// The server's figures for one reply; every field may be absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub done_reason: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub total_duration_ns: Option<u64>,
    pub load_duration_ns: Option<u64>,
    pub eval_duration_ns: Option<u64>,
    /// The server sent no token counts; `completion_tokens` counts the streamed pieces instead.
    pub completion_tokens_estimated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
    /// The request went out but the connection ended before any answer (a reset, a closed socket).
    #[error("no answer from {url}: {message}")]
    NoResponse { url: String, message: String },
    /// Connected, but no response headers within the idle limit.
    #[error("{url} sent no answer for {wait:.0?}")]
    NoAnswer { url: String, wait: Duration },
    #[error("{url} answered HTTP {status}: {message}")]
    Status { url: String, status: u16, message: String, retry_after: Option<Duration> },
    #[error("model {model:?} not found on {url}")]
    ModelNotFound { url: String, model: String },
    #[error("the server reported an error mid-stream: {0}")]
    StreamError(String),
    #[error("the reply ended before the server said it was done (truncated stream)")]
    Truncated,
    /// No token, thinking text or stats for this long (keep-alive comments and blank lines do not count).
    #[error("no data for {0:.0?}: the request stalled")]
    Idle(Duration),
    #[error("the connection broke while reading the reply: {0}")]
    Body(String),
    #[error("unreadable reply line: {message} (line starts {start:?})")]
    Decode { message: String, start: String },
    #[error("{0}")]
    Frame(String),
    /// The startup check failed; the message says what to do.
    #[error("{0}")]
    Check(String),
}

impl ClientError {
    /// Whether another attempt could succeed: network trouble, a busy or failing server, a broken
    /// stream. Other 4xx answers are the request's fault and would fail again.
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::Status { status, .. } => matches!(status, 408 | 409 | 429) || *status >= 500,
            ClientError::ModelNotFound { .. } | ClientError::Frame(_) | ClientError::Check(_) => false,
            _ => true,
        }
    }

    /// Trouble that says the server itself may be gone, not that this request is bad: no
    /// connection, a connection closed before any answer, no answer at all, or a gateway/busy
    /// status (502, 503, 504). Whether it really is down is then asked with a probe.
    pub fn endpoint_trouble(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::NoResponse { .. } | ClientError::NoAnswer { .. } => true,
            ClientError::Status { status, .. } => matches!(status, 502..=504),
            _ => false,
        }
    }

    /// A 5xx answer (for the rule that 5xx on every request, across rows, means the server is sick).
    pub fn server_status(&self) -> bool {
        matches!(self, ClientError::Status { status, .. } if *status >= 500)
    }

    /// The server's own word on when to come back (429/503 `retry-after`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// `Retry-After` (seconds) or `retry-after-ms`, as servers say when to come back.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).and_then(|s| s.trim().parse::<f64>().ok());
    let secs = get("retry-after-ms").map(|ms| ms / 1000.0).or_else(|| get("retry-after"))?;
    // Not capped here: the pipeline caps it at `run.max_retry_after_secs` and says so in the log.
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)))
}

/// The message of an error body: `{"error":"..."}`, `{"error":{"message":...}}`, or the text.
pub fn error_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        match v.get("error") {
            Some(Value::String(s)) => return s.clone(),
            Some(Value::Object(o)) => {
                if let Some(Value::String(s)) = o.get("message") {
                    return s.clone();
                }
            }
            _ => {}
        }
        if let Some(Value::String(s)) = v.get("message").or_else(|| v.get("detail")) {
            return s.clone();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(no body)".to_owned()
    } else {
        text.chars().take(300).collect()
    }
}

/// An error with its causes, `a: b: c`, as reqwest hides the useful part in the source chain.
/// Credentials in a URL (`http://user:secret@host`) never make it into the text.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = crate::config::scrub_credentials(&e.to_string());
    let mut src = e.source();
    while let Some(inner) = src {
        let t = crate::config::scrub_credentials(&inner.to_string());
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

/// Turns a reqwest send error into a client error: no response came, so the server may be gone.
pub fn send_error(url: &str, e: &reqwest::Error) -> ClientError {
    if e.is_connect() || e.is_timeout() {
        ClientError::Connect { url: url.to_owned(), message: error_chain(e) }
    } else {
        ClientError::NoResponse { url: url.to_owned(), message: error_chain(e) }
    }
}

/// Sends a request whose reply streams, and checks its status. Headers come with the first
/// token, so the idle limit also covers model load and prompt evaluation. A non-2xx answer is a
/// `Status` error with the body's message and the server's `retry-after`.
pub async fn open_stream(req: reqwest::RequestBuilder, url: &str, idle: Duration) -> Result<reqwest::Response, ClientError> {
    let resp = match tokio::time::timeout(idle, req.send()).await {
        Err(_) => return Err(ClientError::NoAnswer { url: url.to_owned(), wait: idle }),
        Ok(Err(e)) => return Err(send_error(url, &e)),
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = retry_after(resp.headers());
    let body = tokio::time::timeout(idle, resp.bytes()).await.ok().and_then(Result::ok).unwrap_or_default();
    Err(ClientError::Status { url: url.to_owned(), status: status.as_u16(), message: error_message(&body), retry_after })
}

/// Reply bytes as I/O results for the line framer; a broken connection is an I/O error.
pub fn body_bytes(resp: reqwest::Response) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send {
    use futures::StreamExt;
    resp.bytes_stream().map(|r| r.map_err(|e| std::io::Error::other(error_chain(&e))))
}

/// A framing error as a client error: a broken connection, an overlong line.
pub fn frame_error(e: crate::framing::FrameError) -> ClientError {
    use crate::framing::FrameError;
    match e {
        FrameError::Io(e) => ClientError::Body(e.to_string()),
        e @ FrameError::LineTooLong { .. } => ClientError::Frame(e.to_string()),
    }
}

/// A reply with a limit on the silence between pieces of *data*: a token, thinking text or the
/// final stats. Bytes that carry none (SSE `: keep-alive` comments, blank NDJSON lines, empty
/// deltas) do not reset it, so a server that only keeps the connection warm still stalls out.
/// One timer per reply, re-armed lazily: each chunk only notes the time.
pub fn idle_chunks(inner: ChunkStream, idle: Duration) -> ChunkStream {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::time::{Instant, Sleep};

    struct Idle {
        inner: ChunkStream,
        sleep: Pin<Box<Sleep>>,
        last: Instant,
        idle: Duration,
        ended: bool,
    }
    impl futures::Stream for Idle {
        type Item = Result<Chunk, ClientError>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            if self.ended {
                return Poll::Ready(None);
            }
            match self.inner.as_mut().poll_next(cx) {
                Poll::Ready(Some(item)) => {
                    self.last = Instant::now();
                    return Poll::Ready(Some(item));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
            loop {
                if self.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let due = self.last + self.idle;
                if due <= Instant::now() {
                    self.ended = true;
                    return Poll::Ready(Some(Err(ClientError::Idle(self.idle))));
                }
                self.sleep.as_mut().reset(due);
            }
        }
    }
    let now = Instant::now();
    Box::pin(Idle { inner, sleep: Box::pin(tokio::time::sleep_until(now + idle)), last: now, idle, ended: false })
}

/// Reply bytes framed into lines.
fn lines<S>(bytes: S) -> tokio_util::codec::FramedRead<tokio_util::io::StreamReader<std::pin::Pin<Box<S>>, bytes::Bytes>, crate::framing::LineCodec>
where
    S: futures::Stream<Item = std::io::Result<bytes::Bytes>>,
{
    tokio_util::codec::FramedRead::new(tokio_util::io::StreamReader::new(Box::pin(bytes)), crate::framing::LineCodec::default())
}

/// What a wire format does with the complete lines of a streamed reply (NDJSON for Ollama, SSE
/// for OpenAI-compatible servers). Framing, the order of chunks and errors are
/// [`decode_lines`]'s; a format only reads lines.
pub trait LineDecoder: Send + 'static {
    /// One complete line (without its `\n` or `\r\n`): chunks go to `out`. Ok(true) when the
    /// reply is complete; an Err ends it.
    fn line(&mut self, line: &[u8], out: &mut std::collections::VecDeque<Chunk>) -> Result<bool, ClientError>;
    /// The bytes ran out before the reply said it was complete: the last chunks, or why it is
    /// no reply (usually [`ClientError::Truncated`]).
    fn end(&mut self, out: &mut std::collections::VecDeque<Chunk>) -> Result<(), ClientError>;
}

/// Reply bytes, framed into lines, decoded by a wire format into chunks. The stream ends after
/// the chunk that completes the reply, or with the first error.
pub fn decode_lines<S, D>(bytes: S, decoder: D) -> impl futures::Stream<Item = Result<Chunk, ClientError>> + Send
where
    S: futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
    D: LineDecoder,
{
    use futures::StreamExt;
    struct St<L, D> {
        lines: L,
        decoder: D,
        pending: std::collections::VecDeque<Chunk>,
        complete: bool,
    }
    let st = St { lines: lines(bytes), decoder, pending: Default::default(), complete: false };
    futures::stream::unfold(Some(st), |state| async move {
        let mut st = state?;
        loop {
            if let Some(c) = st.pending.pop_front() {
                return Some((Ok(c), Some(st)));
            }
            if st.complete {
                return None;
            }
            let step = match st.lines.next().await {
                Some(Ok(line)) => st.decoder.line(&line, &mut st.pending).map(|complete| st.complete = complete),
                Some(Err(e)) => Err(frame_error(e)),
                None => {
                    st.complete = true;
                    st.decoder.end(&mut st.pending)
                }
            };
            if let Err(e) = step {
                return Some((Err(e), None));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies() {
        assert_eq!(error_message(br#"{"error":"model 'x' not found"}"#), "model 'x' not found");
        assert_eq!(error_message(br#"{"error":{"message":"bad","type":"x","code":null}}"#), "bad");
        assert_eq!(error_message(b""), "(no body)");
        assert_eq!(error_message(b"plain"), "plain");
    }

    #[test]
    fn retry_after_headers() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
    }
}
