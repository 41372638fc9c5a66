"""Data-stage throughput: cleaning, filtering, PII scrubbing and tokenization, MB/s and peak RSS.

    python bench/data_throughput.py [SOURCES...] [--stages-only] [--max-mb N] [--repeat N]

    python bench/data_throughput.py                                # the embedded stdlib corpus
    python bench/data_throughput.py /usr/share/doc --max-mb 40     # prose-heavy: changelogs, NEWS, manuals
    python bench/data_throughput.py PATH [PATH...]                 # any lmforge data source

Three sections, each measured in its own subprocess so that its peak RSS (VmHWM) is its own:

1. Phases: the data stage end to end (``prepare_data``, default config), training the tokenizer,
   and tokenizing.
2. Per-stage rows: each filtering step on its own, over identical input. The sources' documents
   are read once (``lmforge.data.sources.iter_source``), NFC-normalised and kept to the length
   rules the clean stage applies before filtering (``min_chars``..``max_chars``), and cached to a
   JSONL file in the work dir; each stage's process loads that file and builds its inputs before
   the clock starts, so reading is not timed. lmforge rows: ``quality`` (``apply_filters`` with
   the default ``FilterConfig``, profile auto), ``quality-aggressive``, ``pii`` (``scrub``),
   ``langid`` (``detect`` on every document) and, for reference, ``minhash``
   (``MinHasher.signature``). Where datatrove is installed, its Gopher quality, Gopher repetition
   and C4 quality filters, both Gopher filters chained, its PII formatter and its language filter
   run on the same documents, each through its per-document method (``filter`` / ``format``) on
   datatrove ``Document`` objects, so no pipeline executor or IO is timed. A row whose class needs
   something this machine does not have (a spaCy tokenizer, a fastText model to download) reads
   ``unavailable: REASON``. Every stage is warmed up on a small text first, so lazy model and
   tokenizer loads are not timed either.
3. The target: "all default filters together cost no more than 30% of the clean stage's
   throughput". ``prepare_data`` runs end to end with the quality filters and PII off, then with
   the defaults, on 2 workers (the target) and on 1 (reference); MB/s is input bytes over wall
   seconds, and the target is met when defaults/off >= 0.70.

MB are UTF-8 megabytes of text: read for cleaning, trained on for the tokenizer, encoded for
tokenizing, fed to the stage for the per-stage rows. ``--max-mb N`` keeps every section to a
spread, deterministic sample of about N MB of the sources' files (copied into the work dir, names
kept, so extension-based decisions stay the same); ``--stages-only`` runs only section 2.
The machine may be shared: compare ratios measured in one run, not MB/s across runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: lmforge from this checkout
    sys.path.insert(0, str(ROOT))

PHASES = {
    "clean": "from lmforge.data.prepare import DataConfig, prepare_data\n"
             "m = prepare_data({sources!r}, {work!r} + '/data', DataConfig(), progress=False)['metrics']\n"
             "mb = m['input_bytes'] / 1e6\n"
             "extra = f\"kept {{m['docs_kept']}}/{{m['docs_seen']}} docs, dropped {{m['dropped']}}\"",
    "tokenizer": "from lmforge.tokenizer.train import train_tokenizer\n"
                 "man = train_tokenizer({work!r} + '/data', {work!r} + '/tok', 8192, progress=False)\n"
                 "mb = min(man['config']['max_train_bytes'] or 1e18, {train_bytes}) / 1e6\n"
                 "extra = f\"vocab 8192, val {{man['metrics']['bytes_per_token']}} bytes/token\"",
    "tokenize": "from lmforge.tokenizer.encode import tokenize_data\n"
                "m = tokenize_data({work!r} + '/data', {work!r} + '/tok', progress=False)['metrics']\n"
                "mb = (m['bytes_train'] + m['bytes_val']) / 1e6\n"
                "extra = f\"{{m['tokens_train']:,}} train + {{m['tokens_val']:,}} val tokens\"",
}
WRAP = """import json, resource, time
t = time.perf_counter()
{body}
s = time.perf_counter() - t
try:
    rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
