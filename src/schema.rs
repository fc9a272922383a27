//! Structured output: the JSON schema a run asks replies to follow, compiled once at config time,
//! and the check of every reply against it. Servers constrain decoding to a schema only in part
//! (types and required keys, often not `minimum`/`maximum`), so a reply counts only once it has
//! been parsed and validated here.

use std::path::Path;

use serde_json::Value;

/// A schema, as given and compiled (draft 2020-12; no reference is ever fetched).
pub struct OutputSchema {
    pub value: Value,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for OutputSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputSchema").field("value", &self.value).finish()
    }
}

/// Why a reply does not count.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    /// `/score: 100 is greater than the maximum of 10`, or why it is no JSON at all.
    pub errors: Vec<String>,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.errors.join("; "))
    }
}

impl OutputSchema {
    /// Parses and compiles a schema; `origin` names where it came from (a file, or a config key),
    /// and a JSON syntax error gives its line and column there.
    pub fn parse(text: &str, origin: &str) -> Result<OutputSchema, String> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| format!("{origin}:{}:{}: not JSON: {e}", e.line(), e.column()))?;
        if !(value.is_object() || value.is_boolean()) {
            return Err(format!("{origin}: a JSON schema is an object (e.g. {{\"type\": \"object\", ...}})"));
        }
        let validator = jsonschema::draft202012::new(&value).map_err(|e| {
            let at = e.instance_path().as_str();
            format!("{origin}: not a valid JSON schema (draft 2020-12){}: {e}", if at.is_empty() { String::new() } else { format!(" at {at}") })
        })?;
        Ok(OutputSchema { value, validator })
    }

    pub fn load(path: &Path) -> Result<OutputSchema, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The reply's content as JSON, validated: the value, or every reason it does not count.
    /// A reply wrapped in one Markdown code fence is read from inside it.
    pub fn check(&self, content: &str) -> Result<Value, Invalid> {
        let text = unfence(content);
        let value: Value = serde_json::from_str(text).map_err(|e| Invalid {
            errors: vec![if e.is_eof() { format!("not complete JSON (cut off?): {e}") } else { format!("not JSON: {e}") }],
        })?;
        let errors: Vec<String> = self
            .validator
            .iter_errors(&value)
            .map(|e| {
                let at = e.instance_path().as_str().to_owned();
                format!("{}: {e}", if at.is_empty() { "/" } else { at.as_str() })
            })
            .collect();
        if errors.is_empty() {
            Ok(value)
        } else {
            Err(Invalid { errors })
        }
    }
}

/// The inside of one Markdown code fence (```` ```json ... ``` ````), or the text as it is.
fn unfence(text: &str) -> &str {
    let t = text.trim();
    let Some(rest) = t.strip_prefix("```") else { return text };
    let Some(body) = rest.strip_suffix("```") else { return text };
    // The info string (`json`) runs to the end of the first line.
    match body.split_once('\n') {
        Some((info, inner)) if !info.contains('{') && !info.contains('[') => inner,
        _ => body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JUDGE: &str = r#"{"type":"object","properties":{"score":{"type":"integer","minimum":1,"maximum":10},"reason":{"type":"string"}},"required":["score","reason"],"additionalProperties":false}"#;

    #[test]
    fn replies_are_parsed_validated_and_unfenced() {
        let s = OutputSchema::parse(JUDGE, "judge.schema.json").unwrap();
        assert_eq!(s.check(r#"{"score": 7, "reason": "ok"}"#).unwrap()["score"], 7);
        assert_eq!(s.check("```json\n{\"score\": 3, \"reason\": \"meh\"}\n```\n").unwrap()["score"], 3);
        assert_eq!(s.check("```\n{\"score\": 3, \"reason\": \"meh\"}\n```").unwrap()["score"], 3);
        let e = s.check(r#"{"score": 100, "reason": "x"}"#).unwrap_err();
        assert_eq!(e.errors.len(), 1);
        assert!(e.errors[0].starts_with("/score: 100 is greater than the maximum of 10"), "{e}");
        let e = s.check(r#"{"score": 5, "rea"#).unwrap_err();
        assert!(e.errors[0].contains("cut off"), "{e}");
        let e = s.check(r#"{"reason": 5}"#).unwrap_err();
        assert!(e.errors.iter().any(|m| m.contains("score")) && e.errors.iter().any(|m| m.starts_with("/reason")), "{e}");
    }

    #[test]
    fn bad_schemas_say_where() {
        let e = OutputSchema::parse("{\n  \"type\": \"object\",\n  oops\n}", "s.json").unwrap_err();
        assert!(e.starts_with("s.json:3:"), "{e}");
        let e = OutputSchema::parse(r#"{"type": "objekt"}"#, "s.json").unwrap_err();
        assert!(e.contains("not a valid JSON schema"), "{e}");
        assert!(OutputSchema::parse("[1]", "s.json").is_err());
    }
}
