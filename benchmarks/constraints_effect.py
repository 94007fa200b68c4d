"""Measured effect of constrained decoding on the offline demo (docs/human_eval.md#mitigations).

Captions a finished run's test/yj_test split with the tiny base model and its QLoRA adapter, once per
constraint variant, and writes the table (CIDEr-D and flag rates with 95 % bootstrap CIs over images,
captions changed, banned terms left) to ``--out`` as CSV and Markdown. CPU is enough (1 thread).

    PYTHONPATH=. python benchmarks/constraints_effect.py --run outputs/demo --out outputs/constraints_effect
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

VARIANTS = {
    "none": {},
    "scripts+gendered+norepeat3": {"ban_scripts": ["latin", "hangul", "cyrillic"], "word_list": "gendered",
                                   "no_repeat_ngram_size": 3},
    # a term the demo's captions do use (jp-shapes has no people): what a ban does to a word the model needs
    "ban 三角形": {"ban_words": ["三角形"]},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished run folder (params.yaml, adapter/)")
    ap.add_argument("--out", required=True, help="where captions and the table go")
    ap.add_argument("--splits", nargs="+", default=["test", "yj_test"])
    args = ap.parse_args()

    import torch

    from jpcap_helpers.analysis.mitigations import constraint_comparison
    from jpcap_helpers.io import atomic_write_text
    from jpcap_helpers.params import load_params

    torch.set_num_threads(1)
    run, out = Path(args.run).resolve(), Path(args.out).resolve()
    models = out / "models"
    if not models.exists():   # work on a copy of the run's tiny model: the run folder is only read
        src = load_params(run / "params.yaml").model.models_dir
        shutil.copytree(src, models)
    params = load_params(run / "params.yaml", {"run.output_dir": str(out), "run.name": "run",
                                                "model.models_dir": str(models)})
    frames = []
    start = time.perf_counter()
    for split in args.splits:
        df = constraint_comparison(params, VARIANTS, split=split, adapter=run / "adapter", out_dir=out / "captions")
        df.insert(0, "split", split)
        frames.append(df)
    import pandas as pd

    table = pd.concat(frames, ignore_index=True)
    atomic_write_text(out / "constraints_effect.csv", table.to_csv(index=False))

    def ci(r, k, pct=False):
        f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.2f}")
        return f"{f(r[k])} [{f(r[k + '_lo'])}, {f(r[k + '_hi'])}]"

    lines = ["| split | system | variant | n | CIDEr-D [95% CI] | non-Japanese % | repetition % | hallucination % | "
             "gendered % | changed | banned term left |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        lines.append(f"| {r['split']} | {r['system']} | {r['variant']} | {r['n_images']} | {ci(r, 'CIDEr')} | "
                     f"{ci(r, 'non_japanese', True)} | {ci(r, 'repetition', True)} | {ci(r, 'hallucination', True)} | "
                     f"{ci(r, 'gendered', True)} | {r['n_changed']} | {r['n_banned_term_left']} |")
    md = "\n".join(lines) + f"\n\n({time.perf_counter() - start:.0f} s on CPU, decoder: {table['decoder'].iloc[0]})\n"
    atomic_write_text(out / "constraints_effect.md", md)
    print(md)


if __name__ == "__main__":
    main()
