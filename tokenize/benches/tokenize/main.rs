//! Tokenization benchmark (issue 8). Prints figures; it is not a test, and CI does not run it.
//!
//! - scan throughput (a [`Mode::Monitor`] tokenizer, the sparse corpus: few hits) and tokenize
//!   throughput ([`Mode::Enforce`]), in MB/s (10^6 bytes of UTF-8 per second), one call per
//!   document;
//! - FF1 surrogates per second for each kind (enforce mode on documents that are one value per
//!   line, so nearly all the time is FF1);
//! - precision and recall per kind of [`detect_spans`] against the corpus's ground truth, and,
//!   given Presidio's detections on the same files, Presidio's, in one table;
//! - recall and precision per kind on the boundary corpus (each kind after and before every
//!   punctuation mark and run into words), and the false positives on its look-alike set; the
//!   crate's tests assert the same figures (`every_kind_is_found_at_every_boundary`,
//!   `look_alikes_are_left_alone_at_every_boundary`).
//!
//! Matching rule (the same for both tools): a detection is a true positive if it overlaps a
//! planted value of the same kind; a planted value is found if a detection of its kind overlaps
//! it. Precision = true-positive detections / detections, recall = found values / values.
//!
//! # Usage
//! ```text
//! cargo bench -p nanoclaw-tokenize --bench tokenize                      # our figures only
//! cargo bench -p nanoclaw-tokenize --bench tokenize -- gen DIR [SPARSE_BYTES DENSE_BYTES]
//! cargo bench -p nanoclaw-tokenize --bench tokenize -- run DIR [PRESIDIO_JSON]
//! ```
//! `gen` writes `DIR/{sparse,dense}.txt` and `DIR/{sparse,dense}.json` (the documents' and the
//! planted values' byte spans); `run` scores those files and measures throughput on larger
//! in-memory corpora from the same generator and seed (of which the files are a prefix).
//! `scripts/bench-tokenize` runs `gen`, Presidio (`scripts/bench_tokenize_presidio.py`) and
//! `run`.
//!
//! # Layout
//! - `corpus`: the seeded, labelled corpus generator.
//! - `boundary`: the boundary corpus and its look-alikes (shared with the crate's tests).
//! - this file: the files, the timings, the scoring and the table.

mod boundary;
mod corpus;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nanoclaw_tokenize::{Kind, Mode, Tokenizer, detect_spans};
use serde_json::{Value, json};

use corpus::{Corpus, Density, Rng};

const SEED: u64 = 0x6e61_6e6f_636c_6177;
/// Default sizes of the scored files (Presidio scans them too, at about 0.1 MB/s).
const SPARSE_FILE_BYTES: usize = 2_000_000;
const DENSE_FILE_BYTES: usize = 500_000;
/// Sizes of the in-memory corpora our throughput is measured on.
const SPARSE_MEM_BYTES: usize = 32_000_000;
const DENSE_MEM_BYTES: usize = 8_000_000;
/// Each timing repeats until at least this long has passed, and the best of 3 is kept.
const MIN_TIME: Duration = Duration::from_millis(700);
const KINDS: [Kind; 4] = [Kind::Card, Kind::Ssn, Kind::Email, Kind::ApiKey];
/// The seed and size of the boundary corpus, as the crate's tests use them.
const BOUNDARY_SEED: u64 = 0x626f_756e_6461_7279;
const BOUNDARY_PER_PAIR: usize = 4;
const LOOK_ALIKES_PER_PAIR: usize = 6;
/// The scan throughput the issue asks for, MB/s on the sparse corpus.
const TARGET_SCAN_MB_S: f64 = 150.0;

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Card => "card",
        Kind::Ssn => "ssn",
        Kind::Email => "email",
        Kind::ApiKey => "api_key",
    }
}

