"""Provenance: is model B derived from model A, or the same architecture trained separately?

A rebadged model is someone else's weights behind new tensor names, often with disguises that
leave its function unchanged: attention heads or MLP units permuted, weights rescaled between
adjacent layers (a norm gain times c and the next projection's columns divided by c; up_proj
times c and down_proj divided by c; q times c and k divided by c), or some more training. This
module compares weights with measures that those disguises cannot move.

Layout. Both models are read in the Hugging Face Llama layout (an lmforge directory goes through
:func:`to_hf_state_dict`, which splits the fused ``wqkv``/``w13``), and then names are dropped.
A is the reference: its matrices are split into layers and roles (q, k, v, o, gate, up, down) by
shape and file order, the order a safetensors writer gives Llama's names (it sorts by name).
Order survives renaming only partly, so B's names and order are never used: each B matrix is
paired, one to one, with the A matrix of its shape whose residual Gram (below) is most alike.
Norm gains are left out: a rescaling rewrites them at will, and gains near 1 make any two
models look alike.

Measures, per layer, each a cosine (scale-free) over a fixed sample of residual channels, which
line up in both models because none of the disguises moves a residual channel:

* ``qk`` = sum over heads of W_q,h^T W_k,h, the attention logits' bilinear form. A head
  permutation only reorders the sum's terms; q*c, k/c cancel inside each term.
* ``ov`` = sum over heads of W_o,h W_v,h: the same argument for v*c, o/c.
* ``mlp`` = W_down W_up, a sum over units: a unit permutation reorders it; up*c, down/c cancel.
* ``gram``: per matrix, the correlations between its residual-side columns. Row (head, unit)
  permutations leave it unchanged and the normalisation cancels norm gains folded into columns;
  per-unit rescaling reweights rows, so it survives that only approximately. It needs no
  within-layer roles, so it still holds when A's file order is not the usual one.

A norm gain scales the products' residual side; alternate row and column normalisation
("balancing") removes any positive diagonal scaling on either side. Diagonals are dropped before
the cosine (see :func:`_off_diagonal`). A layer scores max(mean(qk, ov, mlp), gram): a derived
model keeps at least one high; an independent one keeps both near 0, its residual basis being an
unrelated random one. Sorted singular values are not used: independent random matrices of one
shape share their spectrum. Token embeddings are compared directly (the rows are the same
tokens) and shown, but not scored, so copied layers behind a new vocabulary still read as derived.

Verdict: ``incomparable`` when the matrices cannot be paired by shape (another architecture);
else ``derived`` when the mean layer score reaches DERIVED_MIN, ``independent`` below it.
Not covered: residual-stream rotations or permutations (they move every measure), a norm gain's
sign flipped with its projection's columns, and models too large to hold twice in memory.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from scipy.optimize import linear_sum_assignment

from lmforge.errors import LmforgeError
from lmforge.export.hf import PICKLE_SUFFIXES, check_replaceable, config_from_hf, to_hf_state_dict
from lmforge.model.io import CONFIG, WEIGHTS, load_model
from lmforge.model.model import ModelConfig
from lmforge.rundir import Manifest, atomic_write_text, hash_file, hash_json

# Derived at or above, independent below. Measured (bench/provenance_matrix.py; depth-2 models, 128
# channels): derived test cases 0.735 (a fine-tuned child, then permuted, rescaled and renamed) to 1.000;
# independent ones 0.006-0.010, no layer above 0.013 (noise of about 1/channels). Children trained 2x and
# 7x longer than their parent score 0.530 and 0.372: 0.2 still calls them derived and sits 15x above
# the highest independent layer.
DERIVED_MIN = 0.2
MAX_CHANNELS = 256  # residual channels sampled: the d x d measures cost O(d^2) memory at full width
BALANCE_STEPS = 20  # row/column normalisation rounds: 5 reach float32 precision on the test models' products
# Within a layer, the order a name-sorting writer gives Llama's names: down_proj < gate_proj < up_proj
# < k_proj < o_proj < q_proj < v_proj.
ROLES = ("down", "gate", "up", "k", "o", "q", "v")
ROWS_ARE_RESIDUAL = {"down", "o"}  # they write the residual stream; the others read it through columns


@dataclass
class Weights:
    path: Path
    cfg: ModelConfig
    mats: list[torch.Tensor]  # every matrix, in file order
    files: list[Path]


@dataclass
class LayerRow:
    layer: int  # A's layer: its index in an lmforge directory, its position in file order in an HF one
    qk: float
    ov: float
    mlp: float
    gram: float
    score: float


@dataclass
class Result:
    a: str
    b: str
    verdict: str  # derived | independent | incomparable
    score: Optional[float]
    layers: list[LayerRow] = field(default_factory=list)
    embed: Optional[float] = None  # direct cosine of the token embeddings, when the vocabularies match
    reason: str = ""

    def to_dict(self) -> dict:
        return {**asdict(self), "derived_min": DERIVED_MIN}


# ----------------------------------------------------------------------------- reading


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _file_tensors(f: Path) -> list[torch.Tensor]:
    """The tensors of one safetensors file in data-offset order, read without unpickling anything."""
    try:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        header.pop("__metadata__", None)
        names = sorted(header, key=lambda n: header[n]["data_offsets"][0])
        with safe_open(str(f), framework="pt") as st:
            return [st.get_tensor(n).float() for n in names]
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, struct.error) as e:
        detail = str(e).splitlines()[0] if str(e) else repr(e)
        raise LmforgeError(f"{f}: not a readable safetensors file ({detail}); re-export or re-download it") from None


def _hf_files(p: Path) -> list[Path]:
    files = sorted(p.glob("*.safetensors"))
    if not files:
        pickles = [f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
        hint = (f"only pickle weights ({', '.join(pickles)}), which can run code when loaded; convert them to "
                "safetensors first") if pickles else "no *.safetensors weights; pass the directory that holds them"
        raise LmforgeError(f"{p}: {hint}")
    return files


def read_weights(path: str | Path) -> Weights:
    """An lmforge model directory or a Hugging Face Llama directory, as HF-layout matrices."""
    p = Path(path)
    if not p.is_dir():
        raise LmforgeError(f"{p}: no such directory; pass an lmforge model directory or a Hugging Face Llama directory")
    if (p / CONFIG).is_file():
        model = load_model(p)
        sd = to_hf_state_dict(model)
        # Our own names, so the true layer order (a plain name sort puts layer 10 before 2).
        tensors, cfg, files = [sd[k].float() for k in sorted(sd, key=_natural)], model.cfg, [p / WEIGHTS]
    elif (p / "config.json").is_file():
        try:
            raw = json.loads((p / "config.json").read_text())
        except (ValueError, OSError) as e:
            raise LmforgeError(f"{p / 'config.json'}: not valid JSON ({e})") from None
        cfg = config_from_hf(raw, str(p / "config.json"))
        files = _hf_files(p)
        tensors = [t for f in files for t in _file_tensors(f)]
    else:
        raise LmforgeError(f"{p}: neither an lmforge model directory ({CONFIG}) nor a Hugging Face Llama "
                           "directory (config.json); pass the directory that holds the weights")
    return Weights(p, cfg, [t for t in tensors if t.dim() == 2], files)


def _role_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    d, q, kv = c.d_model, c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    return {"down": (d, c.d_ff), "gate": (c.d_ff, d), "up": (c.d_ff, d),
            "k": (kv, d), "o": (d, q), "q": (q, d), "v": (kv, d)}


def layer_roles(w: Weights) -> tuple[list[int], list[dict[str, int]]]:
    """Indices into ``w.mats`` of the vocabulary matrices (embedding, untied lm_head) and, per layer,
    role -> index: layer i takes the i-th run of each shape's matrices in file order, and inside a
    run the roles come in ROLES order. Should the MLP share the vocabulary's shape (d_ff ==
    vocab_size), the surplus is the vocabulary's: Llama's names sort it before the layers."""
    shapes, vocab_shape = _role_shapes(w.cfg), (w.cfg.vocab_size, w.cfg.d_model)
    queues: dict[tuple, list[int]] = {}
    for i, t in enumerate(w.mats):
        queues.setdefault(tuple(t.shape), []).append(i)
    need = Counter({s: n * w.cfg.n_layer for s, n in Counter(shapes.values()).items()})
    vocab = queues.get(vocab_shape, [])[:max(len(queues.get(vocab_shape, [])) - need[vocab_shape], 0)]
    if vocab_shape in queues:
        queues[vocab_shape] = queues[vocab_shape][len(vocab):]
    if len(vocab) not in (1, 2) or {s: len(q) for s, q in queues.items() if q} != dict(need):
        raise LmforgeError(f"{w.path}: its matrices do not fit its config ({w.cfg.n_layer} Llama layers of d_model "
                           f"{w.cfg.d_model}, vocabulary {w.cfg.vocab_size}); is this a Llama-architecture model?")
    return vocab, [{r: queues[shapes[r]].pop(0) for r in ROLES} for _ in range(w.cfg.n_layer)]


# ----------------------------------------------------------------------------- measures


def _channels(d: int) -> torch.Tensor:
    if d <= MAX_CHANNELS:
        return torch.arange(d)
    return torch.randperm(d, generator=torch.Generator().manual_seed(0))[:MAX_CHANNELS].sort().values


def residual_gram(w: torch.Tensor, rows_residual: bool, idx: torch.Tensor) -> torch.Tensor:
    """Off-diagonal correlations between the residual-side columns of ``w`` (flattened)."""
    x = F.normalize((w.T if rows_residual else w)[:, idx], dim=0)
    return _off_diagonal(x.T @ x)


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """Without the diagonal. A correlation Gram's is all ones in every model, and a product's sums to its
    trace, which no change of basis moves (a copying head's is positive): either would make
    independent models look alike."""
    return m[~torch.eye(len(m), dtype=torch.bool)]


def balance(m: torch.Tensor) -> torch.Tensor:
    """``m`` with unit row and column norms: the same for D1 m D2 for any positive diagonals D1, D2."""
    for _ in range(BALANCE_STEPS):
        m = F.normalize(F.normalize(m, dim=1), dim=0)
    return m


def products(layer: dict[str, torch.Tensor], cfg: ModelConfig, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The qk, ov and mlp products of one layer on the sampled residual channels, balanced, off-diagonal."""
    rep = cfg.n_head // cfg.n_kv_head  # grouped-query attention: each k/v head serves rep q heads
    k, v = (layer[r].reshape(cfg.n_kv_head, cfg.head_dim, -1).repeat_interleave(rep, 0).flatten(0, 1) for r in "kv")
    raw = {"qk": layer["q"][:, idx].T @ k[:, idx], "ov": layer["o"][idx] @ v[:, idx],
           "mlp": layer["down"][idx] @ layer["up"][:, idx]}
    return {name: _off_diagonal(balance(m)) for name, m in raw.items()}


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.cosine_similarity(x.flatten(), y.flatten(), dim=0))


