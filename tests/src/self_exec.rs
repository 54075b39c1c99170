//! Test executables that play several processes: built without libtest's harness (`harness =
//! false`), they re-execute themselves in other roles, such as the daemon (`serve ...`, see
//! [`SERVE`]) and its VMM (`--kernel ...`, a fake one from [`crate::fake_vmm`]).
//!
//! [`main`] picks the role from the first argument. Without one, it runs the tests, reading the
//! arguments `cargo test` passes on the way libtest does: name filters, `--exact`, `--skip`,
//! `--list`, `--ignored` (no test here is ignored) and `--include-ignored`; other options are
//! accepted and have no effect. Tests run one at a time, in order.
//!
//! ```text
//! fn main() {
//!     nanoclaw_tests::self_exec::main(
//!         &[self_exec::SERVE, ("--kernel", fake_vmm)],
//!         nanoclaw_tests::tests![first_test, second_test],
//!     );
//! }
//! ```

use std::time::Instant;

use clap::Parser;

/// A role: the first argument that selects it, and what runs it (given the arguments from that
/// one on).
pub type Role = (&'static str, fn(&[String]));

/// A test: its name and its body (which fails by panicking).
pub type Test = (&'static str, fn());

/// The daemon: `serve ARGS` runs the real daemon (`host_agent::daemon::serve_main`) in this
/// executable.
pub const SERVE: Role = ("serve", serve_daemon);

/// `[(name, fn), ...]` for [`main`], from the test functions' names.
#[macro_export]
macro_rules! tests {
    ($($test:ident),* $(,)?) => {
        &[$((stringify!($test), $test as fn())),*]
    };
}

/// Plays the role the first argument names, or runs `tests`. Exits 101 if a test failed.
/// A VMM's command line may open with `--disk FILE` pairs (a VM with an image): the role is
/// the argument after them, and the role gets the arguments from there.
pub fn main(roles: &[Role], tests: &[Test]) {
    let args: Vec<String> = std::env::args().collect();
    let mut at = 1;
    while args.get(at).is_some_and(|a| a == "--disk") {
        at += 2;
    }
    if let Some(first) = args.get(at)
        && let Some((_, role)) = roles.iter().find(|(name, _)| name == first)
    {
        role(&args[at..]);
        return;
    }
    if !run_tests(&Selection::parse(&args[1..]), tests) {
        std::process::exit(101);
    }
}

#[derive(Debug, Parser)]
struct ServeCli {
    #[command(flatten)]
    args: host_agent::daemon::ServeArgs,
}

/// The role `serve`: `args` are `serve ...` as `host-agent` takes them.
fn serve_daemon(args: &[String]) {
    let cli = ServeCli::parse_from(args);
    if let Err(e) = host_agent::daemon::serve_main(cli.args) {
        eprintln!("serve: error: {e:#}");
        std::process::exit(1);
    }
}

/// Which tests to run, from libtest's command line.
#[derive(Debug, Default)]
struct Selection {
    list: bool,
    exact: bool,
    ignored_only: bool,
    filters: Vec<String>,
    skip: Vec<String>,
}

impl Selection {
    fn parse(args: &[String]) -> Self {
        let mut s = Selection::default();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--list" => s.list = true,
                "--exact" => s.exact = true,
                "--ignored" => s.ignored_only = true,
                "--skip" => s.skip.extend(args.next().cloned()),
                // libtest's options that take a value as the next argument.
                "--test-threads" | "--format" | "--color" | "--logfile" | "--shuffle-seed"
                | "-Z" => {
                    args.next();
                }
                flag if flag.starts_with('-') => {}
                filter => s.filters.push(filter.to_owned()),
            }
        }
        s
    }

    fn wants(&self, name: &str) -> bool {
        let matches = |pattern: &String| {
            if self.exact {
                name == pattern
            } else {
                name.contains(pattern.as_str())
            }
        };
        // No test here is ignored, so `--ignored` selects none.
        !self.ignored_only
            && (self.filters.is_empty() || self.filters.iter().any(matches))
            && !self.skip.iter().any(matches)
    }
}

/// Runs (or lists) the selected tests; whether none failed.
fn run_tests(selection: &Selection, tests: &[Test]) -> bool {
    let chosen: Vec<&Test> = tests.iter().filter(|(n, _)| selection.wants(n)).collect();
    if selection.list {
        for (name, _) in &chosen {
            println!("{name}: test");
        }
        let n = chosen.len();
        println!(
            "\n{n} {}, 0 benchmarks",
            if n == 1 { "test" } else { "tests" }
        );
        return true;
    }
    println!("\nrunning {} tests", chosen.len());
    let started = Instant::now();
    let mut failed = Vec::new();
    for (name, test) in &chosen {
        println!("test {name} ...");
        let t = Instant::now();
        match std::panic::catch_unwind(test) {
            Ok(()) => println!("test {name} ... ok ({:.1?})", t.elapsed()),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    if !failed.is_empty() {
        println!("\nfailures:");
        for name in &failed {
            println!("    {name}");
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed; 0 ignored; 0 measured; {} filtered out; finished in {:.2}s\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        chosen.len() - failed.len(),
        failed.len(),
        tests.len() - chosen.len(),
        started.elapsed().as_secs_f64()
    );
    failed.is_empty()
}
