"""Distillation: a teacher answers prompts, and a student is fine-tuned on the answers.

The teacher is a local model (an lmforge or HF directory) or any OpenAI-compatible endpoint
(``http://HOST:PORT/v1``; its key is read from an environment variable, never from a flag or a
file). Answers are generated in batches and appended to ``OUT/teacher_answers.jsonl``, one line
per prompt keyed by a hash of the teacher and the prompt, so an interrupted run picks up where
it stopped and a repeated one asks nothing again. Endpoint calls are retried with backoff; a
prompt that still fails is counted, never fatal (unless every prompt fails: then the endpoint
is reported). The answers become conversations, and the student trains on them through
:func:`lmforge.post.sft.sft`; the manifest's stage is ``distill`` and ``teacher`` names the
teacher (its weights' hash, or the URL and model name), so training on another model's
outputs is always visible in the record.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.model.generate import SampleConfig, generate
from lmforge.model.io import WEIGHTS, load_config, load_model, save_model
from lmforge.model.model import build_model
from lmforge.post.base import resolve_base
from lmforge.post.chats import ROLES, chat_token_ids, records, render
from lmforge.post.sft import SFTConfig, doc_attention, sft
from lmforge.rundir import Manifest, hash_file

ANSWERS = "teacher_answers.jsonl"


@dataclass
class DistillConfig:
    teacher: str = ""  # a model directory, or an OpenAI-compatible base URL (http://.../v1)
    teacher_model: str = ""  # the model name an endpoint serves
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the endpoint's key
    student: str = ""  # a model directory, or depth=N: a fresh model like the teacher's at depth N
    prompts: str = ""  # JSONL: {"prompt": "..."} or {"messages": [...]} (a trailing assistant turn is ignored)
    out: str = "runs/distill"
    max_new_tokens: int = 256
    temperature: float = 0.0
    batch_size: int = 16  # prompts per generation batch (concurrent requests, for an endpoint)
    retries: int = 3
    backoff_s: float = 0.5  # doubled after each failed attempt
    timeout_s: float = 60.0
    keep_unfinished: bool = False  # also train on answers the token budget cut off (they never end their turn)
    alpha: float = 0.0  # logit distillation's share of the loss (local teacher, same tokenizer); 0: answers only
    top_k: int = 32  # teacher logits kept per position for logit distillation
    sft: SFTConfig = field(default_factory=SFTConfig)  # how the student trains (base, data, out are set here)


def read_prompts(path) -> list[list[dict]]:
    """Prompt conversations from JSONL; a bad line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"--prompts {path}: no such file; give JSONL with one {{\"prompt\": ...}} or {{\"messages\": [...]}} per line")
    out = []
    for where, row, error in records(path):
        if error:
            raise LmforgeError(f"{where}: {error}")
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
            out.append([{"role": "user", "content": row["prompt"]}])
            continue
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not msgs or any(not isinstance(m, dict) or m.get("role") not in ROLES
                                                         or not isinstance(m.get("content"), str) for m in msgs):
            raise LmforgeError(f"{where}: needs a non-empty 'prompt' string or a 'messages' list of "
                               "{\"role\", \"content\"} objects")
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise LmforgeError(f"{where}: the conversation has no prompt before its answer")
        out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    if not out:
        raise LmforgeError(f"{path}: no prompts")
    return out


# ----------------------------------------------------------------------------- teachers


class LocalTeacher:
    def __init__(self, path: str, work_dir: Path):
        self.base = resolve_base(path, work_dir / "teacher", flag="--teacher")
        self.tok = self.base.tokenizer()
        self.ids = chat_token_ids(self.tok)
        self.model = load_model(self.base.model_dir)
        self.record = {"kind": "local", "path": str(Path(path).resolve()), "weights_hash": self.base.weights_hash}

    def answer(self, prompts: list[list[dict]], cfg: DistillConfig) -> list[tuple[str | None, bool]]:
        """(answer, finished) per prompt: finished when the teacher ended its turn within the budget."""
        ids = [render(p, self.tok, self.ids, add_generation_prompt=True)[0] for p in prompts]
        outs = generate(self.model, ids, SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature),
                        eos_id=[self.ids["end"], self.ids["eos"]], pad_id=self.ids["pad"] or 0)
        budget = [min(cfg.max_new_tokens, self.model.cfg.context - min(len(i), self.model.cfg.context)) for i in ids]
        return [(self.tok.decode(o) or None, len(o) < b) for o, b in zip(outs, budget)]


