"""Presidio half of scripts/bench-tokenize: runs Microsoft Presidio's AnalyzerEngine on the
corpus files that `cargo bench -p nanoclaw-tokenize --bench tokenize -- gen DIR` wrote, one analyze()
call per document, and writes its detections and timings to a JSON file that the Rust bench's
`run DIR PRESIDIO_JSON` puts in the comparison table.

Offline: Presidio's default engine downloads a spaCy model, so it gets a blank English pipeline
instead (its pattern recognizers for these kinds do not need a model). Only CREDIT_CARD,
US_SSN and EMAIL_ADDRESS are asked for: Presidio has no recognizer for API keys or tokens.
Presidio's default score threshold is kept (every result counts).

Only the analyze() calls are timed, in CPU seconds of this process (the machine is shared) and
in wall seconds; one warm-up call first (the email validator's public-suffix lookup fails offline
and falls back to its bundled list on the first use).

It also prints its own precision and recall with the same matching rule as the Rust bench: a
detection is a true positive if it overlaps a planted value of the same kind; a planted value
is found if a detection of its kind overlaps it.
"""

import argparse
import bisect
import json
import logging
import os
import sys
import tempfile
import time

ENTITIES = {"CREDIT_CARD": "card", "US_SSN": "ssn", "EMAIL_ADDRESS": "email"}
CORPORA = ("sparse", "dense")


def engine(model_dir):
    import spacy
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    spacy.blank("en").to_disk(model_dir)
    provider = NlpEngineProvider(nlp_configuration={
        "nlp_engine_name": "spacy",
        "models": [{"lang_code": "en", "model_name": model_dir}],
    })
    return AnalyzerEngine(nlp_engine=provider.create_engine(), supported_languages=["en"])


def byte_offsets(doc):
    """Maps a character offset of `doc` to its UTF-8 byte offset."""
    if doc.isascii():
        return lambda i: i
    table = [0]
    for ch in doc:
        table.append(table[-1] + len(ch.encode("utf-8")))
    return lambda i: table[i]


def analyze(analyzer, text, docs):
    """Detections as [kind, start byte, end byte, score] and (CPU s, wall s) of the analysis."""
    data = text.encode("utf-8")
    detections = []
    cpu = wall = 0.0
    for start, end in docs:
        doc = data[start:end].decode("utf-8")
        c0, w0 = time.process_time(), time.perf_counter()
        results = analyzer.analyze(text=doc, language="en", entities=list(ENTITIES))
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        to_byte = byte_offsets(doc)
        for r in results:
            kind = ENTITIES.get(r.entity_type)
            if kind is not None:
                detections.append([kind, start + to_byte(r.start), start + to_byte(r.end),
                                   round(r.score, 3)])
    return detections, cpu, wall


def score(truth, detections, kind):
    """(precision, recall, planted) with the module doc's matching rule."""
    spans = sorted((s, e) for k, s, e in truth if k == kind)
    starts = [s for s, _ in spans]
    ends = [e for _, e in spans]
    found = [False] * len(spans)
    dets = true_dets = 0
    for k, s, e, _ in detections:
        if k != kind:
            continue
        dets += 1
        lo = bisect.bisect_right(ends, s)
        hi = bisect.bisect_left(starts, e)
        if lo < hi:
            true_dets += 1
            for i in range(lo, hi):
                found[i] = True
    p = true_dets / dets if dets else float("nan")
    r = sum(found) / len(spans) if spans else float("nan")
    return p, r, len(spans)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="the directory `gen` wrote")
    ap.add_argument("--out", required=True, help="the JSON file to write")
    args = ap.parse_args()

    # The offline public-suffix fallback logs a traceback per failed URL; it is expected.
    logging.getLogger("tldextract").setLevel(logging.CRITICAL)
    import spacy
    from importlib.metadata import version

    with tempfile.TemporaryDirectory() as model_dir:
        analyzer = engine(os.path.join(model_dir, "blank_en"))
        analyzer.analyze(text="warm up jane@example.com 4111 1111 1111 1111", language="en",
                         entities=list(ENTITIES))
        out = {
            "presidio_version": version("presidio-analyzer"),
            "spacy_version": spacy.__version__,
            "kinds": sorted(ENTITIES.values()),
            "score_threshold": 0,
            "corpora": {},
        }
        for name in CORPORA:
            with open(os.path.join(args.dir, name + ".txt"), encoding="utf-8") as f:
                text = f.read()
            with open(os.path.join(args.dir, name + ".json"), encoding="utf-8") as f:
                labels = json.load(f)
            detections, cpu, wall = analyze(analyzer, text, labels["docs"])
            nbytes = len(text.encode("utf-8"))
            out["corpora"][name] = {"bytes": nbytes, "cpu_seconds": cpu, "wall_seconds": wall,
                                    "detections": detections}
            print(f"presidio {name}: {nbytes / 1e6:.2f} MB in {cpu:.1f} CPU s "
                  f"({nbytes / 1e6 / cpu:.3f} MB/s), {len(detections)} detections", file=sys.stderr)
            for kind in sorted(ENTITIES.values()):
                p, r, n = score(labels["truth"], detections, kind)
                print(f"presidio {name} {kind}: planted {n}, P {p:.3f} R {r:.3f}", file=sys.stderr)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
