//! Vision providers: an OpenAI-compatible client and the offline local analyzer.

pub mod local;
pub mod openai;
pub mod select;

use serde_json::{Map, Value};

/// Parse and check the model's answer: one JSON object with a description and the
/// documented keys (missing lists become empty; wrong types are invalid output).
pub fn validate_analysis(content: &str) -> Result<Value, String> {
    let trimmed = content.trim();
    // Some models wrap JSON in a Markdown fence despite json mode.
    let inner = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|s| s.strip_suffix("```"))
        .unwrap_or(trimmed);
    let v: Value =
        serde_json::from_str(inner.trim()).map_err(|e| format!("model output is not JSON: {e}"))?;
    let Value::Object(obj) = v else {
        return Err("model output is not a JSON object".into());
    };
    let mut out = Map::new();
    match obj.get("description") {
        Some(Value::String(s)) if !s.trim().is_empty() => {
            out.insert("description".into(), Value::String(s.clone()));
        }
        _ => return Err("model output lacks a description".into()),
    }
    match obj.get("category") {
        None | Some(Value::Null) => {
            out.insert("category".into(), Value::String(String::new()));
        }
        Some(Value::String(s)) => {
            out.insert("category".into(), Value::String(s.clone()));
        }
        Some(_) => return Err("model output: category is not a string".into()),
    }
    match obj.get("text") {
        None | Some(Value::Null) => {
            out.insert("text".into(), Value::String(String::new()));
        }
        Some(Value::String(s)) => {
            out.insert("text".into(), Value::String(s.clone()));
        }
        Some(_) => return Err("model output: text is not a string".into()),
    }
    for key in ["tags", "objects", "quality_issues"] {
        match obj.get(key) {
            None | Some(Value::Null) => {
                out.insert(key.into(), Value::Array(Vec::new()));
            }
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
                out.insert(key.into(), Value::Array(items.clone()));
            }
            Some(_) => return Err(format!("model output: {key} is not a list of strings")),
        }
    }
    // Keep any extra keys the prompt may ask for later.
    for (k, v) in obj {
        out.entry(k).or_insert(v);
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_model_output() {
        let v = validate_analysis(r#"{"description":"a cat","tags":["cat"]}"#).unwrap();
        assert_eq!(v["tags"][0], "cat");
        assert_eq!(v["objects"], Value::Array(vec![]));
        assert!(validate_analysis("```json\n{\"description\":\"x\"}\n```").is_ok());
        assert!(validate_analysis("not json").is_err());
        assert!(validate_analysis("[1]").is_err());
        assert!(validate_analysis(r#"{"description":""}"#).is_err());
        assert!(validate_analysis(r#"{"description":"x","tags":"cat"}"#).is_err());
        assert!(validate_analysis(r#"{"description":"x","tags":[1]}"#).is_err());
    }
}
