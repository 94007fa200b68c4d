"""The ``jpcap`` command: thin argument parsing over the stage modules.

Each subcommand lives in its stage module as ``add_<cmd>_arguments(parser)`` + ``run_<cmd>(args) -> int``;
modules are imported only when their subcommand runs, so ``jpcap --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# command: (module, help)
COMMANDS = {
    "run": ("runner", "execute the notebooks headless with papermill"),
    "prepare": ("data", "clean one COCO-format captions file into a processed JSONL + report"),
    "evaluate": ("evaluate", "score predictions against references (BLEU, ROUGE-L, CIDEr, CIs)"),
    "train": ("train", "fine-tune (QLoRA / LoRA) as a params file says; resumes from checkpoints"),
    "sweep": ("ablations", "run 03 + 04 for every ablation setting (resumable, carries on past failures)"),
    "compare": ("ablations", "tables, figures and paired tests of a sweep's runs"),
    "params": ("cli", "validate a params file and print it resolved"),
    "toy-data": ("cli", "generate the synthetic jp-shapes data set"),
    "models": ("cli", "list the model registry"),
}


def add_params_arguments(parser) -> None:
    parser.add_argument("params", help="params YAML")


def run_params(args) -> int:
    import yaml

    from .params import ParamsError, load_params

    try:
        p = load_params(args.params)
    except ParamsError as e:
        print(f"jpcap params: {e}", file=sys.stderr)
        return 2
    print(f"# {args.params}: valid · params hash {p.hash()}")
    print(yaml.safe_dump(p.to_dict(), allow_unicode=True, sort_keys=False), end="")
    return 0


def add_toy_data_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="folder to write jp-shapes into")
    parser.add_argument("--n-train", type=int, default=480)
    parser.add_argument("--n-val", type=int, default=160)
    parser.add_argument("--n-yj", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)


def run_toy_data(args) -> int:
    from .toydata import generate_jp_shapes

    summary = generate_jp_shapes(args.out, n_train=args.n_train, n_val=args.n_val, n_yj=args.n_yj,
                                 seed=args.seed)
    for name, counts in summary["files"].items():
        print(f"{name}: {counts}")
    return 0


def add_models_arguments(parser) -> None:
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")


def run_models(args) -> int:
    from .models import registry_table
    from .reports import markdown_table

    table = registry_table()
    print(markdown_table(table) if args.markdown else table.to_string(index=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jpcap", description="Japanese image captioning with small VLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(command, help=help_text, description=help_text)
        p.set_defaults(_command=command, _module=module)
        fn = command.replace("-", "_")
        # argument definitions are cheap to import only for our own commands; others load lazily
        if module == "cli":
            globals()[f"add_{fn}_arguments"](p)
        else:
            getattr(importlib.import_module(f"jpcap_helpers.{module}"), f"add_{fn}_arguments")(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    fn = args._command.replace("-", "_")
    module = sys.modules[__name__] if args._module == "cli" else importlib.import_module(
        f"jpcap_helpers.{args._module}")
    return int(getattr(module, f"run_{fn}")(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
