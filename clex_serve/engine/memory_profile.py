"""Measure the GPU memory a step needs beyond weights and KV cache, before the KV pool takes the rest.

vLLM's profile run: the largest prefill the scheduler may send and the largest decode batch run once on
dummy tokens, and the allocator's peak is read. The KV pool is then sized to what remains under
``--gpu-memory-utilization``, so that a long prefill cannot run out of memory once the pool exists.
"""

from __future__ import annotations

import torch

from clex_serve.loading.loader import LoadedModel


def peak_step_memory(loaded: LoadedModel, block_size: int, attention_backend: str, max_prefill_tokens: int,
                     max_num_seqs: int) -> int:
    """Bytes of activation memory at the peak of (a) one prefill of ``max_prefill_tokens`` tokens and (b) one
    eager decode step of ``max_num_seqs`` sequences, added: decode graphs keep their own memory pool."""
    from clex_serve.engine.model_runner import ModelRunner, SequenceStep

    device = loaded.device
    decode_len = 2
    num_blocks = -(-max_prefill_tokens // block_size) + max_num_seqs * -(-decode_len // block_size)
    # A temporary pool for just these tokens; the runner is eager so that nothing is captured yet.
    runner = ModelRunner(loaded, num_blocks, block_size, attention_backend, max_num_seqs=max_num_seqs,
                         enforce_eager=True)
    prefill_blocks = list(range(-(-max_prefill_tokens // block_size)))
    decode_tables = [[len(prefill_blocks) + index] for index in range(max_num_seqs)]
    peaks = []
    for steps in (
        [SequenceStep([0] * max_prefill_tokens, 0, prefill_blocks,
                      scale=runner.rope.scale_for_length(max_prefill_tokens))],
        [SequenceStep([0], 1, table, scale=runner.rope.scale_for_length(2)) for table in decode_tables],
    ):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        logits = runner.execute(steps).last_logits
        # The sampler's working set: a softmax over every sequence's logits at once.
        torch.softmax(logits.expand(max_num_seqs, -1).contiguous(), dim=-1)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - before)
        del logits
    runner.release_kv_cache()
    del runner
    torch.cuda.empty_cache()
    return sum(peaks)
