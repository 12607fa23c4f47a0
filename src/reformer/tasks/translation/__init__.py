"""Translation (en->de): parallel text, a shared subword tokenizer, a seq2seq model, BLEU."""
