"""transformers' ViT and ViTMAE as PyTorch references: random weights, the official key names of
their params, and state dicts in the official layout that `params_from_torch` converts.

`ViTClassifier` is the official models_vit.py classifier (a timm ViT with global pooling +
fc_norm, or the cls token after the final norm) around transformers' ViTModel, with linear
probing's BatchNorm head as an option."""

import re

import torch
import transformers

from mae_jax import convert

# The models here are tiny: torch's intra-op threads only wait on each other, 100x slower than
# one thread on a busy 2-core machine (measured: 2 s against 0.02 s for a backward pass).
torch.set_num_threads(1)


def official_name(name: str) -> str:
  """The official key of a transformers param (mae_jax.convert's mapping); q/k/v projections
  give `attn.qkv`, the one official param they are thirds of."""
  for pattern, repl in convert._HF_TO_OFFICIAL:  # pylint: disable=protected-access
    name = re.sub(pattern, repl, name)
  m = convert._HF_QKV.match(name)  # pylint: disable=protected-access
  return f"{m.group(1)}.attn.qkv.{m.group(4)}" if m else name


def official_state_dict(model: torch.nn.Module) -> dict:
  """The model's state dict under the official keys (q/k/v joined), as numpy arrays that may
  share the model's memory."""
  return convert.official_from_transformers(model.state_dict())


def randomize(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> None:
  """Random values in every trainable param (biases and norms too): std-normal noise, around 1
  for LayerNorm scales. Fixed tables (no gradient) are left as they are."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not p.requires_grad:
        continue
      is_scale = re.search(r"norm[^.]*\.weight$", name) is not None
      p.copy_(std * torch.randn(p.shape, generator=gen) + (1.0 if is_scale else 0.0))


def vitmae(img, patch, width, depth, heads, dwidth, ddepth, dheads, norm_pix, seed=1):
  """transformers' ViTMAEForPreTraining of that shape with `randomize`d weights."""
  config = transformers.ViTMAEConfig(
      hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
      intermediate_size=4 * width, image_size=img, patch_size=patch, num_channels=3,
      decoder_hidden_size=dwidth, decoder_num_hidden_layers=ddepth,
      decoder_num_attention_heads=dheads, decoder_intermediate_size=4 * dwidth,
      layer_norm_eps=1e-6, hidden_act="gelu", norm_pix_loss=norm_pix, mask_ratio=0.75,
      attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.ViTMAEForPreTraining(config).eval()
  # transformers 5 can leave the fixed sin-cos tables at zero on a fresh model; fill them with
  # its own table code (independent of ours), before randomizing every trainable weight.
  model.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
  model.vit.embeddings.initialize_weights()
  model.decoder.initialize_weights(model.vit.embeddings.patch_embeddings.num_patches)
  assert model.vit.embeddings.position_embeddings.abs().sum() > 0
  randomize(model, seed)
  return model


class ViTClassifier(torch.nn.Module):
  """models_vit.VisionTransformer on transformers' ViTModel: `global_pool` averages the patch
  tokens before the final norm and applies `fc_norm` (the final norm unused, as the official
  code deletes it); otherwise the cls token after the final norm. `head_batchnorm` puts
  main_linprobe.py's BatchNorm1d(affine=False, eps=1e-6) before the Linear head."""

  def __init__(self, img, patch, width, depth, heads, num_classes, *, global_pool,
               head_batchnorm=False):
    super().__init__()
    config = transformers.ViTConfig(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=4 * width, image_size=img, patch_size=patch, num_channels=3,
        layer_norm_eps=1e-6, hidden_act="gelu", attn_implementation="eager")
    self.vit = transformers.ViTModel(config, add_pooling_layer=False)
    self.global_pool = global_pool
    if global_pool:
      self.fc_norm = torch.nn.LayerNorm(width, eps=1e-6)
      self.vit.layernorm.requires_grad_(False)
    linear = torch.nn.Linear(width, num_classes)
    self.head = (torch.nn.Sequential(torch.nn.BatchNorm1d(width, affine=False, eps=1e-6), linear)
                 if head_batchnorm else linear)

  def features(self, pixels_nchw: torch.Tensor) -> torch.Tensor:
    out = self.vit(pixel_values=pixels_nchw, output_hidden_states=self.global_pool)
    if self.global_pool:
      return self.fc_norm(out.hidden_states[-1][:, 1:].mean(dim=1))
    return out.last_hidden_state[:, 0]

  def forward(self, pixels_nchw: torch.Tensor) -> torch.Tensor:
    return self.head(self.features(pixels_nchw))
