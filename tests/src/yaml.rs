//! Writes a JSON value as block-style YAML, so that generated agent configs
//! read like the hand-written ones.

use serde_json::Value;

/// The YAML text of `value` (an object at the top level).
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(_) | Value::Array(_) => block(value, 0, &mut out),
        other => {
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Object(m) if m.is_empty() => "{}".to_owned(),
        Value::Array(a) if a.is_empty() => "[]".to_owned(),
        // JSON strings are valid YAML double-quoted scalars.
        other => other.to_string(),
    }
}

fn is_block(v: &Value) -> bool {
    match v {
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => false,
    }
}

fn block(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                if is_block(v) {
                    out.push_str(&format!("{pad}{k}:\n"));
                    block(v, indent + 2, out);
                } else {
                    out.push_str(&format!("{pad}{k}: {}\n", scalar(v)));
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                if is_block(item) {
                    // Render the item one level deeper, then put "- " in
                    // place of the first line's indentation.
                    let mut inner = String::new();
                    block(item, indent + 2, &mut inner);
                    out.push_str(&format!("{pad}- {}", &inner[indent + 2..]));
                } else {
                    out.push_str(&format!("{pad}- {}\n", scalar(item)));
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_blocks() {
        let v = serde_json::json!({
            "a": {"b": 1, "c": "x: y"},
            "ports": [{"port": 8080}, {"port": 8081, "protocol": "http"}],
            "allow": ["spiffe://td/*"],
            "empty": [],
            "t": true
        });
        let want = "a:\n  b: 1\n  c: \"x: y\"\nallow:\n  - \"spiffe://td/*\"\nempty: []\nports:\n  - port: 8080\n  - port: 8081\n    protocol: \"http\"\nt: true\n";
        assert_eq!(to_yaml(&v), want);
    }
}