def _match(sim: torch.Tensor) -> list[int]:
    """The one-to-one pairing (column per row) with the largest total similarity."""
    _, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    return [int(c) for c in cols]


def pair_matrices(a: Weights, b: Weights, pool_a: list[int], pool_b: list[int], rows_residual: dict[int, bool],
                  idx: torch.Tensor) -> tuple[dict[int, int], dict[int, float]]:
    """For every A matrix in ``pool_a``, its partner among B's matrices of the same shape in ``pool_b``
    (one to one, the largest total Gram similarity), and their Gram similarity."""
    partner, sims = {}, {}
    for shape in {tuple(a.mats[i].shape) for i in pool_a}:
        ia = [i for i in pool_a if tuple(a.mats[i].shape) == shape]
        ib = [j for j in pool_b if tuple(b.mats[j].shape) == shape]
        gb = {r: F.normalize(torch.stack([residual_gram(b.mats[j], r, idx) for j in ib]), dim=1)
              for r in {rows_residual[i] for i in ia}}
        sim = torch.stack([gb[rows_residual[i]] @ F.normalize(residual_gram(a.mats[i], rows_residual[i], idx), dim=0)
                           for i in ia])
        for row, col in enumerate(_match(sim)):
            partner[ia[row]], sims[ia[row]] = ib[col], float(sim[row, col])
    return partner, sims


