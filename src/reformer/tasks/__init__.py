"""The tasks, each a package with its recipe (what it brings to `training.Trainer`), its
data and its model pieces: `lm` (language models: duplication, enwik8, text, images),
`encoder` (mlm, classify, listops) and `translation`. `training.RECIPES` names each
task's recipe; the `reformer` command (`cli/`) sits above them."""
