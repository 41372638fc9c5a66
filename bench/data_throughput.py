"""Data-stage throughput: cleaning and tokenization MB/s and peak RSS, on the default corpus.

    python bench/data_throughput.py                 # the embedded stdlib corpus
    python bench/data_throughput.py PATH [PATH...]  # any lmforge data source

Each phase runs in its own subprocess so its peak RSS is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

PHASES = {
    "clean": "from lmforge.data.prepare import DataConfig, prepare_data\n"
             "m = prepare_data({sources!r}, {work!r} + '/data', DataConfig(), progress=False)['metrics']\n"
             "mb = (m['bytes_train'] + m['bytes_val']) / 1e6",
    "tokenizer": "from lmforge.tokenizer.train import train_tokenizer\n"
                 "train_tokenizer({work!r} + '/data', {work!r} + '/tok', 8192, progress=False)\n"
                 "mb = 0.0",
    "tokenize": "from lmforge.data.shards import tokenize_data\n"
                "m = tokenize_data({work!r} + '/data', {work!r} + '/tok', progress=False)['metrics']\n"
                "mb = m['tokens_train'] * m['bytes_per_token'] / 1e6",
}
WRAP = "import json, resource, time\nt = time.perf_counter()\n{body}\n" \
       "print(json.dumps({{'s': time.perf_counter() - t, 'mb': mb, 'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))"


def main() -> None:
    sources = sys.argv[1:] or ["default"]
    with tempfile.TemporaryDirectory() as work:
        print(f"data throughput on {', '.join(sources)}")
        print(f"{'phase':<10} {'seconds':>8} {'MB':>8} {'MB/s':>8} {'peak RSS MB':>12}")
        for name, body in PHASES.items():
            code = WRAP.format(body=body.format(sources=sources, work=work))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rate = f"{r['mb'] / r['s']:.2f}" if r["mb"] else "-"
            print(f"{name:<10} {r['s']:>8.1f} {r['mb']:>8.1f} {rate:>8} {r['rss_mb']:>12.0f}")


if __name__ == "__main__":
    main()