# ----------------------------------------------------------------------------- verdict


def provenance(a: str | Path, b: str | Path) -> Result:
    """Is ``b`` derived from ``a``? Both are model directories; see the module docstring for the method."""
    return compare(read_weights(a), read_weights(b))


def compare(wa: Weights, wb: Weights) -> Result:
    """Compare reference weights ``wa`` with suspect weights ``wb``."""
    (vocab_a, roles_a), (vocab_b, _) = layer_roles(wa), layer_roles(wb)  # B's roles come from the pairing
    # A new vocabulary on copied layers is still a copy: then the layers alone are paired.
    same_vocab = wa.cfg.vocab_size == wb.cfg.vocab_size
    pool_a = [i for i in range(len(wa.mats)) if same_vocab or i not in vocab_a]
    pool_b = [j for j in range(len(wb.mats)) if same_vocab or j not in vocab_b]
    shapes_a, shapes_b = (Counter(tuple(w.mats[i].shape) for i in pool) for w, pool in ((wa, pool_a), (wb, pool_b)))
    if shapes_a != shapes_b:
        diff = sorted(set(shapes_a.items()) ^ set(shapes_b.items()))[:4]
        return Result(str(wa.path), str(wb.path), "incomparable", None,
                      reason=f"the matrices cannot be paired by shape ((shape, count) differing: {diff})")
    idx = _channels(wa.cfg.d_model)
    rows_residual = dict.fromkeys(vocab_a, False)  # an embedding's columns are residual channels
    rows_residual |= {i: r in ROWS_ARE_RESIDUAL for layer in roles_a for r, i in layer.items()}
    partner, gram = pair_matrices(wa, wb, pool_a, pool_b, rows_residual, idx)
    rows = []
    for n, layer in enumerate(roles_a):
        pa = products({r: wa.mats[i] for r, i in layer.items()}, wa.cfg, idx)
        pb = products({r: wb.mats[partner[i]] for r, i in layer.items()}, wb.cfg, idx)
        qk, ov, mlp = (_cos(pa[m], pb[m]) for m in ("qk", "ov", "mlp"))
        g = sum(gram[i] for i in layer.values()) / len(layer)
        rows.append(LayerRow(n, qk, ov, mlp, g, max((qk + ov + mlp) / 3, g)))
    score = sum(r.score for r in rows) / len(rows)
    embed = sum(_cos(wa.mats[i], wb.mats[partner[i]]) for i in vocab_a) / len(vocab_a) if same_vocab else None
    return Result(str(wa.path), str(wb.path), "derived" if score >= DERIVED_MIN else "independent", score, rows, embed)


