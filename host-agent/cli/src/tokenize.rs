//! `nanoclaw tokenize scan`: a dry run of the tokenizer's monitor mode on the user's own data,
//! with no daemon and no key. It prints where the detectors find card numbers, SSNs, email
//! addresses and API keys, never the values themselves.
//!
//! - Plain text (the default): the whole input, from the file or stdin, is one text; one line
//!   `{"spans": [[kind, start, end], ...]}` is printed for it.
//! - `--jsonl`: each input line is a JSON object with a string member `text`; one such line is
//!   printed per input line, in order. A line that is not that (not JSON, not UTF-8, blank, or
//!   without a string `text`) stops the scan with an error naming its line number.
//!
//! `kind` is `card`, `ssn`, `email` or `api_key`; `start` and `end` count Unicode code points
//! (not bytes) from the start of the text, `end` exclusive, so that `text[start:end]` in
//! Python (or any code-point indexing) is the value.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;

use nanoclaw_tokenize::{Kind, detect_spans};

/// `nanoclaw tokenize ...`.
#[derive(Debug, clap::Subcommand)]
pub enum TokenizeCommand {
    /// Print where the tokenizer finds sensitive values (a dry run of monitor mode): one JSON
    /// line `{"spans": [[kind, start, end], ...]}`, offsets in Unicode code points.
    Scan {
        /// Read JSON lines `{"text": "..."}` and print one result line per input line.
        #[arg(long)]
        jsonl: bool,
        /// The file to read (default: standard input).
        file: Option<PathBuf>,
    },
}

/// Errors of `nanoclaw tokenize scan`.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The input could not be opened or read.
    #[error("cannot read {what}")]
    Read {
        /// The file, or standard input.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Plain-text input is not UTF-8.
    #[error("the input is not UTF-8 text (invalid byte at offset {0})")]
    NotUtf8(usize),
    /// A JSONL line is not UTF-8.
    #[error("line {0}: not UTF-8")]
    LineNotUtf8(usize),
    /// A JSONL line is blank.
    #[error("line {0}: blank (each line must be a JSON object with a string \"text\")")]
    BlankLine(usize),
    /// A JSONL line is not JSON.
    #[error("line {line}: not JSON")]
    Json {
        /// The line number, from 1.
        line: usize,
        /// The parser's message.
        #[source]
        source: serde_json::Error,
    },
    /// A JSONL line is JSON but not an object with a string `text`.
    #[error("line {0}: expected a JSON object with a string \"text\" member")]
    NoText(usize),
    /// Writing the output failed.
    #[error("cannot write the output")]
    Write(#[source] std::io::Error),
}

/// Runs a `tokenize` subcommand.
pub fn run(command: TokenizeCommand) -> Result<u8, super::CliError> {
    match command {
        TokenizeCommand::Scan { jsonl, file } => {
            let (input, what): (Box<dyn Read>, String) = match &file {
                Some(path) => (
                    Box::new(std::fs::File::open(path).map_err(|source| ScanError::Read {
                        what: path.display().to_string(),
                        source,
                    })?),
                    path.display().to_string(),
                ),
                None => (Box::new(std::io::stdin().lock()), "standard input".into()),
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            scan(BufReader::new(input), &what, jsonl, &mut out)?;
            out.flush().map_err(ScanError::Write)?;
            Ok(0)
        }
    }
}

/// Scans `input` (named `what` in errors) and writes the result lines to `out`.
pub fn scan(
    mut input: impl BufRead,
    what: &str,
    jsonl: bool,
    out: &mut impl Write,
) -> Result<(), ScanError> {
    let read_err = |source| ScanError::Read {
        what: what.to_owned(),
        source,
    };
    if !jsonl {
        let mut bytes = Vec::new();
        input.read_to_end(&mut bytes).map_err(read_err)?;
        let text = std::str::from_utf8(&bytes).map_err(|e| ScanError::NotUtf8(e.valid_up_to()))?;
        return write_spans(out, text);
    }
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line).map_err(read_err)? == 0 {
            return Ok(());
        }
        number += 1;
        let text = std::str::from_utf8(&line).map_err(|_| ScanError::LineNotUtf8(number))?;
        let text = text.strip_suffix('\n').unwrap_or(text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        if text.trim().is_empty() {
            return Err(ScanError::BlankLine(number));
        }
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|source| ScanError::Json {
                line: number,
                source,
            })?;
        let Some(text) = value.get("text").and_then(serde_json::Value::as_str) else {
            return Err(ScanError::NoText(number));
        };
        write_spans(out, text)?;
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Card => "card",
        Kind::Ssn => "ssn",
        Kind::Email => "email",
        Kind::ApiKey => "api_key",
    }
}

