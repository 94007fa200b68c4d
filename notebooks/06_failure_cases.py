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
