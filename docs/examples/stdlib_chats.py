"""Chat and preference data from this Python's standard library, for trying `lmforge sft` and `lmforge dpo`.

    python docs/examples/stdlib_chats.py -o runs/chats          # chats.jsonl, val_chats.jsonl, pairs.jsonl

Every function with a docstring becomes two conversations: "Write a function NAME(ARGS) that
SUMMARY" answered with its source, and "Explain what this function does" (with the source)
answered with its docstring summary. Modules are split by file, so no file gives both train and
held-out conversations. pairs.jsonl pairs each function request with its source (chosen) and the
same source with its lines in reverse order (rejected): a mechanical negative that shows what DPO
does, not a model's own mistake. Conversations longer than --max-chars are left out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sysconfig
from pathlib import Path

from lmforge.post.tasks import functions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", default="runs/chats")
    ap.add_argument("--max-chars", type=int, default=600)
    ap.add_argument("--val-percent", type=int, default=5)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    sets = {"chats": [], "val_chats": [], "pairs": []}
    for path in files:
        held = int(hashlib.sha256(str(path.relative_to(stdlib)).encode()).hexdigest(), 16) % 100 < args.val_percent
        for name, sig, summary, _, body in functions(path, methods=True):
            if len(body) > args.max_chars:
                continue
            ask = f"Write a function {name}({sig}) that {summary[0].lower() + summary[1:]}"
            sets["val_chats" if held else "chats"] += [
                {"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": body}]},
                {"messages": [{"role": "user", "content": f"Explain what this function does:\n{body}"},
                              {"role": "assistant", "content": summary}]}]
            lines = body.splitlines()
            if not held and len(lines) > 2:
                sets["pairs"].append({"prompt": ask, "chosen": body, "rejected": "\n".join(reversed(lines))})
    for name, rows in sets.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out / name}.jsonl: {len(rows)}")


if __name__ == "__main__":
    main()
