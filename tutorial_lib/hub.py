"""Optional downloads from the Hugging Face Hub (Stable Diffusion's VAE, CLIP).

Nothing in the course needs the internet: these paths run when the Hub is reachable or the files
are already in the local cache, and otherwise return None after saying why.
"""

from __future__ import annotations

import socket
import warnings


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def from_hub(from_pretrained, name: str, **kwargs):
    """`from_pretrained(name, **kwargs)` if the Hub is reachable, else from the local cache only;
    None (with a message) when neither works."""
    online = hub_reachable()
    try:
        with warnings.catch_warnings():  # diffusers passes huggingface_hub an argument it deprecated: not ours to fix
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
            return from_pretrained(name, local_files_only=not online, **kwargs)
    except Exception as err:  # offline and not cached, or the Hub refused: skip, never fail
        where = "the Hub" if online else "the local cache (the Hugging Face Hub is not reachable)"
        print(f"Skipped: could not load {name!r} from {where}: {type(err).__name__}: {str(err)[:200]}")
        return None
