"""jpcap: Japanese image captioning with small vision-language models.

Stages as subpackages (docs/architecture.md): data → models → engine → evaluate → train → analysis,
over params / io / text / colab; ``setup`` is what every notebook calls first.
"""

__version__ = "0.1.0"


def setup(*args, **kwargs):
    """Validate params, prepare the runtime and run folder (see :func:`jpcap_helpers.session.setup`)."""
    from .session import setup as _setup

    return _setup(*args, **kwargs)
