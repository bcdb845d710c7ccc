"""A colour-preserving VAE for the embedded default: diffusers' AutoencoderKL with hand-set weights.

A randomly initialised VAE decodes any latent into coloured noise, and training one would cost the 2-core budget.
This one is the tiny default's AutoencoderKL (three blocks, four latent channels) with weights set so that

- the encoder averages each 4x4 patch and writes its R, G, B and luminance, minus the miniature world's mean
  colour ``PIXEL_MEAN``, as the four latent channels (``LATENT_GAIN`` per unit of [-1, 1] pixel value, so that
  ``latents * scaling_factor`` is centred with a standard deviation near 1 on typical images);
- the decoder upsamples the R, G, B latents back to pixels (nearest neighbour plus a [1 2 1] smoothing per
  upsampler, i.e. close to bilinear).

So ``decode(encode(x))`` is a 16 x 16 colour thumbnail of a 64 x 64 image, smoothly enlarged: layout and colour
survive exactly, fine detail does not. Residual branches and attention outputs are zero (identity blocks). The
GroupNorms that SD's blocks end with would normalise each image; every signal channel therefore shares its
GroupNorm group with its negative and with a large constant pair, which makes the group's mean zero and its
variance an image-independent constant (to ~1e-4), and SiLU is kept in its linear range by a bias.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

NORM_GROUPS = 8
LATENT_GAIN = 11.0  # latent units per pixel unit
CONSTANT = 64.0  # the constant pair sharing each signal's GroupNorm group
SILU_BIAS = 10.0  # SiLU(10 + y) ~ 10 + y for |y| << 10
LOGVAR = -12.0  # posterior std exp(-6) latent units: sampling barely perturbs the latents
SMOOTH = torch.tensor([1.0, 2.0, 1.0])
SIGNALS = 4  # R, G, B, luminance
PIXEL_MEAN = (-0.03, -0.12, -0.34, -0.16)  # of the world's images, in [-1, 1] units


def _centre(weight: torch.Tensor, out: int, inp: int, value: float) -> None:
    weight[out, inp, weight.shape[2] // 2, weight.shape[3] // 2] = value


def colour_preserving_weights(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The state dict described in the module docstring for a 3-block, 4-latent AutoencoderKL with 8 groups."""
    cfg = vae.config
    enc_group = cfg.block_out_channels[-1] // cfg.norm_num_groups
    dec_group = cfg.block_out_channels[0] // cfg.norm_num_groups
    if cfg.latent_channels != SIGNALS or cfg.in_channels != 3 or enc_group < 4 or dec_group < 4:
        raise ValueError(
            "the colour-preserving tiny VAE needs 3 image channels, 4 latent channels and at least 4 channels per "
            f"GroupNorm group (got {cfg.block_out_channels} channels, {cfg.norm_num_groups} groups)"
        )
    if SIGNALS * enc_group > cfg.block_out_channels[0]:
        raise ValueError(
            f"vae channels {cfg.block_out_channels}: the first block needs {SIGNALS * enc_group}"
        )
    sd = {k: torch.zeros_like(v) for k, v in vae.state_dict().items()}
    smooth = torch.outer(SMOOTH, SMOOTH) / 16
    for key, value in sd.items():
        if key.endswith(("norm1.weight", "norm2.weight", "group_norm.weight")):
            value.fill_(1.0)  # inside zeroed residual branches: any finite value
        elif key.endswith("conv_shortcut.weight"):
            for c in range(min(value.shape[:2])):
                value[c, c] = 1.0
        elif "downsamplers" in key and key.endswith("weight"):
            for c in range(value.shape[0]):
                value[c, c, :2, :2] = 0.25  # stride 2 on a (0, 1, 0, 1)-padded input: a 2x2 average
        elif "upsamplers" in key and key.endswith("weight"):
            for c in range(value.shape[0]):
                value[c, c] = smooth
    # encoder: group k holds (x_k, -x_k, C, -C, 0...) for x = R, G, B, luminance
    weight, bias = sd["encoder.conv_in.weight"], sd["encoder.conv_in.bias"]
    for k in range(SIGNALS):
        first = k * enc_group
        for sign, channel in ((1.0, first), (-1.0, first + 1)):
            for c in range(3):
                if k == 3 or c == k:
                    _centre(weight, channel, c, sign / 3 if k == 3 else sign)
        bias[first + 2], bias[first + 3] = CONSTANT, -CONSTANT
    # normalised x_k = x_k / sqrt((mean x^2 + C^2) * 2 / enc_group) ~ x_k * sqrt(enc_group / 2) / C
    enc_norm = (enc_group / 2) ** 0.5 / CONSTANT
    sd["encoder.conv_norm_out.weight"].fill_(1.0)
    sd["encoder.conv_norm_out.bias"].fill_(SILU_BIAS)
    weight, bias = sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"]
    for k in range(SIGNALS):
        gain = LATENT_GAIN / (2 * enc_norm)  # (SiLU(10 + y) - SiLU(10 - y)) ~ 2y
        _centre(weight, k, k * enc_group, gain)
        _centre(weight, k, k * enc_group + 1, -gain)
        bias[k] = -LATENT_GAIN * PIXEL_MEAN[k]
        bias[SIGNALS + k] = LOGVAR
    for key in ("quant_conv.weight", "post_quant_conv.weight"):
        for c in range(sd[key].shape[0]):
            sd[key][c, c] = 1.0
    # decoder: group k of the last block holds (z_k, -z_k, C, -C) for z = R, G, B; the constants are the
    # bias of that block's residual branch, added after the upsamplers (which would blur them at the border)
    weight, bias = sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"]
    for k in range(3):
        _centre(weight, k * dec_group, k, 1.0 / LATENT_GAIN)
        _centre(weight, k * dec_group + 1, k, -1.0 / LATENT_GAIN)
        bias[k * dec_group], bias[k * dec_group + 1] = PIXEL_MEAN[k], -PIXEL_MEAN[k]
    last = f"decoder.up_blocks.{len(cfg.block_out_channels) - 1}.resnets.0.conv2.bias"
    for k in range(3):
        sd[last][k * dec_group + 2], sd[last][k * dec_group + 3] = CONSTANT, -CONSTANT
    dec_norm = (dec_group / 2) ** 0.5 / CONSTANT
    sd["decoder.conv_norm_out.weight"].fill_(1.0)
    sd["decoder.conv_norm_out.bias"].fill_(SILU_BIAS)
    weight = sd["decoder.conv_out.weight"]
    for k in range(3):
        _centre(weight, k, k * dec_group, 1 / (2 * dec_norm))
        _centre(weight, k, k * dec_group + 1, -1 / (2 * dec_norm))
    return sd


def make_colour_preserving(vae: AutoencoderKL) -> AutoencoderKL:
    """Overwrite ``vae``'s weights in place (see the module docstring) and return it."""
    vae.load_state_dict(colour_preserving_weights(vae))
    return vae
