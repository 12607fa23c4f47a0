"""reformer: the Reformer (Kitaev, Kaiser, Levskaya, ICLR 2020) for very long sequences.

LSH attention (with a strictly causal `window` mode), reversible residual layers and
chunked feed-forward layers and loss, in plain PyTorch.
"""

from .config import ReformerConfig
from .model import ReformerLM

__all__ = ["ReformerConfig", "ReformerLM"]
__version__ = "0.1.0"
