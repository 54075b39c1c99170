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
    held: Held,
}

/// A namespace's holder process and the host's end of its veth: dropping it ends the
/// holder (the namespace goes with it) and deletes that end, for a holder that would not die.
#[derive(Debug)]
struct Held {
    holder: Child,
    host_if: String,
}

impl Held {
    /// A new namespace joined to this one by a veth pair: `host_if` here (one left by an
    /// earlier run that died is deleted first), `inner_if` in the namespace.
    fn linked(host_if: String, inner_if: &str) -> Result<Self> {
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        let held = Self {
            holder: holder()?,
            host_if,
        };
        let pid = held.holder.id().to_string();
        run(Command::new("ip").args([
            "link",
            "add",
            &held.host_if,
            "type",
            "veth",
            "peer",
            "name",
            inner_if,
            "netns",
            &pid,
        ]))?;
        Ok(held)
    }

    /// Gives `inner_if` the address `cidr` and brings it and the namespace's loopback up.
    fn configure(&self, inner_if: &str, cidr: &str) -> Result<()> {
        for args in [
            &["addr", "add", cidr, "dev", inner_if][..],
            &["link", "set", inner_if, "up"],
            &["link", "set", "lo", "up"],
        ] {
            run(self.command("ip").args(args))?;
        }
        Ok(())
    }

    /// `program` run inside the namespace (`nsenter --net=... program`).
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(self.nsenter_arg()).arg("--").arg(program);
        cmd
    }

    /// `--net=/proc/PID/ns/net`.
    fn nsenter_arg(&self) -> String {
        format!("--net=/proc/{}/ns/net", self.holder.id())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
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
        let client_if = format!("ncc-{tag}");
        let ns = Self {
            held: Held::linked(format!("nch-{tag}"), &client_if)?,
        };
        run(Command::new("ip").args([
            "addr",
            "add",
            &format!("{host}/{prefix_len}"),
            "dev",
            &ns.held.host_if,
        ]))?;
        run(Command::new("ip").args(["link", "set", &ns.held.host_if, "up"]))?;
        ns.held
            .configure(&client_if, &format!("{client}/{prefix_len}"))?;
        Ok(ns)
    }

    /// `program` run inside the namespace (`nsenter --net=... program`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.held.command(program)
    }
}

/// A process holding a new network namespace, once that namespace exists.
fn holder() -> Result<Child> {
    let mut holder = Command::new("unshare")
        .args(["--net", "--", "sleep", "infinity"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("start the namespace's holder (unshare --net)")?;
    let net = format!("/proc/{}/ns/net", holder.id());
    // unshare has made the namespace once its child runs: wait for that.
    let own = std::fs::read_link("/proc/self/ns/net").context("this namespace")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_link(&net).ok().is_none_or(|n| n == own) {
        if std::time::Instant::now() > deadline {
            let _ = holder.kill();
            let _ = holder.wait();
            bail!("the holder's network namespace did not appear");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(holder)
}

/// Network namespaces on one Ethernet segment (a bridge in the caller's namespace, a veth to
/// each), each with an address of [`UNDERLAY_NET`] on its `ul0`: two "hosts" that share an
/// underlay, and a client on it that routes the overlay prefix straight onto it, as
/// `docs/security/network.md` ("The underlay") describes. Dropping it removes them all.
#[derive(Debug)]
pub struct Underlay {
    bridge: String,
    /// The members, in the order made.
    pub members: Vec<Member>,
}

/// One namespace of an [`Underlay`].
#[derive(Debug)]
pub struct Member {
    held: Held,
    /// Its address on the underlay.
    pub addr: Ipv4Addr,
}

/// The underlay's network, a /24.
pub const UNDERLAY_NET: [u8; 3] = [10, 77, 0];
/// The interface's name in each member.
pub const UNDERLAY_IF: &str = "ul0";

impl Underlay {
    /// Makes `count` members (addresses `.1` up), the last one a client whose route to
    /// `overlay` (`A.B.C.D/LEN`) is the underlay itself; `tag` names the links.
    pub fn create(tag: &str, count: u8, overlay: &str) -> Result<Self> {
        let bridge = format!("ncb-{tag}");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        run(Command::new("ip").args(["link", "add", &bridge, "type", "bridge"]))?;
        let mut underlay = Self {
            bridge,
            members: Vec::new(),
        };
        run(Command::new("ip").args(["link", "set", &underlay.bridge, "up"]))?;
        for i in 1..=count {
            let [a, b, c] = UNDERLAY_NET;
            let member = Member {
                held: Held::linked(format!("ncu-{tag}{i}"), UNDERLAY_IF)?,
                addr: Ipv4Addr::new(a, b, c, i),
            };
            run(Command::new("ip").args([
                "link",
                "set",
                &member.held.host_if,
                "master",
                &underlay.bridge,
                "up",
            ]))?;
            member
                .held
                .configure(UNDERLAY_IF, &format!("{}/24", member.addr))?;
            if i == count {
                run(member
                    .command("ip")
                    .args(["route", "add", overlay, "dev", UNDERLAY_IF]))?;
            }
            underlay.members.push(member);
        }
        Ok(underlay)
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        self.members.clear();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

impl Member {
    /// `program` run inside the namespace (`nsenter --net=... program`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.held.command(program)
    }

    /// `--net=/proc/PID/ns/net`: nsenter's argument that enters the namespace.
    pub fn nsenter_arg(&self) -> String {
        self.held.nsenter_arg()
    }

    /// A TCP connection to `addr` made from inside the namespace (the socket stays in it).
    pub fn connect(
        &self,
        addr: std::net::SocketAddr,
        timeout: std::time::Duration,
    ) -> Result<std::net::TcpStream> {
        let ns = std::fs::File::open(format!("/proc/{}/ns/net", self.held.holder.id()))
            .context("open the namespace")?;
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns(2) on a descriptor this thread owns; it changes only this
            // thread's network namespace, and the thread ends after the connect.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context("join the namespace");
            }
            std::net::TcpStream::connect_timeout(&addr, timeout)
                .with_context(|| format!("connect to {addr}"))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the connecting thread panicked"))?
    }
}
