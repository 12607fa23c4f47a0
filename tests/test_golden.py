"""Golden losses: a change that does not touch the maths must give the identical losses
under a fixed seed (torchtitan's rule). The values below were recorded before the
one-forward-path / one-training-engine redesign (issue 16) began, on this CPU with 2
threads; 1 and 2 threads agree to 1e-7 relative. If a change alters them on purpose (new
maths), re-record them in the same commit and say why.

    python -m pytest tests/test_golden.py -q
"""

import json
from pathlib import Path

from reformer.run_config import _merge, config_from_dict, preset_dict
from reformer.training import train
from test_translation_cli import write_corpus

LM_LOSSES = [
    4.875863552093506,
    4.8610053062438965,
    4.852175712585449,
    4.86957311630249,
    4.89070987701416,
    4.866842269897461,
    4.852504730224609,
    4.854280471801758,
    4.870663642883301,
    4.83613920211792,
    4.858442783355713,
    4.869925022125244,
    4.872347354888916,
    4.859670162200928,
    4.8964996337890625,
    4.909386157989502,
    4.879083633422852,
    4.8662285804748535,
    4.879258155822754,
    4.854197978973389,
    4.8545122146606445,
    4.909013271331787,
    4.866816997528076,
    4.8343353271484375,
    4.877840995788574,
    4.902029991149902,
    4.874767780303955,
    4.883788585662842,
    4.855238914489746,
    4.866181373596191,
]
MT_LOSSES = [
    5.2326046276643785,
    5.190320516370006,
    5.035117594401042,
    4.947164639559659,
    4.806480570042387,
    4.770616443879014,
    4.470896006662608,
    4.565869561557112,
    4.527910505022321,
    4.27664505807977,
]


def _losses(run: Path) -> list[float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    assert worst <= 1e-6, f"largest relative difference {worst:.2e}: {got}"


def test_lm_golden_losses(tmp_path):
    """30 steps of a small LSH language model (2 layers, 2 hashes, dropout 0.1)."""
    d = _merge(preset_dict("duplication-small"), dict(
        steps=30, log_every=1, eval_every=0, checkpoint_every=30, batch_size=4, seq_len=64,
        progress=False, out=str(tmp_path / "r"), eval_hashes=[],
        optim=dict(warmup_steps=5, lr=3e-3),
        model=dict(d_model=32, d_ff=64, n_heads=2, n_layers=2, max_seq_len=64, chunk_len=8,
                   n_hashes=2, dropout=0.1),
    ))  # fmt: skip
    train(config_from_dict(d))
    _close(_losses(tmp_path / "r"), LM_LOSSES)


def test_translation_golden_losses(tmp_path):
    """10 steps of a tiny reversible encoder-decoder on generated parallel text."""
    d = _merge(preset_dict("multi30k-small"), dict(
        steps=10, log_every=1, eval_every=0, checkpoint_every=10, progress=False,
        data=str(write_corpus(tmp_path)), out=str(tmp_path / "r"),
        optim=dict(warmup_steps=3, lr=3e-3),
        model=dict(d_model=32, d_ff=64, n_heads=2, n_layers=1),
        translation=dict(n_enc_layers=1, vocab_size=60, max_tokens=256),
    ))  # fmt: skip
    train(config_from_dict(d))
    _close(_losses(tmp_path / "r"), MT_LOSSES)
