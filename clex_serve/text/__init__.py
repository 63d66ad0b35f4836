"""Text: tokenizers, incremental detokenization, chat templates and stop conditions."""
