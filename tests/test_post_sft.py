"""SFT: packed conversations stay apart, the stage trains and records, bad input stops it, resume is exact."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import CHAT_CTX as CTX, function_chats, run_cli, signal_when
from lmforge.model.io import load_model
from lmforge.model.model import ModelConfig, build_model
from lmforge.post.chats import chat_token_ids, pack, render
from lmforge.post.sft import Rows, SFTConfig, doc_attention, packed_loss, sft
from lmforge.tokenizer.io import load_tokenizer

@pytest.fixture(scope="module")
def chats_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    f.write_text("".join(json.dumps(c) + "\n" for c in function_chats()))
    return f


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_conversations_see_only_themselves(tiny_data, dtype):
    """A packed row's logits equal each conversation's logits computed alone, on both attention paths."""
    _, tok_dir = tiny_data
    tok = load_tokenizer(tok_dir)
    ids = chat_token_ids(tok)
    convs = [[{"role": "user", "content": c["messages"][0]["content"][:20]},
              {"role": "assistant", "content": c["messages"][1]["content"][:30]}] for c in function_chats(3)]
    encoded = [render(c, tok, ids) for c in convs]
    p = pack(encoded, context=127, pad_id=ids["pad"])
    assert len(p.tokens) == 1 and max(p.doc[0]) == 3  # all three in one row, then padding
    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=2, vocab_size=512, context=CTX)).to(dtype)
    row = torch.tensor(p.tokens)[:, :-1]
    positions, mask = doc_attention(torch.tensor(p.doc)[:, :-1])
    with torch.no_grad():
        packed = model(row, positions=positions, attn_mask=mask)[0]
        start = 0
        for t, _ in encoded:
            alone = model(torch.tensor([t]))[0]
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(packed[start:start + len(t)], alone, atol=tol, rtol=tol)
            start += len(t)


def test_doc_attention_restarts_positions_and_blocks_other_documents():
    doc = torch.tensor([[1, 1, 1, 2, 2, 0, 0]])
    positions, mask = doc_attention(doc)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    m = mask[0, 0]
    assert m[4].tolist() == [False, False, False, True, True, False, False]
    assert m[2].tolist() == [True, True, True, False, False, False, False]


def test_sft_trains_on_the_assistant_and_records_its_inputs(chat_base, chats_file, tmp_path):
    out = tmp_path / "sft"
    man = sft(SFTConfig(base=str(chat_base), data=str(chats_file), out=str(out), max_steps=30, batch_size=4,
                        eval_every=0, precision="fp32", lr=1e-3), progress=False)
    assert man["stage"] == "sft" and man["status"] == "complete"
    m = man["metrics"]
    assert m["train_conversations"] + m["val_conversations"] == len(function_chats())
    assert m["rows"] < m["train_conversations"]  # packed: several conversations per row
    assert 0.5 < m["row_fill"] <= 1
    assert set(man["inputs"]) >= {"data", "base", "tokenizer", "init_from"}
    # The fine-tuned model predicts the held-out assistant tokens better than the base did.
    tok = load_tokenizer(man["inputs"]["tokenizer"]["path"])
    ids = chat_token_ids(tok)
    val = Rows.of(pack([render(c["messages"], tok, ids) for c in function_chats()[-20:]], CTX, ids["pad"]))
    batch = val.batch(torch.arange(len(val)))
    with torch.no_grad():
        before = packed_loss(load_model(chat_base), batch).item()
        after = packed_loss(load_model(out), batch).item()
    assert after < before - 0.3, (before, after)
    # `lmforge status` reads an SFT run like any training run
    r = run_cli("status", out, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "complete"


@pytest.mark.parametrize("line, needle", [
    ("{oops", "not JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role = 'robot'"),
])
def test_bad_chats_stop_with_file_and_line_and_write_nothing(chat_base, chats_file, tmp_path, line, needle):
    bad = tmp_path / "bad.jsonl"
    lines = chats_file.read_text().splitlines()
    bad.write_text("\n".join(lines[:3] + [line] + lines[3:10]) + "\n")
    out = tmp_path / "sft"
    r = run_cli("sft", "--base", chat_base, "--data", bad, "-o", out, "--steps", "2", "-q")
    assert r.returncode == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl:4: " in err and needle in err, err
    assert not out.exists()
    r = run_cli("sft", "--base", chat_base, "--data", bad, "-o", out, "--steps", "2", "-q", "--skip-bad",
                "--set", "sft.val_fraction=0.2")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert sum(m["skipped_lines"].values()) == 1


def test_sft_resumes_bitwise_after_kill_9(chat_base, chats_file, tmp_path):
    args = ["sft", "--base", chat_base, "--data", chats_file, "--steps", "40", "-q", "--resume", "auto",
            "--set", "sft.ckpt_every=4", "--set", "sft.batch_size=2", "--set", "sft.precision='fp32'"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = run_cli(*args, "-o", tmp_path / "ref", env=env)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    code, _ = signal_when([*args, "-o", run], run / "checkpoints" / "step-00000008", signal.SIGKILL, 0)
    assert code == -signal.SIGKILL, "the run ended before it could be killed"
    r = run_cli(*args, "-o", run, env=env)
    assert r.returncode == 0, r.stderr
    a, b = load_model(tmp_path / "ref").state_dict(), load_model(run).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    events = [json.loads(ln)["event"] for ln in (run / "events.jsonl").read_text().splitlines()]
    assert "resumed" in events


def test_chat_model_round_trips_through_transformers(chat_base, chats_file, tmp_path):
    """An HF export of an SFT model is a chat model in transformers: apply_chat_template plus greedy
    generate gives the tokens lmforge's chat gives, and stops at <|end|>."""
    transformers = pytest.importorskip("transformers")
    from lmforge.export.hf import export_hf
    from lmforge.model.generate import SampleConfig
    from lmforge.post.chat import Chat, prompt_ids, reply

    out = tmp_path / "sft"
    sft(SFTConfig(base=str(chat_base), data=str(chats_file), out=str(out), max_steps=60, batch_size=4, eval_every=0,
                  precision="fp32", lr=2e-3), progress=False)
    hf_dir = export_hf(out, tmp_path / "hf")
    assert "chat_template" in json.loads((hf_dir / "tokenizer_config.json").read_text())
    tok = load_tokenizer(hf_dir)
    chat = Chat(load_model(out), tok, chat_token_ids(tok), system="You write Python.")
    question = "Write dedent: Remove any common leading whitespace"
    cfg = SampleConfig(max_new_tokens=40, temperature=0)
    ours_text = "".join(reply(chat, question, cfg))
    assert ours_text.strip()
    chat.history.pop()  # ask again, the way transformers will
    prompt = prompt_ids(chat, 40)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    msgs = chat.messages()
    enc = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == prompt  # the template renders what lmforge renders
    gen = hf_model.generate(**enc, max_new_tokens=40, do_sample=False)[0, len(prompt):].tolist()
    end = tok.token_to_id("<|end|>")
    new = gen[:-1] if gen and gen[-1] in (end, tok.token_to_id("<|eos|>")) else gen
    assert tok.decode(new) == ours_text
    stopped = bool(gen) and gen[-1] == end
    assert stopped == (len(new) < 40)  # transformers stops at <|end|> exactly when lmforge does


def test_chat_cli_keeps_history_and_obeys_commands(chat_base, tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmforge", "chat", str(chat_base), "--max-tokens", "5", "-t", "0"],
                       input="hello\n/system Be brief.\nagain\n/reset\nhi\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 3
    assert "(system: Be brief.)" in r.stdout and "(history cleared)" in r.stdout


def test_prompt_drops_oldest_turns_when_the_context_fills(chat_base):
    from lmforge.post.chat import open_chat, prompt_ids

    chat = open_chat(chat_base)
    chat.system = "sys"
    for i in range(40):
        chat.history += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": f"answer {i}"}]
    p = prompt_ids(chat, 32)
    assert len(p) <= CTX - 32
    text = chat.tok.decode(p, skip_special_tokens=False)
    assert text.startswith("<|system|>sys<|end|>") and "question 39" in text and "question 0 " not in text
    assert text.endswith("<|assistant|>")
