# %% [markdown]
# # 04 · Evaluation: BLEU-4, ROUGE-L, CIDEr with confidence intervals
#
# References and predictions go through the same normaliser, are segmented by MeCab (fugashi +
# unidic-lite, surface forms, punctuation dropped) and scored with pycocoevalcap's BLEU, ROUGE-L and
# CIDEr-D directly — its own PTBTokenizer cannot segment Japanese, and METEOR/SPICE are English-only.
# 95% confidence intervals come from a seeded bootstrap over images; the paired bootstrap test says
# whether a difference between two systems on the same images is more than noise.
#
# Each scored (model, adapter, split) becomes a row of `metrics.csv` with its provenance (model
# revision, adapter, params hash, split hash, git commit, date).

# %% tags=["parameters"]
params_file = "../params/smoke.yaml"   # offline tiny default; Colab T4: "../params/colab_t4.yaml"
run_name = "smoke"
overrides = {}                           # e.g. {"train.lora_rank": 8}
jpcap_git_url = "https://github.com/YOUR-ACCOUNT/jpcap.git"  # Colab only: where to clone jpcap from

# %% [markdown]
# ### Setup
# In Colab this installs jpcap first (clone + `pip install`); elsewhere it is already installed
# (`make demo` / `pip install -e .`). Then it validates the params file — an unknown key or a wrong
# type stops here, before any model or data loads — writes the resolved params into the run folder
# and reports the GPU and the precision it implies.

# %%
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("jpcap_helpers") is None:  # Colab: fetch and install the project
    if not os.path.isdir("/content/jpcap"):
        subprocess.run(["git", "clone", "-q", jpcap_git_url, "/content/jpcap"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "/content/jpcap[quant]"], check=True)
    os.chdir("/content/jpcap/notebooks")
from jpcap_helpers import colab, params as jp_params
P = jp_params.start_run(params_file, run_name, overrides)
env = colab.report_environment(P)

# %%
from jpcap_helpers import evaluate, reports
metrics = evaluate.evaluate_run(P)
evaluate.results_table(metrics)

# %%
reports.bar_chart_with_ci(metrics, x="system", y="CIDEr", lo="CIDEr_lo", hi="CIDEr_hi", hue="split",
                          title="CIDEr with 95% CI");

# %% [markdown]
# ## Paired test against the zero-shot baseline

# %%
evaluate.paired_tests(P, metrics)
