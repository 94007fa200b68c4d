# %% [markdown]
# # 02 · Zero-shot captioning
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR-ACCOUNT/jpcap/blob/main/notebooks/02_zero_shot.ipynb)
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
# Offline, the tiny model is **pretrained here on another captioning task of the toy world** (fresh shape
# images, captions as tags and plain sentences in a phrasing that is neither STAIR's nor YJ's; docs/models.md),
# built and pretrained once when notebook 01 first needed it and cached under `model.models_dir`. Its
# zero-shot captions name shapes and colours in the wrong style: weak but not zero, as a multilingual model
# meeting STAIR would be. Loaded in 4-bit here (`model.load_in_4bit`), as the QLoRA run in 03 uses it.

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
# ## The models
# The registry says where each model comes from, its licence, whether it saw STAIR in training (then its
# STAIR score is not zero-shot) and how it fits a T4. Gated models (PaliGemma, Japanese Stable VLM) need
# their licence accepted on the hub and a login: the next cell uses the Colab secret `HF_TOKEN` (🔑 in
# the sidebar) or asks for a token; it does nothing when no model of this run is gated.

# %%
from jpcap_helpers import engine, models
from jpcap_helpers.analysis import reports
models.registry_table()

# %%
jpcap_helpers.session.login_for_gated_models(P)

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