except OSError:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"s": s, "mb": mb, "rss_mb": rss, "extra": extra}}))
"""

# Per-stage rows, in print order: (stage, implementation, what it corresponds to on the other side).
STAGES = [
    ("quality", "lmforge", "default FilterConfig: gopher + repetition (prose), code + repetition (code)"),
    ("quality", "datatrove", "GopherQualityFilter then GopherRepetitionFilter, chained per doc"),
    ("gopher-quality", "datatrove", "GopherQualityFilter ~ lmforge quality's gopher rules"),
    ("gopher-repetition", "datatrove", "GopherRepetitionFilter ~ lmforge quality's repetition rules"),
    ("quality-aggressive", "lmforge", "quality.aggressive(): every filter, C4 included, tighter"),
    ("c4", "datatrove", "C4QualityFilter ~ lmforge's c4 rule (in quality-aggressive)"),
    ("pii", "lmforge", "scrub: email, ip, phone, private/aws/api keys"),
    ("pii", "datatrove", "PIIFormatter: email, ip ~ lmforge pii"),
    ("langid", "lmforge", "langid.detect on every doc (py3langid)"),
    ("langid", "datatrove", "LanguageFilter (fastText lid.176) ~ lmforge langid"),
    ("minhash", "lmforge", "MinHasher.signature, 128 perms (reference)"),
]
FILTERING = ("quality", "quality-aggressive", "gopher-quality", "gopher-repetition", "c4")  # "kept" means something
STAGE_TIMEOUT_S = 3600
# Untimed first call of every stage: prose without repeats, so each filter gets as far as its word
# tokenizer or model, whose lazy load is then not timed.
WARMUP = ("Before the clock starts, every stage reads this short paragraph once. It loads whatever models, "
          "tables or tokenizers the stage needs, so that their cost is not counted against the documents.\n\n"
          "Questions about the benchmark can go to jane.doe@example.org, or by phone to +1 415 555 0100. "
          "Nothing here is measured; the numbers come from the corpus that follows, which was read from disk "
          "beforehand and held in memory with the same text for each of the implementations being compared.\n")
TARGET_RATIO = 0.70


def run_phase(name: str, sources: list[str], work: str, train_bytes: int) -> dict:
    code = WRAP.format(body=PHASES[name].format(sources=sources, work=work, train_bytes=train_bytes))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"{name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the input: read once, cached ----

def _spread_key(path: Path) -> bytes:
    return hashlib.blake2b(str(path).encode("utf-8", "surrogatepass"), digest_size=8).digest()


def prepare_input(sources: list[str], work: Path, max_mb: float | None) -> dict:
    """Read the sources once into ``work/docs.jsonl`` (the per-stage input); with ``max_mb``, only
    a spread sample of their files, also copied under ``work/input/`` for the end-to-end runs."""
    from lmforge.data.clean import normalize
    from lmforge.data.prepare import DataConfig
    from lmforge.data.sources import Drops, iter_file, iter_source, source_files

    cfg = DataConfig()
    drops = Drops()
    budget = max_mb * 1e6 / len(sources) if max_mb else None  # each source gets its share
    run_sources: list[str] = []
    stats = {"docs_read": 0, "docs": 0, "bytes": 0, "files": 0, "length_dropped": 0, "read_bytes": 0, "note": ""}
    t0 = time.perf_counter()
    with open(work / "docs.jsonl", "w", encoding="utf-8") as out:

        def keep(doc_id: str, raw: str) -> int:
            try:
                n = len(raw.encode("utf-8"))
            except UnicodeEncodeError:  # lone surrogates: the clean stage skips these too
                return 0
            stats["docs_read"] += 1
            text = normalize(raw)
            if not text.strip() or not cfg.min_chars <= len(text) <= cfg.max_chars:
                stats["length_dropped"] += 1
                return n
            out.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
            stats["docs"] += 1
            stats["bytes"] += len(text.encode("utf-8"))
            return n

        for k, src in enumerate(sources):
            read_bytes = 0
            files = source_files(src)
            if files is None or budget is None:  # streamed source, or no cap: the source as it is
                run_sources.append(src)
                for doc_id, raw in iter_source(src, cfg.text_field, drops, files):
                    read_bytes += keep(doc_id, raw)
                    if budget is not None and read_bytes >= budget:
                        stats["note"] += (f"{src}: a streamed source, so only its first {budget / 1e6:g} MB per "
                                          "stage; the end-to-end runs read all of it. ")
                        break
                stats["files"] += len(files or [])
                stats["read_bytes"] += read_bytes
                continue
            if not files:
                continue
            chosen = []
            for f in sorted(files, key=_spread_key):  # a spread, deterministic sample of the files
                if read_bytes >= budget:
                    break
                chosen.append(f)
                read_bytes += sum(keep(doc_id, raw) for doc_id, raw in iter_file(f, cfg.text_field, drops))
            root = Path(os.path.commonpath([str(f.parent) for f in files]))
            dest = work / "input" / f"{k:02d}"
            for f in chosen:
                target = dest / f.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
            run_sources.append(str(dest))
            stats["files"] += len(chosen)
            stats["read_bytes"] += read_bytes
    stats.update(read_mb=stats.pop("read_bytes") / 1e6, read_s=time.perf_counter() - t0, sources=run_sources,
                 drops=dict(drops))
    return stats


# ---- one stage, in its own process ----

def _vm(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _lmforge_stage(stage: str):
    """(per-document function returning (kept or None, label or None), summary of the labels)."""
    from collections import Counter

    if stage in ("quality", "quality-aggressive"):
        from lmforge.data.quality import FilterConfig, aggressive, apply_filters

        cfg = FilterConfig() if stage == "quality" else aggressive()

        def fn(doc):
            reason = apply_filters(doc[1], doc[0], cfg)[1]
            return reason is None, reason

        return fn, lambda c: "dropped " + ", ".join(f"{k} {v}" for k, v in c.most_common(5) if k)
    if stage == "pii":
        from lmforge.data.pii import scrub

        def fn(doc):
            counts = scrub(doc[1])[1]
            return None, tuple(counts.items())

        def summary(c: Counter) -> str:
            kinds: Counter = Counter()
            for items, n in c.items():
                for kind, k in items or ():
                    kinds[kind] += k * n
            changed = sum(n for items, n in c.items() if items)
            return f"{changed} docs changed; " + ", ".join(f"{k} {v}" for k, v in kinds.most_common())

        return fn, summary
    if stage == "langid":
        from lmforge.data.langid import detect

        return (lambda doc: (None, detect(doc[1])[0]),
                lambda c: "top " + ", ".join(f"{k} {v}" for k, v in c.most_common(4)))
    if stage == "minhash":
        from lmforge.data.clean import MinHasher

        hasher = MinHasher(0.8, 128)
        return (lambda doc: (None, hasher.signature(doc[1]) is None),
                lambda c: f"{c[True]} docs under one shingle")
    raise ValueError(stage)


def _datatrove_stage(stage: str):
    """As _lmforge_stage, for datatrove's filters; documents are datatrove Documents."""
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    def verdict(result) -> tuple[bool, str | None]:
        if isinstance(result, tuple):
            return bool(result[0]), result[1]
        return bool(result), None if result else "dropped"

    def dropped(c) -> str:
        return "dropped " + ", ".join(f"{k} {v}" for k, v in c.most_common(4) if k)

    if stage == "quality":
        quality, repetition = GopherQualityFilter(), GopherRepetitionFilter()

        def fn(doc):
            kept, reason = verdict(quality.filter(doc))
            if kept:
                kept, reason = verdict(repetition.filter(doc))
            return kept, reason

        return fn, dropped
    if stage in ("gopher-quality", "gopher-repetition", "c4"):
        step = {"gopher-quality": GopherQualityFilter, "gopher-repetition": GopherRepetitionFilter,
                "c4": C4QualityFilter}[stage]()
        return (lambda doc: verdict(step.filter(doc))), dropped
    if stage == "pii":
        from datatrove.pipeline.formatters import PIIFormatter

        pii = PIIFormatter()

        def fn(doc):
            return None, pii.format(doc.text) != doc.text

        return fn, lambda c: f"{c[True]} docs changed"
    if stage == "langid":
        from datatrove.pipeline.filters import LanguageFilter

        lid = LanguageFilter(label_only=True)

        def fn(doc):
            lid.filter(doc)
            return None, doc.metadata.get("language")

        return fn, lambda c: "top " + ", ".join(f"{k} {v}" for k, v in c.most_common(4))
    raise ValueError(stage)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:160]


