"""`reformer train | eval | plot | generate | translate | predict | convert | plan`: the CLI.

One module per verb, each with its `cmd_VERB(argv) -> exit status`; the flags of each are
generated from its typed dataclass by tyro (`reformer VERB --help`), so there is no second
list of options to keep in sync. `main` dispatches and maps errors to exit statuses:
2 a user mistake, 3 a diverged run, 4 a failed write, 128 + N a stop by signal N.
"""

from __future__ import annotations

import signal
import sys

from ..checkpoint import CheckpointError
from ..files import is_write_error, write_error_message
from ..training import RunStopped, RunWriteFailed, TrainingDiverged
from ..training.interrupt import exit_code
from .convert import cmd_convert
from .eval import cmd_eval
from .generate import cmd_generate
from .plan import cmd_plan
from .plot import cmd_plot
from .predict import cmd_predict
from .train import cmd_train
from .translate import cmd_translate

USAGE = """usage: reformer {train,eval,plot,generate,translate,predict,convert,plan} ...

Train and run Reformer models (LSH attention, reversible layers, chunked feed-forward).

verbs:
  train     train a model from a preset, a config file and flags; resumable
  eval      evaluate a checkpoint, optionally over several numbers of hash rounds
  plot      draw a run's learning curves (PNG)
  generate  sample text (or an image) from a checkpoint with the cached decoder
  translate translate text (stdin or a file) with a translation run's checkpoint
  predict   classify texts (stdin or a file) with a classify or listops run's checkpoint
  convert   import a transformers Reformer directory as a run, or export a run to one
  plan      predict a training step's peak memory by component; the longest length that fits

`reformer VERB --help` lists a verb's options. Examples:
  reformer train --preset duplication-small --out runs/dup
  reformer eval --checkpoint runs/dup --n-hashes 1 2 4 8
  reformer plot runs/dup
  reformer train --preset multi30k-small --data ../shared/data/translation/multi30k --out runs/mt
  echo "A man rides a bike." | reformer translate --checkpoint runs/mt
  reformer train --preset listops-small --out runs/listops
  echo "[MAX 2 9 [MIN 4 7 ] 0 ]" | reformer predict --checkpoint runs/listops
  torchrun --nproc-per-node 2 -m reformer train --preset duplication-small --out runs/dup2
  reformer convert --from-transformers path/to/reformer-enwik8 --out runs/enwik8-hf
  reformer convert --to-transformers runs/dup --out exported/dup
  reformer plan --preset enwik8-small --length 65536 --budget 20GiB
"""

VERBS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "plot": cmd_plot,
    "generate": cmd_generate,
    "translate": cmd_translate,
    "predict": cmd_predict,
    "convert": cmd_convert,
    "plan": cmd_plan,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"reformer: unknown verb {verb!r}; choose from {', '.join(VERBS)}\n", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    try:
        return VERBS[verb](rest)
    except RunStopped as e:
        if e.rank == 0:
            print(f"reformer {verb}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt as e:  # Ctrl-C outside a training loop (or a third signal)
        print(f"reformer {verb}: interrupted", file=sys.stderr, flush=True)
        return exit_code(getattr(e, "signum", signal.SIGINT))
    except TrainingDiverged as e:
        print(f"reformer {verb}: {e}", file=sys.stderr)
        return 3
    except RunWriteFailed as e:
        print(f"reformer {verb}: error: {e}", file=sys.stderr)
        return 4
    except (ValueError, TypeError, FileNotFoundError, CheckpointError) as e:
        print(f"reformer {verb}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not is_write_error(e):
            raise
        print(f"reformer {verb}: error: {write_error_message(e)}", file=sys.stderr)
        return 4
