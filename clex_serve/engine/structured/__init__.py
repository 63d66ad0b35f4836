"""Structured outputs: grammars compiled from a request's ``StructuredOutputsParams`` (xgrammar), one matcher
per sequence advanced with each token it accepts, and the per-row token bitmask the sampler applies."""
