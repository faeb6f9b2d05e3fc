"""Process groups, devices and dtypes: the same code path for one process,
`torchrun` on one machine, and `torchrun` over several machines.

Every rank runs the whole generation loop on its shard of the weights;
fairscale's layers exchange activations between ranks (NCCL on GPUs, gloo on
CPUs).
"""

import atexit
import contextlib
import io
import logging
import os
from typing import Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def choose_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """The requested device; else this rank's GPU (LOCAL_RANK) when CUDA is available; else the CPU."""
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: {device!r} is not a device ({e}); use e.g. 'cpu', 'cuda' or 'cuda:1'") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build)"
            raise ValueError(
                f"device={str(device)!r}, but torch {torch.__version__} was built with {built} and sees no GPU: "
                f"use device='cpu', or install a CUDA build of torch on a machine with an NVIDIA GPU"
            )
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def choose_dtype(device: torch.device, dtype: Optional[Union[str, torch.dtype]] = None) -> torch.dtype:
    """The requested dtype; else bf16 (fp16 on GPUs without bf16) on CUDA, fp32 on CPU."""
    if dtype is not None:
        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'float16'")
            dtype = getattr(torch, dtype)
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: the GPU's free memory, else the host's available memory."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")  # other Unixes


def setup_model_parallel(model_parallel_size: Optional[int], device: torch.device) -> int:
    """Joins (or creates) the process group and fairscale's model-parallel groups.

    Under torchrun the group comes from the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...). In a plain `python` process a single-rank group is
    created in memory: no torchrun, no network port.

    Returns:
        The model-parallel size: one checkpoint shard per rank of a group.
    """
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if launched_by_torchrun():
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        logger.debug("initialised %s process group: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
        # A process that exits with its group alive can abort in interpreter teardown
        # (gloo's worker threads outlive Python): tear the group down while Python still runs.
        atexit.register(_destroy_process_group)

    if model_parallel_size is None:
        model_parallel_size = dist.get_world_size()
    if fs_init.model_parallel_is_initialized():
        current = fs_init.get_model_parallel_world_size()
        if current != model_parallel_size:
            raise ValueError(
                f"this process already runs model-parallel size {current}; cannot build a model with "
                f"model_parallel_size={model_parallel_size} in it"
            )
        return model_parallel_size
    if dist.get_world_size() % model_parallel_size != 0:
        raise ValueError(
            f"model_parallel_size={model_parallel_size} does not divide the {dist.get_world_size()} processes "
            f"launched; launch a multiple of {model_parallel_size} processes (torchrun --nproc_per_node ...)"
        )
    # fairscale announces its groups with print() on every rank; keep it in the log.
    announcement = io.StringIO()
    with contextlib.redirect_stdout(announcement):
        fs_init.initialize_model_parallel(model_parallel_size)
    logger.debug(announcement.getvalue().strip())
    return model_parallel_size


def _destroy_process_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on the rank that prints (rank 0)."""
    return get_rank() == 0
