"""Loading the models a run starts from: plain checkpoints, GGUF files, and a memory check first.

A GGUF checkpoint (llama.cpp's format) loads through transformers, dequantised to float, but
the loaded model is flagged as quantized and refuses ``save_pretrained``, so neither a value
model nor the attribution store could be derived from it. :func:`gguf_checkpoint` converts a
GGUF file once into an ordinary transformers checkpoint directory, cached on disk (keyed by
the file's path, size and modification time), and everything downstream loads that directory.
Nothing here is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch


class ModelLoadError(Exception):
    """A model that cannot be loaded; the message says why, in one line."""


def cache_root() -> Path:
    """Where converted and pre-trained models are cached: $RLHF_INFLUENCE_CACHE or ~/.cache/rlhf_influence."""
    base = os.environ.get("RLHF_INFLUENCE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rlhf_influence"
    )
    return Path(base)


def publish_directory(staging: Path, path: Path) -> Path:
    """Rename a fully written ``staging`` directory to ``path`` (atomic; a concurrent writer that won keeps its copy)."""
    from ..store.writer import honour_umask

    honour_umask(staging)  # mkdtemp made it 0700, safetensors its files 0600
    try:
        staging.rename(path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not path.is_dir():
            raise
    return path


def split_gguf_path(model_name_or_path: str, gguf_file: str | None) -> tuple[str, str] | None:
    """(directory, file name) when the model is a GGUF file, given either way; else None."""
    if gguf_file:
        if os.path.isabs(gguf_file) or os.sep in gguf_file:
            return os.path.dirname(os.path.abspath(gguf_file)), os.path.basename(gguf_file)
        return model_name_or_path, gguf_file
    if model_name_or_path.lower().endswith(".gguf"):
        path = os.path.abspath(model_name_or_path)
        return os.path.dirname(path), os.path.basename(path)
    return None


def require_gguf_package() -> None:
    """Raise a one-line ModelLoadError where the ``gguf`` package (transformers' GGUF reader) is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            "loading a .gguf checkpoint needs the 'gguf' package: pip install gguf"
        ) from None


def gguf_cache_path(directory: str, file_name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the conversion of this GGUF file is cached (keyed by its path, size and modification time).

    Raises:
        ModelLoadError: no such file.
    """
    source = Path(directory) / file_name
    if not source.is_file():
        raise ModelLoadError(f"GGUF file {str(source)!r} does not exist")
    stat = source.stat()
    # v2: conversions written without the GGUF quantization flag (which made Trainer refuse to train)
    key = f"v2|{source.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / f"gguf_{source.stem}_{digest}"


def gguf_checkpoint(directory: str, file_name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """An ordinary transformers checkpoint (model + tokenizer, float32) converted from a GGUF file, cached.

    The first call dequantises the GGUF file through transformers and saves the weights as
    safetensors with the tokenizer (chat template included); later calls return the cached
    directory at once.

    Raises:
        ModelLoadError: no such file, no ``gguf`` package, or a file transformers cannot read.
    """
    path = gguf_cache_path(directory, file_name, cache_dir)
    if (path / "config.json").is_file():
        return path
    require_gguf_package()
    source, root = Path(directory) / file_name, path.parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=file_name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(directory), gguf_file=file_name, dtype=torch.float32
        )
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load GGUF file {str(source)!r}: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    # The loaded model is flagged as quantized (it refuses save_pretrained): copy its weights into
    # a plain model of the same class and config, which matches every key.
    with torch.random.fork_rng(devices=[]):
        plain = type(loaded)(loaded.config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    if hasattr(plain.config, "quantization_config"):  # the weights are dequantised: not a quantized model
        del plain.config.quantization_config
    del loaded
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=root))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    return publish_directory(staging, path)


def first_line(exc: BaseException) -> str:
    """An exception's message in one line, for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def available_memory_bytes() -> int | None:
    """Memory the system can give a new allocation now (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def parameter_count(model_name_or_path: str, **config_kwargs) -> int:
    """Parameters of a causal LM checkpoint, counted on an empty (meta) model built from its config."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_name_or_path, **config_kwargs)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def check_fits_in_memory(num_params: int, bytes_per_param: int, copies: int, what: str) -> None:
    """Refuse, before loading, a model whose ``copies`` would not fit in the memory available now.

    Raises:
        ModelLoadError: the estimate exceeds the available memory.
    """
    available = available_memory_bytes()
    needed = num_params * bytes_per_param * copies
    if available is not None and needed > available:
        raise ModelLoadError(
            f"{what} has {num_params / 1e9:.2f}B parameters: {copies} copies at {bytes_per_param} bytes "
            f"each need about {needed / 2**30:.1f} GiB, but only {available / 2**30:.1f} GiB of memory is "
            "available (use a smaller model, --dtype bfloat16, or a machine with more memory)"
        )
