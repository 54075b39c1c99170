//! Access profiles over the Python MCP upstream (`tests/peers/mcp_upstream.py`), written once
//! for every test that needs one: the component tests of the gateway and the sidecar, and the
//! end-to-end MCP test.
//!
//! A profile is [`header`] (name, tier, tokenize mode and the `files` server) followed by the
//! tool entries the test grants: [`read_file`], [`write_file`], [`delete_file`], [`transfer`].

use std::path::Path;

/// The profile's name, tier and tokenize mode, and the `files` server: `python` runs the
/// upstream, which records every call it receives in `log` (JSON lines).
pub fn header(name: &str, tier: &str, tokenize: &str, python: &Path, log: &Path) -> String {
    format!(
        "name = \"{name}\"\ntier = \"{tier}\"\ntokenize = \"{tokenize}\"\n\n\
         [servers.files]\ncommand = [\"{python}\", \"{upstream}\"]\n\
         env = {{ NANOCLAW_PEER_LOG = \"{log}\" }}\n",
        python = python.display(),
        upstream = crate::peers::peer("mcp_upstream.py").display(),
        log = log.display(),
    )
}

/// `read_file`, its `path` under `prefix`, no other argument.
pub fn read_file(prefix: &str) -> String {
    format!(
        "\n[[tools]]\nserver = \"files\"\nname = \"read_file\"\n\
         args.path = {{ prefix = \"{prefix}\" }}\n"
    )
}

/// `write_file`, its `path` under `prefix`, other arguments (the content) allowed, and
/// surrogates in its arguments restored to the real values (`restore = true`).
pub fn write_file(prefix: &str) -> String {
    format!(
        "\n[[tools]]\nserver = \"files\"\nname = \"write_file\"\n\
         args.path = {{ prefix = \"{prefix}\" }}\nother_args = \"allow\"\nrestore = true\n"
    )
}

/// `delete_file`, which needs the user's approval; its `path` under `prefix` when one is
/// given, else any argument.
pub fn delete_file(prefix: Option<&str>) -> String {
    let path = prefix
        .map(|p| format!("args.path = {{ prefix = \"{p}\" }}\n"))
        .unwrap_or_default();
    format!(
        "\n[[tools]]\nserver = \"files\"\nname = \"delete_file\"\n{path}\
         approval = \"deletes a file\"\n"
    )
}

/// `transfer`, its integer `amount` within `min..=max`.
pub fn transfer(min: i64, max: i64) -> String {
    format!(
        "\n[[tools]]\nserver = \"files\"\nname = \"transfer\"\n\
         args.amount = {{ min = {min}, max = {max} }}\n"
    )
}
