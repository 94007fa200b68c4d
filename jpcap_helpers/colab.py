"""The Colab face: where the notebook runs, which GPU it has, Google Drive, the Hugging Face login and
the widget manager. Nothing here decides a model setting (that is ``models``); it reports facts."""
from __future__ import annotations

import os
import sys
from typing import Optional


class ColabError(RuntimeError):
    """The runtime cannot do what the params ask (Drive did not mount, folder not writable)."""


def in_colab() -> bool:
    return "google.colab" in sys.modules


def gpu_info() -> dict:
    """Name, memory and compute capability of GPU 0 (``{"gpu": None, ...}`` without one)."""
    import torch

    if not torch.cuda.is_available():
        return {"gpu": None, "memory_gib": 0.0, "compute_capability": None, "count": 0}
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "count": torch.cuda.device_count(),
    }


def mount_drive(mount_point: str = "/content/drive") -> Optional[str]:
    """Mount Google Drive in Colab; returns the mount point, or None outside Colab."""
    if not in_colab():
        return None
    from google.colab import drive  # type: ignore[import-not-found]

    try:
        drive.mount(mount_point)
    except Exception as e:  # Colab raises plain Exceptions (timeout, refused authorisation)
        raise ColabError(f"Google Drive did not mount at {mount_point} ({e}). Run the cell again and "
                         "accept the authorisation, or set run.mount_drive: false and run.persist_dir to "
                         "a local folder (files are then lost when the runtime ends).") from None
    return mount_point


def enable_widgets() -> None:
    """Colab renders ipywidgets 8 (the failure browser, tqdm bars) only with its custom widget manager."""
    if in_colab():
        from google.colab import output  # type: ignore[import-not-found]

        output.enable_custom_widget_manager()


def hf_login() -> Optional[str]:
    """Log in to the Hugging Face hub for gated models: Colab secret ``HF_TOKEN``, else the environment
    variable, else an interactive prompt in a notebook. Returns where the token came from (None: none)."""
    token, source = None, None
    if in_colab():
        try:
            from google.colab import userdata  # type: ignore[import-not-found]

            token, source = userdata.get("HF_TOKEN"), "Colab secret HF_TOKEN"
        except Exception:   # secret missing or notebook access not granted
            token = None
    if not token and os.environ.get("HF_TOKEN"):
        token, source = os.environ["HF_TOKEN"], "environment variable HF_TOKEN"
    from huggingface_hub import login

    if token:
        login(token=token, add_to_git_credential=False)
        return source
    if in_colab() or "ipykernel" in sys.modules:
        from huggingface_hub import notebook_login

        notebook_login()
        return "interactive login"
    print("hf_login: no HF_TOKEN found; gated models (PaliGemma, Japanese Stable VLM) will not load")
    return None


def offer_download(path: str) -> None:
    """In Colab, offer a file for download to the user's computer; elsewhere do nothing."""
    if in_colab():
        from google.colab import files  # type: ignore[import-not-found]

        files.download(str(path))
