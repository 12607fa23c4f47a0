"""Run-to-run reproducibility of the CPU math libraries, set before their first call.

PyTorch's CPU wheels multiply float32 matrices with Intel oneMKL, whose defaults let results
differ between fresh processes in the last bit: `MKL_DYNAMIC` lets it choose fewer threads than
asked for, and without conditional numerical reproducibility (CNR) it may pick code paths by
memory alignment and balance work between threads by timing. In training this was reported
as a logged loss 1-2 ulp off (2e-7 relative) in about one fresh process of 18, while the
weights stayed identical (a gradient change that small rounds away in the float32 update). With
`MKL_CBWR=AUTO` (CNR on the best code path for this CPU) and dynamic threads off, oneMKL
returns the same bits in every process with the same thread count. oneMKL reads MKL_CBWR at
its first computation, so setting it when `reformer` is imported is early enough; it reads
MKL_DYNAMIC when torch loads, and PyTorch turns dynamic threads off only inside
`torch.set_num_threads`, so that is called once with the current count. A value the user set
is kept (`MKL_DYNAMIC=TRUE` then leaves the thread count alone).
"""

from __future__ import annotations

import os

#: oneMKL settings for bit-identical results across processes (the user's own values win)
MKL_SETTINGS = {"MKL_CBWR": "AUTO", "MKL_DYNAMIC": "FALSE"}


def pin_math_libraries() -> None:
    """Set MKL_SETTINGS in the environment where the user has not set them, and turn
    oneMKL's dynamic threads off unless the user asked for them."""
    for key, value in MKL_SETTINGS.items():
        os.environ.setdefault(key, value)
    if os.environ["MKL_DYNAMIC"].strip().upper() in ("FALSE", "0", "NO"):
        import torch

        torch.set_num_threads(torch.get_num_threads())  # also mkl_set_dynamic(false)
