"""Scale on paper (train/scale.py): FSDP memory per GPU and GPU-hours, against hand counts."""

import pytest

from tutorial_lib.models.dit import dit_cost, preset
from tutorial_lib.train.scale import STATE_BYTES_PER_PARAM, fsdp_memory, gpu_hours


def test_states_are_sharded_and_activations_follow_the_tokens():
    cfg = preset("tiny-moe-mixer", text_dim=384)
    one, eight = fsdp_memory(cfg, 1, 4), fsdp_memory(cfg, 8, 4)
    assert one.states == STATE_BYTES_PER_PARAM * dit_cost(cfg).params
    assert eight.states == one.states / 8 and eight.gathered == one.gathered and eight.activations == one.activations
    # 2 bytes x B x D per token and block kept (1 mixer block on 16 tokens, 4 blocks), + 34 B n D for one block
    per_token = 2 * 4 * cfg.hidden_size
    assert one.activations == per_token * (16 + 4 * 16) + 17 * per_token * 16
    masked = fsdp_memory(cfg, 1, 4, mask_ratio=0.75)
    assert masked.activations == per_token * (16 + 4 * 4) + 17 * per_token * 16
    full = fsdp_memory(cfg, 1, 4, activation_checkpointing=False)
    assert full.activations == 17 * per_token * 16 * 5 > one.activations
    assert fsdp_memory(cfg, 1, 8).activations == 2 * one.activations


def test_gpu_hours_are_three_forward_passes_per_image_at_the_given_utilisation():
    assert gpu_hours(1e9, 3600, peak_flops=3e9, mfu=1.0) == pytest.approx(1.0)
    assert gpu_hours(1e9, 3600, peak_flops=3e9, mfu=0.5) == pytest.approx(2.0)


@pytest.mark.parametrize("kwargs, match", [(dict(world_size=0, batch_per_gpu=1), "world_size"),
                                           (dict(world_size=1, batch_per_gpu=0), "batch_per_gpu")])
def test_bad_sizes_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fsdp_memory(preset("tiny"), **kwargs)


def test_an_mfu_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="mfu"):
        gpu_hours(1e9, 1, 1e12, 40)
