"""Human evaluation a class can run (docs/human_eval.md): a seeded, stratified sample of images with
two systems' captions (:mod:`.sampling`), blind side-by-side judgements appended kill-safe to one
JSONL per rater (:mod:`.storage`), an ipywidgets rater (:mod:`.widget`), a self-contained HTML form
whose answers import through the same validation (:mod:`.form`), and the statistics: win rates with
bootstrap CIs, Cohen's / Fleiss' κ, Spearman ρ against per-image CIDEr (:mod:`.stats`)."""
from .form import export_form, form_html, import_form_answers
from .sampling import Sample, default_systems, draw_sample, items_from_run, load_sample, sample_for_run
from .stats import cohen_kappa, fleiss_kappa, human_eval_report, spearman, win_rates
from .storage import FLAG_CHOICES, PREFERENCES, JudgementError, RatingStore, load_ratings, validate_judgement
from .widget import RaterWidget

__all__ = ["Sample", "draw_sample", "items_from_run", "load_sample", "default_systems", "sample_for_run", "RaterWidget", "form_html", "export_form",
           "import_form_answers", "JudgementError", "RatingStore", "load_ratings", "validate_judgement",
           "PREFERENCES", "FLAG_CHOICES", "win_rates", "cohen_kappa", "fleiss_kappa", "spearman",
           "human_eval_report"]
