//! What the dataset holds: one `Record` per (row, sample) that finished, one `Failure` per
//! (row, sample) that ran out of retries, and the stable numbers derived from a request
//! (its per-sample seed and its key).

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
    pub fn csv_fields(&self, schema: bool) -> Vec<String> {
        let mut row = self.csv_row().to_vec();
        if schema {
            row.push(self.parsed.as_ref().map(Value::to_string).unwrap_or_default());
            row.push(self.invalid.map(|n| n.to_string()).unwrap_or_default());
        }
        row
    }

    /// The CSV row, in [`CSV_COLUMNS`] order; absent values are empty cells.
    pub fn csv_row(&self) -> [String; 18] {
        fn opt<T: ToString>(v: &Option<T>) -> String {
            v.as_ref().map(ToString::to_string).unwrap_or_default()
        }
        [
            self.id.clone(),
            self.sample.to_string(),
            self.model.clone(),
            opt(&self.system),
            self.prompt.clone(),
            self.response.clone(),
            opt(&self.thinking),
            opt(&self.done_reason),
            opt(&self.prompt_tokens),
            opt(&self.completion_tokens),
            self.duration_ms.to_string(),
            self.attempts.to_string(),
            self.finished_at.clone(),
            opt(&self.seed),
            opt(&self.eval_duration_ms),
            self.key.clone(),
            opt(&self.endpoint),
            self.tokens_estimated.to_string(),
        ]
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

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The seed for one sample. With one sample per prompt it is the configured seed itself; with
/// several, each (row id, sample) gets its own, derived stably, so samples differ yet a re-run
/// repeats them. Kept below 2^31 so every backend takes it.
pub fn derive_seed(seed: i64, samples_per_prompt: u32, id: &str, sample: u32) -> i64 {
    if samples_per_prompt <= 1 {
        return seed;
    }
    let h = fnv1a64(&[&seed.to_le_bytes(), id.as_bytes(), &sample.to_le_bytes()]);
    (splitmix64(h) & 0x7fff_ffff) as i64
}

/// The seed of re-ask `n` (1-based) of a (row, sample) after an invalid structured reply: new,
/// so that a deterministic server does not return the same broken text, yet stable, so that a
/// re-run asks the same.
pub fn reask_seed(seed: i64, id: &str, sample: u32, n: u32) -> i64 {
    let h = fnv1a64(&[b"re-ask", &seed.to_le_bytes(), id.as_bytes(), &sample.to_le_bytes(), &n.to_le_bytes()]);
    (splitmix64(h) & 0x7fff_ffff) as i64
}

/// Everything that shapes a response, named: its stable hash is the record's `key`. A record
/// whose key differs from the one the current config gives was made by another request (edited
/// template, other model, options or schema).
#[derive(Debug, Clone, Copy)]
pub struct RequestKey<'a> {
    pub id: &'a str,
    pub sample: u32,
    pub model: &'a str,
    /// `chat` | `generate` (the Ollama API; `chat` for OpenAI-compatible servers).
    pub api: &'a str,
    pub system: Option<&'a str>,
    pub prompt: &'a str,
    /// Sampling options as sent, the per-sample seed included.
    pub options: &'a Map<String, Value>,
    pub think: Option<&'a Value>,
    /// Part of the key only when set: runs without a schema keep their keys.
    pub schema: Option<&'a Value>,
}

/// The canonical form that is hashed: an object with its keys in sorted order (as serde_json's
/// sorted map writes them), so that keys stay byte-identical to those of every earlier version.
#[derive(Serialize)]
struct Canonical<'a> {
    api: &'a str,
    id: &'a str,
    model: &'a str,
    options: CanonicalOptions<'a>,
    prompt: &'a str,
    sample: u32,
    system: Option<&'a str>,
    v: u32,
}

#[derive(Serialize)]
struct CanonicalOptions<'a> {
    options: &'a Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema: Option<&'a Value>,
    think: Option<&'a Value>,
}

