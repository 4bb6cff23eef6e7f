//! Vision providers: an OpenAI-compatible client, an Anthropic Messages client, Bedrock's
//! Converse client (feature `bedrock`) and the offline local analyzer; the remote embedders
//! (an OpenAI-compatible `/embeddings`, Bedrock's Titan and Nova).

pub mod anthropic;
pub mod anthropic_batch;
#[cfg(feature = "bedrock")]
pub mod bedrock;
#[cfg(feature = "bedrock")]
pub mod bedrock_embed;
pub mod embed_common;
pub mod embed_openai;
#[cfg(feature = "bedrock")]
pub mod gen_bedrock;
pub mod gen_common;
pub mod gen_local;
pub mod gen_openai;
mod http;
pub mod local;
pub mod local_embed;
pub mod openai;
pub mod openai_batch;
pub mod select;

use serde_json::{Map, Value};

/// Why a model's answer is not a usable analysis (invalid output: retried once, then permanent).
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    #[error("model output is not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("model output is not a JSON object")]
    NotObject,
    #[error("model output lacks a description")]
    MissingDescription,
    #[error("model output: {key} is not {expected}")]
    WrongType {
        key: &'static str,
        expected: &'static str,
    },
}

/// Parse and check the model's answer: one JSON object with a description and the
/// documented keys (missing lists become empty; wrong types are invalid output).
pub fn validate_analysis(content: &str) -> Result<Value, AnalysisError> {
    let trimmed = content.trim();
    // Some models wrap JSON in a Markdown fence despite json mode.
    let inner = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|s| s.strip_suffix("```"))
        .unwrap_or(trimmed);
    let v: Value = serde_json::from_str(inner.trim())?;
    let Value::Object(obj) = v else {
        return Err(AnalysisError::NotObject);
    };
    let mut out = Map::new();
    match obj.get("description") {
        Some(Value::String(s)) if !s.trim().is_empty() => {
            out.insert("description".into(), Value::String(s.clone()));
        }
        _ => return Err(AnalysisError::MissingDescription),
    }
    for key in ["category", "text"] {
        match obj.get(key) {
            None | Some(Value::Null) => {
                out.insert(key.into(), Value::String(String::new()));
            }
            Some(Value::String(s)) => {
                out.insert(key.into(), Value::String(s.clone()));
            }
            Some(_) => {
                return Err(AnalysisError::WrongType {
                    key,
                    expected: "a string",
                })
            }
        }
    }
    for key in ["tags", "objects", "quality_issues"] {
        match obj.get(key) {
            None | Some(Value::Null) => {
                out.insert(key.into(), Value::Array(Vec::new()));
            }
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
                out.insert(key.into(), Value::Array(items.clone()));
            }
            Some(_) => {
                return Err(AnalysisError::WrongType {
                    key,
                    expected: "a list of strings",
                })
            }
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
        assert_eq!(v["category"], "");
        assert!(validate_analysis("```json\n{\"description\":\"x\"}\n```").is_ok());
    }

    #[test]
    fn invalid_model_output_says_which_rule_it_breaks() {
        assert!(matches!(
            validate_analysis("not json"),
            Err(AnalysisError::NotJson(_))
        ));
        assert!(matches!(
            validate_analysis("[1]"),
            Err(AnalysisError::NotObject)
        ));
        assert!(matches!(
            validate_analysis(r#"{"description":""}"#),
            Err(AnalysisError::MissingDescription)
        ));
        for (body, bad) in [
            (r#"{"description":"x","tags":"cat"}"#, "tags"),
            (r#"{"description":"x","tags":[1]}"#, "tags"),
            (r#"{"description":"x","category":3}"#, "category"),
            (r#"{"description":"x","text":["a"]}"#, "text"),
        ] {
            match validate_analysis(body) {
                Err(e @ AnalysisError::WrongType { key, .. }) => {
                    assert_eq!(key, bad, "{body}");
                    assert!(e.to_string().contains(bad), "{e}");
                }
                other => panic!("{body}: {other:?}"),
            }
        }
        // The failure reason recorded for an image stays readable.
        assert_eq!(
            validate_analysis(r#"{"description":"x","objects":{}}"#)
                .unwrap_err()
                .to_string(),
            "model output: objects is not a list of strings"
        );
    }
}
