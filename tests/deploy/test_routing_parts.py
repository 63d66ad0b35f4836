"""The router's parts that need no Ray: the scale-keyed prefix tree, the routing hint the ingress computes
(the same tokens, scale and block hashes as the engine's prefix cache), the merged /metrics, and the
translation between ``clex-serve`` flags and the Ray application's arguments."""

import pytest

from clex_serve.deploy.local import _as_app_args, replica_flags
from clex_serve.deploy.metrics_merge import merge_metrics
from clex_serve.deploy.prefix_tree import ScaleKeyedPrefixTree, chained_block_hashes
from clex_serve.deploy.routing_hint import ModelView, routing_hint, scale_steps


def test_blocks_leave_one_prompt_token_to_compute_and_chain():
    assert chained_block_hashes(list(range(16)), 16) == []  # the last token must be computed
    two = chained_block_hashes(list(range(33)), 16)
    assert len(two) == 2
    assert chained_block_hashes(list(range(40)), 16) == two  # a longer prompt shares the same leading blocks
    changed = chained_block_hashes([99] + list(range(1, 33)), 16)
    assert changed[0] != two[0] and changed[1] != two[1]  # a block's hash covers every block before it


def test_a_prefix_counts_only_under_its_own_scale_bucket():
    tree = ScaleKeyedPrefixTree()
    blocks = chained_block_hashes(list(range(100)), 16)
    tree.insert((1, None), blocks[:4], "a")
    tree.insert((1, None), blocks, "b")
    match = tree.match((1, None), blocks, ["a", "b"])
    assert match.replicas == ("b",) and match.blocks == len(blocks)
    assert tree.match((1, None), blocks[:3], ["a", "b"]).replicas == ("a", "b")
    assert tree.match((1, None), blocks, ["a"]).blocks == 4  # among the candidates only
    assert tree.match((2, None), blocks, ["a", "b"]).blocks == 0  # the same tokens at another scale: nothing


def test_each_replica_keeps_its_most_recent_blocks_within_its_capacity_and_leaves_when_it_dies():
    clock = iter(range(1000))
    tree = ScaleKeyedPrefixTree(clock=lambda: next(clock))
    old = chained_block_hashes(list(range(0, 81)), 16)
    new = chained_block_hashes(list(range(500, 581)), 16)
    tree.insert((1, None), old, "a")
    tree.insert((1, None), new, "a")
    tree.set_capacity("a", 5)
    assert tree.blocks_held("a") == 5
    assert tree.match((1, None), new, ["a"]).blocks == 5 and tree.match((1, None), old, ["a"]).blocks == 0
    tree.insert((1, None), old, "b")
    tree.remove_replica("a")
    assert tree.match((1, None), new, ["a", "b"]).blocks == 0
    assert tree.match((1, None), old, ["a", "b"]).replicas == ("b",)


def test_scale_steps_follow_the_clex_schedule():
    def clex(length):
        return min(-(-length // 128), 16)

    steps = scale_steps(clex, 2048)
    assert steps[:3] == ((1, 1), (129, 2), (257, 3)) and steps[-1] == (1921, 16)
    view = _view(steps)
    assert [view.scale_for_length(n) for n in (1, 128, 129, 256, 257, 2048)] == [1, 1, 2, 2, 3, 16]
    assert scale_steps(lambda length: 1, 4096) == ((1, 1),)  # plain RoPE: one bucket


class _Tokenizer:
    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


def _view(steps=((1, 1), (129, 2)), log_scale=False) -> ModelView:
    return ModelView(_Tokenizer(), None, "llama", 16, 2048, 10_000, log_scale, steps)


def test_routing_hints_for_completions_carry_the_prompts_scale_and_blocks():
    view = _view()
    hint = routing_hint(view, "/v1/completions", b'{"prompt": "' + b"x" * 140 + b'"}')
    assert hint.num_prompt_tokens == 141 and hint.bucket == (2, None) and len(hint.block_hashes) == 140 // 16
    by_ids = routing_hint(view, "/v1/completions", b'{"prompt": [5, 6, 7]}')
    assert by_ids.bucket == (1, None) and by_ids.block_hashes == ()
    assert routing_hint(_view(log_scale=True), "/v1/completions", b'{"prompt": "abc"}').bucket == (1, 4)
    for path, body in [
        ("/v1/models", b"{}"),
        ("/v1/completions", b"{not json"),
        ("/v1/completions", b"[]"),
        ("/v1/completions", b'{"prompt": {"a": 1}}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}'),  # no chat template
        ("/v1/completions", b'{"prompt": "' + b"x" * 10_001 + b'"}'),  # longer than any context: refused there
    ]:
        assert routing_hint(view, path, body) is None


def test_merged_metrics_label_every_sample_with_its_replica_and_keep_families_whole():
    one = (
        '# HELP up Up\n# TYPE up gauge\nup 1.0\n# HELP req Requests\n# TYPE req counter\nreq_total{outcome="ok"} 3.0\n'
    )
    merged = merge_metrics([("r1", one), ("r2", one.replace("3.0", "4.0"))])
    assert merged.count("# TYPE up gauge") == 1
    lines = merged.splitlines()
    assert lines[2:4] == ['up{replica="r1"} 1.0', 'up{replica="r2"} 1.0']
    assert 'req_total{replica="r2",outcome="ok"} 4.0' in lines


def test_flags_travel_to_the_replicas_without_the_proxys_own():
    flags = ["--ray-replicas", "2", "--port=9000", "--host", "0.0.0.0", "--max-num-seqs", "8", "--no-log-scale"]
    kept = replica_flags(flags + ["--enable-prefix-caching"])
    assert kept == ["--max-num-seqs", "8", "--no-log-scale", "--enable-prefix-caching"]
    assert _as_app_args(kept) == {"max_num_seqs": "8", "log_scale": "false", "enable_prefix_caching": "true"}


def test_build_app_refuses_bad_arguments_on_the_driver():
    pytest.importorskip("ray.serve")
    from clex_serve.deploy.ray import _flags, build_app

    assert _flags({"max_num_seqs": 8, "enable_prefix_caching": "false", "log_scale": "false"}) == [
        "--max-num-seqs",
        "8",
        "--no-log-scale",
    ]
    with pytest.raises(ValueError, match="router must be one of"):
        build_app({"router": "random"})
    with pytest.raises(ValueError, match="invalid clex-serve flags"):
        build_app({"max_num_seqs": "0"})
