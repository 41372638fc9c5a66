"""The verdict matrix of `lmforge provenance` on the cases tests/test_eval_provenance.py asserts on.

    OMP_NUM_THREADS=1 python bench/provenance_matrix.py              # the test cases
    OMP_NUM_THREADS=1 python bench/provenance_matrix.py --continued  # and longer continued training

Builds the same tiny models as the tests (the stdlib corpus fixture, depth-2 models trained for
30 steps, a 20-step fine-tune, transformers inits, the disguises), compares each pair and prints,
per case, the verdict, the score and each measure's lowest layer, then the margin between the
lowest derived score and the highest independent one. ``--continued`` adds children that train
2x and 7x longer than their parent (60 and 200 steps at the full learning rate), to show how
far continued training can go before a derived model reads as independent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import make_corpus  # noqa: E402
from test_eval_provenance import build_cases, train_run  # noqa: E402

from lmforge.data.prepare import DataConfig, prepare_data  # noqa: E402
from lmforge.eval.provenance import DERIVED_MIN, provenance  # noqa: E402
from lmforge.tokenizer.encode import tokenize_data  # noqa: E402
from lmforge.tokenizer.train import train_tokenizer  # noqa: E402


def tiny_data(base: Path) -> Path:
    """The tests' tiny_data fixture: ~0.5 MB of stdlib code, vocab 512."""
    prepare_data([str(make_corpus(base / "corpus"))], base / "data", DataConfig(val_fraction=0.15, min_chars=16),
                 progress=False)
    train_tokenizer(base / "data", base / "tok", vocab_size=512, progress=False)
    tokenize_data(base / "data", base / "tok", progress=False)
    return base / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--continued", action="store_true", help="also children trained 60 and 200 steps from the parent")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = tiny_data(Path(tmp))
        cases = build_cases(data, Path(tmp) / "cases")
        rows = [(name, expected, provenance(a, b)) for name, (a, b, expected) in cases.items()]
        parent = cases["fine-tuned child"][0]
        for steps in (60, 200) if args.continued else ():
            child = train_run(data, Path(tmp) / f"continued-{steps}", seed=9, steps=steps, init_from=parent)
            rows.append((f"continued {steps} steps (not a test case)", "derived", provenance(parent, child)))
    print("| case | expected | verdict | score | qk | ov | mlp | gram | embed |")
    print("|---|---|---|---|---|---|---|---|---|")
    lowest = lambda r, m: min(getattr(row, m) for row in r.layers)  # noqa: E731
    for name, expected, r in rows:
        if r.score is None:
            print(f"| {name} | {expected} | {r.verdict} | - | - | - | - | - | - |")
            continue
        cells = " | ".join(f"{lowest(r, m):.3f}" for m in ("qk", "ov", "mlp", "gram"))
        embed = "-" if r.embed is None else f"{r.embed:.3f}"
        print(f"| {name} | {expected} | {r.verdict} | {r.score:.3f} | {cells} | {embed} |")
    tested = [(e, r) for name, e, r in rows if name in cases]
    derived = [r.score for e, r in tested if e == "derived"]
    independent = [r.score for e, r in tested if e == "independent"]
    wrong = [name for name, e, r in rows if name in cases and r.verdict != e]
    top_layer = max(row.score for e, r in tested if e == "independent" for row in r.layers)
    print(f"\ntest cases: lowest derived score {min(derived):.3f}, highest independent {max(independent):.3f}, "
          f"margin {min(derived) - max(independent):.3f}; highest independent layer {top_layer:.3f}; "
          f"threshold {DERIVED_MIN}; wrong verdicts: {wrong or 'none'}")


if __name__ == "__main__":
    main()