def stage_worker(stage: str, impl: str, docs_path: str) -> None:
    """Load the cached documents, build the stage, warm it up, then time it over every document."""
    import gc
    from collections import Counter

    docs = []
    with open(docs_path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            docs.append((d["id"], d["text"]))
    mb = sum(len(t.encode("utf-8")) for _, t in docs) / 1e6
    try:
        if impl == "lmforge":
            fn, summary = _lmforge_stage(stage)
            warm = ("warmup.txt", WARMUP)
        else:
            fn, summary = _datatrove_stage(stage)
            from datatrove.data import Document

            docs = [Document(text=t, id=i) for i, t in docs]
            warm = Document(text=WARMUP, id="warmup")
        fn(warm)  # lazy loads (models, tokenizers) happen here, untimed
    except Exception as e:  # a missing dependency or a download that cannot happen offline
        print(json.dumps({"unavailable": _first_line(e)}))
        return
    profiles = ""
    if impl == "lmforge" and stage.startswith("quality"):  # context for the kept count, untimed
        from lmforge.data.quality import profile_of

        n_code = sum(profile_of(i, t) == "code" for i, t in docs)
        profiles = f"profiles: {len(docs) - n_code} prose, {n_code} code; "
    gc.collect()
    base = _vm("VmRSS")
    labels: Counter = Counter()
    kept = 0
    t = time.perf_counter()
    try:
        for doc in docs:
            ok, label = fn(doc)
            kept += bool(ok)
            labels[label] += 1
    except Exception as e:
        print(json.dumps({"unavailable": "failed on a document: " + _first_line(e)}))
        return
    s = time.perf_counter() - t
    print(json.dumps({"s": s, "mb": mb, "docs": len(docs), "kept": kept if stage in FILTERING else None,
                      "rss_mb": _vm("VmHWM"), "base_mb": base, "extra": profiles + summary(labels)}))


def run_stage(stage: str, impl: str, docs_path: Path) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--run-stage", stage, impl, str(docs_path)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=STAGE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"unavailable": f"timed out after {STAGE_TIMEOUT_S} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"unavailable": f"exit {out.returncode}: {err[:160]}"}
    return json.loads(lines[-1])


