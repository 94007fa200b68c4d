# %% [markdown]
# # 06 · Failure cases and ethics flags
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR-ACCOUNT/jpcap/blob/main/notebooks/06_failure_cases.ipynb)
#
# A browser over every prediction file of this run (zero-shot and fine-tuned side by side): sort and
# filter by per-image CIDEr, by automatic flag and by model, page through the images with their
# references and per-image scores. The same view is exported as one static HTML page
# (`reports/failure_cases.html`, images embedded) for places where widgets do not render (GitHub, a
# saved notebook).
#
# The flags are computed with MeCab (fugashi + unidic-lite): hallucinated nouns (in no reference),
# gendered terms the references do not support, non-Japanese output, repetition loops, empty and
# over-long output. They are evidence to look at, not verdicts; the rules and their limits are in
# `docs/ablations.md`. Offline the images are jp-shapes: no people, so gender and privacy flags have
# nothing to find there.

# %% tags=["parameters"]
params_file = "../params/smoke.yaml"   # offline tiny default; Colab T4: "../params/colab_t4.yaml"
run_name = None                          # None: run.name of the params file
overrides = {}                           # e.g. {"train.lora_rank": 8}

# %% [markdown]
# ### Setup
# On Colab the first cell installs jpcap (a fresh runtime has only Colab's packages); elsewhere it is
# installed already (`make demo` / `pip install -e .`). `setup` then validates the params — an unknown
# key, a wrong type or an out-of-range value stops here, before any model or data loads — mounts Drive
# and checks the persistent folder when the params ask for them, writes the resolved params into the
# run folder and reports the GPU and the precision it implies (bf16 only where the GPU has it natively;
# fp16 on a T4).

# %%
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("jpcap_helpers") is None:  # Colab: clone and install jpcap once per runtime
    if not os.path.isdir("/content/jpcap"):
        subprocess.run(["git", "clone", "-q", "https://github.com/YOUR-ACCOUNT/jpcap", "/content/jpcap"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "/content/jpcap[quant]"], check=True)
    os.chdir("/content/jpcap/notebooks")
import jpcap_helpers
P = jpcap_helpers.setup(params_file, run_name, overrides)

# %% [markdown]
# ## 1. The browser
# `model` picks whose CIDEr and flags drive sorting and filtering (`(any model)`: the lowest CIDEr and
# every model's flags); `show` picks the models shown side by side. The fine-tuned model is the default
# focus, worst CIDEr first.

# %%
from IPython.display import HTML, Markdown, display
from jpcap_helpers.analysis import browser, flags, reports
from jpcap_helpers.io import atomic_write_text
split = P.evaluate.splits[0]
fb = browser.FailureBrowser.from_run(P, split=split)   # include_sweep=True adds the sweep runs' models
display(fb.widget)

# %% [markdown]
# Where the widget does not render, the ten worst images of the focus model as a table:

# %%
fb.table(limit=10)

# %% [markdown]
# ## 2. Flag rates per model
# Share of images with each flag (denominator: every image the model captioned on this split). The
# noun-level hallucination rate is hallucinated noun tokens / content noun tokens.

# %%
rates = flags.flag_rates(fb.flags)
nouns = flags.hallucinated_noun_table(fb.flags)
reports_dir = P.run_dir / "reports"
atomic_write_text(reports_dir / "flag_rates.csv", rates.to_csv(index=False))
atomic_write_text(reports_dir / "hallucinated_nouns.csv", nouns.to_csv(index=False))
rates

# %%
reports.save_figure(reports.flag_rates_chart(rates), reports_dir / "flag_rates.png");

# %% [markdown]
# The most frequent hallucinated nouns per model:

# %%
nouns

# %% [markdown]
# ## 3. Static export
# Every image passing the browser's current filters, in its sort order (at most 500), as one UTF-8 page
# with base64 thumbnails and the flag-rate table on top. A shorter page (the first 20) is shown here; on
# Colab the whole page is offered for download (it is also in the run folder).

# %%
print(fb.export_report(reports_dir / "failure_cases.html", rates=rates))
fb.export_html(reports_dir / "failure_cases_top20.html", rates=rates, max_items=20)
display(HTML((reports_dir / "failure_cases_top20.html").read_text(encoding="utf-8")))
jpcap_helpers.colab.offer_download(reports_dir / "failure_cases.html")

# %% [markdown]
# ## 4. Ethics: what the flags show, and what they cannot
# The four concerns of the project plan, with this run's numbers.

# %%
display(Markdown(flags.ethics_summary(rates, nouns, split=split, synthetic=P.data.source == "jp-shapes")))

# %% [markdown]
# ## 5. Mitigations, measured
# The project plan names two mitigations: filtering (by rule and by a person) and constrained decoding.
# Each is measured here the same way: CIDEr-D and flag rates with 95 % bootstrap CIs over images. What
# they can and cannot do (docs/human_eval.md):
#
# * **A rule-based filter** drops captions the flags mark as unusable (non-Japanese, empty, looping).
#   The kept captions score better *because the hard images are gone*: read the coverage next to the
#   score, it is a choice to show nothing rather than a bad caption, not a better model.
# * **Human review** does the same with a person's judgement: accept or reject captions in the panel
#   below the browser; the decisions are kept in `reports/decisions.jsonl` and the filtered predictions
#   are scored the same way.
# * **Constrained decoding** (`generation.constraints` in the params) removes tokens before they are
#   chosen: other scripts (Latin, Hangul, Cyrillic), listed words (by default the gendered terms of the
#   flag above), repeated n-grams. It removes *words*, not the bias behind them: the model can pick
#   another word with the same assumption, or spell a banned word through other tokens, and banning a
#   word the task needs costs CIDEr (the demo's table in benchmarks/results/constraints_effect.md shows
#   both).

