"""A few CLEX training steps on a tiny model: the loss falls, the ODE learns, and resuming is exact."""

import pytest
import torch

from clex_serve.train.data import WindowSampler
from clex_serve.train.model import ModelShape, build_model, rotary_of
from clex_serve.train.trainer import Batch, TrainConfig, Trainer

SHAPE = ModelShape(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, base_len=16)


def _stream() -> torch.Tensor:
    # A learnable pattern: counting modulo 61, so the next token follows from the current one.
    return (torch.arange(16 * 64) % 61 + 3).to(torch.int32)


def _trainer(path, steps=40, use_clex=True):
    torch.set_num_threads(1)
    sampler = WindowSampler(_stream(), SHAPE.base_len, 8, seed=0)

    def batches(step):
        ids = sampler.batch(step)
        return [Batch(ids, ids, clex_sampling=True)]

    config = TrainConfig(
        steps=steps, learning_rate=1e-2, warmup_steps=2, max_factor=4, checkpoint_every=3, ode_lr_ratio=0.1
    )
    return Trainer(
        build_model(SHAPE, use_clex, seed=0),
        config,
        batches,
        path / "ck.pt",
        use_clex,
        SHAPE.base_len,
        log=lambda line: None,
    )


@pytest.mark.parametrize("use_clex", [True, False])
def test_loss_falls(tmp_path, use_clex):
    trainer = _trainer(tmp_path, use_clex=use_clex)
    losses = [trainer.train_step()[0] for _ in range(40)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_clex_draws_scales_and_trains_the_ode(tmp_path):
    trainer = _trainer(tmp_path)
    ode = rotary_of(trainer.model).proj_func
    assert torch.count_nonzero(ode.ode_down_proj) == 0  # the official init: pure NTK scaling
    scales = [trainer.train_step()[1][0] for _ in range(12)]
    assert set(scales) > {1}, "scales are drawn from 1..max_factor"
    assert torch.count_nonzero(ode.ode_down_proj) > 0, "the ODE receives gradients through torchdiffeq"


def test_resume_continues_identically(tmp_path):
    straight = _trainer(tmp_path / "a", steps=6)
    straight.run()
    first = _trainer(tmp_path / "b", steps=6)
    for _ in range(3):
        first.train_step()
    first.save_checkpoint()
    resumed = _trainer(tmp_path / "b", steps=6)  # fresh process state: new model, optimizer and generator
    resumed.run()
    assert resumed.step == 6
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_config_validation():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="ode_lr_ratio"):
        TrainConfig(steps=1, ode_lr_ratio=0)
    with pytest.raises(ValueError, match="multiple"):
        ModelShape(hidden_size=30, num_heads=4)