def stage_table(docs_path: Path) -> list[tuple[str, str, dict]]:
    print(f"\n{'stage':<19} {'impl':<9} {'MB':>7} {'seconds':>8} {'MB/s':>7} {'kept':>13} "
          f"{'peak RSS MB':>11} {'base MB':>8}   notes")
    rows = []
    for stage, impl, note in STAGES:
        if impl == "datatrove":
            try:
                import datatrove  # noqa: F401
            except ImportError:
                r = {"unavailable": "datatrove not installed"}
            else:
                r = run_stage(stage, impl, docs_path)
        else:
            r = run_stage(stage, impl, docs_path)
        rows.append((stage, impl, r))
        if "unavailable" in r:
            print(f"{stage:<19} {impl:<9} unavailable: {r['unavailable']}   ({note})", flush=True)
            continue
        kept = f"{r['kept']}/{r['docs']}" if r["kept"] is not None else "-"
        print(f"{stage:<19} {impl:<9} {r['mb']:>7.1f} {r['s']:>8.1f} {r['mb'] / r['s']:>7.2f} {kept:>13} "
              f"{r['rss_mb']:>11.0f} {r['base_mb']:>8.0f}   {note}; {r['extra']}", flush=True)
    return rows


# ---- the target: clean end to end, filters off vs defaults ----