class EndpointTeacher:
    def __init__(self, url: str, cfg: DistillConfig):
        if not cfg.teacher_model:
            raise LmforgeError("--teacher is a URL: name the model it serves with --teacher-model")
        self.url = url.rstrip("/") + "/chat/completions"
        self.key = os.environ.get(cfg.api_key_env, "")
        self.record = {"kind": "endpoint", "url": url, "model": cfg.teacher_model}
        self.errors: list[str] = []

    def _ask(self, messages: list[dict], cfg: DistillConfig) -> tuple[str | None, bool]:
        body = json.dumps({"model": cfg.teacher_model, "messages": messages, "max_tokens": cfg.max_new_tokens,
                           "temperature": cfg.temperature}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.key}"} if self.key else {})}
        delay = cfg.backoff_s
        for attempt in range(cfg.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=cfg.timeout_s) as r:
                    reply = json.loads(r.read().decode("utf-8"))
                choice = reply["choices"][0]
                return choice["message"]["content"], choice.get("finish_reason") != "length"
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
                self.errors.append(f"{type(e).__name__}: {str(e)[:120]}")
                if attempt < cfg.retries:
                    time.sleep(delay)
                    delay *= 2
        return None, False

    def answer(self, prompts: list[list[dict]], cfg: DistillConfig) -> list[tuple[str | None, bool]]:
        with ThreadPoolExecutor(max_workers=max(1, min(cfg.batch_size, 16))) as pool:
            return list(pool.map(lambda p: self._ask(p, cfg), prompts))


def open_teacher(cfg: DistillConfig, work_dir: Path):
    if cfg.teacher.startswith(("http://", "https://")):
        return EndpointTeacher(cfg.teacher, cfg)
    return LocalTeacher(cfg.teacher, work_dir)


# ----------------------------------------------------------------------------- answers, student


def prompt_key(teacher: dict, prompt: list[dict]) -> str:
    return hashlib.sha256(json.dumps([teacher, prompt], sort_keys=True).encode()).hexdigest()[:32]


def collect_answers(teacher, prompts: list[list[dict]], cfg: DistillConfig, out: Path) -> dict:
    """Answer every prompt not yet in ``out/teacher_answers.jsonl``, appending batch by batch."""
    path = out / ANSWERS
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                done[row["key"]] = row
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a crash: that prompt is asked again
    todo = [(prompt_key(teacher.record, p), p) for p in prompts]
    todo = [(k, p) for k, p in todo if k not in done]
    failed = 0
    with path.open("a", encoding="utf-8") as f:
        for i in range(0, len(todo), cfg.batch_size):
            batch = todo[i:i + cfg.batch_size]
            for (k, p), (a, finished) in zip(batch, teacher.answer([p for _, p in batch], cfg)):
                if a is None or not a.strip():
                    failed += 1
                    continue
                done[k] = {"key": k, "prompt": p, "answer": a, "finished": finished}
                f.write(json.dumps(done[k]) + "\n")
            f.flush()
            os.fsync(f.fileno())
    have = [done[k] for k in (prompt_key(teacher.record, p) for p in prompts) if k in done]
    # An answer cut off by the token budget would teach the student to end mid-thought; it is kept
    # in the cache (a larger budget can ask again in a new run) but not trained on.
    return {"answers": [a for a in have if a.get("finished", True) or cfg.keep_unfinished], "asked": len(todo),
            "cached": len(prompts) - len(todo), "failed": failed,
            "unfinished": sum(not a.get("finished", True) for a in have)}


def fresh_student(spec: str, teacher_dir: Path, tok_dir: Path, out: Path) -> Path:
    """``depth=N``: a new model shaped like the teacher's at depth N, saved with its tokenizer recorded."""
    try:
        depth = int(spec.split("=", 1)[1])
    except (IndexError, ValueError):
        raise LmforgeError(f"--student {spec}: give a model directory or depth=N") from None
    t = load_config(teacher_dir)
    cfg = replace(t, depth=depth, n_layer=0, d_model=0, n_head=0, n_kv_head=0, d_ff=0)
    dst = out / "student-init"
    if not (dst / WEIGHTS).exists():
        save_model(build_model(cfg), dst)
        man = Manifest(dst, "init", {"from": spec, "shaped_like": str(teacher_dir)})
        man.add_input("tokenizer", tok_dir, content_hash=hash_file(tok_dir / "tokenizer.json"))
        man.finish()
    return dst


