//! A headless Chromium driven over the DevTools Protocol (CDP), for the tests that approve
//! requests on the passkey pages with a virtual authenticator.
//!
//! [`launch`] starts `chromium --headless --remote-debugging-port=0`, reads the DevTools
//! WebSocket address from its stderr, opens one page target and attaches to it (flattened
//! sessions), and answers a [`Cdp`] client bound to that page. The client sends one command at
//! a time and ignores events: the tests only need commands and `Runtime.evaluate`.
//!
//! The DevTools Protocol is a few JSON messages over a WebSocket; a CDP client crate would add
//! a large generated API for the handful of methods used here, so this is written by hand over
//! `tokio-tungstenite`.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long to wait for Chromium's answer to one command (generous: under nested software
/// emulation a page load takes many seconds).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(180);

/// The Chromium binary: `NANOCLAW_CHROMIUM`, or `chromium`.
pub fn chromium_bin() -> String {
    std::env::var("NANOCLAW_CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

/// Whether `bin --version` runs.
pub fn chromium_available(bin: &str) -> bool {
    std::process::Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A minimal DevTools Protocol client on one page: one command at a time, events ignored.
#[derive(Debug)]
pub struct Cdp {
    ws: Ws,
    next_id: u64,
    session: Option<String>,
}

impl Cdp {
    /// Sends `method` with `params` and waits for its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).await?;
        loop {
            let frame = tokio::time::timeout(ANSWER_TIMEOUT, self.ws.next())
                .await
                .with_context(|| format!("{method}: no answer"))?
                .ok_or_else(|| anyhow!("DevTools connection closed"))??;
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text)?;
            if v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Evaluates `expr` in the page (awaiting a promise, as if the user clicked) and answers
    /// its value.
    pub async fn eval(&mut self, expr: &str) -> Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "awaitPromise": true, "userGesture": true,
                       "returnByValue": true}),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{expr}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Navigates to `url` and polls until the expression `ready` is `true`, at most `timeout`.
    pub async fn open(&mut self, url: &str, ready: &str, timeout: Duration) -> Result<()> {
        self.call("Page.navigate", json!({"url": url})).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.eval(ready).await.unwrap_or(Value::Null) == json!(true) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{url}: page not ready within {timeout:?} ({ready})")
    }

    /// Enables WebAuthn emulation and adds a CTAP2 platform authenticator with resident keys
    /// and user verification, verified as `user_verified` says. Answers its id.
    pub async fn add_virtual_authenticator(&mut self, user_verified: bool) -> Result<Value> {
        self.call("WebAuthn.enable", json!({"enableUI": false}))
            .await?;
        let auth = self
            .call(
                "WebAuthn.addVirtualAuthenticator",
                json!({"options": {"protocol": "ctap2", "transport": "internal",
                       "hasResidentKey": true, "hasUserVerification": true,
                       "isUserVerified": user_verified}}),
            )
            .await?;
        Ok(auth["authenticatorId"].clone())
    }
}

/// The Chromium process group (killed on drop: the browser and every helper process it
/// started, so none lingers to slow the tests that follow) and its throwaway profile directory.
#[derive(Debug)]
pub struct Browser {
    child: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) with a negative pid signals that process group; the group is the
            // one `launch` created for this child (`process_group(0)`), so nothing else is hit.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = self.child.start_kill();
    }
}

/// Starts headless Chromium `bin` and attaches a [`Cdp`] client to a fresh page. Waits at most
/// `timeout` for Chromium to listen.
pub async fn launch(bin: &str, timeout: Duration) -> Result<(Browser, Cdp)> {
    let profile = tempfile::tempdir()?;
    let mut child = tokio::process::Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {bin}"))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    // What Chromium said before it listens (or instead), for the error if it never does.
    let mut said: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let listening = tokio::time::timeout(timeout, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = line.strip_prefix("DevTools listening on ") {
                return Ok(url.trim().to_owned());
            }
            if said.len() == 20 {
                said.pop_front();
            }
            said.push_back(line);
        }
        let status = child.wait().await?;
        bail!("chromium exited before listening ({status})")
    })
    .await;
    let said = said.into_iter().collect::<Vec<_>>().join("\n");
    let ws_url = match listening {
        Ok(Ok(url)) => url,
        Ok(Err(e)) => bail!("{e}; its last lines on stderr:\n{said}"),
        Err(_) => {
            bail!("chromium did not start within {timeout:?}; its last lines on stderr:\n{said}")
        }
    };
    // Keep draining its stderr so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (ws, _) = tokio_tungstenite::connect_async(ws_url.as_str()).await?;
    let mut cdp = Cdp {
        ws,
        next_id: 0,
        session: None,
    };
    let target = cdp
        .call("Target.createTarget", json!({"url": "about:blank"}))
        .await?;
    let attached = cdp
        .call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        )
        .await?;
    cdp.session = attached["sessionId"].as_str().map(str::to_owned);
    Ok((
        Browser {
            child,
            _profile: profile,
        },
        cdp,
    ))
}
