"""Split a recipe's training rows into two halves, plus its held-out rows, as JSONL files.

    python tools/data_halves.py RECIPE OUT_DIR  ->  OUT_DIR/{half_a,half_b,eval}.jsonl

The held-out rows are the recipe's own split (`data.eval_size`, `data.seed`), so adapters trained
on `half_a` and `half_b` (`data.dataset=OUT_DIR/half_a.jsonl data.eval_dataset=OUT_DIR/eval.jsonl`)
and their blends are scored on the same rows as the main job. The halves are contiguous in data
set order (chatterbot: topic files in sorted order), so the two adapters see different topics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qlora.data.loaders import split_sources
from qlora.recipe import load_recipe


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main(recipe: str, out_dir: str) -> None:
    cfg = load_recipe(recipe, [])
    _, train_rows, _, eval_rows = split_sources(cfg.data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    half = len(train_rows) // 2
    for name, rows in (("half_a", train_rows[:half]), ("half_b", train_rows[half:]), ("eval", eval_rows)):
        write_jsonl(out / f"{name}.jsonl", list(rows))
        print(f"{out / name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    main(*sys.argv[1:])
