"""A model's own pinned Python environment, for checkpoints whose hub code needs an old transformers
(Japanese Stable VLM; the documented fallback for Asagi): a virtual environment that reuses this
interpreter's packages (torch, bitsandbytes, PIL, … — no torch download) and adds only the pinned
versions a recipe lists (e.g. ``transformers==4.45.2``), created once and cached (on Colab in
``run.persist_dir``). Captioning runs there in a subprocess (:mod:`.pinned_runner`; the engine side is
``engine.pinned``).

How the reuse works: the environment's ``site-packages`` holds a ``.pth`` file naming this
interpreter's package folders, which Python appends AFTER the environment's own packages — so a pinned
``transformers`` wins and everything else comes from here. ``pip`` sees those packages too and installs
only what the pins change.
"""
from __future__ import annotations

import hashlib
import json
import os
import site
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..io import atomic_write_json

__all__ = ["PinnedRecipe", "PinnedEnvError", "ENV_STAMP", "LOCAL_ENV_ROOT", "env_root", "env_dir", "ensure_env",
           "ensure_env_with_fallback", "parent_site_dirs", "runner_path"]

ENV_STAMP = "jpcap_env.json"  # written last: an environment without it is incomplete and rebuilt


class PinnedEnvError(RuntimeError):
    """A pinned environment could not be made or used; the message names the model and the fix."""


@dataclass(frozen=True)
class PinnedRecipe:
    """How a model runs in its own environment: the pip requirements added on top of this interpreter's
    packages, and the runner's loading recipe (``"vision2seq"``: AutoModelForVision2Seq + image
    processor + tokenizer, prompt without special tokens; ``"auto"``: AutoModel + AutoProcessor with
    the prompt tokenised by the tokenizer alone, as 4.45-era Llava remote code expects)."""
    requirements: tuple[str, ...]
    runner: str


LOCAL_ENV_ROOT = Path.home() / ".cache" / "jpcap" / "envs"


def env_root(params: Any) -> Path:
    """Where pinned environments live: ``<persist_dir>/envs`` when set (Colab: Drive, so a new runtime
    finds it), else ``~/.cache/jpcap/envs`` (``JPCAP_ENV_DIR`` overrides both)."""
    if os.environ.get("JPCAP_ENV_DIR"):
        return Path(os.environ["JPCAP_ENV_DIR"])
    persist = getattr(params.run, "persist_dir", None)
    return Path(persist) / "envs" if persist else LOCAL_ENV_ROOT


def env_dir(root: Path, name: str, requirements: Sequence[str]) -> Path:
    """``<root>/<name>-<hash>``: one environment per (Python version, requirement list)."""
    key = json.dumps([sys.version_info[:2], sorted(requirements)])
    return Path(root) / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def parent_site_dirs() -> list[str]:
    """This interpreter's package folders (site-packages of the venv or system it runs in)."""
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    dirs += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    seen, out = set(), []
    for d in dirs:
        if d and d not in seen and Path(d).is_dir():
            seen.add(d)
            out.append(d)
    return out


def _env_python(folder: Path) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(cmd: list[str], what: str, name: str, timeout: float) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PinnedEnvError(f"{name}: {what} took longer than {timeout:.0f} s; check the network and retry") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise PinnedEnvError(f"{name}: {what} failed ({' | '.join(tail)[-400:]}). The package index must be "
                             "reachable the first time (the environment is cached afterwards)")


def ensure_env(root: Path, name: str, requirements: Sequence[str], timeout: float = 900.0) -> Path:
    """The Python executable of ``name``'s pinned environment, created on first use (a lock keeps two
    processes from building it at once; a half-built one, without :data:`ENV_STAMP`, is rebuilt)."""
    from filelock import FileLock

    folder = env_dir(root, name, requirements)
    python = _env_python(folder)
    stamp = folder / ENV_STAMP
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if stamp.is_file() and python.is_file():
            return python
        # --copies: no symlinks (a Google Drive folder cannot hold them)
        _run([sys.executable, "-m", "venv", "--clear", "--copies", "--without-pip", str(folder)],
             f"creating the virtual environment {folder}", name, timeout)
        out = subprocess.run([str(python), "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
        Path(out, "_jpcap_parent.pth").write_text("\n".join(parent_site_dirs()) + "\n", encoding="utf-8")
        if requirements:
            # pip of this interpreter installs into the environment (--python), seeing the parent's packages
            _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                  "--disable-pip-version-check", *requirements], f"installing {' '.join(requirements)}", name, timeout)
        versions = subprocess.run([str(python), "-c", "import transformers;print(transformers.__version__)"],
                                  capture_output=True, text=True).stdout.strip()
        atomic_write_json(stamp, {"requirements": list(requirements), "python": sys.version.split()[0],
                                  "transformers": versions or None, "parent_site": parent_site_dirs()})
    return python


def ensure_env_with_fallback(root: Path, name: str, requirements: Sequence[str]) -> Path:
    """:func:`ensure_env` in ``root``; if that folder cannot hold an environment (a network drive that
    refuses executables), in :data:`LOCAL_ENV_ROOT` instead, saying so (it is rebuilt per runtime)."""
    try:
        return ensure_env(root, name, requirements)
    except (PinnedEnvError, OSError) as exc:
        if Path(root) == LOCAL_ENV_ROOT or "installing" in str(exc):
            raise
        print(f"{name}: no environment possible in {root} ({str(exc)[:160]}); using {LOCAL_ENV_ROOT} "
              "(rebuilt in each new runtime)")
        return ensure_env(LOCAL_ENV_ROOT, name, requirements)


def runner_path() -> Path:
    """The runner script (standard library + torch + transformers only: it runs in the pinned env)."""
    return Path(__file__).with_name("pinned_runner.py")

