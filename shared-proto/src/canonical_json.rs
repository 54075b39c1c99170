//! Canonical JSON text: object keys sorted at every level, no spaces, scalars as `serde_json`
//! writes them.
//!
//! It is the one rendering of a JSON value that is signed or digested: the `arguments` of an
//! [`crate::approval::ApprovalRequest`] (the text the approval page shows and the passkey
//! signs) and the argument digests of the MCP gateway's audit records. The key order of the
//! input never matters (with `serde_json`'s `preserve_order`, which some dependency turns on,
//! a map keeps insertion order, so a plain `to_string` would depend on the agent's order).

use serde_json::Value;

/// `value` as canonical JSON text (see the module doc).
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write(value, &mut out);
    out
}

fn write(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_sorted_at_every_level_without_spaces() {
        let mut inner = serde_json::Map::new();
        inner.insert("z".into(), json!(1));
        inner.insert("a".into(), json!([true, null, "x\"y"]));
        let mut outer = serde_json::Map::new();
        outer.insert("b".into(), Value::Object(inner));
        outer.insert("a\n".into(), json!(1.5));
        assert_eq!(
            canonical_json(&Value::Object(outer)),
            r#"{"a\n":1.5,"b":{"a":[true,null,"x\"y"],"z":1}}"#
        );
        assert_eq!(canonical_json(&json!("s")), r#""s""#);
        assert_eq!(canonical_json(&json!([])), "[]");
        assert_eq!(canonical_json(&json!({})), "{}");
    }

    #[test]
    fn insertion_order_does_not_matter() {
        let mut a = serde_json::Map::new();
        a.insert("x".into(), json!(1));
        a.insert("y".into(), json!({"q": 2, "p": 3}));
        let mut b = serde_json::Map::new();
        b.insert("y".into(), json!({"p": 3, "q": 2}));
        b.insert("x".into(), json!(1));
        assert_eq!(
            canonical_json(&Value::Object(a)),
            canonical_json(&Value::Object(b))
        );
    }
}
