//! The Python SDK (`sdk/python`, the standard library only) and its test suite, run against a
//! daemon's remote API: a daemon started with `--listen 127.0.0.1:PORT`, a `run` and a `read`
//! token made with its CLI, and its own certificate as the only one trusted.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::daemon::Daemon;
use crate::process::text;
use crate::workspace::workspace_root;

/// The remote API of a daemon, as the SDK's tests are given it.
#[derive(Debug, Clone)]
pub struct RemoteApi {
    /// `https://localhost:PORT` (the daemon's own certificate names `localhost`).
    pub url: String,
    /// A `run` token.
    pub run_token: String,
    /// A `read` token.
    pub read_token: String,
    /// The daemon's certificate, `<state-dir>/tls/cert.pem`.
    pub ca_file: PathBuf,
}

impl RemoteApi {
    /// The remote API of `d`, which serves `--listen 127.0.0.1:PORT` with its own certificate;
    /// makes the two tokens with `nanoclaw token create`.
    ///
    /// # Panics
    ///
    /// If a token cannot be made.
    pub fn of(d: &Daemon, port: u16) -> Self {
        Self::at(d, &format!("https://localhost:{port}"))
    }

    /// [`RemoteApi::of`] for a daemon reached at `url` (its certificate must name the host).
    ///
    /// # Panics
    ///
    /// If a token cannot be made.
    pub fn at(d: &Daemon, url: &str) -> Self {
        let token = |scope: &str| {
            let out = d.cli(&["token", "create", "--scope", scope]);
            assert!(out.status.success(), "token create: {}", text(&out.stderr));
            text(&out.stdout).trim().to_owned()
        };
        Self {
            url: url.to_owned(),
            run_token: token("run"),
            read_token: token("read"),
            ca_file: d.state_dir().join("tls/cert.pem"),
        }
    }
}

/// The SDK's folder, `sdk/python`.
pub fn sdk_dir() -> PathBuf {
    workspace_root().join("sdk/python")
}

/// `PYTHON -m unittest -v MODULES...` in `sdk/python/tests`, with the SDK on `PYTHONPATH` and
/// `api` in `NANOCLAW_URL`, `NANOCLAW_TOKEN` (run), `NANOCLAW_READ_TOKEN` and
/// `NANOCLAW_CA_FILE`. `daemon` goes in `NANOCLAW_SDK_DAEMON` (`fake` or `guest`: the tests of
/// that kind of daemon run, the others skip). `extra` adds variables.
pub fn sdk_tests(
    python: &Path,
    api: &RemoteApi,
    daemon: &str,
    modules: &[&str],
    extra: &[(&str, &str)],
) -> Command {
    sdk_tests_in(Command::new(python), api, daemon, modules, extra)
}

/// [`sdk_tests`] with the Python command given: `python` may run in a client's own network
/// namespace ([`crate::netns::ClientNetns::command`]).
pub fn sdk_tests_in(
    python: Command,
    api: &RemoteApi,
    daemon: &str,
    modules: &[&str],
    extra: &[(&str, &str)],
) -> Command {
    let dir = sdk_dir();
    let mut cmd = python;
    cmd.args(["-m", "unittest", "-v"])
        .args(modules)
        .current_dir(dir.join("tests"))
        .env("PYTHONPATH", dir.join("src"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("NANOCLAW_SDK_DAEMON", daemon)
        .env("NANOCLAW_URL", &api.url)
        .env("NANOCLAW_TOKEN", &api.run_token)
        .env("NANOCLAW_READ_TOKEN", &api.read_token)
        .env("NANOCLAW_CA_FILE", &api.ca_file);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

/// Checks that a run of [`sdk_tests`] passed, ran at least `min_tests` tests and skipped none;
/// `context` is shown on failure (the daemon's log).
///
/// # Panics
///
/// If it did not.
pub fn assert_sdk_tests_passed(out: &Output, min_tests: usize, context: &str) {
    let report = text(&out.stderr);
    let failed = format!(
        "the Python SDK's tests:\n{}{report}\n--- daemon ---\n{context}",
        text(&out.stdout)
    );
    assert!(out.status.success(), "{failed}");
    let ran: usize = report
        .lines()
        .find_map(|l| l.strip_prefix("Ran ")?.split(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(
        ran >= min_tests,
        "ran {ran} tests, expected {min_tests}: {failed}"
    );
    assert!(!report.contains("skipped"), "a test was skipped: {failed}");
}