impl RequestKey<'_> {
    /// The canonical bytes of the request.
    pub fn canonical(&self) -> Vec<u8> {
        let c = Canonical {
            api: self.api,
            id: self.id,
            model: self.model,
            options: CanonicalOptions { options: self.options, schema: self.schema, think: self.think },
            prompt: self.prompt,
            sample: self.sample,
            system: self.system,
            v: 1,
        };
        serde_json::to_vec(&c).unwrap_or_default()
    }

    /// 32 hex digits: two 64-bit hashes of the canonical bytes.
    pub fn hash(&self) -> String {
        let canon = self.canonical();
        let a = fnv1a64(&[&canon]);
        let b = splitmix64(fnv1a64(&[b"k2", &canon]));
        format!("{a:016x}{b:016x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINNED_SEED: i64 = 346_718_100;

    #[test]
    fn seeds_are_stable_and_distinct() {
        assert_eq!(derive_seed(42, 1, "a", 0), 42);
        let s: Vec<i64> = (0..4).map(|i| derive_seed(42, 4, "row-1", i)).collect();
        assert_eq!(s, (0..4).map(|i| derive_seed(42, 4, "row-1", i)).collect::<Vec<_>>());
        let mut d = s.clone();
        d.dedup();
        assert_eq!(d.len(), 4);
        assert_ne!(derive_seed(42, 4, "row-1", 0), derive_seed(42, 4, "row-2", 0));
        assert_ne!(derive_seed(42, 4, "row-1", 0), derive_seed(43, 4, "row-1", 0));
        assert!(s.iter().all(|x| (0..1 << 31).contains(x)));
        // Pinned: a change here would silently change every multi-sample dataset.
        assert_eq!(derive_seed(42, 4, "row-1", 0), PINNED_SEED);
    }

    /// The key as every version before `RequestKey` computed it: a `Value` built and printed.
    fn value_key(k: &RequestKey<'_>) -> String {
        let mut key_options = serde_json::json!({ "options": k.options, "think": k.think });
        if let Some(s) = k.schema {
            key_options["schema"] = s.clone();
        }
        let canon = serde_json::json!({
            "v": 1, "id": k.id, "sample": k.sample, "model": k.model, "api": k.api,
            "system": k.system, "prompt": k.prompt, "options": key_options,
        })
        .to_string();
        let a = fnv1a64(&[canon.as_bytes()]);
        let b = splitmix64(fnv1a64(&[b"k2", canon.as_bytes()]));
        format!("{a:016x}{b:016x}")
    }

    #[test]
    fn keys_change_with_what_was_asked_and_match_the_old_canonical_form() {
        let o: Map<String, Value> = serde_json::from_str(r#"{"temperature": 0.7, "seed": 42, "stop": ["\n", "é"], "num_predict": 64}"#).unwrap();
        let think = serde_json::json!("high");
        let schema = serde_json::json!({"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}});
        let base = RequestKey { id: "1", sample: 0, model: "m", api: "chat", system: Some("s \"q\" 日本"), prompt: "p\n🎉", options: &o, think: None, schema: None };
        let k = base.hash();
        assert_eq!(k.len(), 32);
        // Byte for byte what datasets written before hold (tests/fixtures/pre-schema checks it end to end).
        for v in [
            base,
            RequestKey { think: Some(&think), ..base },
            RequestKey { system: None, ..base },
            RequestKey { schema: Some(&schema), ..base },
            RequestKey { api: "generate", sample: 3, ..base },
        ] {
            assert_eq!(v.hash(), value_key(&v), "{v:?}");
        }
        assert_ne!(k, RequestKey { prompt: "p2", ..base }.hash());
        assert_ne!(k, RequestKey { system: None, ..base }.hash());
        assert_ne!(k, RequestKey { sample: 1, ..base }.hash());
        assert_ne!(k, RequestKey { schema: Some(&schema), ..base }.hash());
        let o2: Map<String, Value> = serde_json::from_str(r#"{"temperature": 0.8}"#).unwrap();
        assert_ne!(k, RequestKey { options: &o2, ..base }.hash());
    }
}
