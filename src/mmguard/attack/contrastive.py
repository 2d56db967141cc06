"""The attacker for image-caption data: train a CLIP-style model (tested in `evaluate/`).

The recipe follows MEM's (Liu et al. 2024, section 4.1): AdamW, weight decay
0.2, linear warmup then cosine decay, temperature capped at 100. Recipes:

- scratch: every weight from random initialisation (MEM's main setting);
- finetune: start from the model's pretrained weights (`--pretrained`, or the
  packaged towers of `lit`), train all;
- projection: freeze both towers, train only the projection heads and the
  temperature (a linear-probe style attacker).

`test_batchnorm` makes any recipe score with BatchNorm statistics re-estimated on the
clean test images (AdaBN; `evaluate_retrieval`), an attacker's answer to noise that
moved the statistics its training accumulated.

Images are decoded once and kept at the model's input size (the
`ImagePreprocess` resize/crop, normalisation done per batch); an augmentation
spec, if given, is applied to each stored-resolution image before that, once
per epoch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from mmguard.attack.augment import AugmentPipeline
from mmguard.data.images import FloatImages, load_image_uint8
from mmguard.data.records import Dataset, Kind, PairRecord
from mmguard.data.release import per_caption_images
from mmguard.errors import MMGuardError
from mmguard.models.contrastive import ContrastiveModel, info_nce
from mmguard.models.registry import create_contrastive_model, pretrained_by_construction
from mmguard.models.training import Trainer, steps_per_run, train_epochs

RECIPES = ("scratch", "finetune", "projection")


@dataclass
class AttackerRecipe:
    model: str = "rn-tiny"
    recipe: str = "scratch"
    pretrained: str | None = None
    epochs: int = 30
    lr: float = 5e-4
    weight_decay: float = 0.2
    batch_size: int = 64
    warmup_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"
    augment: AugmentPipeline | None = None
    # Scored with BatchNorm statistics re-read on the clean test images (AdaBN): noise
    # shifts the statistics a fine-tuner's running ones learn, and this undoes that part.
    test_batchnorm: bool = False


@dataclass
class ImageCaptionSet:
    """Decoded images (at stored size) with their captions, for training or testing."""

    kind: ClassVar[Kind] = "pairs"
    images: Sequence[torch.Tensor]  # float in [0, 1]; loaded sets keep them as FloatImages
    captions: list[list[str]]
    keys: list[str] = field(default_factory=list)


def load_pairs(dataset: Dataset) -> ImageCaptionSet:
    if dataset.kind != "pairs":
        raise MMGuardError(f"{dataset.source} holds {dataset.kind}; retrieval evaluation needs "
                           "image-caption pairs")
    groups = dataset.records_by_image()
    images, captions = [], []
    for indices in groups.values():
        records = [dataset.records[i] for i in indices]
        assert all(isinstance(r, PairRecord) for r in records)
        images.append(load_image_uint8(records[0].image, records[0].where))
        captions.append([c for r in records for c in r.captions])
    return ImageCaptionSet(FloatImages(images), captions, list(groups))


def caption_rows(data: ImageCaptionSet, dataset: Dataset) -> ImageCaptionSet:
    """`data` one caption row at a time, as a release made per caption holds it.

    `data` is aligned with `dataset` image by image (`load_pairs` of it, or of a
    per-image release of it). Entry r is the dataset's r-th caption row, in the
    order and under the key `data.release.per_caption_images` gives it: the
    image of its row (the same stored tensor for every row of an image, not a copy)
    and the k-th caption `data` holds for that image, k counting the image's
    rows. Several entries then show one image, each with one caption.
    """
    groups = dataset.records_by_image()
    if len(groups) != len(data.images):
        raise MMGuardError(f"{len(data.images)} images do not match the {len(groups)} images "
                           f"of {dataset.source}")
    position = {key: index for index, key in enumerate(groups)}
    seen = [0] * len(groups)
    compact = isinstance(data.images, FloatImages)
    stored = data.images.stored if compact else data.images
    images, captions = [], []
    for record in dataset.records:
        index = position[record.image.key]
        for _ in record.texts():
            k = seen[index]
            if k >= len(data.captions[index]):
                raise MMGuardError(f"image {index} of the set has {len(data.captions[index])} "
                                   f"captions, {dataset.source} has more rows for it")
            images.append(stored[index])
            captions.append([data.captions[index][k]])
            seen[index] += 1
    if seen != [len(c) for c in data.captions]:
        raise MMGuardError(f"the set has more captions per image than {dataset.source} has rows")
    keys = [record.image.key for record in per_caption_images(dataset).records]
    return ImageCaptionSet(FloatImages(images) if compact else images, captions, keys)


def _build_model(recipe: AttackerRecipe) -> ContrastiveModel:
    if recipe.recipe not in RECIPES:
        raise MMGuardError(f"unknown recipe {recipe.recipe!r}; choose one of {', '.join(RECIPES)}")
    pretrained = pretrained_by_construction(recipe.model)
    if recipe.recipe == "scratch" and pretrained:
        raise MMGuardError(f"{recipe.model} is pretrained by construction; use --recipe "
                           "finetune or projection")
    if recipe.recipe == "finetune" and not (recipe.pretrained or pretrained):
        raise MMGuardError("--recipe finetune starts from pretrained weights: give --pretrained")
    torch.manual_seed(recipe.seed)
    model = create_contrastive_model(recipe.model, recipe.pretrained, recipe.device)
    if recipe.recipe == "projection":
        heads = {id(p) for p in model.head_parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in heads)
    return model


def train_attacker(train: ImageCaptionSet, recipe: AttackerRecipe, progress=None,
                   after_epoch=None) -> tuple[ContrastiveModel, list[float]]:
    """Train the attacker; returns the model and the mean loss of every epoch.

    `progress(epoch, mean_loss)` and `after_epoch(model, epoch)` run after every
    epoch (1-based); the latter may evaluate the model (the next epoch puts it
    back in training mode).
    """
    if len(train.images) < 2:
        raise MMGuardError("the training set needs at least two images")
    model = _build_model(recipe)
    device = torch.device(recipe.device)
    total = steps_per_run(len(train.images), recipe.batch_size, recipe.epochs)
    trainer = Trainer([p for p in model.parameters() if p.requires_grad], recipe.lr,
                      recipe.weight_decay, total, int(total * recipe.warmup_fraction))
    # One RNG draws both the epoch order and each image's caption, interleaved.
    rng = random.Random(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    pixels = None if recipe.augment else model_input_pixels(model, train.images)
    tokens = [model.tokenize(captions) for captions in train.captions]

    def augment(epoch: int) -> None:
        nonlocal pixels
        pixels = model_input_pixels(model, [recipe.augment(image, generator)
                                            for image in train.images])

    def batch_loss(batch: list[int]) -> torch.Tensor | None:
        if len(batch) < 2:  # InfoNCE needs a negative
            return None
        ids = torch.stack([tokens[i][rng.randrange(len(tokens[i]))] for i in batch])
        image_features = model.encode_pixels(model.preprocess.normalize(
            pixels[batch].to(device)))
        return info_nce(model.logits(image_features, model.encode_text(ids.to(device))))

    log = train_epochs(trainer, model, batch_loss, items=len(train.images),
                       batch_size=recipe.batch_size, epochs=recipe.epochs, shuffle=rng,
                       before_epoch=augment if recipe.augment else None,
                       progress=lambda epoch, loss: _after(epoch, loss, model, progress,
                                                           after_epoch))
    return model, log.epoch_losses


def _after(epoch: int, loss: float, model: ContrastiveModel, progress, after_epoch) -> None:
    if progress is not None:
        progress(epoch, loss)
    if after_epoch is not None:
        with torch.no_grad():
            after_epoch(model, epoch)


def model_input_pixels(model: ContrastiveModel, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Images at the model's input size in [0, 1] (normalisation happens per batch)."""
    with torch.no_grad():
        return torch.cat([model.preprocess.resize_crop(image[None]) for image in images])
