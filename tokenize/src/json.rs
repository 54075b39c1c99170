//! The structural walk of JSON values: every string value is transformed, nothing else.
//!
//! Member names, numbers, booleans and nulls stay as they are (a card number sent as a JSON
//! number is not detected: it is not text). The walk is bounded: at most
//! [`MAX_JSON_DEPTH`](super::MAX_JSON_DEPTH) levels and [`MAX_INPUT_BYTES`](super::MAX_INPUT_BYTES)
//! of strings in all.

use serde_json::Value;

use super::{MAX_INPUT_BYTES, MAX_JSON_DEPTH, Report, TokenizeError};

/// What is done to each string: `(string, member name)` to the new string and its report.
pub(crate) type StringFn<'a> =
    dyn FnMut(&str, &str) -> Result<(String, Report), TokenizeError> + 'a;

/// A copy of `value` with each string `s` replaced by `f(s, member name)`, and the merged report.
/// The member name is that of the nearest enclosing object member (`""` at the top).
pub(crate) fn transform(
    value: &Value,
    f: &mut StringFn<'_>,
) -> Result<(Value, Report), TokenizeError> {
    let mut out = value.clone();
    let mut walk = Walk {
        f,
        report: Report::default(),
        bytes: 0,
    };
    walk.visit(&mut out, "", 0)?;
    Ok((out, walk.report))
}

struct Walk<'a> {
    f: &'a mut StringFn<'a>,
    report: Report,
    bytes: usize,
}

impl Walk<'_> {
    fn visit(&mut self, v: &mut Value, name: &str, depth: usize) -> Result<(), TokenizeError> {
        if depth > MAX_JSON_DEPTH {
            return Err(TokenizeError::TooDeep {
                max: MAX_JSON_DEPTH,
            });
        }
        match v {
            Value::String(s) => {
                self.bytes += s.len();
                if self.bytes > MAX_INPUT_BYTES {
                    return Err(TokenizeError::TooLarge {
                        len: self.bytes,
                        max: MAX_INPUT_BYTES,
                    });
                }
                let (t, r) = (self.f)(s, name)?;
                *s = t;
                self.report.merge(r);
            }
            Value::Array(items) => {
                for item in items {
                    self.visit(item, name, depth + 1)?;
                }
            }
            Value::Object(members) => {
                for (k, item) in members.iter_mut() {
                    self.visit(item, k, depth + 1)?;
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
        Ok(())
    }
}
