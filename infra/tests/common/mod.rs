//! Helpers shared by the infra tests: YAML → JSON values and CloudFormation intrinsics.

#![allow(dead_code)]

use serde_json::Value;

/// Parse YAML text into a JSON value (all mapping keys in our files are strings).
pub fn yaml_to_json(text: &str) -> Value {
    let yaml: serde_yaml::Value = serde_yaml::from_str(text).expect("valid YAML");
    serde_json::to_value(yaml).expect("YAML with string keys only")
}

pub fn template() -> Value {
    yaml_to_json(sightline_infra_checks::TEMPLATE_YAML)
}

pub fn openapi() -> Value {
    yaml_to_json(sightline_infra_checks::OPENAPI_YAML)
}

/// A value as a list (a scalar becomes a one-element list; null an empty one).
pub fn as_list(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        Value::Null => vec![],
        other => vec![other.clone()],
    }
}

/// `{"Ref": "AWS::NoValue"}`
pub fn is_no_value(v: &Value) -> bool {
    v.get("Ref").and_then(Value::as_str) == Some("AWS::NoValue")
}

/// Expand `Fn::If` into every branch it may take (dropping AWS::NoValue), recursively at the
/// top level of `v`. A plain value yields itself.
pub fn branches(v: &Value) -> Vec<Value> {
    if let Some(args) = v.get("Fn::If").and_then(Value::as_array) {
        assert_eq!(args.len(), 3, "Fn::If takes [condition, then, else]: {v}");
        let mut out = branches(&args[1]);
        out.extend(branches(&args[2]));
        return out;
    }
    if is_no_value(v) {
        return vec![];
    }
    vec![v.clone()]
}

/// Render a CloudFormation string expression to a readable string: literals as they are,
/// `Ref X` → `${X}`, `Fn::GetAtt [X, A]` → `${X.A}`, `Fn::Sub` → its template (with the variables
/// of the map form substituted), `Fn::Join` → the joined parts, anything else → `<json>`.
pub fn render(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Object(o) if o.len() == 1 => {
            let (k, a) = o.iter().next().expect("one key");
            match k.as_str() {
                "Ref" => format!("${{{}}}", a.as_str().unwrap_or("?")),
                "Fn::GetAtt" => match a {
                    Value::Array(p) => format!(
                        "${{{}.{}}}",
                        p[0].as_str().unwrap_or("?"),
                        p.get(1).and_then(Value::as_str).unwrap_or("?")
                    ),
                    Value::String(s) => format!("${{{s}}}"),
                    _ => format!("<{v}>"),
                },
                "Fn::Sub" => match a {
                    Value::String(s) => s.clone(),
                    Value::Array(p) => {
                        let mut s = p[0].as_str().unwrap_or("?").to_string();
                        if let Some(vars) = p.get(1).and_then(Value::as_object) {
                            for (name, val) in vars {
                                s = s.replace(&format!("${{{name}}}"), &render(val));
                            }
                        }
                        s
                    }
                    _ => format!("<{v}>"),
                },
                "Fn::Join" => {
                    let p = a.as_array().expect("Fn::Join [sep, parts]");
                    let sep = p[0].as_str().unwrap_or("");
                    as_list(&p[1])
                        .iter()
                        .map(render)
                        .collect::<Vec<_>>()
                        .join(sep)
                }
                _ => format!("<{v}>"),
            }
        }
        other => format!("<{other}>"),
    }
}

/// Every (key, value) pair anywhere in `v`, depth first.
pub fn walk<'a>(v: &'a Value, out: &mut Vec<(&'a str, &'a Value)>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                out.push((k.as_str(), x));
                walk(x, out);
            }
        }
        Value::Array(a) => {
            for x in a {
                walk(x, out);
            }
        }
        _ => {}
    }
}

/// The names a value refers to: Ref, Fn::GetAtt and `${Name}` / `${Name.Attr}` in Fn::Sub.
pub fn references(v: &Value) -> Vec<String> {
    let mut pairs = Vec::new();
    walk(v, &mut pairs);
    let mut out = Vec::new();
    for (k, x) in pairs {
        match k {
            "Ref" => {
                if let Some(s) = x.as_str() {
                    out.push(s.to_string());
                }
            }
            "Fn::GetAtt" => match x {
                Value::Array(p) => out.push(p[0].as_str().unwrap_or("?").to_string()),
                Value::String(s) => out.push(s.split('.').next().unwrap_or("?").to_string()),
                _ => {}
            },
            "Fn::Sub" => {
                let (text, vars) = match x {
                    Value::String(s) => (s.as_str(), None),
                    Value::Array(p) => (
                        p[0].as_str().unwrap_or(""),
                        p.get(1).and_then(Value::as_object),
                    ),
                    _ => continue,
                };
                let mut rest = text;
                while let Some(i) = rest.find("${") {
                    let after = &rest[i + 2..];
                    let Some(j) = after.find('}') else { break };
                    let name = &after[..j];
                    if !name.starts_with('!') {
                        let base = name.split('.').next().unwrap_or(name);
                        if !vars.is_some_and(|m| m.contains_key(base)) {
                            out.push(base.to_string());
                        }
                    }
                    rest = &after[j + 1..];
                }
            }
            _ => {}
        }
    }
    out
}
