# %% [markdown]
# # 04 · Evaluation: BLEU-4, ROUGE-L, CIDEr with confidence intervals
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR-ACCOUNT/jpcap/blob/main/notebooks/04_eval.ipynb)
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
run_name = None                          # None: run.name of the params file
overrides = {}                           # e.g. {"train.lora_rank": 8}
compare_with = []                        # other runs in the same output folder, e.g. ["colab_t4_qwen3"]

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

# %%
from jpcap_helpers import evaluate
from jpcap_helpers.analysis import reports
metrics = evaluate.evaluate_run(P)
evaluate.results_table(metrics)

# %% [markdown]
# How to read it: one row per system and split; the bracket is the 95% bootstrap interval over images.
# Two systems whose intervals overlap widely are not shown apart by this test set; the paired test below
# is the sharper comparison. Rows flagged as trained on STAIR are not zero-shot on `test`. `yj_test` is
# out-of-domain (other captioners, another style): a gap between the two splits is the price of domain
# shift, not noise. Offline there are three rows per split: the constant-caption floor, the pretrained
# tiny base zero-shot, and the QLoRA-adapted model (`+ft`).

# %%
reports.bar_chart_with_ci(metrics, x="system", y="CIDEr", lo="CIDEr_lo", hi="CIDEr_hi", hue="split",
                          title="CIDEr with 95% CI");

# %% [markdown]
# ## Paired test against the zero-shot baseline

# %%
evaluate.paired_tests(P, metrics)

# %% [markdown]
# A positive difference whose interval excludes 0 (p < 0.05) means fine-tuning beat the zero-shot model on
# that split for these images; an interval across 0 means this test set cannot tell them apart.

# %% [markdown]
# ## Other runs side by side
# Each fine-tuning recipe is its own run: `params/colab_t4.yaml` (Qwen2-VL-2B) and
# `params/colab_t4_qwen3.yaml` (Qwen3-VL-2B, the same recipe) write `outputs/colab_t4` and
# `outputs/colab_t4_qwen3` in the same (Drive) folder. Once 04 has scored each of them, name the others in
# `compare_with` to see every run's latest rows in one table. `same images` says whether a run scored the
# same version of the split as the first run; where it is False the numbers are not comparable.

# %%
if compare_with:
    comparison = evaluate.compare_runs(evaluate.sibling_runs(P.run_dir, compare_with))
else:
    comparison = "no other run named in compare_with"
comparison

# %% [markdown]
# With the same recipe, data and test images, the difference between two fine-tuned rows is the base
# model's; compare it with the interval widths above before calling one model better (the paired test
# works within one run's images).

# %% [markdown]
# ## Share the adapter
# The adapter with a generated model card (base model and revision, data and splits, training params, the
# table above with CIs, contamination notes, licences, intended use, failure-case flags when 06 ran).
# `stage` writes what would be uploaded into the run folder; `push` (or `jpcap push --adapter DIR
# --repo-id NAME`) uploads it after a Hugging Face login.

# %%
from jpcap_helpers import publish
adapter_dir = P.run_dir / "adapter"
if (adapter_dir / "adapter_config.json").exists():
    staged = publish.stage(adapter_dir, repo_id="your-name/jpcap-adapter", out_dir=P.run_dir / "hub_upload")
    print((staged / "README.md").read_text(encoding="utf-8")[:1200])
    # publish.push(adapter_dir, repo_id="your-name/jpcap-adapter")   # after jpcap_helpers.colab.hf_login()
else:
    print(f"no adapter in {adapter_dir}: run 03 first")
