//! A network namespace of its own for a client, joined to the host's by a veth pair: how the
//! end-to-end tests reach the daemon's remote API as another machine would, over a real link
//! and not over loopback.
//!
//! [`ClientNetns::create`] starts a small holder process in a new network namespace
//! (`unshare --net`), makes a veth pair with one end moved into it, and puts [`HOST_ADDR`] (the
//! host's end) and [`CLIENT_ADDR`] (the client's) on a /30; [`ClientNetns::command`] runs a
//! program inside it (`nsenter --net`). Dropping it ends the holder, and the namespace goes
//! with the veth pair. No file is written (`ip netns` would need a writable `/run`, which the
//! nested runner's read-only root does not have). Needs root, util-linux and iproute2.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// The host's end of the link.
pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
/// The client's end of the link.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);

/// A client's network namespace (see the module doc).
#[derive(Debug)]
pub struct ClientNetns {
    holder: Child,
    host_if: String,
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("run {shown}"))?;
    if !out.status.success() {
        bail!("{shown}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl ClientNetns {
    /// Makes the namespace and its link to the host; `tag` names the veth ends.
    pub fn create(tag: &str) -> Result<Self> {
        Self::create_with(tag, HOST_ADDR, CLIENT_ADDR, 30)
    }

    /// [`create`](Self::create) with other addresses: `host` for the host's end and `client`
    /// for the namespace's, on a `/prefix_len`.
    pub fn create_with(
        tag: &str,
        host: Ipv4Addr,
        client: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<Self> {
        let (host_if, client_if) = (format!("nch-{tag}"), format!("ncc-{tag}"));
        // Ends left by an earlier run that died go first.
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        let holder = Command::new("unshare")
            .args(["--net", "--", "sleep", "infinity"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("start the namespace's holder (unshare --net)")?;
        let ns = Self { holder, host_if };
        let pid = ns.holder.id().to_string();
        let net = format!("/proc/{pid}/ns/net");
        // unshare has made the namespace once its child runs: wait for that.
        let own = std::fs::read_link("/proc/self/ns/net").context("this namespace")?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_link(&net).ok().is_none_or(|n| n == own) {
            if std::time::Instant::now() > deadline {
                bail!("the holder's network namespace did not appear");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        run(Command::new("ip").args([
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
            "netns",
            &pid,
        ]))?;
        run(Command::new("ip").args([
            "addr",
            "add",
            &format!("{host}/{prefix_len}"),
            "dev",
            &ns.host_if,
        ]))?;
        run(Command::new("ip").args(["link", "set", &ns.host_if, "up"]))?;
        let client_addr = format!("{client}/{prefix_len}");
        for args in [
            &["addr", "add", &client_addr, "dev", &client_if][..],
            &["link", "set", &client_if, "up"],
            &["link", "set", "lo", "up"],
        ] {
            run(ns.command("ip").args(args))?;
        }
        Ok(ns)
    }

    /// `program` run inside the namespace (`nsenter --net=... program`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/proc/{}/ns/net", self.holder.id()))
            .arg("--")
            .arg(program);
        cmd
    }
}

impl Drop for ClientNetns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        // The pair goes with the namespace; this is for a holder that would not die.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}
