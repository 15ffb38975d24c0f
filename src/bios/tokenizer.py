"""Tokenizers from the Bios server: write the served files to a cache dir, load them locally.

Never touches a model hub. Uses `transformers.AutoTokenizer` when transformers is importable,
else `Tokenizer`, a small encode/decode wrapper over the `tokenizers` library. Both are
imported lazily, inside these functions only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("bios")

__all__ = ["Tokenizer", "load_tokenizer_files", "tokenizer_cache_dir", "write_tokenizer_files"]


def tokenizer_cache_dir(base_model: str) -> Path:
    """Where `base_model`'s tokenizer files go: `$BIOS_CACHE_DIR/tokenizers/<safe name>`
    (default `~/.cache/bios/tokenizers/<safe name>`)."""
    root = os.environ.get("BIOS_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "bios"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", base_model).strip("._") or "model"
    digest = hashlib.sha256(base_model.encode()).hexdigest()[:8]
    return base / "tokenizers" / f"{safe}-{digest}"


def write_tokenizer_files(directory: Path, files: dict[str, str]) -> Path:
    """Write `{filename: text}` into `directory` (atomically per file); return the directory.

    Raises:
        ValueError: a filename is not a plain file name (no directories, no "..").
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        if not name or name != os.path.basename(name) or name in (".", "..") or "\\" in name:
            raise ValueError(f"refusing tokenizer file name {name!r} from the server")
        if not isinstance(text, str):
            text = json.dumps(text)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, directory / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return directory


class Tokenizer:
    """A minimal tokenizer over `tokenizers.Tokenizer` (used when transformers is absent).

    Attributes:
        bos_token_id, eos_token_id: from tokenizer_config.json, when it names them.
    """

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        self._tok = _HFTokenizer.from_file(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.exists():
            config = json.loads(config_path.read_text(encoding="utf-8"))
        self.name_or_path = str(directory)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of `token_ids` (a list, tuple or 1-D array of ints)."""
        return self._tok.decode([int(t) for t in token_ids],
                                skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"bios.tokenizer.Tokenizer({self.name_or_path!r})"


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} (AddedToken serialized)
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer_files(base_model: str, files: dict[str, str]) -> Any:
    """Cache the server's tokenizer files for `base_model` and load them.

    Args:
        base_model: the model name (names the cache directory).
        files: `{filename: text}` as served by GET /api/v1/tokenizer.

    Returns:
        A transformers tokenizer (if transformers is installed and can read the files), else
        a `Tokenizer`.
    """
    directory = write_tokenizer_files(tokenizer_cache_dir(base_model), files)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        AutoTokenizer = None
    if AutoTokenizer is not None:
        try:
            return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as e:  # fall back to the plain tokenizer below
            if "tokenizer.json" not in files:
                raise
            log.warning("bios: transformers could not load the tokenizer of %s (%s); using the "
                        "plain `tokenizers` wrapper", base_model, e)
    if "tokenizer.json" not in files:
        raise ValueError(f"the server's tokenizer for {base_model!r} has no tokenizer.json")
    try:
        return Tokenizer(directory)
    except ImportError as e:
        raise ImportError("get_tokenizer needs `transformers` or `tokenizers`: "
                          "pip install tokenizers") from e
