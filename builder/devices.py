"""Which GPUs a worker takes, decided without touching `torch.cuda`.

Calling `torch.cuda.is_available()` initialises CUDA in the calling process: `CUDA_VISIBLE_DEVICES` set afterwards
no longer applies, and vLLM's forked workers then fail on the initialised CUDA. So the GPUs are counted from
`CUDA_VISIBLE_DEVICES` where the scheduler set it (SLURM, containers) and from NVML otherwise, each worker (a
`num_proc` worker, or a local rank under `accelerate launch`) gets its own block of `per_worker` of them, and the
variable is overwritten with that block before any engine starts.
"""

import os


class GPUAssignmentError(ValueError):
    """Workers x GPUs per worker do not fit the visible GPUs; the message says what fits."""


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as `CUDA_VISIBLE_DEVICES` names them (indices or UUIDs), without CUDA."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip() and gpu.strip() != "-1"]
    try:
        import pynvml  # nvidia-ml-py: ships with vLLM and with torch's CUDA wheels

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML (no driver, no GPU, no package): no GPU this process can see
        return []


def gpu_block(worker: int, workers: int, per_worker: int, gpus: list[str]) -> list[str]:
    """The `per_worker` GPUs of worker `worker` of `workers`: consecutive blocks, never shared.

    Raises `GPUAssignmentError` when `workers * per_worker` exceeds the GPUs, naming what fits.
    """
    if workers * per_worker > len(gpus):
        fits = len(gpus) // per_worker
        raise GPUAssignmentError(
            f"{workers} worker(s) x tensor_parallel_size {per_worker} = {workers * per_worker} GPUs, but "
            f"{len(gpus)} are visible ({','.join(gpus) or 'none'}). Use num_proc (or processes per node) x "
            f"tensor_parallel_size <= {len(gpus)}: e.g. {max(fits, 1)} worker(s) of {per_worker} GPU(s)"
            + ("." if fits else f", or tensor_parallel_size <= {len(gpus)}.")
        )
    return gpus[worker * per_worker : (worker + 1) * per_worker]


def local_workers(rank: int | None, num_proc: int) -> tuple[int, int]:
    """(this worker's index, workers on this node): a `num_proc` worker's rank under one process, the local rank
    under `accelerate launch` / `torchrun` (LOCAL_RANK, LOCAL_WORLD_SIZE)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world > 1:
        return int(os.environ.get("LOCAL_RANK", "0")), local_world
    return (rank or 0), max(1, num_proc)


def claim_gpus(rank: int | None, num_proc: int, per_worker: int) -> list[str]:
    """Points this process at its own block of GPUs (overwriting `CUDA_VISIBLE_DEVICES`) and makes vLLM spawn its
    workers; call before anything initialises CUDA. Returns the block (none where no GPU is visible: the engine
    then runs wherever its own build runs, or says why it cannot)."""
    gpus = visible_gpus()
    if not gpus:
        return []
    worker, workers = local_workers(rank, num_proc)
    block = gpu_block(worker, workers, per_worker, gpus)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(block)
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    return block