def format_table(result: Result) -> str:
    """The per-layer similarities, then the score and the verdict."""
    if result.verdict == "incomparable":
        return f"verdict: incomparable: {result.reason}"
    lines = [f"{'layer':>5}  {'qk':>6}  {'ov':>6}  {'mlp':>6}  {'gram':>6}  {'score':>6}"]
    lines += [f"{r.layer:>5}" + "".join(f"  {v:6.3f}" for v in (r.qk, r.ov, r.mlp, r.gram, r.score))
              for r in result.layers]
    if result.embed is not None:
        lines.append(f"token embeddings: {result.embed:.3f} (shown, not scored)")
    lines.append(f"score {result.score:.3f} (derived at >= {DERIVED_MIN}); verdict: {result.verdict}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command


def _weights_hash(w: Weights) -> str:
    return hash_file(w.files[0]) if len(w.files) == 1 else hash_json([hash_file(f) for f in w.files])


def provenance_run(a, b, out=None) -> tuple[Result, str]:
    """Compare A and B; with ``out``, write a run directory (manifest with both weight hashes and the
    verdict, and the table as ``provenance.txt``). Returns the result and its table."""
    out = Path(out) if out is not None else None
    if out is not None:
        check_replaceable(out, "provenance")  # never let a typo like -o runs/d4 overwrite a run
    wa, wb = read_weights(Path(a)), read_weights(Path(b))
    result = compare(wa, wb)
    table = format_table(result)
    if out is None:
        return result, table
    man = Manifest(out, "provenance", {"a": str(Path(a).resolve()), "b": str(Path(b).resolve()),
                                       "derived_min": DERIVED_MIN, "max_channels": MAX_CHANNELS})
    man.add_input("a", a, content_hash=_weights_hash(wa))
    man.add_input("b", b, content_hash=_weights_hash(wb))
    atomic_write_text(out / "provenance.txt", table + "\n")
    man.add_output("table", out / "provenance.txt", hash_it=True)
    d = result.to_dict()
    man.set_metrics(verdict=d["verdict"], score=d["score"], layers=d["layers"], embed=d["embed"], reason=d["reason"])
    man.finish()
    return result, table
