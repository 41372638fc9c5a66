"""Log-likelihood eval throughput: ``lmforge eval mc:`` and the lm-eval bridge against lm-eval's ``--model hf``.

    python bench/eval_throughput.py --model runs/default/train          # any lmforge model directory
    python bench/eval_throughput.py --model runs/sft --items 400 --rounds 3

One multiple-choice task (Python assignments from the standard library: finish ``NAME =`` with
one of four right-hand sides), written as lmforge ``mc:`` JSONL and as an lm-eval task YAML over
the same file. The model is exported to HF once. Two tables:

- scoring: the log-likelihood call alone, on the same request objects, model already loaded:
  lm-eval's ``HFLM.loglikelihood`` against the bridge's ``loglikelihood``;
- end to end: the whole evaluation (load, read the task, score, write results):
  ``lmforge eval mc:``, ``lm-eval --model lmforge`` and ``lm-eval --model hf``.

Each round runs the ways in a rotating order so background load hits all alike; the tables
report median seconds and tokens/s, counting every context and continuation token scored (the
same tokens for all: the tokenization follows lm-eval's). All run fp32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lmforge.cost.hw import bf16_supported_on_cpu  # noqa: E402
from lmforge.eval.harness import simple_evaluate  # noqa: E402
from lmforge.eval.run import EvalConfig, evaluate  # noqa: E402
from lmforge.export.hf import export_hf  # noqa: E402


def make_items(n: int, seed: int = 0) -> list[dict]:
    std = Path(sysconfig.get_paths()["stdlib"])
    pairs = []
    for f in sorted(std.glob("*.py")):
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            m = re.match(r"^(\s*[A-Za-z_][\w.]* =) (\S.{2,60})$", line)
            if m and "#" not in line:
                pairs.append((m.group(1).strip(), m.group(2)))
    rng = random.Random(seed)
    rng.shuffle(pairs)
    items = []
    for q, a in pairs[:n]:
        choices = rng.sample([b for _, b in pairs[n:n + 5000]], 3) + [a]
        rng.shuffle(choices)
        items.append({"id": f"i{len(items)}", "question": q, "choices": choices, "label": choices.index(a)})
    return items


YAML = """task: bench_code_mc
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    higher_is_better: true
  - metric: acc_norm
    higher_is_better: true
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an lmforge model directory (a train, SFT or DPO run)")
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    work = Path(tempfile.mkdtemp(prefix="lmforge-evalbench-"))
    data = work / "items.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in make_items(args.items)))
    (work / "tasks").mkdir()
    (work / "tasks" / "bench.yaml").write_text(YAML.format(data=data))
    hf = export_hf(args.model, work / "hf")

    import lm_eval
    from lm_eval.tasks import TaskManager

    tokens = 0
    accs: dict[str, float] = {}

    def ours():
        nonlocal tokens
        m = evaluate(EvalConfig(model=args.model, tasks=[f"mc:{data}"], out=str(work / "ev"), batch_size=args.batch_size),
                     progress=False)["metrics"]["tasks"][f"mc:{data}"]
        tokens = m["tokens"]
        accs["lmforge eval mc:"] = m["acc"]["value"]

    def bridge():
        r = simple_evaluate(args.model, ["bench_code_mc"], str(work / "tasks"), batch_size=args.batch_size)
        accs["lm-eval --model lmforge"] = r["results"]["bench_code_mc"]["acc,none"]

    def hf_model():
        r = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32", device="cpu",
                                    batch_size=args.batch_size, tasks=["bench_code_mc"],
                                    task_manager=TaskManager(include_path=str(work / "tasks")))
        accs["lm-eval --model hf"] = r["results"]["bench_code_mc"]["acc,none"]

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmforge.eval.harness import lm_class

    items = [json.loads(x) for x in data.read_text().splitlines()]
    requests = [Instance(request_type="loglikelihood", doc=it, arguments=(it["question"], " " + c), idx=j)
                for it in items for j, c in enumerate(it["choices"])]
    scorers = {"lm-eval --model lmforge": lm_class()(path=args.model, batch_size=args.batch_size),
               "lm-eval --model hf": HFLM(pretrained=str(hf), dtype="float32", device="cpu", batch_size=args.batch_size)}
    score_times: dict[str, list[float]] = {k: [] for k in scorers}
    results = {}
    for r in range(args.rounds):
        for name in list(scorers)[r % 2:] + list(scorers)[:r % 2]:
            t0 = time.perf_counter()
            results[name] = scorers[name].loglikelihood(requests, disable_tqdm=True)
            score_times[name].append(time.perf_counter() - t0)
    worst = max(abs(a[0] - b[0]) for a, b in zip(*results.values()))

    ways = {"lmforge eval mc:": ours, "lm-eval --model lmforge": bridge, "lm-eval --model hf": hf_model}
    times: dict[str, list[float]] = {k: [] for k in ways}
    names = list(ways)
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:
            t0 = time.perf_counter()
            ways[name]()
            times[name].append(time.perf_counter() - t0)
    print(f"cpu: avx512_bf16={'yes' if bf16_supported_on_cpu() else 'no'}, threads {torch.get_num_threads()}; "
          f"model {args.model}; {args.items} items x 4 choices = {tokens} tokens scored; fp32, batch {args.batch_size}")
    base = statistics.median(score_times["lm-eval --model hf"])
    print(f"scoring: {len(requests)} loglikelihood requests, largest difference in log-likelihood {worst:.1e}")
    print(f"{'way':26s} {'median s':>9s} {'tokens/s':>9s} {'vs hf':>6s}")
    for name in scorers:
        med = statistics.median(score_times[name])
        print(f"{name:26s} {med:9.2f} {tokens / med:9.0f} {base / med:6.2f}")
    base = statistics.median(times["lm-eval --model hf"])
    print("end to end:")
    print(f"{'way':26s} {'median s':>9s} {'tokens/s':>9s} {'vs hf':>6s} {'acc':>6s}")
    for name in names:
        med = statistics.median(times[name])
        print(f"{name:26s} {med:9.2f} {tokens / med:9.0f} {base / med:6.2f} {accs[name]:6.3f}")


if __name__ == "__main__":
    main()
