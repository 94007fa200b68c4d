"""Analysis of finished runs (docs/ablations.md): ablation sweeps and their comparison
(:mod:`.ablations`, runner in :mod:`.sweeps`), automatic failure flags (:mod:`.flags`), the
failure-case browser (:mod:`.browser`), human evaluation (:mod:`.human_eval`), mitigations (:mod:`.mitigations`, review
decisions in :mod:`.decisions`), captioning your own photo (:mod:`.your_photo`) and the notebooks' tables and figures (:mod:`.reports`).

Use the modules: ``from jpcap_helpers.analysis import ablations, browser, flags, reports``. They are
imported on first use (``reports`` loads matplotlib and the Japanese font).
"""
import importlib

__all__ = ["ablations", "browser", "decisions", "flags", "human_eval", "mitigations", "reports", "sweeps",
           "your_photo"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
