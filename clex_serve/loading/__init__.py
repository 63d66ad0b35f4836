"""Loading: where a checkpoint comes from (a folder or the hub), how its tensors land in the model, the
random weights of ``--load-format dummy``, and whether a tokenizer fits the model."""
