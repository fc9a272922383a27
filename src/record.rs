//! What the dataset holds: one `Record` per (row, sample) that finished, one `Failure` per
//! (row, sample) that ran out of retries.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One finished response. Field order is the JSONL and CSV column order. Reading is lenient
/// (absent fields take their defaults) so that a CSV, which has no `input`, reads back too.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Record {
    pub id: String,
    /// 0-based sample index.
    pub sample: u32,
    pub model: String,
    /// The system prompt sent, or null when none was.
    pub system: Option<String>,
    /// The rendered user prompt.
    pub prompt: String,
    /// The response text, byte-exact as the model produced it.
    pub response: String,
    /// Reasoning text kept apart from the response; null when the model produced none.
    pub thinking: Option<String>,
    /// `stop`, `length`, ...; null when the server did not say.
    pub done_reason: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Wall time of the successful attempt, request sent to last byte.
    pub duration_ms: u64,
    /// Attempts it took, 1 when the first one succeeded.
    pub attempts: u32,
    /// RFC 3339, UTC.
    pub finished_at: String,
    /// The sampling seed sent with this request; null when none was set.
    pub seed: Option<i64>,
    /// The server's generation time (Ollama's `eval_duration`), for tokens/s.
    pub eval_duration_ms: Option<f64>,
    /// Hash of what was asked (id, sample, model, prompts, options): see [`request_key`].
    pub key: String,
    /// The server that answered.
    pub endpoint: Option<String>,
    /// The server sent no token counts: `completion_tokens` counts the streamed pieces instead.
    pub tokens_estimated: bool,
    /// The original input row.
    pub input: Map<String, Value>,
    /// With a schema: the reply's JSON, validated (absent from runs without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parsed: Option<Value>,
    /// With a schema: how many invalid replies came before this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid: Option<u32>,
    /// Multi-stage runs: the stage's name (absent from one-stage runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// Multi-stage runs, after the first stage: the id of the row this one came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Multi-stage runs, a stage with `keep`: whether the row went on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept: Option<bool>,
}

/// The CSV columns: the record's scalar fields in the same order (`input` is JSONL only).
pub const CSV_COLUMNS: &[&str] = &[
    "id", "sample", "model", "system", "prompt", "response", "thinking", "done_reason", "prompt_tokens",
    "completion_tokens", "duration_ms", "attempts", "finished_at", "seed", "eval_duration_ms", "key", "endpoint",
    "tokens_estimated",
];

/// Extra CSV columns, at the end, of a run with a schema.
pub const SCHEMA_CSV_COLUMNS: &[&str] = &["parsed", "invalid"];

/// The CSV header of a run, with or without a schema.
pub fn csv_columns(schema: bool) -> Vec<&'static str> {
    let mut c = CSV_COLUMNS.to_vec();
    if schema {
        c.extend_from_slice(SCHEMA_CSV_COLUMNS);
    }
    c
}

impl Record {
    /// The CSV row of a run with or without a schema ([`csv_columns`]): `parsed` as compact JSON.
    /// The texts are borrowed, not copied (a long reply is not held twice while it is written).
    pub fn csv_fields(&self, schema: bool) -> Vec<Cow<'_, str>> {
        let mut row: Vec<Cow<'_, str>> = self.csv_row().into();
        if schema {
            row.push(self.parsed.as_ref().map(Value::to_string).unwrap_or_default().into());
            row.push(self.invalid.map(|n| n.to_string()).unwrap_or_default().into());
        }
        row
    }

    /// The CSV row, in [`CSV_COLUMNS`] order; absent values are empty cells.
    pub fn csv_row(&self) -> [Cow<'_, str>; 18] {
        fn opt<T: ToString>(v: &Option<T>) -> Cow<'static, str> {
            v.as_ref().map(|v| Cow::Owned(v.to_string())).unwrap_or_default()
        }
        fn text(s: &Option<String>) -> Cow<'_, str> {
            s.as_deref().map(Cow::Borrowed).unwrap_or_default()
        }
        [
            Cow::Borrowed(self.id.as_str()),
            self.sample.to_string().into(),
            Cow::Borrowed(self.model.as_str()),
            text(&self.system),
            Cow::Borrowed(self.prompt.as_str()),
            Cow::Borrowed(self.response.as_str()),
            text(&self.thinking),
            text(&self.done_reason),
            opt(&self.prompt_tokens),
            opt(&self.completion_tokens),
            self.duration_ms.to_string().into(),
            self.attempts.to_string().into(),
            Cow::Borrowed(self.finished_at.as_str()),
            opt(&self.seed),
            opt(&self.eval_duration_ms),
            Cow::Borrowed(self.key.as_str()),
            text(&self.endpoint),
            self.tokens_estimated.to_string().into(),
        ]
    }

    /// Bytes of text the record holds (prompts, reply, thinking): what its line is about as long as.
    pub fn text_len(&self) -> usize {
        self.prompt.len() + self.response.len() + self.system.as_ref().map_or(0, String::len) + self.thinking.as_ref().map_or(0, String::len)
    }
}

/// A (row, sample) that failed after all its attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub id: String,
    pub sample: u32,
    pub model: String,
    pub error: String,
    pub attempts: u32,
    /// Whether another attempt could succeed (network, busy server) or not (bad request).
    pub retryable: bool,
    pub key: String,
    /// The server of the last attempt.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// RFC 3339, UTC.
    pub when: String,
    /// With a schema: why the last reply did not validate (`/score: 100 is greater than ...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_errors: Option<Vec<String>>,
    /// With a schema: the last reply as the model sent it, to see what it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
    /// Multi-stage runs: the stage that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// Multi-stage runs, after the first stage: the id of the row this one came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// RFC 3339 timestamp with milliseconds, UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// FNV-1a, 64 bits: stable across platforms, versions and runs (std's hasher is not).
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator byte that cannot be confused with content boundaries.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
