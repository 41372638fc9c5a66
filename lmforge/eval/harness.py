"""The lm-evaluation-harness bridge: lmforge models as lm-eval's ``--model lmforge``.

lm-eval 0.4.x finds models only in its own registry, with no plugin entry point, so this module
registers an ``LM`` subclass under the name ``lmforge`` (after importing ``lm_eval.models``:
registering first would stop lm-eval from loading its built-in models, ``hf`` among them).
Two ways in:

- ``lmforge eval RUN --harness TASKS [--include-path DIR]`` calls ``lm_eval.simple_evaluate``;
- ``lmforge-lm-eval --model lmforge --model_args path=RUN --tasks ... [--include_path DIR]`` is
  lm-eval's own command line with the model registered.

The three request types go to :class:`lmforge.eval.lm.LocalLM`: batched log-likelihoods that
compute the output head only where the continuation is read, rolling windows, and generation
with the KV cache. lm-eval is an optional extra: ``pip install -e ".[eval]"``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.eval.lm import open_lm
from lmforge.model.generate import SampleConfig


def _lm_eval():
    try:
        import lm_eval
        import lm_eval.models  # noqa: F401  the built-in models register first
    except ImportError:
        raise LmforgeError("the lm-evaluation-harness bridge needs lm-eval: pip install -e \".[eval]\"") from None
    return lm_eval


@lru_cache(maxsize=1)
def lm_class():
    """The ``LM`` subclass, registered as ``lmforge`` in lm-eval's model registry (once)."""
    _lm_eval()
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    class LmforgeLM(LM):
        """``--model_args path=RUN[,batch_size=N][,chat=auto|on|off]``: an lmforge run or HF directory."""

        def __init__(self, path: str = "", batch_size=16, chat: str = "auto", work_dir: str = "", **_ignored):
            super().__init__()
            if not path:
                raise LmforgeError("--model_args needs path=RUN (an lmforge run or HF directory)")
            bs = 16 if str(batch_size).startswith("auto") else int(batch_size)
            work = Path(work_dir or Path(path) / ".eval")
            self.lm = open_lm(str(path), work, bs, None if chat == "auto" else chat == "on")

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.lm.loglikelihood([self.lm.encode_pair(*r.args) for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return [-self.lm.rolling_nll(self.lm.encode(r.args[0])) for r in requests]

        def generate_until(self, requests, disable_tqdm: bool = False):
            # Requests with the same settings (stop strings, length, sampling) go to generate() together,
            # which batches them with the KV cache; results come back in the requests' order.
            groups: dict = {}
            for i, r in enumerate(requests):
                kw = dict(r.args[1])
                until = kw.get("until") or []
                until = (until,) if isinstance(until, str) else tuple(until)
                temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
                key = (until, int(kw.get("max_gen_toks", 256)), temp, float(kw.get("top_p", 1.0)))
                groups.setdefault(key, []).append(i)
            out: list = [None] * len(requests)
            for (until, max_toks, temp, top_p), idx in groups.items():
                texts = self.lm.generate([requests[i].args[0] for i in idx], max_toks, [list(until)] * len(idx),
                                         SampleConfig(temperature=temp, top_p=top_p, seed=0))
                for i, t in zip(idx, texts):
                    out[i] = t
            return out

    register_model("lmforge")(LmforgeLM)
    return LmforgeLM


def simple_evaluate(model: str, tasks: list[str], include_path: str | None = None, batch_size: int = 16,
                    limit: int | None = None, num_fewshot: int | None = None) -> dict:
    """lm-eval's ``simple_evaluate`` on an lmforge model: its results dict (``results[task][metric]``)."""
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager

    cls = lm_class()
    if include_path and not Path(include_path).is_dir():
        raise LmforgeError(f"--include-path {include_path}: not a directory of lm-eval task YAML files")
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LmforgeError(f"lm-eval knows no task {', '.join(unknown)}; give --include-path DIR for local YAML tasks")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return lm_eval.simple_evaluate(model=cls(path=model, batch_size=batch_size), tasks=tasks, task_manager=manager,
                                   limit=limit, num_fewshot=num_fewshot)


def main() -> None:
    """``lmforge-lm-eval``: lm-eval's command line, with ``--model lmforge`` available."""
    _lm_eval()
    lm_class()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
