"""Data-stage throughput: cleaning and tokenization MB/s and peak RSS, on the default corpus.

    python bench/data_throughput.py                 # the embedded stdlib corpus
    python bench/data_throughput.py PATH [PATH...]  # any lmforge data source

Each phase runs in its own subprocess so that its peak RSS (VmHWM) is its own. MB are
UTF-8 megabytes of text: read for cleaning, trained on for the tokenizer, encoded for
tokenizing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

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


def run_phase(name: str, sources: list[str], work: str, train_bytes: int) -> dict:
    code = WRAP.format(body=PHASES[name].format(sources=sources, work=work, train_bytes=train_bytes))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    sources = sys.argv[1:] or ["default"]
    print(f"data throughput on {', '.join(sources)} ({os.cpu_count()} CPUs)")
    print(f"{'phase':<10} {'seconds':>8} {'MB':>8} {'MB/s':>8} {'peak RSS MB':>12}")
    total = 0.0
    with tempfile.TemporaryDirectory() as work:
        train_bytes = 0
        for name in PHASES:
            r = run_phase(name, sources, work, train_bytes)
            if name == "clean":
                man = json.loads(open(os.path.join(work, "data", "manifest.json")).read())
                train_bytes = man["metrics"]["bytes_train"]
            total += r["s"]
            print(f"{name:<10} {r['s']:>8.1f} {r['mb']:>8.1f} {r['mb'] / r['s']:>8.2f} {r['rss_mb']:>12.0f}   {r['extra']}")
    print(f"{'total':<10} {total:>8.1f}")


if __name__ == "__main__":
    main()
