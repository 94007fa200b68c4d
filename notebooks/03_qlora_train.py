# %% [markdown]
# # 03 · QLoRA fine-tuning
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR-ACCOUNT/jpcap/blob/main/notebooks/03_qlora_train.ipynb)
#
# Qwen2-VL-2B-Instruct adapted on STAIR Captions: the language model in 4-bit NF4, LoRA on the attention
# and MLP projections of the top layers, the projector (`merger`) trainable, the vision tower frozen and
# never quantized. The loss covers only the caption tokens and the end token.
#
# Precision is chosen per GPU: bf16 where supported, otherwise fp16 with loss scaling (a T4 has no bf16;
# Qwen is fp16-fragile, so non-finite steps are skipped and counted). Checkpoints hold everything needed
# to resume after a Colab disconnect.
#
# Offline, `params/smoke.yaml` runs the same QLoRA path on the pretrained tiny model (see 02): its language
# model in 4-bit NF4 through bitsandbytes on CPU, LoRA on all 4 of its layers (`train.top_k_layers: 4`),
# the projector trainable, 900 steps. A model trained from random weights emits one or two captions for
# its first few hundred steps, with or without 4-bit; a pretrained base starts past that (docs/training.md).

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
# ## Plan
# Trainable parameters, peak memory measured on a probe step, and an ETA for the whole run on this
# hardware — with a warning and smaller settings when it will not fit a Colab session. The `cost model`
# line is the arithmetic estimate for a free T4 (docs/training.md); the `probe` line is measured here.

# %%
from jpcap_helpers import engine, train
from jpcap_helpers.analysis import reports
plan = train.plan(P)
print(train.format_plan(plan))

# %% [markdown]
# ## Train
# Resumes from the last checkpoint in the run folder when there is one (a Colab disconnect costs at most
# `save_every` steps). Validation every `eval_every` steps: loss and CIDEr on `eval_images` val images.

# %%
result = train.train(P)
{k: v for k, v in result.to_dict().items() if k != "losses"}

# %% [markdown]
# `non_finite_steps_skipped` counts fp16 overflow steps the loss scaler skipped: a few at the start are
# normal on a T4; many in a row stop the run with a message. `resumed_from_step` > 0 says this session
# continued an earlier one.

# %% [markdown]
# ## Curves

# %%
log = train.read_train_log(P.run_dir)
reports.line_curves(log, "step", [c for c in ("loss", "val_loss", "val_CIDEr") if c in log]);

# %% [markdown]
# Training loss should fall steadily; validation loss and CIDEr are the honest signal (unseen images).
# Validation loss rising while training loss falls means over-fitting: fewer epochs or more data.

# %% [markdown]
# ## Captions before and after fine-tuning
# The fine-tuned model captions the test splits into `predictions/<model>+ft__<split>.jsonl`, scored
# next to the zero-shot rows in 04_eval.

# %%
finetuned = engine.run_finetuned(P, adapter=result.adapter_dir)
finetuned[["model", "split", "n_done", "n_errors", "images_per_s"]]

# %%
engine.before_after_table(P, split="test", n=8)
