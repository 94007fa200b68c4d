"""jpcap: Japanese image captioning with small vision-language models.

One module per stage (see docs/architecture.md): params, text, data, toydata, models, engine,
train, evaluate, flags, reports, browser, runner, colab, cli.
"""

__version__ = "0.1.0"
