"""Contamination audit: scan speed and peak RSS, against corpora of growing size.

    python bench/contamination_rss.py                       # HumanEval vs default and default:stdlib+site
    python bench/contamination_rss.py SOURCE [SOURCE...]    # any data run or `lmforge data` source

Each audit runs in its own subprocess, so its peak RSS (VmHWM) is its own. The benchmark's
n-grams are the only state the audit keeps, so peak RSS should follow the number of files a
source lists and its largest document, not its total size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = """import json, sys
from lmforge.eval.contamination import AuditConfig, audit_contamination
m = audit_contamination(AuditConfig(data=sys.argv[1], tasks="humaneval", out=sys.argv[2]), progress=False)["metrics"]
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
print(json.dumps({"MB": round(m["bytes_scanned"] / 1e6, 1), "docs": m["docs_scanned"], "seconds": m["scan_seconds"],
                  "MB/s": m["scan_mb_per_s"], "peak_rss_MB": round(rss, 1),
                  "contaminated": m["tasks"]["humaneval"]["contaminated"]}))
"""


def main(sources: list[str]) -> None:
    with tempfile.TemporaryDirectory() as work:
        for i, src in enumerate(sources):
            res = subprocess.run([sys.executable, "-c", CHILD, src, f"{work}/audit{i}"], capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            if res.returncode:
                sys.exit(res.stderr)
            print(src, json.loads(res.stdout.splitlines()[-1]), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["default", "default:stdlib+site"])