def distill(cfg: DistillConfig, resume: bool | str = False, progress: bool = True) -> dict:
    """Have the teacher answer ``cfg.prompts``, then train the student on the answers."""
    if not cfg.teacher or not cfg.student or not cfg.prompts:
        raise LmforgeError("distill needs --teacher, --student and --prompts")
    prompts = read_prompts(cfg.prompts)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = open_teacher(cfg, out)
    got = collect_answers(teacher, prompts, cfg, out)
    if not got["answers"]:
        if isinstance(teacher, EndpointTeacher):
            why = f" (last error: {teacher.errors[-1]})" if teacher.errors else ""
            raise LmforgeError(f"--teacher {cfg.teacher}: no prompt got an answer after {cfg.retries} retries each{why}; "
                               f"check the URL, --teacher-model and the key in {cfg.api_key_env}")
        if got["unfinished"]:
            raise LmforgeError(f"--teacher {cfg.teacher}: every answer ran past --max-new-tokens {cfg.max_new_tokens} "
                               "without ending its turn; raise it, or use a chat model (after `lmforge sft`)")
        raise LmforgeError(f"--teacher {cfg.teacher}: every answer was empty (the model stops at once); "
                           "use a chat model (after `lmforge sft`) or a --temperature above 0")
    chats = out / "teacher_chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": a["prompt"] + [{"role": "assistant", "content": a["answer"]}]}) + "\n"
                             for a in got["answers"]), encoding="utf-8")
    student = cfg.student
    if student.startswith("depth="):
        if not isinstance(teacher, LocalTeacher):
            raise LmforgeError("--student depth=N needs a local teacher to take the shape and tokenizer from; "
                               "give a student model directory with an endpoint teacher")
        student = str(fresh_student(student, teacher.base.model_dir, teacher.base.tok_dir, out))
    scfg = replace(cfg.sft, base=student, data=str(chats), out=str(out))
    record = {"teacher": teacher.record,
              "teacher_answers": {"file": ANSWERS, "asked": got["asked"], "cached": got["cached"],
                                  "failed": got["failed"], "unfinished": got["unfinished"], "used": len(got["answers"])},
              "logit_distillation": {"alpha": cfg.alpha, "top_k": cfg.top_k} if cfg.alpha > 0 else None}
    loss = logit_loss(teacher, student, cfg) if cfg.alpha > 0 else None
    return sft(scfg, resume=resume, progress=progress, stage="distill", record=record, loss=loss)


def logit_loss(teacher, student_dir: str, cfg: DistillConfig):
    """``alpha`` x forward KL from the teacher's top-k distribution + (1 - alpha) x cross-entropy,
    on the learned positions. Needs a local teacher with the student's tokenizer."""
    if not isinstance(teacher, LocalTeacher):
        raise LmforgeError("--alpha needs a local teacher: an endpoint gives text, not logits")
    student = resolve_base(student_dir, Path(cfg.out), flag="--student")
    if student.record()["tokenizer"]["content_hash"] != teacher.base.record()["tokenizer"]["content_hash"]:
        raise LmforgeError("--alpha: the student's tokenizer differs from the teacher's; logits only compare "
                           "over one vocabulary (use --alpha 0 to train on the answers)")
    model, alpha, k = teacher.model, cfg.alpha, cfg.top_k

    def loss(student_model, batch):
        x, y, doc = batch
        positions, mask = doc_attention(doc)
        learned = y != -1
        with torch.no_grad():
            model.to(x.device).eval()
            top, idx = model(x, positions=positions, attn_mask=mask)[learned].float().topk(k, dim=-1)
            p_teacher = top.softmax(-1)
        logp = student_model(x, positions=positions, attn_mask=mask)[learned].float().log_softmax(-1)
        kl = (p_teacher * (p_teacher.clamp_min(1e-12).log() - logp.gather(1, idx))).sum(-1).mean()
        ce = -logp.gather(1, y[learned][:, None]).mean()
        return alpha * kl + (1 - alpha) * ce

    return loss
