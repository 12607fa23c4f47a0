"""reformer: the Reformer (Kitaev, Kaiser, Levskaya, ICLR 2020) for very long sequences.

LSH attention (with a strictly causal `window` mode), reversible residual layers and
chunked feed-forward layers and loss, in plain PyTorch.
"""

from .reproducible import pin_math_libraries

pin_math_libraries()  # before anything calls oneMKL (reproducible.py says why)

from .config import ReformerConfig  # noqa: E402
from .model import ReformerLM  # noqa: E402

__all__ = ["ReformerConfig", "ReformerLM"]
__version__ = "0.1.0"
