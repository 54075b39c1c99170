//! Benchmark (prints figures; not a test): snapshots, restores and warm starts against cold
//! boots, in one daemon on one machine. Run it with `scripts/bench-snapshot [N]`, which builds
//! the guest and the binaries and runs this inside the nested runner's L1 (or directly where
//! `/dev/kvm` can boot Linux).
//!
//! Figures, each the median of N rounds where it is a time:
//! 1. **Cold boot to ready**: `POST /v1/vms` (what `nanoclaw run -d` sends) until the daemon
//!    has admitted the sidecar's hello (`boot_id` set), polled with `GET /v1/vms/{id}`.
//! 2. **Snapshot size**: a 256 MiB guest that touched about 30 MiB in all (its agent fills
//!    tmpfs with random bytes up to that, by the guest's own count) is snapshotted; the memory
//!    file's data bytes (it is sparse). Target: at most 40 MiB.
//! 3. **Restore to ready**: `POST /v1/snapshots/{name}/restore` (what `nanoclaw restore NAME
//!    -d` sends) until the restored guest was admitted with its new identity. Target: restore ÷
//!    cold boot at most 0.2.
//! 4. **Warm ÷ cold `run`**: `nanoclaw run --image IMAGE -- /bin/true` to its exit, cold, then
//!    after `nanoclaw image warm IMAGE`; reported.
//!
//! The daemon's binaries and the guest's kernel and initramfs are copied to a local temporary
//! folder first and run from there: in the nested runner they sit on the host's 9p share,
//! whose reads would add to every VMM start and every cold boot's kernel load what no real
//! host pays.
//!
//! The timed requests go straight to the daemon's API socket, one small HTTP/1.1 exchange
//! each, so that neither figure counts the CLI's own process start (a few hundred
//! milliseconds in the nested runner's emulated L1, the same for both). The polling adds up
//! to about 10 ms to each "ready" time. Under the nested runner's software-emulated L1 the absolute times are long;
//! the ratios are the figures to compare.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use std::io::{Read, Write};

use nanoclaw_tests::{CLI_TIMEOUT, Daemon, GuestImage, OutputWithin};

/// How long any one VM may take to get ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// `nanoclaw ARGS` to its end; its stdout, or an error with its stderr.
fn cli(d: &Daemon, args: &[&str]) -> Result<String> {
    let out = d.nanoclaw(args).output_within(Duration::from_secs(300))?;
    ensure!(
        out.status.success(),
        "nanoclaw {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One request to the daemon's API on its socket (HTTP/1.1, a connection of its own): the
/// status and the JSON body.
fn api(d: &Daemon, method: &str, path: &str, body: &str) -> Result<(u16, serde_json::Value)> {
    let mut conn = std::os::unix::net::UnixStream::connect(d.socket())?;
    conn.set_read_timeout(Some(Duration::from_secs(300)))?;
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nhost: nanoclaw\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("{method} {path}: no HTTP answer: {answer:?}"))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{method} {path}: {head:?}"))?;
    ensure!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{method} {path}: a chunked answer"
    );
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    ensure!(
        (200..300).contains(&status),
        "{method} {path}: {status} {body}"
    );
    Ok((status, json))
}

/// The id of the VM a creating request answered with.
fn vm_id(answer: &serde_json::Value) -> Result<String> {
    answer["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no VM id in {answer}"))
}