fn kind_of(name: &str) -> Option<Kind> {
    KINDS.into_iter().find(|k| kind_name(*k) == name)
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; ignore it.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        [] => {
            let dir = std::env::temp_dir().join(format!("tokbench-{}", std::process::id()));
            gen_files(&dir, SPARSE_FILE_BYTES, DENSE_FILE_BYTES)?;
            let r = run(&dir, None);
            std::fs::remove_dir_all(&dir).ok();
            r
        }
        ["gen", dir] => gen_files(Path::new(dir), SPARSE_FILE_BYTES, DENSE_FILE_BYTES),
        ["gen", dir, sparse, dense] => gen_files(
            Path::new(dir),
            sparse.parse().context("SPARSE_BYTES")?,
            dense.parse().context("DENSE_BYTES")?,
        ),
        ["run", dir] => run(Path::new(dir), None),
        ["run", dir, presidio] => run(Path::new(dir), Some(Path::new(presidio))),
        _ => {
            bail!("usage: tokenize [gen DIR [SPARSE_BYTES DENSE_BYTES] | run DIR [PRESIDIO_JSON]]")
        }
    }
}

fn densities() -> [Density; 2] {
    [Density::Sparse, Density::Dense]
}

fn gen_files(dir: &Path, sparse: usize, dense: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    for d in densities() {
        let bytes = if d == Density::Sparse { sparse } else { dense };
        let c = corpus::generate(SEED, d, bytes);
        let (txt, meta) = paths(dir, d);
        std::fs::write(&txt, &c.text).with_context(|| format!("write {}", txt.display()))?;
        let labels = json!({
            "seed": SEED,
            "docs": c.docs.iter().map(|r| [r.start, r.end]).collect::<Vec<_>>(),
            "truth": c.truth.iter().map(|(k, r)| json!([kind_name(*k), r.start, r.end])).collect::<Vec<_>>(),
        });
        std::fs::write(&meta, serde_json::to_vec(&labels)?)
            .with_context(|| format!("write {}", meta.display()))?;
    }
    Ok(())
}

fn paths(dir: &Path, d: Density) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{}.txt", d.name())),
        dir.join(format!("{}.json", d.name())),
    )
}

type Spans = Vec<(Kind, Range<usize>)>;

/// A corpus read back from the files `gen` wrote.
fn load(dir: &Path, d: Density) -> anyhow::Result<Corpus> {
    let (txt, meta) = paths(dir, d);
    let text = std::fs::read_to_string(&txt).with_context(|| format!("read {}", txt.display()))?;
    let meta: Value = serde_json::from_slice(
        &std::fs::read(&meta).with_context(|| format!("read {}", meta.display()))?,
    )?;
    let span = |v: &Value, a: usize| -> anyhow::Result<Range<usize>> {
        let n = |i: usize| v[i].as_u64().map(|x| x as usize).context("bad span");
        let r = n(a)?..n(a + 1)?;
        if r.start > r.end || r.end > text.len() {
            bail!("span out of range");
        }
        Ok(r)
    };
    let docs = meta["docs"]
        .as_array()
        .context("docs")?
        .iter()
        .map(|v| span(v, 0))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let truth = meta["truth"]
        .as_array()
        .context("truth")?
        .iter()
        .map(|v| {
            let k = v[0].as_str().and_then(kind_of).context("bad kind")?;
            Ok((k, span(v, 1)?))
        })
        .collect::<anyhow::Result<Spans>>()?;
    if docs.iter().any(|r| text.get(r.clone()).is_none()) {
        bail!("a document is not on character boundaries");
    }
    Ok(Corpus { text, docs, truth })
}

/// Our detections over the whole corpus, in corpus byte offsets.
fn our_spans(c: &Corpus) -> Spans {
    let mut out = Vec::new();
    for (i, r) in c.docs.iter().enumerate() {
        out.extend(
            detect_spans(c.doc(i))
                .into_iter()
                .map(|(k, s)| (k, s.start + r.start..s.end + r.start)),
        );
    }
    out
}

#[derive(Clone, Copy, Default)]
struct Score {
    truths: usize,
    found: usize,
    detections: usize,
    true_detections: usize,
}

impl Score {
    fn precision(&self) -> f64 {
        if self.detections == 0 {
            return f64::NAN;
        }
        self.true_detections as f64 / self.detections as f64
    }

