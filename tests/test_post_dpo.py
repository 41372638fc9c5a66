"""DPO: TRL's loss, bad pairs, the reference cache, resume after a kill, and that it learns the preference."""

import json
import os
import signal
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from conftest import function_chats, run_cli, signal_when
from lmforge.errors import LmforgeError
from lmforge.model.io import load_model
from lmforge.post.dpo import DPOConfig, dpo, dpo_losses, read_pairs


def make_pairs(n=100):
    """Chosen: a function's source; rejected: the same source with its lines in reverse order."""
    out = []
    for c in function_chats(n):
        user = c["messages"][0]["content"][:30]
        lines = [ln[:30] for ln in c["messages"][1]["content"].splitlines()[:3]]
        answer = "\n".join(lines)
        if len(lines) < 2:
            continue
        out.append({"prompt": [{"role": "user", "content": user}], "chosen": answer,
                    "rejected": "\n".join(reversed(lines))})
    return out


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in make_pairs()))
    return f


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "sigmoid_norm"])
def test_loss_equals_trls_on_the_same_log_probabilities(loss):
    """TRL's DPOTrainer._compute_loss, fed the same per-token log-probabilities and reference sums."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    g = torch.Generator().manual_seed(0)
    B, T, beta = 6, 12, 0.1
    lens = torch.randint(2, T, (2 * B,), generator=g)
    completion = (torch.arange(T + 1)[None, :] >= (T + 1 - lens)[:, None]).long()  # prompt first, then the answer
    per_token = -torch.rand(2 * B, T, generator=g) * 3 * completion[:, 1:]
    ref = -torch.rand(2 * B, generator=g) * 20
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), beta=beta, loss_types=[loss], loss_weights=[1.0], label_smoothing=0.0,
        use_weighting=False, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t))
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * B, T), mean_logits=torch.zeros(2 * B, T),
                              is_top1=torch.zeros(2 * B, T, dtype=torch.bool))
    inputs = {"input_ids": torch.zeros(2 * B, T + 1, dtype=torch.long), "attention_mask": torch.ones(2 * B, T + 1),
              "completion_mask": completion, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    theirs = trl_dpo.DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, False)
    sums = per_token.sum(1)
    ours = dpo_losses(torch.stack([sums[:B], sums[B:]], -1), torch.stack([ref[:B], ref[B:]], -1),
                      torch.stack([lens[:B], lens[B:]], -1).float(), beta, loss).mean()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("row, needle", [
    ({"prompt": "hi", "chosen": "same", "rejected": "same"}, "'chosen' equals 'rejected'"),
    ({"prompt": "hi", "chosen": "a"}, "missing 'rejected'"),
    ({"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt[0]"),
    ({"prompt": "hi", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
])
def test_bad_pairs_name_the_file_and_line(tmp_path, row, needle):
    good = {"prompt": "hi", "chosen": [{"role": "assistant", "content": "yes"}], "rejected": "no"}
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in (good, row, good)) + "\n")
    with pytest.raises(LmforgeError, match=r"pairs.jsonl:2: ") as e:
        read_pairs(f)
    assert needle in str(e.value)
    got = read_pairs(f, skip_bad=True)
    assert len(got.pairs) == 2 and got.skipped == {"bad_pair": 1}
    assert got.pairs[0] == ([{"role": "user", "content": "hi"}], "yes", "no")  # strings and message lists alike


def test_dpo_learns_the_preference_and_records_it(chat_base, pairs_file, tmp_path):
    man = dpo(DPOConfig(policy=str(chat_base), data=str(pairs_file), out=str(tmp_path / "dpo"), max_steps=40,
                        batch_size=4, lr=1e-3, eval_every=20, precision="fp32", val_fraction=0.2), progress=False)
    m = man["metrics"]
    assert man["stage"] == "dpo" and m["ref_cache"] == "computed" and m["ref_forward_rows"] > 0
    assert m["final_pref_accuracy"] >= 0.8 and m["final_reward_margin"] > 0, m
    logged = [json.loads(ln) for ln in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("pref_accuracy" in r and "reward_margin" in r for r in logged)


def test_dpo_resumes_bitwise_and_reads_the_reference_from_its_cache(chat_base, pairs_file, tmp_path):
    args = ["dpo", "--policy", chat_base, "--data", pairs_file, "--steps", "30", "-q", "--resume", "auto",
            "--set", "dpo.ckpt_every=3", "--set", "dpo.batch_size=2", "--set", "dpo.precision='fp32'"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = run_cli(*args, "-o", tmp_path / "ref", env=env)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    code, _ = signal_when([*args, "-o", run], run / "checkpoints" / "step-00000006", signal.SIGKILL, 0)
    assert code == -signal.SIGKILL, "the run ended before it could be killed"
    r = run_cli(*args, "-o", run, env=env)
    assert r.returncode == 0, r.stderr
    m = json.loads((run / "manifest.json").read_text())["metrics"]
    assert m["ref_cache"] == "hit" and m["ref_forward_rows"] == 0  # the reference did not run again
    a, b = load_model(tmp_path / "ref").state_dict(), load_model(run).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shared_prompt_gives_each_answer_the_log_probability_it_has_alone(chat_base):
    """Pairs packed with one copy of the prompt per row (tree attention) score each answer exactly
    as ``prompt + answer`` scored on its own."""
    from lmforge.post.chats import chat_token_ids, pack_groups, render
    from lmforge.post.dpo import encode_pair, pair_has_target, sequence_logps
    from lmforge.post.sft import Rows
    from lmforge.tokenizer.io import load_tokenizer, tokenizer_dir_for

    model = load_model(chat_base).eval()
    tok = load_tokenizer(tokenizer_dir_for(chat_base))
    ids = chat_token_ids(tok)
    # Short pairs, so that several share a row of the model's 128-token context.
    pairs = [([{"role": "user", "content": p["prompt"][0]["content"][:12]}], p["chosen"][:14], p["rejected"][:10])
             for p in make_pairs(12)]
    packed = pack_groups([encode_pair(p, tok, ids) for p in pairs], model.cfg.context, ids["pad"] or 0,
                         has_target=pair_has_target)
    rows = Rows.of(packed)
    assert int(rows.doc.max()) >= 8  # several pairs share a row, so the mask has work to do
    n_pairs = int(rows.doc.max()) // 4
    with torch.no_grad():
        logps, lens = sequence_logps(model, *rows.batch(torch.arange(len(rows))), n_pairs)
    got = [(float(logps[r, i, k]), int(lens[r, i, k])) for r in range(len(rows))
           for i in range(int(rows.doc[r].max()) // 4) for k in (0, 1)]
    want = []
    for prompt, chosen, rejected in pairs:  # the packer keeps pairs in order within this small block
        for answer in (chosen, rejected):
            tokens, mask = render(prompt + [{"role": "assistant", "content": answer}], tok, ids)
            x, y = torch.tensor([tokens[:-1]]), torch.tensor(tokens[1:])
            with torch.no_grad():
                lp = torch.log_softmax(model(x)[0].float(), -1)[torch.arange(len(y)), y]
            learned = torch.tensor(mask[1:])
            want.append((float(lp[learned].sum()), int(learned.sum())))
    assert sorted(w[1] for w in want) == sorted(g[1] for g in got)
    for (g, gn) in got:  # match by (length, value): packing reorders pairs by size
        assert any(gn == wn and abs(g - w) < 1e-3 for w, wn in want), (g, gn)
