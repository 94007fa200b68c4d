# %% [markdown]
# # 05 · Ablations: LoRA rank, layer depth, projector freezing, base model
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR-ACCOUNT/jpcap/blob/main/notebooks/05_ablations.ipynb)
#
# The `ablation` section of the params file names the axes: LoRA rank (`lora_rank`), how many of the top
# language layers get LoRA (`top_k_layers`), whether the vision→language projector trains
# (`projector`) and which base models are fine-tuned with the same recipe (`model`: e.g. Qwen2-VL-2B,
# Qwen2.5-VL-3B, Qwen3-VL-2B side by side with `params/colab_t4_models.yaml`; empty = this run's own model,
# and runs of that model keep their names). `one_factor` varies one axis at a time around this run's own
# `train` values and model (the base setting, run once), `grid` runs every combination. Each sweep run
# is notebooks 03 + 04 executed headless with papermill on its own resolved params file, into
# `<run>/sweep/<sweep run>/`; runs already finished with the same params are skipped, a failing run does
# not stop the others.
#
# Then every run's `metrics.csv` is collected into one table, plotted against each axis with 95% CIs, set
# against its cost (trainable parameters, peak memory, training time) and tested against the base setting
# with the paired bootstrap on the same images. Offline (`params/smoke.yaml`) this is a mini sweep of the
# pretrained tiny model with QLoRA on jp-shapes: rank 8, top 2 of its 4 layers and a frozen projector
# against the base setting (r32 · all 4 layers · projector trainable), `ablation.train_max_steps` (300)
# steps per run. It shows the direction of each axis on toy data; docs/ablations.md says what that can
# and cannot tell about the real ablation — nothing about Japanese captioning quality.

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
# ## 1. The runs
# One row per sweep run, the base setting first. `max_steps` / `max_images` are the sweep's caps
# (`ablation.train_max_steps`, `ablation.eval_max_images`); `status` is what is on disk already.

# %%
from jpcap_helpers.analysis import ablations
ablations.describe_sweep(P)

# %% [markdown]
# ## 2. Run the sweep
# Notebooks 03 (train + caption the test splits) and 04 (score) per run. Executed copies land in each
# run's folder; a failure is listed with its notebook and cell at the end, and the sweep goes on.
# The same from a shell: `jpcap sweep --params FILE` (add `--dry-run` to only list the runs).

# %%
sweep_result = ablations.sweep(P)
import pandas as pd
pd.DataFrame(sweep_result["runs"])[["run", "status", "seconds"]]

# %% [markdown]
# ## 3. Results
# Latest metrics of each run's fine-tuned model, per split, with 95% bootstrap CIs and the run's cost;
# also written to `reports/ablation_results.{csv,md}` (`jpcap compare --params FILE` rebuilds them).

# %%
comparison = ablations.compare(P)
ablations.summary_table(comparison["table"], ci=True) if len(comparison["table"]) else comparison["missing"]

# %% [markdown]
# ### Each metric against each axis
# One column per axis the sweep varies (the model axis too); each holds the runs whose other axes keep
# their base values; `*` marks the base value.

# %%
comparison["figures"].get("ablation_metrics_by_axis")

# %%
comparison["figures"].get("ablation_runs_CIDEr")

# %% [markdown]
# A setting matters when its CI clears the base run's; overlapping bars mean this sweep cannot rank them
# (short smoke or T4 runs rank settings, they do not reach final scores).

# %% [markdown]
# ### Cost
# From each run's `train_result.json` (else `train_plan.json`): trainable parameters, peak memory
# (CUDA `max_memory_allocated` on a GPU, the process's peak RSS on CPU — the label says which) and
# training seconds.

# %%
comparison["costs"]

# %%
comparison["figures"].get("ablation_cost")

# %% [markdown]
# Cost against quality: a higher rank or more layers costs parameters and memory; it is worth it only
# where the metric plots above show a gain beyond the CI.

# %% [markdown]
# ### Paired bootstrap against the base setting
# Same images, same resamples for both runs; `difference` = run − base with its 95% CI and a two-sided
# p-value. With a handful of runs, a few p < 0.05 are expected by chance alone.

# %%
comparison["paired"]

# %%
comparison["figures"].get("ablation_paired")

# %% [markdown]
# ## 4. Failures
# Every failed run with its notebook, cell and error (the executed copy holds the traceback). This cell
# raises when one failed, so `jpcap run` reports it — after the tables above were shown.

# %%
if sweep_result["failures"]:
    raise RuntimeError("sweep runs failed:\n" + "\n".join(
        f"{f['run']} · {f['notebook']} · cell {f['cell']}: {f['error']} ({f['executed']})"
        for f in sweep_result["failures"]))
print(f"all {len(sweep_result['runs'])} sweep runs finished")