    fn recall(&self) -> f64 {
        if self.truths == 0 {
            return f64::NAN;
        }
        self.found as f64 / self.truths as f64
    }
}

/// The matching rule of the module doc, per kind.
fn score(truth: &Spans, detections: &Spans, kind: Kind) -> Score {
    let mut t: Vec<Range<usize>> = truth
        .iter()
        .filter(|(k, _)| *k == kind)
        .map(|(_, r)| r.clone())
        .collect();
    t.sort_by_key(|r| r.start);
    let mut found = vec![false; t.len()];
    let mut s = Score {
        truths: t.len(),
        ..Score::default()
    };
    for (_, d) in detections.iter().filter(|(k, _)| *k == kind) {
        s.detections += 1;
        // Planted values do not overlap, so their ends are sorted too.
        let lo = t.partition_point(|r| r.end <= d.start);
        let hi = t.partition_point(|r| r.start < d.end);
        if lo < hi {
            s.true_detections += 1;
            found[lo..hi].iter_mut().for_each(|f| *f = true);
        }
    }
    s.found = found.iter().filter(|f| **f).count();
    s
}

/// This thread's CPU time. The machine is shared: CPU seconds, unlike wall seconds, do not
/// count the time other processes hold the core (Presidio is timed the same way).
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and the clock id is a constant Linux defines;
    // the call writes only `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Seconds per pass of `f`, as (CPU, wall): the best of 3 rounds, each repeating `f` for at
/// least [`MIN_TIME`] of CPU time.
fn time(mut f: impl FnMut()) -> (f64, f64) {
    let mut best = (f64::INFINITY, f64::INFINITY);
    for _ in 0..3 {
        let (cpu0, wall0) = (thread_cpu_time(), Instant::now());
        let mut n = 0u32;
        while n == 0 || thread_cpu_time() - cpu0 < MIN_TIME {
            f();
            n += 1;
        }
        let cpu = (thread_cpu_time() - cpu0).as_secs_f64() / f64::from(n);
        let wall = wall0.elapsed().as_secs_f64() / f64::from(n);
        best = (best.0.min(cpu), best.1.min(wall));
    }
    best
}

fn mb_per_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

/// MB/s (per CPU second, per wall second) of one tokenizer in `mode` over every document of
/// `c` (a fresh tokenizer per pass).
fn throughput(c: &Corpus, mode: Mode) -> anyhow::Result<(f64, f64)> {
    let mut err = None;
    let secs = time(|| match Tokenizer::new([7; 32], mode) {
        Ok(mut t) => {
            for i in 0..c.docs.len() {
                match t.tokenize_text(c.doc(i)) {
                    Ok(out) => {
                        black_box(out);
                    }
                    Err(e) => err = Some(e),
                }
            }
        }
        Err(e) => err = Some(e),
    });
    if let Some(e) = err {
        return Err(e.into());
    }
    Ok((
        mb_per_s(c.text.len(), secs.0),
        mb_per_s(c.text.len(), secs.1),
    ))
}

