//! The user-prompt template: minijinja with strict undefined, so that a field a row lacks is an
//! error naming the row and the field instead of an empty hole in a training prompt.

use minijinja::{AutoEscape, Environment, UndefinedBehavior};

use crate::input::Row;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template {origin}: {message}")]
    Syntax { origin: String, message: String },
    #[error("row {id} (line {line}): the template uses `{field}`, which the row does not have (it has: {have})")]
    MissingField { id: String, line: u64, field: String, have: String },
    #[error("row {id} (line {line}): cannot render the template: {message}")]
    Render { id: String, line: u64, message: String },
}

pub struct PromptTemplate {
    env: Environment<'static>,
    /// Top-level names the template reads, checked against each row before rendering.
    variables: Vec<String>,
}

const NAME: &str = "user_prompt";

impl PromptTemplate {
    pub fn new(source: String, origin: &str) -> Result<PromptTemplate, TemplateError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.add_template_owned(NAME, source).map_err(|e| TemplateError::Syntax {
            origin: origin.to_owned(),
            message: describe(&e),
        })?;
        let tmpl = env.get_template(NAME).map_err(|e| TemplateError::Syntax { origin: origin.to_owned(), message: describe(&e) })?;
        let mut variables: Vec<String> = tmpl.undeclared_variables(false).into_iter().collect();
        variables.sort();
        Ok(PromptTemplate { env, variables })
    }

    /// Names the template reads from each row.
    pub fn variables(&self) -> &[String] {
        &self.variables
    }

    /// Renders with a context built by the caller (multi-stage rows): `names` are the context's
    /// top-level names, checked against the template's variables first.
    pub fn render_context(&self, id: &str, line: u64, ctx: minijinja::Value, names: &mut dyn Iterator<Item = &str>) -> Result<String, TemplateError> {
        let have: Vec<&str> = names.collect();
        for v in &self.variables {
            if !have.contains(&v.as_str()) && self.env.globals().all(|(g, _)| g != v.as_str()) {
                let mut have = have.clone();
                have.sort();
                return Err(TemplateError::MissingField { id: id.to_owned(), line, field: v.clone(), have: have.join(", ") });
            }
        }
        let tmpl = self.env.get_template(NAME).map_err(|e| TemplateError::Render { id: id.to_owned(), line, message: describe(&e) })?;
        tmpl.render(ctx).map_err(|e| TemplateError::Render { id: id.to_owned(), line, message: describe(&e) })
    }

    pub fn render(&self, row: &Row) -> Result<String, TemplateError> {
        for v in &self.variables {
            if !row.fields.contains_key(v) && self.env.globals().all(|(g, _)| g != v.as_str()) {
                let mut have: Vec<&str> = row.fields.keys().map(String::as_str).collect();
                have.sort();
                return Err(TemplateError::MissingField {
                    id: row.id.clone(),
                    line: row.line,
                    field: v.clone(),
                    have: if have.is_empty() { "no fields".into() } else { have.join(", ") },
                });
            }
        }
        let tmpl = self.env.get_template(NAME).map_err(|e| TemplateError::Render {
            id: row.id.clone(),
            line: row.line,
            message: describe(&e),
        })?;
        tmpl.render(&row.fields).map_err(|e| TemplateError::Render { id: row.id.clone(), line: row.line, message: describe(&e) })
    }
}

/// A stage's `keep`: a minijinja expression over the row (input fields and the stages so far),
/// strict about undefined names like the templates.
pub struct KeepExpr {
    env: Environment<'static>,
    source: String,
}

fn strict_env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env
}

/// The top-level names an expression reads (or why it does not compile).
pub fn expression_variables(source: &str) -> Result<Vec<String>, String> {
    let env = strict_env();
    let expr = env.compile_expression(source).map_err(|e| format!("{source:?} is not an expression: {}", describe(&e)))?;
    let mut vars: Vec<String> = expr.undeclared_variables(false).into_iter().collect();
    vars.sort();
    Ok(vars)
}

impl KeepExpr {
    pub fn new(source: &str) -> Result<KeepExpr, String> {
        expression_variables(source)?;
        Ok(KeepExpr { env: strict_env(), source: source.to_owned() })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the row goes on: the expression's truth (Jinja's: `0`, `""`, `none`, empty lists
    /// are false), or why it cannot be evaluated.
    pub fn eval(&self, ctx: minijinja::Value) -> Result<bool, String> {
        let expr = self.env.compile_expression(&self.source).map_err(|e| describe(&e))?;
        expr.eval(ctx).map(|v| v.is_true()).map_err(|e| format!("keep = {:?}: {}", self.source, describe(&e)))
    }
}

/// minijinja's message with the line it points at, without its multi-line debug dump.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    if let Some(line) = e.line() {
        if !s.contains("line") {
            s.push_str(&format!(" (line {line})"));
        }
    }
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map, Value};

    fn row(v: Value) -> Row {
        let fields: Map<String, Value> = v.as_object().unwrap().clone();
        Row { id: "r1".into(), line: 7, fields }
    }

    #[test]
    fn renders_fields_and_keeps_text_exact() {
        let t = PromptTemplate::new("Q: {{ question }}\n{% if hint %}Hint: {{ hint }}{% endif %}\n".into(), "t").unwrap();
        let out = t.render(&row(json!({"question": "ça <b> & \"x\" 日本 🎉", "hint": "h"}))).unwrap();
        assert_eq!(out, "Q: ça <b> & \"x\" 日本 🎉\nHint: h");
    }

    #[test]
    fn missing_field_names_row_and_field() {
        let t = PromptTemplate::new("{{ question }} {{ topic }}".into(), "t").unwrap();
        let err = t.render(&row(json!({"question": "q"}))).unwrap_err().to_string();
        assert!(err.contains("row r1 (line 7)") && err.contains("`topic`") && err.contains("it has: question"), "{err}");
    }

    #[test]
    fn nested_missing_attribute_is_an_error() {
        let t = PromptTemplate::new("{{ meta.level }}".into(), "t").unwrap();
        assert!(t.render(&row(json!({"meta": {}}))).is_err());
        assert_eq!(t.render(&row(json!({"meta": {"level": 3}}))).unwrap(), "3");
    }

    #[test]
    fn syntax_error_names_origin() {
        let err = PromptTemplate::new("{{ question ".into(), "prompts/x.jinja").err().unwrap().to_string();
        assert!(err.contains("prompts/x.jinja"), "{err}");
    }
}