def prepare_worker(mode: str, workers: int, out: str, sources: list[str]) -> None:
    import resource

    from lmforge.data.prepare import DataConfig, prepare_data
    from lmforge.data.quality import FilterConfig

    if mode == "off":
        cfg = DataConfig(workers=workers, pii=False,
                         filters=FilterConfig(gopher=False, repetition=False, c4=False, code=False))
    else:
        cfg = DataConfig(workers=workers)
    t = time.perf_counter()
    m = prepare_data(sources, out, cfg, progress=False)["metrics"]
    s = time.perf_counter() - t
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"s": s, "mb": m["input_bytes"] / 1e6, "clean_s": m["stage_seconds"].get("clean"),
                      "kept": m["docs_kept"], "seen": m["docs_seen"], "tasks": m["tasks"], "rss_mb": _vm("VmHWM"),
                      "worker_rss_mb": children}))


def run_prepare(mode: str, workers: int, work: Path, sources: list[str]) -> dict:
    out_dir = work / f"target-{mode}-{workers}"
    cmd = [sys.executable, os.path.abspath(__file__), "--run-prepare", mode, str(workers), str(out_dir), *sources]
    out = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    if out.returncode != 0:
        sys.exit(f"prepare_data ({mode}, {workers} workers) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def target_check(work: Path, sources: list[str], repeat: int, stages: list[tuple[str, str, dict]]) -> None:
    print("\ntarget: all default filters (quality + PII) cost no more than 30% of the clean phase's "
          f"throughput, i.e. defaults/off >= {TARGET_RATIO:.2f}")
    print("clean phase = prepare_data end to end (read, normalise, filter, PII, MinHash, dedup, write); "
          "off = FilterConfig(gopher=False, repetition=False, c4=False, code=False), pii=False; with the defaults "
          "fewer documents reach MinHash, dedup and writing, which the end-to-end ratio credits")
    print(f"{'workers':>7} {'filters':<8} {'tasks':>5} {'seconds':>8} {'MB':>7} {'MB/s':>7} {'clean-task MB/s':>15} "
          f"{'kept':>13} {'peak RSS MB (main/worker)':>26}")
    for workers in (2, 1):
        best: dict[str, dict] = {}
        for _ in range(repeat):
            for mode in ("off", "default"):
                r = run_prepare(mode, workers, work, sources)
                if mode not in best or r["s"] < best[mode]["s"]:
                    best[mode] = r
        for mode in ("off", "default"):
            r = best[mode]
            clean = f"{r['mb'] / r['clean_s']:.2f}" if r.get("clean_s") else "-"
            pool = f"{r['worker_rss_mb']:.0f}" if r["worker_rss_mb"] else "- (tasks ran in the main process)"
            print(f"{workers:>7} {mode:<8} {r['tasks']:>5} {r['s']:>8.1f} {r['mb']:>7.1f} {r['mb'] / r['s']:>7.2f} "
                  f"{clean:>15} {str(r['kept']) + '/' + str(r['seen']):>13} {r['rss_mb']:>17.0f}/{pool}", flush=True)
        ratio = best["off"]["s"] / best["default"]["s"]
        clean_ratio = (best["off"]["clean_s"] / best["default"]["clean_s"]
                       if best["off"].get("clean_s") and best["default"].get("clean_s") else None)
        also = f" (clean tasks alone: {clean_ratio:.2f})" if clean_ratio else ""
        if workers == 2:
            verdict = "MEETS" if ratio >= TARGET_RATIO else "MISSES"
            print(f"  ratio defaults/off, 2 workers: {ratio:.2f}{also} -> {verdict} the target "
                  f"(filters cost {100 * (1 - ratio):.0f}% of the throughput)")
        else:
            print(f"  ratio defaults/off, 1 worker (reference): {ratio:.2f}{also} "
                  f"(filters cost {100 * (1 - ratio):.0f}%)")
        if workers == 1:
            per_mb = {st: r["s"] / r["mb"] for st, impl, r in stages if impl == "lmforge" and "s" in r}
            if "quality" in per_mb and "pii" in per_mb:
                off_per_mb = best["off"]["s"] / best["off"]["mb"]
                est = off_per_mb / (off_per_mb + per_mb["quality"] + per_mb["pii"])
                print(f"  cross-check from the per-stage rows (1 core, off + quality + pii seconds per MB, no "
                      f"downstream savings counted): {est:.2f}")


# ---- main ----

def hardware_line() -> str:
    try:
        from lmforge.cost.hw import cpu_name

        name = cpu_name()
    except Exception:  # torch missing or broken: read /proc/cpuinfo alone
        import platform

        name = platform.processor() or platform.machine()
        try:
            name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
        bf16 = "yes" if "avx512_bf16" in flags else "no"
    except (OSError, StopIteration):
        bf16 = "unknown"
    return f"CPU: {name}; avx512_bf16: {bf16}; os.cpu_count(): {os.cpu_count()}"


def versions_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        dt = f"datatrove {version('datatrove')}"
    except PackageNotFoundError:
        dt = "datatrove not installed"
    try:
        import spacy

        sp = f"spacy {spacy.__version__}"
    except ImportError:
        sp = "spacy not installed (datatrove's English word tokenizer needs it)"
    return f"python {sys.version.split()[0]}; {dt}; {sp}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--run-stage":
        stage_worker(*sys.argv[2:5])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--run-prepare":
        prepare_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sources", nargs="*", default=["default"],
                    help="lmforge data sources (default: the embedded stdlib corpus; /usr/share/doc is prose-heavy)")
    ap.add_argument("--stages-only", action="store_true", help="only the per-stage rows")
    ap.add_argument("--max-mb", type=float, default=None,
                    help="keep every section to a spread sample of about this many MB of the sources' files")
    ap.add_argument("--repeat", type=int, default=1, help="target check: best of this many runs per setting")
    args = ap.parse_args()
    sources = args.sources or ["default"]

    print("reproduce: " + shlex.join(["python", "bench/data_throughput.py", *sys.argv[1:]]))
    print(hardware_line())
    print(versions_line())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inp = prepare_input(sources, work, args.max_mb)
        capped = f", capped at {args.max_mb:g} MB: {inp['files']} files" if args.max_mb else ""
        print(f"input: {', '.join(sources)}{capped}; read {inp['read_mb']:.1f} MB, {inp['docs_read']} docs in "
              f"{inp['read_s']:.1f} s (untimed); per-stage input: {inp['docs']} docs, {inp['bytes'] / 1e6:.1f} MB "
              f"(NFC, min_chars..max_chars; {inp['length_dropped']} docs outside)"
              + (f"; skipped {inp['drops']}" if inp["drops"] else ""))
        if inp["note"]:
            print(f"note: {inp['note'].strip()}")
        run_sources = inp["sources"]

        if not args.stages_only:
            print(f"\n{'phase':<10} {'seconds':>8} {'MB':>8} {'MB/s':>8} {'peak RSS MB':>12}")
            total = 0.0
            train_bytes = 0
            for name in PHASES:
                r = run_phase(name, run_sources, str(work), train_bytes)
                if name == "clean":
                    man = json.loads(open(os.path.join(work, "data", "manifest.json")).read())
                    train_bytes = man["metrics"]["bytes_train"]
                total += r["s"]
                print(f"{name:<10} {r['s']:>8.1f} {r['mb']:>8.1f} {r['mb'] / r['s']:>8.2f} {r['rss_mb']:>12.0f}   "
                      f"{r['extra']}", flush=True)
            print(f"{'total':<10} {total:>8.1f}")
            shutil.rmtree(work / "data", ignore_errors=True)
            shutil.rmtree(work / "tok", ignore_errors=True)

        print("\nper stage (one process each; MB/s over the cached documents, reading untimed; "
              "base MB: RSS with the input loaded, before timing)")
        print("datatrove rows apply their prose rules to every document (it has no code profile); "
              "lmforge quality judges code files by the code rules")
        stages = stage_table(work / "docs.jsonl")

        if not args.stages_only:
            target_check(work, run_sources, max(1, args.repeat), stages)


if __name__ == "__main__":
    main()
