"""Train the small CLEX demo model that ships with clex-serve, and measure its length extrapolation.

Stages (``python -m clex_serve.train.build_default_model`` runs them all, from scratch):

- ``corpus``: the source of the running Python's standard library, a fixed selection with a held-out split;
- ``tokenizer``: a byte-level BPE trained on the training split, saved in Hugging Face format;
- ``pretrain``: causal-LM pretraining of a small Llama with plain RoPE, then CLEX continued pretraining of it
  (``trainer`` runs the loop, ``positions`` and ``clex_rotary`` implement CLEX's training procedure);
- ``sft``: a short chat fine-tune on question/answer pairs made from stdlib docstrings (``instructions``);
- ``export``: the Hugging Face folder that ``clex_serve.loading.loader.load_model`` reads;
- ``evaluate``: held-out perplexity at 1x..16x the training length, computed with the engine.
"""
