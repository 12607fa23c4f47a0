"""RNG state in a checkpoint: torch (CPU and CUDA), Python and NumPy generators."""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def _capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    rng: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [
            str(np_state[0]),
            [int(x) for x in np_state[1]],
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
    }
    if torch.cuda.is_available():
        rng["cuda"] = list(torch.cuda.get_rng_state_all())
    return rng


def _restore_rng(rng: Mapping[str, Any]) -> None:
    if "torch_cpu" in rng:
        torch.set_rng_state(rng["torch_cpu"].to("cpu", torch.uint8))
    if "python" in rng:
        random.setstate(rng["python"])
    if "numpy" in rng:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda_states = rng.get("cuda")
    if cuda_states:
        if torch.cuda.is_available():
            n = min(len(cuda_states), torch.cuda.device_count())
            for i in range(n):
                torch.cuda.set_rng_state(cuda_states[i].to("cpu", torch.uint8), device=i)
        else:
            warnings.warn(
                "checkpoint holds CUDA RNG states but CUDA is not available; "
                "they were not restored",
                stacklevel=3,
            )
