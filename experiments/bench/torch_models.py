"""The PyTorch side of `experiments.bench.vs_pytorch`: mirrors of jtl's MLP, cnn_small, ResNet-18 and
ViT-tiny, layer for layer (parameter counts and logits are checked against jtl there), their train
step (`TorchSide`), and their weights as jtl variables (`jtl_variables_from_torch`).

torch is passed in, not imported here, so that this module imports without the `bench` extra.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

NUM_CLASSES = 10
LR, WEIGHT_DECAY, TOTAL_STEPS = 1e-3, 1e-4, 10_000  # AdamW and cosine schedule, both sides


def torch_models(torch) -> dict[str, Callable[..., Any]]:
  """PyTorch mirrors of jtl's models (torchvision / timm parameter names where jtl maps them)."""
  nn, F = torch.nn, torch.nn.functional

  class MLP(nn.Module):  # jtl.models.small.MLP + head: dense0, dense1 (256, relu), head
    def __init__(self, in_features: int, hidden=(256, 256)):
      super().__init__()
      widths = (in_features, *hidden)
      self.dense = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
      self.head = nn.Linear(widths[-1], NUM_CLASSES)

    def forward(self, x):
      x = x.flatten(1)
      for layer in self.dense:
        x = F.relu(layer(x))
      return self.head(x)

  class ConvBNReLU(nn.Module):  # 3x3 conv (no bias) -> BN (eps 1e-5, momentum 0.1) -> relu
    def __init__(self, cin: int, cout: int):
      super().__init__()
      self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
      self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
      return F.relu(self.bn(self.conv(x)))

  class SmallCNN(nn.Module):  # jtl.models.small.SmallCNN: stages, 2x2 max-pool between, GAP, head
    def __init__(self, widths=(32, 64, 128)):
      super().__init__()
      self.stages = nn.ModuleList(ConvBNReLU(a, b) for a, b in zip((3, *widths), widths))
      self.head = nn.Linear(widths[-1], NUM_CLASSES)

    def forward(self, x):
      for i, stage in enumerate(self.stages):
        if i > 0 and min(x.shape[2:]) >= 2:
          x = F.max_pool2d(x, 2)
        x = stage(x)
      return self.head(x.mean(dim=(2, 3)))

  class BasicBlock(nn.Module):  # torchvision BasicBlock = jtl ResidualBlock(bottleneck=False)
    def __init__(self, cin: int, cout: int, stride: int):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.downsample = None
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                        nn.BatchNorm2d(cout))

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return F.relu((x if self.downsample is None else self.downsample(x)) + y)

  class ResNet18(nn.Module):  # torchvision resnet18 = jtl resnet18 (7x7/2 stem, 3x3/2 max-pool)
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      cin = 64
      for i, width in enumerate((64, 128, 256, 512), start=1):
        blocks = [BasicBlock(cin, width, 1 if i == 1 else 2), BasicBlock(width, width, 1)]
        setattr(self, f"layer{i}", nn.Sequential(*blocks))
        cin = width
      self.fc = nn.Linear(512, NUM_CLASSES)

    def forward(self, x):
      x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return self.fc(x.mean(dim=(2, 3)))

  class Attention(nn.Module):  # timm: fused qkv (= jtl's query/key/value), SDPA, proj (= out)
    def __init__(self, width: int, heads: int):
      super().__init__()
      self.heads = heads
      self.qkv = nn.Linear(width, 3 * width)
      self.proj = nn.Linear(width, width)

    def forward(self, x):
      b, n, d = x.shape
      q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
      y = F.scaled_dot_product_attention(q, k, v)
      return self.proj(y.transpose(1, 2).reshape(b, n, d))

  class Mlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int):
      super().__init__()
      self.fc1, self.fc2 = nn.Linear(width, mlp_dim), nn.Linear(mlp_dim, width)

    def forward(self, x):
      return self.fc2(F.gelu(self.fc1(x)))  # exact GELU, as jtl

  class Block(nn.Module):  # pre-LN, LayerNorm eps 1e-6 as jtl
    def __init__(self, width: int, heads: int, mlp_dim: int):
      super().__init__()
      self.norm1 = nn.LayerNorm(width, eps=1e-6)
      self.attn = Attention(width, heads)
      self.norm2 = nn.LayerNorm(width, eps=1e-6)
      self.mlp = Mlp(width, mlp_dim)

    def forward(self, x):
      x = x + self.attn(self.norm1(x))
      return x + self.mlp(self.norm2(x))

  class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
      super().__init__()
      self.proj = nn.Conv2d(3, width, patch, patch)

    def forward(self, x):
      return self.proj(x).flatten(2).transpose(1, 2)

  class ViT(nn.Module):  # timm VisionTransformer (class token) = jtl ViT(pool='cls')
    def __init__(self, image_size: int, patch: int, width=192, depth=12, heads=3, mlp_dim=768):
      super().__init__()
      self.patch_embed = PatchEmbed(patch, width)
      self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
      self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image_size // patch) ** 2 + 1, width))
      self.blocks = nn.Sequential(*(Block(width, heads, mlp_dim) for _ in range(depth)))
      self.norm = nn.LayerNorm(width, eps=1e-6)
      self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, x):
      x = self.patch_embed(x)
      x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
      return self.head(self.norm(self.blocks(x))[:, 0])

  return {
      "mlp": lambda image_size, vit_patch: MLP(3 * image_size * image_size),
      "cnn": lambda image_size, vit_patch: SmallCNN(),
      "resnet18": lambda image_size, vit_patch: ResNet18(),
      "vit": lambda image_size, vit_patch: ViT(image_size, vit_patch),
  }


