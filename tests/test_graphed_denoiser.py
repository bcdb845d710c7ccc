"""stages/lib/training/graphed_denoiser.py off CUDA: every call is the forward the model had, which comes back
after the block (the CUDA replays themselves: tests/test_gpu.py)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from stages.lib.training.graphed_denoiser import GraphedDenoiser, graphed_sampling


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, attention_head_dim=2,
    ).eval()  # fmt: skip


def test_cpu_calls_are_eager_and_the_forward_comes_back() -> None:
    unet = _unet()
    calls: list[int] = []
    plain = unet.forward

    def wrapped(*args, **kwargs):  # stands for an instance-level wrapper such as Accelerate's
        calls.append(1)
        return plain(*args, **kwargs)

    unet.forward = wrapped
    denoiser = GraphedDenoiser(unet)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor(10), torch.randn(2, 3, 8)
    with torch.no_grad():
        expected = plain(x, t, encoder_hidden_states=text, return_dict=False)[0]
        with graphed_sampling(unet, denoiser):
            assert unet.forward == denoiser.forward
            out = unet(x, t, encoder_hidden_states=text, return_dict=False)[0]
            as_output = unet(x, t, encoder_hidden_states=text).sample
    assert torch.equal(out, expected) and torch.equal(as_output, expected)
    assert len(calls) == 2, "both calls went to the forward the model had"
    assert not denoiser.graphs, "nothing is captured off CUDA"
    assert unet.forward is wrapped, "the instance-level wrapper is back"
    del unet.forward
    with graphed_sampling(unet, denoiser):
        pass
    assert "forward" not in unet.__dict__, "a model without a wrapper gets the class's forward back"
