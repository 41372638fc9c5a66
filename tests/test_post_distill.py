"""Distillation from a local teacher and from an OpenAI-compatible endpoint on loopback."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import function_chats, run_cli
from lmforge.errors import LmforgeError
from lmforge.post.distill import DistillConfig, distill
from lmforge.post.sft import SFTConfig


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": c["messages"][0]["content"]}) + "\n" for c in function_chats(24)))
    return f


def student_cfg():
    return SFTConfig(max_steps=6, batch_size=2, eval_every=0, precision="fp32", val_fraction=0.1)


def test_local_teacher_to_a_new_student_with_a_resumable_answer_cache(chat_base, prompts_file, tmp_path):
    out = tmp_path / "distill"
    cfg = DistillConfig(teacher=str(chat_base), student="depth=1", prompts=str(prompts_file), out=str(out),
                        max_new_tokens=24, temperature=1.0, keep_unfinished=True, sft=student_cfg())
    man = distill(cfg, progress=False)
    assert man["stage"] == "distill"
    assert man["teacher"]["kind"] == "local" and man["teacher"]["weights_hash"].startswith("sha256:")
    t = man["teacher_answers"]
    assert t["asked"] == 24 and t["cached"] == 0 and t["used"] + t["failed"] == 24
    lines = (out / "teacher_answers.jsonl").read_text().splitlines()
    cached = [json.loads(ln) for ln in lines]
    assert len(cached) == t["used"] and all(a["answer"] for a in cached)  # kept: unfinished ones too, when asked
    assert t["unfinished"] == sum(not a["finished"] for a in cached) > 0  # a base model runs past 24 tokens
    assert json.loads((out / "student-init" / "model_config.json").read_text())["n_layer"] == 1
    again = distill(cfg, resume="auto", progress=False)  # nothing is asked twice
    assert again["teacher_answers"]["asked"] == t["failed"] and again["teacher_answers"]["cached"] == 24 - t["failed"]
    strict = DistillConfig(**{**vars(cfg), "keep_unfinished": False})  # cut-off answers are not trained on
    if t["unfinished"] == t["used"]:
        with pytest.raises(LmforgeError, match="ran past --max-new-tokens"):
            distill(strict, resume="auto", progress=False)
    else:
        assert distill(strict, resume="auto", progress=False)["teacher_answers"]["used"] == t["used"] - t["unfinished"]


class _Stub(BaseHTTPRequestHandler):
    """An OpenAI chat-completions endpoint: fails each prompt's first attempt, and answers
    a prompt containing 'heappush' with non-JSON every time."""

    seen: dict = {}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        assert self.headers.get("Authorization") == "Bearer sekret"
        n = _Stub.seen[text] = _Stub.seen.get(text, 0) + 1
        if "heappush" in text or n == 1:
            self.send_response(200 if n > 1 else 503)
            self.end_headers()
            self.wfile.write(b"<html>not json</html>")
            return
        reply = {"choices": [{"message": {"role": "assistant", "content": f"def f():\n    return {len(text)}"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_endpoint_teacher_retries_counts_failures_and_is_named(chat_base, prompts_file, tmp_path, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("STUB_KEY", "sekret")
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        man = distill(DistillConfig(teacher=url, teacher_model="stub-1", api_key_env="STUB_KEY", student=str(chat_base),
                                    prompts=str(prompts_file), out=str(tmp_path / "d"), retries=2, backoff_s=0.01,
                                    sft=student_cfg()), progress=False)
    finally:
        server.shutdown()
    n_bad = sum("heappush" in json.loads(ln)["prompt"] for ln in prompts_file.read_text().splitlines())
    assert n_bad >= 1
    assert man["teacher"] == {"kind": "endpoint", "url": url, "model": "stub-1"}
    t = man["teacher_answers"]
    assert t["failed"] == n_bad and t["used"] == 24 - n_bad


def test_a_refusing_endpoint_is_reported_with_exit_code_2(chat_base, prompts_file, tmp_path):
    r = run_cli("distill", "--teacher", "http://127.0.0.1:9/v1", "--teacher-model", "x", "--student", chat_base,
                "--prompts", prompts_file, "-o", tmp_path / "d", "-q", "--set", "sft.max_steps=1")
    assert r.returncode == 2
    assert "http://127.0.0.1:9/v1" in r.stderr and "no prompt got an answer" in r.stderr


def test_logit_distillation_is_zero_between_equal_models_and_trains(chat_base, prompts_file, tmp_path):
    import torch

    from lmforge.model.io import load_config
    from lmforge.post.chats import chat_token_ids, pack, render
    from lmforge.post.distill import LocalTeacher, logit_loss
    from lmforge.post.sft import Rows

    teacher = LocalTeacher(str(chat_base), tmp_path)
    vocab = load_config(chat_base).vocab_size
    ids = chat_token_ids(teacher.tok)
    convs = [c["messages"] for c in function_chats(6)]
    rows = Rows.of(pack([render(c, teacher.tok, ids) for c in convs], load_config(chat_base).context, ids["pad"]))
    batch = rows.batch(torch.arange(len(rows)))
    full = logit_loss(teacher, str(chat_base), DistillConfig(out=str(tmp_path), alpha=1.0, top_k=vocab))
    assert abs(full(teacher.model, batch).item()) < 1e-4  # the same model: nothing to learn from the teacher
    top8 = logit_loss(teacher, str(chat_base), DistillConfig(out=str(tmp_path), alpha=1.0, top_k=8))
    assert top8(teacher.model, batch).item() > 0.01  # the student's mass outside the teacher's top 8 costs
    man = distill(DistillConfig(teacher=str(chat_base), student="depth=1", prompts=str(prompts_file),
                                out=str(tmp_path / "kd"), max_new_tokens=24, temperature=1.0, alpha=0.5,
                                keep_unfinished=True,
                                sft=student_cfg()), progress=False)
    assert man["logit_distillation"] == {"alpha": 0.5, "top_k": 32} and man["status"] == "complete"
