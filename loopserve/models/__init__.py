"""Model definitions and their on-disk formats: the annotator and reward model (MiniLM encoder plus a
head) and the generator (a causal LM). Everything loads through safetensors, never pickle."""
