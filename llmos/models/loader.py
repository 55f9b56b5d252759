"""Path → Checkpoint (config, fp32 weights in HF names, tokenizer).

Parsing a GGUF file's metadata and dequantizing it costs seconds in Python, so the first load
writes the result to a cache (safetensors + JSON, keyed by the file's path, size and mtime) and
later loads read that in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmos.models.cache import cache_dir
from llmos.models.config import ModelConfig
from llmos.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)
CACHE_FORMAT = 1


@dataclass(slots=True)
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer


def load_checkpoint(path: str | Path, use_cache: bool = True) -> Checkpoint:
    path = Path(path)
    if path.is_dir():
        return _load_hf_folder(path)
    root = cache_dir() if use_cache else None
    if root is None:
        return _load_gguf(path)
    stat = path.stat()
    key = hashlib.sha256(
        f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CACHE_FORMAT}".encode()
    ).hexdigest()[:24]
    entry = root / "models" / key
    if (entry / "meta.json").is_file():
        try:
            meta = json.loads((entry / "meta.json").read_text())
            config = ModelConfig(**meta["config"])
            weights = load_file(str(entry / "weights.safetensors"))
            return Checkpoint(config, weights, Tokenizer.from_gguf_metadata(meta["tokenizer"]))
        except Exception as exc:  # a damaged cache entry is rebuilt, never fatal
            log.warning("model cache entry %s unreadable (%s); rebuilding", entry, exc)
    checkpoint, tokenizer_meta = _load_gguf_with_meta(path)
    try:
        _write_cache(entry, checkpoint, tokenizer_meta)
    except OSError as exc:
        log.warning("could not write the model cache at %s: %s", entry, exc)
    return checkpoint


def _load_gguf_with_meta(path: Path) -> tuple[Checkpoint, dict]:
    from llmos.models.gguf import load_gguf  # the gguf package is only needed on a cache miss

    ckpt = load_gguf(path)
    tokenizer_meta = {k: v for k, v in ckpt.metadata.items() if k.startswith("tokenizer.")}
    return Checkpoint(
        ckpt.config, ckpt.weights, Tokenizer.from_gguf_metadata(ckpt.metadata)
    ), tokenizer_meta


def _load_gguf(path: Path) -> Checkpoint:
    return _load_gguf_with_meta(path)[0]


def _write_cache(entry: Path, ckpt: Checkpoint, tokenizer_meta: dict) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
    try:
        save_file(
            {k: v.contiguous() for k, v in ckpt.weights.items()}, str(tmp / "weights.safetensors")
        )
        meta = {"config": asdict(ckpt.config), "tokenizer": tokenizer_meta}
        (tmp / "meta.json").write_text(json.dumps(meta))
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        tmp.rename(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_hf_folder(folder: Path) -> Checkpoint:
    config_path = folder / "config.json"
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: {folder} has no *.safetensors files")
    config = ModelConfig.from_hf(json.loads(config_path.read_text()))
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_file(str(file)).items():
            weights[name] = tensor.to(torch.float32)
    if "lm_head.weight" in weights:
        config.tie_word_embeddings = False
    return Checkpoint(config, weights, Tokenizer.from_folder(folder))