/// Waits until VM `id`'s sidecar was admitted with an identity of its own; the time since
/// `from`.
fn ready(d: &Daemon, id: &str, from: Instant) -> Result<Duration> {
    loop {
        let (_, info) = api(d, "GET", &format!("/v1/vms/{id}"), "")?;
        if info["boot_id"].is_string() && info["reidentify_pending"].is_null() {
            return Ok(from.elapsed());
        }
        if info["status"] == "stopped" || info["status"] == "failed" {
            bail!("VM {id} ended before it was ready: {info}\n{}", d.records());
        }
        if from.elapsed() > READY_TIMEOUT {
            bail!("VM {id} not ready within {READY_TIMEOUT:?}: {info}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stop(d: &Daemon, id: &str) -> Result<()> {
    cli(d, &["stop", id]).map(drop)
}

fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let image = GuestImage::from_env().context("the guest image (NANOCLAW_GUEST_MANIFEST)")?;
    let local = tempfile::tempdir()?;
    let copy = |from: &std::path::Path| -> Result<std::path::PathBuf> {
        let to = local.path().join(from.file_name().context("a file name")?);
        std::fs::copy(from, &to).with_context(|| format!("copy {}", from.display()))?;
        Ok(to)
    };
    let host_agent = nanoclaw_tests::host_agent_bin();
    for bin in ["nanoclaw-vmm", "nanoclaw"] {
        copy(&host_agent.with_file_name(bin))?;
    }
    let host_agent = copy(&host_agent)?;
    // SAFETY: nothing else runs yet (the daemon is started below), so no thread reads the
    // environment while it changes.
    unsafe { std::env::set_var("NANOCLAW_HOST_AGENT", &host_agent) };
    let (vmlinux, initramfs) = (copy(&image.vmlinux)?, copy(&image.initramfs)?);
    let d = Daemon::start(&vmlinux, &initramfs)?;
    println!("snapshot benchmark, {rounds} rounds each (medians)");
    let result = bench(&d, rounds);
    if result.is_err() {
        // What went wrong, from the daemon's side and each VM's.
        eprintln!("{}", d.records());
    }
    result
}

fn bench(d: &Daemon, rounds: usize) -> Result<()> {
    // 1. Cold boots.
    let mut cold = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let (_, created) = api(
            d,
            "POST",
            "/v1/vms",
            r#"{"command":"/bin/sleep","args":["600"]}"#,
        )?;
        let id = vm_id(&created)?;
        cold.push(ready(d, &id, t)?);
        stop(d, &id)?;
    }
    let cold = median(cold);
    println!("  cold boot to ready            {:>8.3} s", secs(cold));

    // 2. A guest that touched about 30 MiB in all (its kernel, the sidecar and the agent
    //    included): the agent fills tmpfs with random bytes up to that, from the guest's own
    //    count (MemTotal - MemFree), and prints the count after.
    let filler = "used() { while read k v u; do case $k in MemTotal:) t=$v;; MemFree:) f=$v;; \
                  esac; done < /proc/meminfo; echo $(( (t - f) / 1024 )); }; \
                  n=$(( 30 - $(used) )); [ $n -gt 0 ] && dd if=/dev/urandom of=/tmp/fill bs=1M \
                  count=$n 2>/dev/null; echo \"filled used=$(used)\"; sleep 600";
    let id = cli(d, &["run", "-d", "--", "/bin/sh", "-c", filler])?
        .trim()
        .to_owned();
    let t = Instant::now();
    let used_mib = loop {
        let logs = cli(d, &["logs", &id])?;
        if let Some(used) = logs
            .lines()
            .find_map(|l| l.strip_prefix("filled used="))
            .and_then(|n| n.trim().parse::<u64>().ok())
        {
            break used;
        }
        ensure!(
            t.elapsed() < READY_TIMEOUT,
            "the filler never finished: {logs}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let t = Instant::now();
    cli(d, &["snapshot", &id, "bench"])?;
    let took = t.elapsed();
    stop(d, &id)?;
    let listed: serde_json::Value = serde_json::from_str(&cli(d, &["snapshot", "ls", "--json"])?)?;
    let snap = listed
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "bench"))
        .context("the snapshot in `snapshot ls`")?;
    let data = snap["memory_data_bytes"].as_u64().unwrap_or(0);
    let total = snap["memory_bytes"].as_u64().unwrap_or(0);
    println!(
        "  snapshot of a {} MiB guest that touched {used_mib} MiB (its own count): {:.1} MiB of memory data (target <= 40 MiB: {}), taken in {:.3} s",
        total >> 20,
        data as f64 / f64::from(1 << 20),
        if data <= 40 << 20 { "met" } else { "NOT met" },
        secs(took)
    );

    // 3. Restores of it.
    let (mut restored, mut answered) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let (_, created) = api(d, "POST", "/v1/snapshots/bench/restore", "{}")?;
        let id = vm_id(&created)?;
        answered.push(t.elapsed());
        restored.push(ready(d, &id, t)?);
        stop(d, &id)?;
    }
    let (restored, answered) = (median(restored), median(answered));
    let ratio = secs(restored) / secs(cold).max(1e-9);
    println!(
        "  restore to ready              {:>8.3} s   restore / cold boot {ratio:.2} (target <= 0.2: {})",
        secs(restored),
        if ratio <= 0.2 { "met" } else { "NOT met" }
    );
    println!(
        "    of which the restore request (the VMM started and restored the guest) {:.3} s, the guest's reconnect and new identity {:.3} s",
        secs(answered),
        secs(restored.saturating_sub(answered))
    );
    cli(d, &["snapshot", "rm", "bench"])?;

    // 4. Warm and cold `run --image`.
    nanoclaw_tests::oci::import_test_image(d, "bench-image", CLI_TIMEOUT * 4)?;
    let run = |label: &str| -> Result<Duration> {
        let mut times = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            cli(d, &["run", "--image", "bench-image", "--", "/bin/true"])
                .with_context(|| format!("a {label} run"))?;
            times.push(t.elapsed());
        }
        Ok(median(times))
    };
    let cold_run = run("cold")?;
    let t = Instant::now();
    let template = cli(d, &["image", "warm", "bench-image"])?;
    let warm_took = t.elapsed();
    let warm_run = run("warm")?;
    println!(
        "  run --image to exit: cold {:.3} s, warm {:.3} s   warm / cold {:.2} (template {} taken in {:.3} s)",
        secs(cold_run),
        secs(warm_run),
        secs(warm_run) / secs(cold_run).max(1e-9),
        template.trim(),
        secs(warm_took)
    );
    Ok(())
}
