"""lmforge provenance: derived models (fine-tuned, renamed, permuted, rescaled, exported) against
independent ones (other seeds) and other architectures, on tiny models trained here.

The case builders are plain functions so that bench/provenance_matrix.py prints the similarity
matrix of exactly these cases.
"""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.eval.cli import provenance_cmd
from lmforge.eval.provenance import DERIVED_MIN, format_table, provenance
from lmforge.export.hf import export_hf
from lmforge.model.io import load_model, save_model
from lmforge.model.model import ModelConfig, build_model
from lmforge.train.config import TrainConfig
from lmforge.train.trainer import train

MODEL = {"depth": 2, "vocab_size": 512, "context": 64}
STEPS = 30


def train_run(data_dir, out, seed, steps=STEPS, init_from=""):
    train(TrainConfig(data=str(data_dir), out=str(out), model=ModelConfig(**MODEL), max_steps=steps, batch_size=4,
                      eval_every=0, eval_batches=1, ckpt_every=0, precision="fp32", warmup_steps=5, seed=seed,
                      init_from=str(init_from)), progress=False)
    return Path(out)


def _loguniform(n, g, signed=False):
    x = torch.exp(torch.empty(n).uniform_(-0.7, 0.7, generator=g))  # factors in [0.5, 2]
    return x * (torch.randint(0, 2, (n,), generator=g) * 2 - 1) if signed else x


def permuted(model, seed=0):
    """The same function with attention heads (kv groups and the q heads inside them) and MLP units reordered."""
    m, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    c = m.cfg
    H, K, hd, rep = c.n_head, c.n_kv_head, c.head_dim, c.n_head // c.n_kv_head
    with torch.no_grad():
        for blk in m.blocks:
            kv = torch.randperm(K, generator=g)
            kv = kv.roll(1) if torch.equal(kv, torch.arange(K)) else kv  # with 2 heads, randperm is often the identity
            q = torch.cat([kv[i] * rep + torch.randperm(rep, generator=g) for i in range(K)])
            wq, wk, wv = blk.attn.wqkv.weight.split([H * hd, K * hd, K * hd])
            heads = lambda w, p: w.reshape(len(p), hd, -1)[p].flatten(0, 1)  # noqa: E731
            blk.attn.wqkv.weight.copy_(torch.cat([heads(wq, q), heads(wk, kv), heads(wv, kv)]))
            blk.attn.wo.weight.copy_(heads(blk.attn.wo.weight.T, q).T)
            u = torch.randperm(c.d_ff, generator=g)
            gate, up = blk.mlp.w13.weight.split(c.d_ff)
            blk.mlp.w13.weight.copy_(torch.cat([gate[u], up[u]]))
            blk.mlp.w2.weight.copy_(blk.mlp.w2.weight[:, u])
    return m


def rescaled(model, seed=0):
    """The same function with norm gains x c (next projection's columns / c), up x s (down / s), q x a (k / a)
    and v x b (o / b): per channel, unit or head, signed where the sign cancels too."""
    m, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    c = m.cfg
    K, hd, rep = c.n_kv_head, c.head_dim, c.n_head // c.n_kv_head
    with torch.no_grad():
        for blk in m.blocks:
            for norm, nxt in ((blk.attn_norm, blk.attn.wqkv), (blk.mlp_norm, blk.mlp.w13)):
                gain = _loguniform(c.d_model, g)
                norm.weight.mul_(gain)
                nxt.weight.div_(gain)
            a, b = _loguniform(K, g, signed=True), _loguniform(K * hd, g, signed=True)
            row = torch.cat([a.repeat_interleave(rep * hd), 1 / a.repeat_interleave(hd), b])
            blk.attn.wqkv.weight.mul_(row[:, None])
            blk.attn.wo.weight.div_(b.view(K, hd).repeat_interleave(rep, 0).flatten())
            s = _loguniform(c.d_ff, g, signed=True)
            blk.mlp.w13.weight.mul_(torch.cat([torch.ones(c.d_ff), s])[:, None])
            blk.mlp.w2.weight.div_(s)
    return m


def saved(model, out, like):
    """``model`` saved as an lmforge dir that reuses ``like``'s manifest (so export finds the tokenizer)."""
    save_model(model, out)
    shutil.copy(Path(like) / "manifest.json", Path(out) / "manifest.json")
    return Path(out)


def renamed(hf_dir, out, rename):
    """A copy of an HF directory with its tensors renamed by ``rename(name) -> new name``."""
    out = Path(out)
    out.mkdir()
    shutil.copy(Path(hf_dir) / "config.json", out / "config.json")
    sd = load_file(str(Path(hf_dir) / "model.safetensors"))
    save_file({rename(k): v for k, v in sd.items()}, str(out / "model.safetensors"))
    return out


