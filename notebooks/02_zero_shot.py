# %% [markdown]
# # 02 · Zero-shot captioning
#
# Every model in `zero_shot.models` captions the test splits (`test`: STAIR, in-domain; `yj_test`: YJ,
# out-of-domain) with its own Japanese prompt in its own format (Qwen chat template, PaliGemma's
# `caption ja`, ...). Generation is batched and greedy by default: Qwen2-VL / Qwen2.5-VL through the
# project's static-KV-cache decoder (batches of one image size, CUDA-graph steps on a GPU; the same
# tokens as transformers' greedy `generate`), other models through `generate` with left padding
# (`generation.decoder` in docs/params.md); predictions are appended to `predictions/<model>__<split>.jsonl` after every batch, so a
# killed run resumes where it stopped. Failing images are recorded with their error, not fatal.
#
# Models trained on STAIR Captions are flagged: their "zero-shot" STAIR score is not zero-shot.
# Offline, the tiny model is **randomly initialised**: its captions are noise, shown only to prove the
# pipeline runs.

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
from jpcap_helpers import engine, models, reports
models.registry_table()

# %%
summary = engine.run_zero_shot(P)
summary[[c for c in ("model", "split", "contamination", "n_done", "n_errors", "images_per_s", "peak_gpu_gib")
         if c in summary]]

# %% [markdown]
# ## A floor to judge against
# One caption for every image — the most frequent training caption. On templated captions such as
# jp-shapes this already scores well above zero, so "learning" means beating this row, not beating 0.

# %%
engine.write_constant_baseline(P)

# %% [markdown]
# ## Sample captions next to their images

# %%
for split in P.zero_shot.splits:
    items = engine.sample_items(P, model=P.zero_shot.models[0], split=split, n=8)
    if items:
        reports.image_grid(items, title=f"{P.zero_shot.models[0]} · {split} (prediction / reference)")
