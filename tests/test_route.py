"""The tiered router: metrics on a hand-computed example, config errors, deterministic decisions,
fallback when an upstream fails or hangs, the classifier, and the ledger's escalation share."""

import http.server
import json
import re
import threading
import time

import httpx
import numpy as np
import pytest

from conftest import run_cli
from serving import free_port, serving

from lmforge.cost.ledger import serve_usage
from lmforge.errors import LmforgeError
from lmforge.route.config import load_router
from lmforge.route.evaluate import read_labelled, tier_passes
from lmforge.route.policy import Classifier, apgr, cpt, pgr_curve, threshold_for_rate, train_classifier
from lmforge.route.router import Router
from lmforge.serve.app import ServeConfig, State, create_app


def test_metrics_on_a_hand_computed_example():
    # Four queries; the large tier helps only on the first two (gap 0.5 in mean quality).
    qs, ql = np.zeros(4), np.array([1.0, 1.0, 0.0, 0.0])
    shares, pgr = pgr_curve(qs, ql, np.array([4.0, 3.0, 2.0, 1.0]))
    assert np.interp(0.25, shares, pgr) == pytest.approx(0.5) and np.interp(0.5, shares, pgr) == pytest.approx(1.0)
    # PGR rises linearly to 1 at 50% and stays: area 0.25*0.5/2 + 0.25*(0.5+1)/2 + 0.5*1 = 0.75.
    assert apgr(shares, pgr) == pytest.approx(0.75, abs=1e-3)
    assert cpt(shares, pgr, 0.5) == pytest.approx(0.25) and cpt(shares, pgr, 0.8) == pytest.approx(0.40)
    # The worst order recovers nothing until the helpful queries come last.
    shares, worst = pgr_curve(qs, ql, np.array([1.0, 2.0, 3.0, 4.0]))
    assert apgr(shares, worst) == pytest.approx(0.25, abs=1e-3) and cpt(shares, worst, 0.8) == pytest.approx(0.90)
    # A constant score cannot tell queries apart: it is random routing, PGR(c) = c, APGR 0.5.
    shares, flat = pgr_curve(qs, ql, np.zeros(4))
    assert np.allclose(flat, shares) and apgr(shares, flat) == pytest.approx(0.5)
    with pytest.raises(LmforgeError, match="no gap"):
        pgr_curve(ql, qs, np.zeros(4))


def test_threshold_for_rate_escalates_that_share():
    conf = [-0.1, -0.5, -1.0, -2.0, -3.0, -0.2, -0.7, -1.5]
    for rate in (0.0, 0.25, 0.5, 1.0):
        t = threshold_for_rate(conf, rate)
        assert np.mean(np.asarray(conf) < t) == rate


def write_router(path, small, large, **top):
    lines = [f"{k} = {json.dumps(v)}" for k, v in {"name": "auto", **top}.items()]
    for tier in (small, large):
        lines.append("[[tiers]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in tier.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.replace('name = "auto"', 'name = "auto"\nthreshhold = 1'), "unknown key 'threshhold'"),
    (lambda t: t[: t.index("[[tiers]]", t.index("[[tiers]]") + 1)], "exactly two [[tiers]]"),
    (lambda t: t.replace("threshold = -1.0", "threshold = 3"), "'threshold' = 3 is out of range"),
    (lambda t: t.replace('name = "small"\n', ""), "'name' is missing"),
    (lambda t: t.replace('"policy": ', "").replace('policy = "cascade"', 'policy = "vote"'), "policy = 'vote'"),
    (lambda t: t.replace("usd_per_mtok = 1", "usd_per_mtok = 1\ncolour = 2"), "unknown key 'colour'"),
])
def test_router_file_errors_name_the_file_and_key(tmp_path, chat_base, edit, words):
    path = write_router(tmp_path / "r.toml", {"name": "small", "model": str(chat_base), "usd_per_mtok": 1},
                        {"name": "large", "model": str(chat_base), "usd_per_mtok": 10}, policy="cascade",
                        threshold=-1.0)
    path.write_text(edit(path.read_text()))
    with pytest.raises(LmforgeError, match=re.escape(words)) as e:
        load_router(path)
    assert str(path) in str(e.value)


def test_an_unreachable_upstream_is_an_error_at_startup(tmp_path, chat_base):
    port = free_port()
    path = write_router(tmp_path / "r.toml", {"name": "small", "model": str(chat_base)},
                        {"name": "large", "url": f"http://127.0.0.1:{port}/v1", "model": "big", "timeout_s": 2},
                        threshold=-1.0)
    with pytest.raises(LmforgeError, match="large: .* is unreachable"):
        Router(load_router(path)).check()