# %%
from pathlib import Path
from IPython.display import Image as IPImage
from jpcap_helpers.analysis import decisions, human_eval, mitigations, your_photo
focus = fb.w_model.value if fb.w_model.value in fb.models else fb.models[0]
focus_src = next(s for s in browser.prediction_sources(P, split) if s.label == focus)
refs_path = P.processed_dir / f"{split}.jsonl"
mitigations.compact(mitigations.rule_filter(focus_src.predictions, refs_path,
                                           reports_dir / f"filtered__{focus}__{split}.jsonl",
                                           n_resamples=P.evaluate.bootstrap_samples))

# %% [markdown]
# Review captions of the browser's focus model: pick an image of the current page, accept or reject it.
# Then the next cell scores the predictions without the rejected captions (with no decisions yet both
# rows are equal).

# %%
store = decisions.DecisionStore(reports_dir / "decisions.jsonl")
display(decisions.DecisionPanel(fb, store).widget)

# %%
mitigations.compact(decisions.apply_decisions(focus_src.predictions, focus, store, refs_path,
                                             reports_dir / f"reviewed__{focus}__{split}.jsonl",
                                             n_resamples=P.evaluate.bootstrap_samples))

# %% [markdown]
# Constrained decoding: the same images captioned without and with the default constraint set
# (`mitigations.VARIANTS`: scripts + gendered terms + no repeated trigram), base model and adapter. On
# a real model this captions `max_images` images per variant and system (minutes on a T4).

# %%
adapter = P.run_dir / "adapter"
constrained = mitigations.constraint_comparison(P, split=split, adapter=adapter if adapter.exists() else None,
                                                max_images=60)
atomic_write_text(reports_dir / "constraints_effect.csv", constrained.to_csv(index=False))
mitigations.compact(constrained)

# %% [markdown]
# ## 6. Human evaluation
# Automatic metrics and flags are proxies; people judge captions directly. A blind A/B test of the
# base model against the fine-tuned one: a sample of images stratified by split (in-domain `test`,
# out-of-domain `yj_test`) and by per-image CIDEr band (low / mid / high), drawn once with the run's
# seed and kept in `reports/human_eval/sample.json` (rating the same sample is what makes raters
# comparable). Each rater sees the image and the two captions as A and B in a random order, says which
# is better (or a tie), scores adequacy and fluency 1–5 and flags hallucination, bias or privacy
# problems. Each judgement is appended to `reports/human_eval/ratings/<name>.jsonl` at once, so a rater
# can stop and come back. Classmates without Jupyter use the HTML form below and send back the file it
# downloads.

# %%
he_dir = reports_dir / "human_eval"
systems = human_eval.default_systems(fb.models)
sample = human_eval.sample_for_run(P, he_dir / "sample.json", systems, n=30)
print(f"sample {sample.sample_id}: {len(sample.items)} images of {systems};",
      ", ".join(f"{k} {v['drawn']}/{v['available']}" for k, v in sample.strata.items()))

# %% [markdown]
# The rater (type your name, press start; it resumes where you stopped). Headless runs only display it.

# %%
display(human_eval.RaterWidget(sample, he_dir / "ratings").widget)

# %% [markdown]
# Results from whatever ratings exist: win rates with 95 % bootstrap CIs over items, agreement
# between raters (Cohen's κ for two, Fleiss' κ for more, on the items every rater judged) and Spearman's
# ρ between the raters' adequacy/fluency and per-image CIDEr. With 30 items and a few raters the
# intervals are wide and κ moves a lot with one changed answer: report the number of items with every
# number, and read the ratings as a check on the metrics, not as a verdict.

# %%
he_report = human_eval.human_eval_report(sample, he_dir / "ratings", n_resamples=P.evaluate.bootstrap_samples)
display(Markdown(he_report["text"]))
for key in ("win_rates", "correlations", "flags"):
    if key in he_report:
        display(he_report[key])

# %% [markdown]
# The same sample as one self-contained HTML page (images embedded). Raters open it in any browser,
# answer, and press *Download answers*; import each returned file with
# `human_eval.import_form_answers("<name>.jsonl", sample, he_dir / "ratings")` — it checks every line
# as the widget does, skips what that rater already judged and counts bad lines — then re-run the
# results cell.

# %%
form_path = human_eval.export_form(sample, he_dir / "rating_form.html")
print(f"wrote {form_path} ({form_path.stat().st_size / 1024:.0f} KiB)")
jpcap_helpers.colab.offer_download(form_path)

# %% [markdown]
# ## 7. Caption your own photo
# Put a photo's path in `my_photo` (on Colab: upload it with the file browser on the left, e.g.
# `/content/my.jpg`). The base model and the fine-tuned adapter caption it side by side, with the flags
# that need no references. Without a photo a jp-shapes scene is drawn, the only world the offline tiny
# model knows. The photo stays on this machine; do not publish captions of people without their consent.

# %%
my_photo = None   # e.g. "/content/my.jpg"
photo = Path(my_photo) if my_photo else your_photo.toy_photo(reports_dir / "toy_photo.jpg")
display(IPImage(filename=str(photo), width=224))
your_photo.caption_photos(P, [photo], adapter=adapter)
