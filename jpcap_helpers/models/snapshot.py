"""Where a ported family's files are: a local folder in the hub layout, or a hub id resolved to its
snapshot folder (from the local cache when offline; the folder's name is then the commit)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ["local_folder", "snapshot_commit"]


def local_folder(path: str, revision: Optional[str] = None) -> Path:
    """``path`` itself when it is a folder, else the hub snapshot of that id (raises the hub's OSError
    when it is neither cached nor reachable; ``loading.hub_errors`` words it)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, revision=revision))


def snapshot_commit(path: str, folder: Path) -> Optional[str]:
    """The commit of a hub snapshot folder (its name), None for a user's own folder."""
    return folder.name if folder != Path(path).expanduser() else None
