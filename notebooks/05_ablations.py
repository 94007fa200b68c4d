# %% [markdown]
# # 05 · Ablations: LoRA rank, layer depth, projector freezing
#
# **Not built yet** (issue 7): the sweep runner (`jpcap sweep`), run comparison and figures. This notebook
# only validates the sweep axes in the params file and lists the runs a sweep would make. No result below
# is an ablation result.

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
axes = {"lora_rank": P.ablation.lora_rank, "top_k_layers": P.ablation.top_k_layers,
        "projector": P.ablation.projector}
print(f"mode: {P.ablation.mode}")
axes
