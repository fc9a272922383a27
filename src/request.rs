//! A request, as data: the messages, options and output format a stage sends (what every client
//! writes in its own wire format), the per-sample and re-ask seeds, and the typed key that
//! names everything that shapes a reply.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::record::fnv1a64;

/// Who says a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One turn of a conversation, as both wire formats write it (`{"role": ..., "content": ...}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Message<'a> {
    pub role: Role,
    pub content: &'a str,
}

/// One request: what the pipeline asks of any backend. A stage is described by data: its
/// messages (a system prompt, the rendered user prompt, later earlier turns), its options and
/// its output format.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub messages: &'a [Message<'a>],
    /// Sampling options in Ollama's names; a client maps them to its wire names.
    pub options: &'a Map<String, Value>,
    /// A JSON schema the reply must follow, sent in the server's dialect.
    pub schema: Option<&'a Value>,
}

impl<'a> Request<'a> {
    /// The system prompt (the first system message), for APIs that take it apart.
    pub fn system(&self) -> Option<&'a str> {
        self.messages.iter().find(|m| m.role == Role::System).map(|m| m.content)
    }

    /// The last user message, for APIs that take one prompt (Ollama's `/api/generate`).
    pub fn prompt(&self) -> &'a str {
        self.messages.iter().rev().find(|m| m.role == Role::User).map(|m| m.content).unwrap_or("")
    }
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
    /// A later stage's request: the key of the request whose reply it was made from, so that
    /// keys chain (part of the key only when set: one-stage runs and first stages keep theirs).
    pub parent: Option<u128>,
}

/// The canonical form that is hashed: an object with its keys in sorted order (as serde_json's
/// sorted map writes them), so that keys stay byte-identical to those of every earlier version.
#[derive(Serialize)]
struct Canonical<'a> {
    api: &'a str,
    id: &'a str,
    model: &'a str,
    options: CanonicalOptions<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
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

const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The two hashes of [`RequestKey::value`] over bytes written to it, in one pass (two
/// independent chains, so the second costs little).
struct KeyHasher {
    a: u64,
    b: u64,
}

impl KeyHasher {
    fn new() -> KeyHasher {
        let a: u64 = fnv1a64(&[]);
        // The state of the second hash after its first part ("k2" and the part separator).
        let b = b"k2".iter().fold(a, |h, x| (h ^ u64::from(*x)).wrapping_mul(FNV_PRIME));
        KeyHasher { a, b: (b ^ 0xff).wrapping_mul(FNV_PRIME) }
    }

    fn finish(&self) -> u128 {
        let a = (self.a ^ 0xff).wrapping_mul(FNV_PRIME);
        let b = (self.b ^ 0xff).wrapping_mul(FNV_PRIME);
        (u128::from(a) << 64) | u128::from(splitmix64(b))
    }
}

impl std::io::Write for KeyHasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (mut a, mut b) = (self.a, self.b);
        for x in buf {
            a = (a ^ u64::from(*x)).wrapping_mul(FNV_PRIME);
            b = (b ^ u64::from(*x)).wrapping_mul(FNV_PRIME);
        }
        (self.a, self.b) = (a, b);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl RequestKey<'_> {
    /// The canonical bytes of the request.
    pub fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(&self.canonical_form()).unwrap_or_default()
    }

    fn canonical_form(&self) -> Canonical<'_> {
        Canonical {
            api: self.api,
            id: self.id,
            model: self.model,
            options: CanonicalOptions { options: self.options, schema: self.schema, think: self.think },
            parent: self.parent.map(|k| format!("{k:032x}")),
            prompt: self.prompt,
            sample: self.sample,
            system: self.system,
            v: 1,
        }
    }

    /// The key as a number: two 64-bit hashes of the canonical bytes, `fnv1a64([canon])` and
    /// `splitmix64(fnv1a64(["k2", canon]))`, computed in one pass (two independent chains, so
    /// the second costs little).
    pub fn value(&self) -> u128 {
        let mut h = KeyHasher::new();
        // Written straight into the hashes: the canonical bytes are never held.
        let _ = serde_json::to_writer(&mut h, &self.canonical_form());
        h.finish()
    }

    /// 32 hex digits (see [`RequestKey::value`]).
    pub fn hash(&self) -> String {
        format!("{:032x}", self.value())
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
        let base = RequestKey { id: "1", sample: 0, model: "m", api: "chat", system: Some("s \"q\" 日本"), prompt: "p\n🎉", options: &o, think: None, schema: None, parent: None };
        let k = base.hash();
        // The one-pass form is the two hashes as first written.
        let canon = base.canonical();
        assert_eq!(k, format!("{:016x}{:016x}", fnv1a64(&[&canon]), splitmix64(fnv1a64(&[b"k2", &canon]))));
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
        assert_ne!(k, RequestKey { parent: Some(7), ..base }.hash());
        assert_ne!(RequestKey { parent: Some(8), ..base }.hash(), RequestKey { parent: Some(7), ..base }.hash());
        let o2: Map<String, Value> = serde_json::from_str(r#"{"temperature": 0.8}"#).unwrap();
        assert_ne!(k, RequestKey { options: &o2, ..base }.hash());
    }
}