def shuffled_names(hf_dir, out, seed=0):
    """Every tensor renamed to a meaningless name, so that a name sort puts them in a random order."""
    names = sorted(load_file(str(Path(hf_dir) / "model.safetensors")))
    perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    new = {n: f"t{p:03d}" for n, p in zip(names, perm)}
    return renamed(hf_dir, out, new.__getitem__)


NORM_RENAMES = {"model.norm.weight": "a_final_norm.weight",
                "model.layers.1.post_attention_layernorm.weight": "model.layers.0.aa_norm.weight"}


def extended_vocab(model, extra=64, seed=0):
    """The same layers behind an embedding with ``extra`` new token rows (a new tokenizer's additions)."""
    cfg = ModelConfig(**{**MODEL, "vocab_size": MODEL["vocab_size"] + extra})
    torch.manual_seed(seed)
    m = build_model(cfg)
    sd = model.state_dict()
    with torch.no_grad():
        for name, p in m.state_dict().items():
            p[:len(sd[name])].copy_(sd[name])
    return m


def hf_llama(out, seed):
    """A transformers-initialised LlamaForCausalLM, saved as safetensors: grouped-query attention, and
    d_ff == vocab_size, so that an MLP matrix has the embedding's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    return Path(out)


def build_cases(data_dir, work):
    """name -> (A, B, expected verdict)."""
    work = Path(work)
    a = train_run(data_dir, work / "a", seed=1)
    child = train_run(data_dir, work / "child", seed=2, steps=20, init_from=a)
    other = train_run(data_dir, work / "other", seed=3)
    model = load_model(a)
    save_model(build_model(ModelConfig(**{**MODEL, "depth": 3})), work / "wider")
    save_model(build_model(ModelConfig(**{**MODEL, "n_layer": 3})), work / "deeper")
    export_hf(a, work / "a-hf")
    disguised = saved(rescaled(permuted(load_model(child), seed=5), seed=6), work / "child-disguised", like=child)
    export_hf(disguised, work / "child-disguised-hf")
    h0, h1 = hf_llama(work / "llama0", 0), hf_llama(work / "llama1", 1)
    return {
        "fine-tuned child": (a, child, "derived"),
        "HF export": (a, work / "a-hf", "derived"),
        "two norms renamed": (a, renamed(work / "a-hf", work / "a-hf-norms", lambda k: NORM_RENAMES.get(k, k)), "derived"),
        "heads+units permuted": (a, saved(permuted(model), work / "perm", like=a), "derived"),
        "rescaled": (a, saved(rescaled(model), work / "scaled", like=a), "derived"),
        "child permuted+rescaled+renamed": (a, shuffled_names(work / "child-disguised-hf", work / "rebadged"), "derived"),
        "vocabulary extended": (a, saved(extended_vocab(model), work / "more-tokens", like=a), "derived"),
        "different seed": (a, other, "independent"),
        "child vs other seed": (child, other, "independent"),
        "different width": (a, work / "wider", "incomparable"),
        "different depth": (a, work / "deeper", "incomparable"),
        "transformers seeds 0/1": (h0, h1, "independent"),
        "transformers renamed": (h0, shuffled_names(h0, work / "llama0-renamed"), "derived"),
    }


@pytest.fixture(scope="module")
def cases(tiny_data, tmp_path_factory):
    return build_cases(tiny_data[0], tmp_path_factory.mktemp("prov"))


@pytest.fixture(scope="module")
def results(cases):
    return {name: provenance(a, b) for name, (a, b, _) in cases.items()}


CASES = ["fine-tuned child", "HF export", "two norms renamed", "heads+units permuted", "rescaled",
         "child permuted+rescaled+renamed", "vocabulary extended", "different seed", "child vs other seed",
         "different width", "different depth", "transformers seeds 0/1", "transformers renamed"]


@pytest.mark.parametrize("name", CASES)
def test_verdict(cases, results, name):
    r = results[name]
    assert r.verdict == cases[name][2], format_table(r)
    if r.verdict == "derived":
        assert r.score >= DERIVED_MIN and all(row.score >= DERIVED_MIN for row in r.layers)
    elif r.verdict == "independent":
        # Far below the threshold, not just below it.
        assert r.score < DERIVED_MIN / 4 and all(row.score < DERIVED_MIN / 4 for row in r.layers)
    else:
        assert r.score is None and not r.layers and "shape" in r.reason


def test_cases_cover_the_list(cases):
    assert sorted(cases) == sorted(CASES)


def logits(model, seed=0):
    x = torch.randint(0, MODEL["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def test_disguises_preserve_the_function_and_change_the_weights(cases):
    model = load_model(cases["fine-tuned child"][0])
    for fn in (permuted, rescaled):
        other = fn(model)
        torch.testing.assert_close(logits(other), logits(model), atol=1e-4, rtol=1e-4)
        for blk, orig in zip(other.blocks, model.blocks):
            assert not torch.allclose(blk.attn.wqkv.weight, orig.attn.wqkv.weight)
            assert not torch.allclose(blk.mlp.w13.weight, orig.mlp.w13.weight)


def test_exact_invariants_hold_exactly(results):
    """Renaming and permuting move no measure; rescaling moves only the approximate one (gram)."""
    for name in ("HF export", "two norms renamed", "heads+units permuted", "transformers renamed"):
        assert all(min(row.qk, row.ov, row.mlp, row.gram) > 0.999 for row in results[name].layers), name
    rows = results["rescaled"].layers
    assert all(min(row.qk, row.ov, row.mlp, row.score) > 0.999 for row in rows)
    assert all(row.gram < 0.99 for row in rows)  # the rescaling did bite; the products did not notice


def _offset_order(path):
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda n: header[n]["data_offsets"][0])


def test_renaming_two_norms_reorders_the_file_but_not_the_result(cases, results):
    a_hf, b = cases["HF export"][1], cases["two norms renamed"][1]
    before = [n for n in _offset_order(a_hf / "model.safetensors") if "norm" in n]
    after = [n for n in _offset_order(b / "model.safetensors") if "norm" in n]
    assert [NORM_RENAMES.get(n, n) for n in before] != after  # the norms did move in the file
    assert results["two norms renamed"].to_dict()["layers"] == results["HF export"].to_dict()["layers"]


def test_a_new_vocabulary_leaves_the_embeddings_unscored(results):
    r = results["vocabulary extended"]
    assert r.embed is None and r.score > 0.999
    assert results["fine-tuned child"].embed > 0.5 and results["different seed"].embed < 0.1


def test_transformers_llama_against_an_lmforge_model_is_incomparable(cases):
    r = provenance(cases["transformers seeds 0/1"][0], cases["fine-tuned child"][0])
    assert r.verdict == "incomparable"


def test_result_round_trips_as_json(results):
    d = json.loads(json.dumps(results["fine-tuned child"].to_dict()))
    assert d["verdict"] == "derived" and d["derived_min"] == DERIVED_MIN and len(d["layers"]) == MODEL["depth"]
    assert set(d["layers"][0]) == {"layer", "qk", "ov", "mlp", "gram", "score"}


def test_bad_input(cases, tmp_path):
    a = cases["fine-tuned child"][0]
    with pytest.raises(LmforgeError, match="nope: no such directory"):
        provenance(a, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="empty: neither an lmforge model directory"):
        provenance(tmp_path / "empty", a)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(cases["HF export"][1] / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04junk that must never be unpickled")
    with pytest.raises(LmforgeError, match=r"pickled: only pickle weights \(pytorch_model.bin\)"):
        provenance(a, pickled)
    broken = tmp_path / "broken"
    shutil.copytree(cases["HF export"][1], broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(LmforgeError, match="broken/model.safetensors: not a readable safetensors file"):
        provenance(a, broken)
    for call in (lambda: provenance(tmp_path / "nope", a), lambda: provenance_cmd(tmp_path / "nope", a, out=None)):
        with pytest.raises(LmforgeError) as e:
            call()
        assert "\n" not in str(e.value) and "nope" in str(e.value)


def test_command_writes_a_run_directory(cases, tmp_path, capsys):
    a, b, _ = cases["fine-tuned child"]
    provenance_cmd(a, b, out=tmp_path / "prov")
    printed = capsys.readouterr().out
    assert "verdict: derived" in printed and "qk" in printed
    man = json.loads((tmp_path / "prov" / "manifest.json").read_text())
    assert man["stage"] == "provenance" and man["status"] == "complete"
    assert man["metrics"]["verdict"] == "derived" and len(man["metrics"]["layers"]) == MODEL["depth"]
    assert man["inputs"]["a"]["hash"].startswith("sha256:") and man["inputs"]["a"]["hash"] != man["inputs"]["b"]["hash"]
    assert (tmp_path / "prov" / "provenance.txt").read_text().strip() == printed.strip()
    provenance_cmd(a, b, out=tmp_path / "prov")  # an earlier provenance output may be replaced
    with pytest.raises(LmforgeError, match="not an earlier `lmforge provenance` output"):
        provenance_cmd(a, b, out=a)  # a training run never is


def test_help_teaches_the_command():
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("provenance")(provenance_cmd)
    app.command("other")(lambda: None)  # two commands, so the name is a subcommand as in lmforge's CLI
    r = CliRunner().invoke(app, ["provenance", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "Example: lmforge provenance" in r.output and "--out" in r.output
    assert f"derived at a score of at least {DERIVED_MIN}" in " ".join(r.output.split())  # the help quotes the constant

