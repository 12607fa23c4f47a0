"""Language models (tasks duplication, enwik8, text, images): the task interface over the
data sources (data.py) and the training recipe and evaluation (recipe.py)."""
