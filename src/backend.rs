//! What every model-server client gives the pipeline: a stream of [`Chunk`]s per reply, and
//! errors that say whether another attempt could succeed. The wire formats live in the clients.

use std::time::Duration;

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
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
    #[error("{url} answered HTTP {status}: {message}")]
    Status { url: String, status: u16, message: String, retry_after: Option<Duration> },
    #[error("model {model:?} not found on {url}")]
    ModelNotFound { url: String, model: String },
    #[error("the server reported an error mid-stream: {0}")]
    StreamError(String),
    #[error("the reply ended before the server said it was done (truncated stream)")]
    Truncated,
    #[error("no data for {0:.0?}: the request stalled")]
    Idle(Duration),
    #[error("the connection broke while reading the reply: {0}")]
    Body(String),
    #[error("unreadable reply line: {message} (line starts {start:?})")]
    Decode { message: String, start: String },
    #[error("{0}")]
    Frame(String),
}

impl ClientError {
    /// Whether another attempt could succeed: network trouble, a busy or failing server, a broken
    /// stream. Other 4xx answers are the request's fault and would fail again.
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::Status { status, .. } => matches!(status, 408 | 409 | 429) || *status >= 500,
            ClientError::ModelNotFound { .. } | ClientError::Frame(_) => false,
            _ => true,
        }
    }

    /// The server's own word on when to come back (429/503 `retry-after`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}