class Upstream(http.server.BaseHTTPRequestHandler):
    """A loopback stand-in for an upstream tier: it fails, hangs or answers, as the test sets."""

    mode = "fail"
    calls = 0

    def do_POST(self):
        type(self).calls += 1
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.mode == "hang":
            time.sleep(3)
        if self.mode in ("fail", "hang"):
            self.send_response(500)
            self.end_headers()
            return
        body = json.dumps({"choices": [{"message": {"content": "from upstream"}, "finish_reason": "stop",
                                        "logprobs": {"content": [{"logprob": -0.01}]}}],
                           "usage": {"prompt_tokens": 5, "completion_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def upstream():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    Upstream.mode, Upstream.calls = "fail", 0
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def served_router(tmp_path, router: Router):
    cfg = ServeConfig(models=[f"{n}={p}" for n, p in router.local_models().items()], dir=tmp_path / "serve",
                      api_keys={"key-route-1": "u"}, calibrate=False)
    state = State(cfg)
    state.virtual[router.name] = router
    return serving(create_app(cfg, state)), state


def ask(url, n=1, **extra):
    body = {"model": "auto", "messages": [{"role": "user", "content": "Write a sorting function."}],
            "max_tokens": 12, "temperature": 0, **extra}
    return [httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer key-route-1"},
                       timeout=60) for _ in range(n)]


def test_cascade_decisions_are_deterministic_and_recorded(tmp_path, chat_base):
    small = {"name": "small", "model": str(chat_base), "usd_per_mtok": 1.0}
    large = {"name": "large", "model": str(chat_base), "usd_per_mtok": 50.0}
    for threshold, tier in ((-50.0, "small"), (0.0, "large")):  # no answer is certain: 0 always escalates
        router = Router(load_router(write_router(tmp_path / f"r{tier}.toml", small, large, threshold=threshold)))
        ctx, state = served_router(tmp_path / tier, router)
        with ctx as url:
            rs = ask(url, n=3)
            models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer key-route-1"}).json()
            streamed = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer key-route-1"},
                                  json={"model": "auto", "messages": [{"role": "user", "content": "Write a sorting "
                                        "function."}], "max_tokens": 12, "temperature": 0, "stream": True}).text
        assert "auto" in [m["id"] for m in models["data"]]
        assert all(r.status_code == 200 and r.headers["x-lmforge-tier"] == tier for r in rs)
        texts = [r.json()["choices"][0]["message"]["content"] for r in rs]
        assert len(set(texts)) == 1 and texts[0] in "".join(
            json.loads(x[6:])["choices"][0]["delta"].get("content", "") for x in streamed.split("\n\n")
            if x.startswith("data: {") and json.loads(x[6:])["choices"])
        use = rs[0].json()["usage"]
        assert use["tier"] == tier and use["escalated"] == (tier == "large") and not use["fallback"]
        # A cascade pays for the small answer even when it escalates.
        small_cost = (use["prompt_tokens"] + use["completion_tokens"]) * 1.0 / 1e6
        assert use["cost_usd"] > (50 * small_cost if tier == "large" else 0)
        led = serve_usage(tmp_path / tier / "serve")
        assert led["routers"]["auto"]["share_escalated"] == (1.0 if tier == "large" else 0.0)
        assert led["routers"]["auto"]["tiers"] == {tier: 4}


def test_a_failing_or_hanging_upstream_falls_back(tmp_path, chat_base, upstream):
    local = {"name": "small", "model": str(chat_base), "usd_per_mtok": 1.0}
    remote = {"name": "large", "url": upstream, "model": "big", "usd_per_mtok": 50.0, "timeout_s": 1}
    router = Router(load_router(write_router(tmp_path / "r.toml", local, remote, threshold=0.0)))
    ctx, _ = served_router(tmp_path / "a", router)
    with ctx as url:
        for mode in ("fail", "hang"):
            Upstream.mode = mode
            t0 = time.time()
            (r,) = ask(url)
            assert r.status_code == 200 and time.time() - t0 < 10
            assert r.headers["x-lmforge-tier"] == "small" and r.headers["x-lmforge-fallback"] == "true"
            assert r.json()["usage"]["fallback"] and r.json()["usage"]["escalated"]
        Upstream.mode = "ok"
        (r,) = ask(url)
        assert r.headers["x-lmforge-tier"] == "large" and r.json()["choices"][0]["message"]["content"] == "from upstream"
    # The first tier failing: a classifier that always picks the upstream, which fails, falls back to the local one.
    rows = [{"prompt": f"hard task {i}" if i % 2 else f"easy {i}", "small": 0.0, "large": float(i % 2)} for i in range(20)]
    train_classifier([r["prompt"] for r in rows], [r["large"] > r["small"] for r in rows], tmp_path / "clf.json")
    path = write_router(tmp_path / "c.toml", local, remote, policy="classifier", classifier="clf.json",
                        threshold=0.0, max_retries=0)
    Upstream.mode = "fail"
    ctx, _ = served_router(tmp_path / "b", Router(load_router(path)))
    with ctx as url:
        (r,) = ask(url)
        assert r.status_code == 502 and r.json()["error"]["code"] == "tier_failed"  # no retries allowed


def test_classifier_learns_the_labels_and_is_stored_as_json(tmp_path):
    rows = [(f"implement a hard concurrent parser number {i}", True) for i in range(30)] + \
           [(f"say hi {i}", False) for i in range(30)]
    info = train_classifier([p for p, _ in rows], [y for _, y in rows], tmp_path / "clf.json")
    assert info["n_train"] == 60
    json.loads((tmp_path / "clf.json").read_text())  # plain JSON: nothing is unpickled
    p = Classifier(tmp_path / "clf.json").p_large(["implement a hard parser", "say hi"])
    assert p[0] > 0.5 > p[1]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(LmforgeError, match="not a router classifier"):
        Classifier(tmp_path / "bad.json")


def test_router_eval_cli_reports_routellm_metrics(tmp_path, chat_base):
    rows = [{"prompt": f"def f{i}(x):\n    \"\"\"Return x{' squared' * (i % 3)}.\"\"\"\n", "small": -1.0 - (i % 3),
             "large": -1.0} for i in range(12)]
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_router(tmp_path / "r.toml", {"name": "small", "model": str(chat_base), "usd_per_mtok": 1.0},
                        {"name": "large", "model": str(chat_base), "usd_per_mtok": 20.0}, threshold=-3.0)
    out = run_cli("router", "eval", "--router", path, "--data", data, "-o", tmp_path / "ev", "--max-tokens", "8")
    assert out.returncode == 0, out.stderr
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert 0.0 <= rep["apgr"] <= 1.0 and rep["apgr_random"] == 0.5
    ops = rep["operating"]
    assert ops["always_large"]["usd_per_1k"] > ops["always_small"]["usd_per_1k"]
    assert ops["random"]["share_large"] == ops["policy"]["share_large"]
    assert (tmp_path / "ev" / "routing.png").stat().st_size > 1000 and "APGR" in out.stdout


TASKS = [{"prompt": "Write a function double(x) that returns twice x.\n", "entry_point": "double",
          "doctest": ">>> double(3)\n6\n>>> double(-2)\n-4\n"},
         {"prompt": "Write a function inc(x) that returns the sum of x and 1.\n", "entry_point": "inc",
          "doctest": ">>> inc(3)\n4\n"},
         {"prompt": "Write a function neg(x) that returns the negation of x.\n", "entry_point": "neg",
          "doctest": ">>> neg(5)\n-5\n"},
         {"prompt": "Write a function sq(x) that returns the square of x.\n", "entry_point": "sq",
          "doctest": ">>> sq(3)\n9\n"}]


class Scripted:
    """A tier that answers each prompt from a table."""
    chat = False

    def __init__(self, answers):
        self.answers = answers

    def generate(self, prompts, max_new_tokens, stop, sample):
        assert sample.temperature == 0.0  # one greedy answer per task
        return [self.answers[p] for p in prompts]


def test_labels_by_execution_pass_only_answers_that_run_correctly(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    answers = {TASKS[0]["prompt"]: "```python\ndef double(x):\n    return 2 * x\n```\n",  # right
               TASKS[1]["prompt"]: "def inc(x):\n    return x + 2\n",  # runs, wrong value
               TASKS[2]["prompt"]: "```python\ndef neg(x):\n    return -x\n",  # right, the fence never closed
               TASKS[3]["prompt"]: "def sq(x):\n    return x **\n"}  # does not parse
    assert tier_passes(Scripted(answers), path) == [1.0, 0.0, 1.0, 0.0]
    assert tier_passes(Scripted(answers), path, limit=2) == [1.0, 0.0]


def test_router_label_cli_with_tasks_writes_pass_fail_rows(tmp_path, chat_base):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    out = run_cli("router", "label", "--small", chat_base, "--large", chat_base, "--tasks", path,
                  "-o", tmp_path / "labelled.jsonl", "--max-new-tokens", "16")
    assert out.returncode == 0, out.stderr
    rows = read_labelled(tmp_path / "labelled.jsonl")
    assert [r["prompt"] for r in rows] == [t["prompt"] for t in TASKS]
    assert all(r["quality"] == "pass" and r["small"] in (0.0, 1.0) and r["small"] == r["large"] for r in rows)
    both = run_cli("router", "label", "--small", chat_base, "--large", chat_base, "--tasks", path, "-s", tmp_path,
                   "-o", tmp_path / "x.jsonl")
    assert both.returncode != 0 and "exactly one of --tasks" in both.stderr