def decayed(name: str, param) -> bool:
  """jtl decays `kernel` leaves only: conv/linear weights, not biases, norms, tokens, pos_embed."""
  return param.ndim >= 2 and not name.endswith(("cls_token", "pos_embed"))


class TorchSide:
  """The same step in PyTorch: forward, CE loss, backward, accuracy, grad norm, AdamW, schedule."""

  def __init__(self, torch, name: str, batch_np: dict[str, np.ndarray], vit_patch: int = 4,
               compiled: bool = False):
    self.torch = torch
    torch.manual_seed(0)
    image_size = batch_np["image"].shape[1]
    self.model = torch_models(torch)[name](image_size, vit_patch)
    self.model.train()
    self.forward = torch.compile(self.model) if compiled else self.model
    self.images = torch.from_numpy(np.ascontiguousarray(batch_np["image"].transpose(0, 3, 1, 2)))
    self.labels = torch.from_numpy(batch_np["label"].astype(np.int64))
    named = list(self.model.named_parameters())
    self.params = [p for _, p in named]
    groups = [{"params": [p for n, p in named if decayed(n, p)], "weight_decay": WEIGHT_DECAY},
              {"params": [p for n, p in named if not decayed(n, p)], "weight_decay": 0.0}]
    try:  # the fused (single-kernel) AdamW runs on CPU since torch 2.4
      self.opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8, fused=True)
      self.fused = True
    except (RuntimeError, TypeError, ValueError):
      self.opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8)
      self.fused = False
    self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=TOTAL_STEPS)
    self.num_params = sum(p.numel() for p in self.params)

  def one_step(self) -> dict:
    torch = self.torch
    self.opt.zero_grad(set_to_none=True)
    logits = self.forward(self.images)
    loss = torch.nn.functional.cross_entropy(logits, self.labels)
    loss.backward()
    accuracy = (logits.detach().argmax(-1) == self.labels).float().mean()
    grad_norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in self.params]))
    self.opt.step()
    self.sched.step()
    return {"loss": loss.detach(), "accuracy": accuracy, "grad_norm": grad_norm}

  def compile(self) -> float:
    """Runs the first step (torch.compile compiles here); returns its seconds."""
    start = time.perf_counter()
    self.one_step()
    return time.perf_counter() - start

  def run(self, n: int) -> dict:
    metrics = None
    for _ in range(n):
      metrics = self.one_step()
    return metrics  # CPU eager and compiled kernels are synchronous

  def logits(self) -> np.ndarray:
    self.model.eval()
    with self.torch.no_grad():
      out = self.model(self.images).numpy()
    self.model.train()
    return out


def jtl_variables_from_torch(torch, name: str, module, abstract_variables: dict) -> dict:
  """The torch module's weights as jtl variables (params + batch_stats)."""
  from jtl import pretrained  # noqa: PLC0415
  state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
  if name in ("resnet18", "vit"):  # torchvision / timm names: jtl's own loader maps them
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, f"{name}.pth")
      torch.save(module.state_dict(), path)
      loaded, report = pretrained.load_pretrained(path, abstract_variables=abstract_variables)
    if report["missing"] or report["mismatched"]:
      raise RuntimeError(f"{name}: torch -> jtl mapping incomplete: {report}")
    return {"params": loaded["params"], **loaded["model_state"]}
  params: dict[str, Any] = {"backbone": {}, "head": {"kernel": state["head.weight"].T,
                                                       "bias": state["head.bias"]}}
  stats: dict[str, Any] = {"backbone": {}}
  if name == "mlp":
    for i in range(len(module.dense)):
      w = state[f"dense.{i}.weight"]
      if i == 0:  # torch flattens (C, H, W), jtl (H, W, C)
        c = 3
        side = int(round((w.shape[1] // c) ** 0.5))
        w = w.reshape(-1, c, side, side).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
      params["backbone"][f"dense{i}"] = {"kernel": w.T, "bias": state[f"dense.{i}.bias"]}
    return {"params": params}
  for i in range(len(module.stages)):  # cnn
    p = f"stages.{i}."
    params["backbone"][f"stage{i + 1}"] = {
        "conv": {"kernel": state[p + "conv.weight"].transpose(2, 3, 1, 0)},
        "bn": {"scale": state[p + "bn.weight"], "bias": state[p + "bn.bias"]}}
    stats["backbone"][f"stage{i + 1}"] = {"bn": {"mean": state[p + "bn.running_mean"],
                                                 "var": state[p + "bn.running_var"]}}
  return {"params": params, "batch_stats": stats}
