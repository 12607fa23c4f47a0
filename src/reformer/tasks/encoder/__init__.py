"""Encoder (bidirectional) models: masked-LM and classification heads, their data and recipes."""
