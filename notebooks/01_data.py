# %% [markdown]
# # 01 · Data: STAIR Captions in-domain, YJ Captions out-of-domain
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR-ACCOUNT/jpcap/blob/main/notebooks/01_data.ipynb)
#
# **STAIR Captions v1.2** gives about five Japanese captions for each MS-COCO 2014 image; it is our
# in-domain data: *train* comes from STAIR train, *val* and *test* are carved from STAIR val by image id.
# **YJ Captions 26k** (Yahoo! Japan) captions COCO images too, in another style: our out-of-domain test.
# Because YJ reuses COCO images, every YJ image that is also a *training* image is removed — otherwise
# the "out-of-domain" score would be measured on images the model was trained on.
#
# Offline (tests, the demo) the same code reads **jp-shapes**, a synthetic set of coloured shapes with
# templated Japanese captions written in STAIR's exact file format. Its scores measure the pipeline and
# learning on toy data — never Japanese captioning quality.

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
# ## 1. Raw data
# `source: stair` downloads the STAIR tarball and the YJ zip (Colab); the COCO images come later, only
# those the chosen subsets need. `source: jp-shapes` generates the synthetic set (deterministic, seeded).

# %%
from jpcap_helpers import data, models
from jpcap_helpers.analysis import reports
raw = data.fetch_raw(P)
raw

# %% [markdown]
# ## 2. Clean, check and split
# One normaliser for training captions, references and predictions: NFKC (full-width ASCII → half-width,
# half-width kana → full-width), unified punctuation, emoji and control characters removed, spaces between
# Japanese characters removed, captions truncated to `max_caption_tokens` model tokens, empty ones dropped.
# Unreadable images, and names that would lead outside the images folder, are skipped and counted with
# their reason. Every count lands in `report.json`. The model's tokenizer counts the tokens; the model's
# image rule rejects shapes its processor cannot take. Offline, asking for the tiny model's tokenizer builds
# the tiny model first — and pretrains it (about a minute on CPU, once; cached under `model.models_dir`).

# %%
tokenizer = models.load_tokenizer(P)
report = data.prepare_from_params(P, tokenizer, reject=models.processor_rejection)
data.report_tables(report)["splits"]

# %% [markdown]
# Each split counts images and captions; `yj_test` holds only YJ images that are no training image (the
# leak check). Val and test come from STAIR val, disjoint by image id.

# %%
tables = data.report_tables(report)
tables["changes"]

# %% [markdown]
# What the normaliser changed, by kind: most changes are punctuation and width; a large count of dropped
# captions would point at a broken input file.

# %%
tables["skipped"]

# %% [markdown]
# Every skipped image with its reason (unreadable, too small, an aspect ratio the processor rejects,
# `outside_images_root` for a name that leads out of the images folder). Nothing is dropped silently.

# %% [markdown]
# ## 3. Caption lengths
# In MeCab words (fugashi + unidic-lite, the segmentation the evaluation uses) and in model tokens
# (what `max_caption_tokens` counts).

# %%
stats = data.caption_statistics(P, tokenizer)
reports.length_histograms(stats["mecab_lengths"], "MeCab words per caption", "Caption length (words)");

# %%
reports.length_histograms(stats["token_lengths"], "model tokens per caption", "Caption length (model tokens)");

# %% [markdown]
# Captions far below `max_caption_tokens` mean truncation touched almost none of them; the token counts
# also set `generation.max_new_tokens` (a budget well above the longest captions wastes decoding steps).

# %% [markdown]
# ## 4. Frequent words (train, MeCab surface forms, punctuation excluded)

# %%
stats["top_words"]

# %% [markdown]
# ## 5. A look at the images and their captions

# %%
reports.image_grid(data.sample_items(P, split="train", n=8), title="train");
