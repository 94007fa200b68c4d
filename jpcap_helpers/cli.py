"""The ``jpcap`` command: argument parsing over the stage packages, one function per command.

``COMMANDS`` maps each command to its (arguments, run) pair explicitly; a command imports its stage only
when it runs, so ``jpcap --help`` stays fast. Errors a user can fix end in one line and exit code 2
(:func:`main` handles them in one place); ``JPCAP_DEBUG=1`` shows the traceback instead.
Under several GPUs: ``accelerate launch -m jpcap_helpers.cli train params/h100.yaml``.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence


class CommandFailed(Exception):
    """A command ran and failed in a way it already reported (exit code 1)."""


def _params_arguments(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        parser.add_argument("params", help="params YAML (e.g. params/smoke.yaml)")
    else:
        parser.add_argument("--params", required=True, help="params YAML (e.g. params/smoke.yaml)")
    parser.add_argument("--run-name", default=None, help="run folder name (default: run.name)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set train.max_steps=10 (YAML value)")


def _load(args):
    from .params import load_params, parse_overrides
    from .session import apply_cpu_threads

    overrides = parse_overrides(args.overrides)
    if args.run_name:
        overrides["run.name"] = args.run_name
    params = load_params(args.params, overrides)
    apply_cpu_threads(params)   # commands that train or caption in this process
    return params


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# --------------------------------------------------------------------------- jpcap run

def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser)
    parser.add_argument("--only", default=None, help="comma-separated notebooks, e.g. 01,03")
    parser.add_argument("--log-output", action="store_true", help="stream cell outputs to the log")


def run_run(args) -> int:
    from .params import parse_overrides
    from .runner import NotebookFailed, run_notebooks

    try:
        run_notebooks(args.params, args.only, args.run_name, parse_overrides(args.overrides),
                      log_output=args.log_output)
    except NotebookFailed as e:
        raise CommandFailed(str(e)) from None
    return 0


# --------------------------------------------------------------------------- jpcap prepare

def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    from .data import DEFAULT_MAX_SIDE

    parser.add_argument("--captions", required=True, type=Path, metavar="FILE.json",
                        help="a COCO-format captions file (STAIR or YJ)")
    parser.add_argument("--images", required=True, type=Path, metavar="DIR",
                        help="the COCO image root (holding train2014/, val2014/) or a folder of the images")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="writes DIR/<stem of FILE>.jsonl and DIR/report.json")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 listing every dropped caption and skipped image (outputs still written)")
    parser.add_argument("--max-caption-tokens", type=int, default=64, metavar="N",
                        help="truncate captions to N tokens of --tokenizer (default 64; needs --tokenizer)")
    parser.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                        help="a local tokenizer folder (save_pretrained layout) for truncation")
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, metavar="PX",
                        help=f"longest image side as loaded for the checks (default {DEFAULT_MAX_SIDE})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_prepare(args) -> int:
    from .data import prepare_file
    from .models import processor_rejection

    report = prepare_file(args.captions, args.images, args.out, tokenizer=args.tokenizer,
                          max_caption_tokens=args.max_caption_tokens, max_side=args.max_side,
                          reject=processor_rejection, progress=not args.no_progress)
    img, cap = report["images"], report["captions"]
    print(f"{report['output']}: kept {img['kept']}/{img['in_file']} images, {cap['kept']}/{cap['in_file']} "
          f"captions; report: {Path(args.out) / 'report.json'}")
    if args.strict and report["problems"]:
        lines = "\n".join(f"  {line}" for line in report["problems"])
        raise CommandFailed(f"{len(report['problems'])} problem(s) in {args.captions}:\n{lines}")
    return 0


# --------------------------------------------------------------------------- jpcap caption

def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a registry key or hub id (jpcap models lists them)")
    parser.add_argument("--model-path", default=None, metavar="DIR",
                        help="a local folder in the model's hub layout, used instead of the hub id")
    parser.add_argument("--adapter", default=None, metavar="DIR", help="a trained LoRA adapter (03's output)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", default=None, help="a processed split of --params (e.g. test, yj_test)")
    source.add_argument("--images", type=Path, default=None, metavar="DIR",
                        help="caption every image file in DIR (rows carry file_name)")
    parser.add_argument("--params", default=None, help="params YAML (required with --split; generation.* "
                        "and model.* settings apply; default with --images: the built-in defaults)")
    parser.add_argument("--out", required=True, type=Path, metavar="PRED.jsonl",
                        help="predictions JSONL (resumed if it exists) + PRED.meta.json")
    parser.add_argument("--max-images", type=int, default=None, help="caption only the first N records")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set generation.batch_size=32")


def run_caption(args) -> int:
    from .engine.sharding import process_group

    process_group()  # under accelerate launch: first, before anything touches CUDA (one GPU per process)
    from .engine import caption_file, folder_records
    from .io import read_jsonl
    from .params import Params, load_params, parse_overrides
    from .session import apply_cpu_threads

    overrides = {**parse_overrides(args.overrides), "model.name": args.model}
    if args.split is not None and args.params is None:
        raise ValueError("--split needs --params (the processed splits live in its run's data folder)")
    if args.params is not None:
        params = load_params(args.params, overrides)
    else:
        params = Params.from_dict({}, check_paths=False).with_overrides(overrides)
    apply_cpu_threads(params)
    if args.max_images is not None and args.max_images < 1:
        raise ValueError("--max-images must be ≥ 1")
    if args.images is not None:
        records, images_dir = folder_records(args.images), args.images
    else:
        split_file = Path(params.processed_dir) / f"{args.split}.jsonl"
        if not split_file.is_file():
            raise FileNotFoundError(f"{split_file}: split {args.split!r} does not exist — run the data notebook "
                                    "(01) or `jpcap prepare` first")
        records, images_dir = list(read_jsonl(split_file)), params.images_dir
    records = records[:args.max_images] if args.max_images else records
    summary = caption_file(params, args.model, records, images_dir, args.out, model_dir=args.model_path,
                           adapter=args.adapter, keep_file_name=args.images is not None)
    print(f"{summary['model']}: {summary['n_captioned']} captioned, {summary['n_errors']} errors, "
          f"{summary['n_skipped_existing']} already done → {args.out} ({summary['images_per_s']} images/s, "
          f"{summary['decoder']}" + (f", after a {summary['warmup_seconds']:.1f} s warm-up"
                                    if summary.get("warmup_seconds") else "")
          + (f", {summary['n_resized']} images moved to {summary['n_grids']} grids" if summary.get("n_resized") else "")
          + ")")
    return 1 if summary["n_errors"] and not summary["n_captioned"] else 0


# --------------------------------------------------------------------------- jpcap evaluate

def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, type=Path, help="predictions JSONL {image_id, caption}")
    parser.add_argument("--refs", required=True, type=Path,
                        help="references: COCO captions JSON or processed <split>.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="write scores, CIs and per-image scores as JSON")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score only the reference images that have a prediction")


def run_evaluate(args) -> int:
    from .evaluate import EvaluationError, format_table, ids_preview, load_predictions, load_references, score
    from .io import atomic_write_json

    references = load_references(args.refs)
    predictions = load_predictions(args.pred)
    try:
        result = score(references, predictions, allow_missing=args.allow_missing)
    except EvaluationError as e:
        raise EvaluationError(f"{args.pred} vs {args.refs}: {e}") from None
    result = {"predictions": str(args.pred), "references": str(args.refs), **result}
    print(format_table(result))
    if result["n_missing"]:
        print(f"note: {result['n_missing']} reference images had no prediction and were not scored: "
              f"{ids_preview(result['missing_image_ids'])}", file=sys.stderr)
    if args.out is not None:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------- jpcap train

def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser, positional=True)
    parser.add_argument("--no-resume", action="store_true", help="delete this run's checkpoints and start over")
    parser.add_argument("--plan-only", action="store_true",
                        help="print trainable params, memory and ETA; no training")
    parser.add_argument("--session-hours", type=float, default=None,
                        help="warn when the run needs longer than this (default: Colab's limits when in Colab)")


def run_train(args) -> int:
    from . import train
    from .params import save_resolved

    params = _load(args)
    if args.plan_only:
        print(train.format_plan(train.plan(params, session_hours=args.session_hours)))
        return 0
    if _rank() == 0:
        save_resolved(params)
    result = train.train(params, resume=not args.no_resume, session_hours=args.session_hours)
    if _rank() == 0:
        print(f"adapter: {result.adapter_dir} · {result.steps} steps in {result.seconds:.0f} s · final loss "
              f"{result.final_train_loss} · val loss {result.final_val_loss} · val CIDEr {result.final_val_cider}")
    return 0


# --------------------------------------------------------------------------- jpcap sweep / compare

def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="validate and list the runs; run nothing")
    parser.add_argument("--force", action="store_true", help="run finished runs again (they resume)")
    parser.add_argument("--log-output", action="store_true", help="stream the notebooks' cell outputs")


def run_sweep(args) -> int:
    from .analysis import ablations

    params = _load(args)
    if args.dry_run:
        print(ablations.describe_sweep(params).to_string(index=False))
        return 0
    result = ablations.sweep(params, force=args.force, log_output=args.log_output, progress_bar=True)
    if result["failures"]:
        raise CommandFailed(f"{len(result['failures'])} sweep run(s) failed (see the log above)")
    return 0


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser)
    parser.add_argument("--no-figures", action="store_true", help="tables only")


def run_compare(args) -> int:
    from .analysis import ablations

    params = _load(args)
    out = ablations.compare(params, figures=not args.no_figures)
    if not len(out["table"]):
        raise CommandFailed(f"no sweep run of {params.run.name} has results yet (jpcap sweep first)")
    cols = [c for c in ablations.SUMMARY_COLUMNS if c in out["table"]]
    print(out["table"][cols].to_string(index=False))
    for path in out["files"]:
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- jpcap push

def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, type=Path, help="the adapter folder (outputs/<run>/adapter)")
    parser.add_argument("--repo-id", required=True, help="hub repository, e.g. your-name/jpcap-qwen2-vl-stair")
    parser.add_argument("--run-dir", type=Path, default=None, help="the run folder (default: the adapter's parent)")
    parser.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    parser.add_argument("--to-folder", type=Path, default=None, metavar="DIR",
                        help="write the files that would be uploaded (adapter + model card) into DIR; no network")


def run_push(args) -> int:
    from . import publish

    if args.to_folder is not None:
        out = publish.stage(args.adapter, args.repo_id, args.to_folder, args.run_dir)
        print(f"wrote the adapter and its model card to {out} (nothing uploaded)")
        return 0
    url = publish.push(args.adapter, args.repo_id, args.run_dir, private=not args.public)
    print(f"uploaded: {url}")
    return 0


# --------------------------------------------------------------------------- small commands

def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("params", help="params YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param (YAML value), validated like the file")


def run_params(args) -> int:
    import yaml

    from .params import load_params

    p = load_params(args.params, args.overrides)
    print(f"# {args.params}: valid · params fingerprint {p.fingerprint()}")
    print(yaml.safe_dump(p.to_dict(), allow_unicode=True, sort_keys=False), end="")
    return 0


def add_toy_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write jp-shapes into")
    parser.add_argument("--n-train", type=int, default=480)
    parser.add_argument("--n-val", type=int, default=160)
    parser.add_argument("--n-yj", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)


def run_toy_data(args) -> int:
    from .data import generate_jp_shapes

    summary = generate_jp_shapes(args.out, n_train=args.n_train, n_val=args.n_val, n_yj=args.n_yj,
                                 seed=args.seed)
    for name, counts in summary["files"].items():
        print(f"{name}: {counts}")
    return 0


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")


def run_models(args) -> int:
    from .analysis.reports import markdown_table
    from .models import registry_table

    table = registry_table()
    print(markdown_table(table) if args.markdown else table.to_string(index=False))
    return 0


# command: (help, add arguments, run)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "run": ("execute the notebooks headless with papermill", add_run_arguments, run_run),
    "prepare": ("clean one COCO-format captions file into a processed JSONL + report",
                add_prepare_arguments, run_prepare),
    "caption": ("caption a split or a folder of images with one model (resumable JSONL)",
                add_caption_arguments, run_caption),
    "evaluate": ("score predictions against references (BLEU, ROUGE-L, CIDEr, CIs)",
                 add_evaluate_arguments, run_evaluate),
    "train": ("fine-tune (QLoRA / LoRA) as a params file says; resumes from checkpoints",
              add_train_arguments, run_train),
    "sweep": ("run 03 + 04 for every ablation setting (resumable, carries on past failures)",
              add_sweep_arguments, run_sweep),
    "compare": ("tables, figures and paired tests of a sweep's runs", add_compare_arguments, run_compare),
    "push": ("upload an adapter with a generated model card to the Hugging Face hub", add_push_arguments,
             run_push),
    "params": ("validate a params file and print it resolved", add_params_arguments, run_params),
    "toy-data": ("generate the synthetic jp-shapes data set", add_toy_data_arguments, run_toy_data),
    "models": ("list the model registry", add_models_arguments, run_models),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jpcap", description="Japanese image captioning with small VLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(command, help=help_text, description=help_text))
    return parser


_OS_FIXES = {
    errno.EACCES: "not writable or readable by you: fix its permissions or choose another folder",
    errno.EPERM: "not permitted: fix its permissions or choose another folder",
    errno.ENOTDIR: "a file stands where a folder is needed: move it or choose another folder",
    errno.EISDIR: "a folder stands where a file is needed",
    errno.ENOSPC: "the disk is full: free space or choose another output folder",
    errno.EROFS: "the file system is read-only: choose another output folder",
    errno.ENOENT: "not found: check the path",
}


def describe_error(e: BaseException) -> str:
    """One line for a user-fixable error: the path and the fix for OS errors, else the message."""
    if isinstance(e, OSError) and e.errno in _OS_FIXES and not type(e).__module__.startswith("jpcap"):
        where = e.filename or ""
        return f"{where}: {e.strerror} — {_OS_FIXES[e.errno]}" if where else f"{e.strerror} — {_OS_FIXES[e.errno]}"
    return str(e)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or environment (one line, exit 2), not a bug in jpcap."""
    from .params import ParamsError

    errors: list[type[BaseException]] = [ParamsError, ValueError, OSError]
    for module, name in (("train", "TrainError"), ("models", "ModelError"), ("data", "DataError")):
        try:
            errors.append(getattr(__import__(f"jpcap_helpers.{module}", fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _, _, run = COMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except CommandFailed as e:
        print(f"jpcap {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"jpcap {args.command}: interrupted (what was written so far is kept; run again to resume)",
              file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("JPCAP_DEBUG") or not isinstance(e, _user_errors()):
            raise
        print(f"jpcap {args.command}: error: {describe_error(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