/// FF1 surrogates per second for one kind: 2,000 distinct values, one per line, in documents of
/// 100 lines, through an enforce-mode tokenizer.
fn surrogates_per_s(kind: Kind) -> anyhow::Result<f64> {
    let mut rng = Rng::new(SEED ^ 0xff1);
    let docs: Vec<String> = (0..20)
        .map(|_| {
            (0..100)
                .map(|_| match kind {
                    Kind::Card => corpus::card(&mut rng),
                    Kind::Ssn => corpus::ssn(&mut rng),
                    Kind::Email => corpus::email(&mut rng),
                    Kind::ApiKey => {
                        let (name, key, _) = corpus::api_key(&mut rng);
                        format!("{name}={key}")
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    let mut count = 0u64;
    let mut err = None;
    let secs = time(|| {
        count = 0;
        match Tokenizer::new([7; 32], Mode::Enforce) {
            Ok(mut t) => {
                for d in &docs {
                    match t.tokenize_text(d) {
                        Ok((out, report)) => {
                            count += report.total();
                            black_box(out);
                        }
                        Err(e) => err = Some(e),
                    }
                }
            }
            Err(e) => err = Some(e),
        }
    });
    if let Some(e) = err {
        return Err(e.into());
    }
    if count < 1900 {
        bail!(
            "only {count} of 2000 {} values were tokenized",
            kind_name(kind)
        );
    }
    Ok(count as f64 / secs.0)
}

/// Presidio's figures for one corpus, read from the JSON the Python script wrote.
struct Presidio {
    version: String,
    bytes: usize,
    cpu_seconds: f64,
    wall_seconds: f64,
    spans: Spans,
    kinds: Vec<Kind>,
}

fn load_presidio(path: &Path, d: Density) -> anyhow::Result<Presidio> {
    let v: Value = serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("read {}", path.display()))?,
    )?;
    let c = &v["corpora"][d.name()];
    let spans = c["detections"]
        .as_array()
        .context("detections")?
        .iter()
        .map(|x| {
            let k = x[0].as_str().and_then(kind_of).context("bad kind")?;
            let n = |i: usize| x[i].as_u64().map(|n| n as usize).context("bad span");
            Ok((k, n(1)?..n(2)?))
        })
        .collect::<anyhow::Result<Spans>>()?;
    let kinds = v["kinds"]
        .as_array()
        .context("kinds")?
        .iter()
        .filter_map(|k| k.as_str().and_then(kind_of))
        .collect();
    Ok(Presidio {
        version: format!(
            "presidio-analyzer {}, spaCy {}",
            v["presidio_version"].as_str().unwrap_or("?"),
            v["spacy_version"].as_str().unwrap_or("?")
        ),
        bytes: c["bytes"].as_u64().context("bytes")? as usize,
        cpu_seconds: c["cpu_seconds"].as_f64().context("cpu_seconds")?,
        wall_seconds: c["wall_seconds"].as_f64().context("wall_seconds")?,
        spans,
        kinds,
    })
}

fn cell(x: f64) -> String {
    if x.is_nan() {
        "-".to_string()
    } else {
        format!("{x:.3}")
    }
}

fn run(dir: &Path, presidio: Option<&Path>) -> anyhow::Result<()> {
    println!(
        "tokenize benchmark: seed {SEED:#x}; MB/s = 10^6 bytes per CPU second of the scanning \
         thread (wall-clock figures in brackets); one call per document"
    );
    println!(
        "matching: a detection counts if it overlaps a planted value of the same kind \
         (P = true detections / detections, R = planted values found / planted values)"
    );
    let mut mem_speed = BTreeMap::new();
    for d in densities() {
        let file = load(dir, d)?;
        let mem_bytes = if d == Density::Sparse {
            SPARSE_MEM_BYTES
        } else {
            DENSE_MEM_BYTES
        };
        let mem = corpus::generate(SEED, d, mem_bytes.max(file.text.len()));
        if !mem.text.starts_with(&file.text) {
            bail!(
                "{}: the files are not from this generator and seed",
                d.name()
            );
        }
        let scan = throughput(&mem, Mode::Monitor)?;
        let enforce = throughput(&mem, Mode::Enforce)?;
        mem_speed.insert(d.name(), (scan, enforce));
        let ours = our_spans(&file);
        let p = presidio.map(|p| load_presidio(p, d)).transpose()?;
        println!();
        println!(
            "== {} corpus: {} documents, {:.2} MB, {} planted values ({:.1} per KB) ==",
            d.name(),
            file.docs.len(),
            file.text.len() as f64 / 1e6,
            file.truth.len(),
            file.truth.len() as f64 * 1e3 / file.text.len() as f64
        );
        if let Some(p) = &p {
            println!(
                "Presidio: {} (blank spaCy pipeline, default threshold)",
                p.version
            );
        }
        println!(
            "{:<8} {:>7} | {:>7} {:>7} | {:>10} {:>10}",
            "kind", "planted", "ours P", "ours R", "Presidio P", "Presidio R"
        );
        for k in KINDS {
            let o = score(&file.truth, &ours, k);
            let theirs = match &p {
                None => "(not run)".to_string(),
                Some(p) if !p.kinds.contains(&k) => "n/a: no recognizer (R = 0)".to_string(),
                Some(p) => {
                    let s = score(&file.truth, &p.spans, k);
                    format!("{:>10} {:>10}", cell(s.precision()), cell(s.recall()))
                }
            };
            println!(
                "{:<8} {:>7} | {:>7} {:>7} | {theirs}",
                kind_name(k),
                o.truths,
                cell(o.precision()),
                cell(o.recall())
            );
        }
        println!(
            "throughput, ours: scan (monitor) {:.1} MB/s, tokenize (enforce) {:.1} MB/s \
             [wall: {:.1}, {:.1}] (on {:.0} MB of the same generator)",
            scan.0,
            enforce.0,
            scan.1,
            enforce.1,
            mem.text.len() as f64 / 1e6
        );
        if let Some(p) = &p {
            let theirs = mb_per_s(p.bytes, p.cpu_seconds);
            println!(
                "throughput, Presidio: {theirs:.3} MB/s [wall: {:.3}] (analysis only, on the \
                 {:.2} MB file); ours/Presidio: scan {:.0}x, enforce {:.0}x",
                mb_per_s(p.bytes, p.wall_seconds),
                p.bytes as f64 / 1e6,
                scan.0 / theirs,
                enforce.0 / theirs
            );
        }
        let dump = json!(
            ours.iter()
                .map(|(k, r)| json!([kind_name(*k), r.start, r.end]))
                .collect::<Vec<_>>()
        );
        let out = dir.join(format!("{}.ours.json", d.name()));
        std::fs::write(&out, serde_json::to_vec(&dump)?)
            .with_context(|| format!("write {}", out.display()))?;
    }
    println!();
    print!("FF1 surrogates/s (enforce, one value per line):");
    for k in KINDS {
        print!(" {} {:.0}", kind_name(k), surrogates_per_s(k)?);
    }
    println!();
    boundary_figures();
    let ((sparse_scan, _), _) = mem_speed.get("sparse").copied().unwrap_or_default();
    println!(
        "target >= {TARGET_SCAN_MB_S:.0} MB/s scanning text with few hits: {} ({sparse_scan:.1} MB/s)",
        if sparse_scan >= TARGET_SCAN_MB_S {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}

/// The boundary corpus's figures: recall and precision per kind, false positives on the
/// look-alikes (targets: recall >= 0.99, no false positive).
fn boundary_figures() {
    let samples = boundary::samples(BOUNDARY_SEED, BOUNDARY_PER_PAIR);
    println!();
    println!(
        "== boundary corpus: {} samples, each kind after and before {} punctuation marks and \
         run into words (emails: punctuation only) ==",
        samples.len(),
        boundary::BEFORE.len() - 1
    );
    println!(
        "{:<8} {:>7} | {:>7} {:>7} | target R >= 0.99",
        "kind", "planted", "P", "R"
    );
    for k in KINDS {
        let (f, missed) = boundary::score(&samples, k, detect_spans);
        println!(
            "{:<8} {:>7} | {:>7} {:>7} |{}",
            kind_name(k),
            f.planted,
            cell(f.precision()),
            cell(f.recall()),
            missed
                .first()
                .map(|s| format!(
                    " missed e.g. {:?} (before {:?}, after {:?})",
                    s.text, s.before, s.after
                ))
                .unwrap_or_default()
        );
    }
    let look = boundary::look_alikes(BOUNDARY_SEED, LOOK_ALIKES_PER_PAIR);
    let mut fp: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for c in &look {
        let e = fp.entry(c.what).or_default();
        e.0 += 1;
        if !detect_spans(&c.text).is_empty() {
            e.1 += 1;
        }
    }
    let total: usize = fp.values().map(|v| v.1).sum();
    println!(
        "look-alikes: {} written, {total} detected (target 0): {}",
        look.len(),
        fp.iter()
            .map(|(w, (n, d))| format!("{w} {d}/{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