/// The spans of `text` as `[kind, start, end]` in code points.
pub fn spans_in_code_points(text: &str) -> Vec<(Kind, usize, usize)> {
    // Spans are sorted and do not overlap: count the characters between them once.
    let mut at_byte = 0;
    let mut at_char = 0;
    let mut to_char = |byte: usize| {
        at_char += text[at_byte..byte].chars().count();
        at_byte = byte;
        at_char
    };
    detect_spans(text)
        .into_iter()
        .map(|(kind, r)| {
            let start = to_char(r.start);
            let end = to_char(r.end);
            (kind, start, end)
        })
        .collect()
}

fn write_spans(out: &mut impl Write, text: &str) -> Result<(), ScanError> {
    let spans: Vec<serde_json::Value> = spans_in_code_points(text)
        .into_iter()
        .map(|(kind, start, end)| serde_json::json!([kind_name(kind), start, end]))
        .collect();
    let line = serde_json::json!({ "spans": spans });
    writeln!(out, "{line}").map_err(ScanError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn run_scan(input: &str, jsonl: bool) -> Result<String, ScanError> {
        let mut out = Vec::new();
        scan(input.as_bytes(), "test input", jsonl, &mut out)?;
        Ok(String::from_utf8(out).expect("utf-8 output"))
    }

    #[test]
    fn offsets_are_code_points() {
        // "é" and "ü" are two bytes each: byte offsets would be 2 and 4 higher.
        let text = "café order4111111111111111, Zürich ssn:123-45-6789.";
        let out = run_scan(text, false).expect("scan");
        assert_eq!(
            out, "{\"spans\":[[\"card\",10,26],[\"ssn\",39,50]]}\n",
            "{text:?}"
        );
        let chars: Vec<char> = text.chars().collect();
        let s: String = chars[10..26].iter().collect();
        assert_eq!(s, "4111111111111111");
        let s: String = chars[39..50].iter().collect();
        assert_eq!(s, "123-45-6789");
    }

    #[test]
    fn jsonl_gives_one_line_per_record() {
        let input = concat!(
            "{\"text\": \"mail jane@example.com\", \"id\": 1}\n",
            "{\"text\": \"nothing here\"}\r\n",
            "{\"text\": \"\\u00e9 key=ghp_abcdefghijklmnopqrstuvwxyz0123456789\"}",
        );
        let out = run_scan(input, true).expect("scan");
        assert_eq!(
            out,
            concat!(
                "{\"spans\":[[\"email\",5,21]]}\n",
                "{\"spans\":[]}\n",
                "{\"spans\":[[\"api_key\",6,46]]}\n",
            )
        );
    }

    #[test]
    fn bad_jsonl_lines_are_named() {
        let ok = "{\"text\": \"a\"}\n";
        for (bad, line, says) in [
            ("not json\n", 2, "line 2: not JSON"),
            ("{\"text\": 5}\n", 2, "line 2: expected a JSON object"),
            ("[\"text\"]\n", 2, "line 2: expected a JSON object"),
            ("\n", 2, "line 2: blank"),
        ] {
            let err = run_scan(&format!("{ok}{bad}{ok}"), true).expect_err(bad);
            let msg = err.to_string();
            assert!(msg.starts_with(says), "{bad:?}: {msg}");
            assert!(msg.contains(&format!("line {line}")), "{msg}");
        }
        let mut out = Vec::new();
        let err = scan(&b"{\"text\": \"a\"}\n\xff\n"[..], "x", true, &mut out).expect_err("utf-8");
        assert_eq!(err.to_string(), "line 2: not UTF-8");
        // The lines before the bad one were printed.
        assert_eq!(out, b"{\"spans\":[]}\n");
    }

    #[test]
    fn plain_text_must_be_utf8() {
        let mut out = Vec::new();
        let err = scan(&b"ok \xc3("[..], "x", false, &mut out).expect_err("utf-8");
        assert!(matches!(err, ScanError::NotUtf8(3)), "{err}");
    }

    #[test]
    fn the_command_parses() {
        let cli = crate::Cli::parse_from(["nanoclaw", "tokenize", "scan", "--jsonl", "in.jsonl"]);
        match cli.command {
            crate::Command::Tokenize(TokenizeCommand::Scan { jsonl, file }) => {
                assert!(jsonl);
                assert_eq!(file, Some(PathBuf::from("in.jsonl")));
            }
            other => panic!("{other:?}"),
        }
        let cli = crate::Cli::parse_from(["nanoclaw", "tokenize", "scan"]);
        assert!(matches!(
            cli.command,
            crate::Command::Tokenize(TokenizeCommand::Scan {
                jsonl: false,
                file: None
            })
        ));
    }
}
