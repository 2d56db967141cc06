"""Image-text retrieval metrics (R@K, MedR, MeanR), and what a random scorer would get.

`evaluate_retrieval(model, test)` measures a trained contrastive model on a
(clean) test set; the rest works on features alone.

Protection is judged by how badly a CLIP model trained on protected data retrieves
on a clean test set, so these numbers are the headline result. Two details decide
whether they can be trusted:

Ties are pessimistic. A true item's rank is
    1 + #(items with strictly greater similarity) + #(other items with equal similarity),
so a collapsed model (constant or all-zero features) gets the worst rank, not rank 1.
Without this, a protection that makes the attacker collapse would look like a model
that retrieves perfectly.

For image->text an image may have several true captions; its rank is the rank of the
best-ranked of them among all captions. Equal similarities are broken against the true
side: every false caption that ties with the best true caption is counted ahead of it,
the other true captions are not (they are correct answers too). The best rank an image
with c captions can get is therefore n_texts - c + 1 at worst, which is also the
largest value the random-scorer distribution in `random_guess_level` can take.

Medians follow `torch.median`: for an even count it is the lower of the two middle
values (an actual rank, never x.5), and `random_guess_level` uses the same convention
for a distribution (the smallest r with P(rank <= r) >= 1/2).

The similarity matrix is never built whole: 10k images x 50k captions would be 2 GB.
It is computed in blocks, once by image rows and once by caption columns, so that each
true score is compared against values from the same matrix product (identical
features then give bit-identical similarities, and ties are seen as ties).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

import torch
import torch.nn.functional as F

from mmguard.attack.contrastive import ImageCaptionSet, model_input_pixels
from mmguard.errors import MMGuardError
from mmguard.models.contrastive import ContrastiveModel
from mmguard.models.training import batchnorm_statistics_of

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
# Images per batch when BatchNorm statistics are re-read on the test set: the
# attackers' training batch.
TEST_BATCHNORM_BATCH = 64

# Similarity values held in memory at once per block (64 MB as float32).
_BLOCK_ELEMENTS = 1 << 24


def _check_inputs(image_features: torch.Tensor, text_features: torch.Tensor,
                  text_to_image: torch.Tensor) -> None:
    if image_features.dim() != 2 or text_features.dim() != 2:
        raise MMGuardError(f"features must be 2-D (items x dim); got image "
                           f"{tuple(image_features.shape)} and text {tuple(text_features.shape)}")
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    if n_img == 0 or n_txt == 0:
        raise MMGuardError("retrieval needs at least one image and one caption")
    if image_features.shape[1] != text_features.shape[1]:
        raise MMGuardError(f"image features have dimension {image_features.shape[1]} but text "
                           f"features have {text_features.shape[1]}")
    if text_to_image.dim() != 1 or text_to_image.shape[0] != n_txt:
        raise MMGuardError(f"text_to_image must have one entry per caption ({n_txt}); got shape "
                           f"{tuple(text_to_image.shape)}")
    if text_to_image.dtype.is_floating_point or text_to_image.dtype == torch.bool:
        raise MMGuardError(f"text_to_image must hold integer image indices, not "
                           f"{text_to_image.dtype}")
    low, high = int(text_to_image.min()), int(text_to_image.max())
    if low < 0 or high >= n_img:
        raise MMGuardError(f"text_to_image refers to image {low if low < 0 else high}, but there "
                           f"are only {n_img} images (indices 0..{n_img - 1})")
    counts = torch.bincount(text_to_image.cpu().long(), minlength=n_img)
    missing = (counts == 0).nonzero().flatten()
    if missing.numel():
        raise MMGuardError(f"{missing.numel()} image(s) have no caption (first: index "
                           f"{int(missing[0])}); every test image needs at least one")
    for name, feats in (("image", image_features), ("text", text_features)):
        if not bool(torch.isfinite(feats).all()):
            raise MMGuardError(f"{name} features contain NaN or inf")


def retrieval_ranks(image_features: torch.Tensor, text_features: torch.Tensor,
                    text_to_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based ranks (i2t per image, t2i per caption) under cosine similarity, ties pessimistic.

    `text_to_image[j]` is the index of the image caption j describes; every image must
    have at least one caption. Returns two int64 CPU tensors of shape (N_img,), (N_txt,).
    """
    _check_inputs(image_features, text_features, text_to_image)
    # Half precision would create ties that full precision does not have.
    dtype = torch.promote_types(image_features.dtype, torch.float32)
    device = image_features.device
    img = F.normalize(image_features.detach().to(device, dtype), dim=1)
    txt = F.normalize(text_features.detach().to(device, dtype), dim=1)
    owner = text_to_image.to(device).long()
    n_img, n_txt = img.shape[0], txt.shape[0]
    captions = torch.arange(n_txt, device=device)

    # image -> text, by blocks of image rows (each row sees every caption).
    i2t = torch.empty(n_img, dtype=torch.long, device=device)
    rows = max(1, _BLOCK_ELEMENTS // n_txt)
    for start in range(0, n_img, rows):
        stop = min(start + rows, n_img)
        sims = img[start:stop] @ txt.T
        mine = (owner >= start) & (owner < stop)
        local, cols = owner[mine] - start, captions[mine]
        true_scores = sims[local, cols]
        best = torch.full((stop - start,), -math.inf, dtype=dtype, device=device)
        best = best.scatter_reduce(0, local, true_scores, reduce="amax")
        # True captions tied with the best one are correct answers, so they do not push it down.
        true_at_best = torch.zeros(stop - start, dtype=torch.long, device=device)
        true_at_best.index_add_(0, local, (true_scores >= best[local]).long())
        i2t[start:stop] = 1 + (sims >= best[:, None]).sum(dim=1) - true_at_best

    # text -> image, by blocks of caption columns (each column sees every image).
    t2i = torch.empty(n_txt, dtype=torch.long, device=device)
    cols_per_block = max(1, _BLOCK_ELEMENTS // n_img)
    for start in range(0, n_txt, cols_per_block):
        stop = min(start + cols_per_block, n_txt)
        sims = img @ txt[start:stop].T
        true_scores = sims[owner[start:stop], torch.arange(stop - start, device=device)]
        # Counts the true image itself once (the "1 +") and every other image tied or above.
        t2i[start:stop] = (sims >= true_scores[None, :]).sum(dim=0)

    return i2t.cpu(), t2i.cpu()


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise MMGuardError(f"recall cut-offs must be positive integers; got {ks!r}")
    return ks


def summarize_ranks(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """R@K in percent for each K, MedR (lower median, as torch.median) and MeanR."""
    ks = _check_ks(ks)
    ranks = ranks.flatten().long()
    if ranks.numel() == 0:
        raise MMGuardError("no ranks to summarize")
    out = {f"R@{k}": 100.0 * float((ranks <= k).double().mean()) for k in ks}
    out["MedR"] = float(ranks.median())
    out["MeanR"] = float(ranks.double().mean())
    return out


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image: torch.Tensor,
                      ks: Sequence[int] = DEFAULT_KS) -> dict:
    """{"i2t": {"R@1", ..., "MedR", "MeanR"}, "t2i": {...}, "n_images": N, "n_texts": M}.

    All values are plain Python numbers; R@K is in percent. See the module docstring
    for the tie rule and the median convention.
    """
    ks = _check_ks(ks)
    i2t, t2i = retrieval_ranks(image_features, text_features, text_to_image)
    return {"i2t": summarize_ranks(i2t, ks), "t2i": summarize_ranks(t2i, ks),
            "n_images": int(i2t.numel()), "n_texts": int(t2i.numel())}


def _p_best_rank_above(n: int, c: int, r: int) -> Fraction:
    """P(best of c true items ranks below r) when n items are ordered at random.

    Equal to C(n-c, r) / C(n, r): all of the top r are false ones. Written as the
    product prod_{t<c} (n-r-t)/(n-t), which stays small for large n.
    """
    if r >= n - c + 1:
        return Fraction(0)
    p = Fraction(1)
    for t in range(c):
        p *= Fraction(n - r - t, n - t)
    return p


def _lower_median_best_rank(n: int, counts: dict[int, int]) -> int:
    """Smallest r with P(best rank <= r) >= 1/2 for an image drawn at random, `counts`
    mapping c (true captions) -> how many images have c; the CDF is monotone, so bisect."""
    images = sum(counts.values())

    def at_most(r: int) -> Fraction:
        return sum((m * (1 - _p_best_rank_above(n, c, r)) for c, m in counts.items()),
                   Fraction(0)) / images

    low, high = 1, n - min(counts) + 1
    while low < high:
        mid = (low + high) // 2
        if at_most(mid) >= Fraction(1, 2):
            high = mid
        else:
            low = mid + 1
    return low


def random_guess_level(n_images: int, n_texts: int, captions_per_image: int | Sequence[int],
                       ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Expected metrics of a scorer that orders items uniformly at random (same keys as
    `retrieval_metrics`). A protected model near these numbers has learned nothing.

    image->text, c = captions_per_image true captions among n = n_texts:
        P(best rank <= K) = 1 - C(n-c, K) / C(n, K)
        MedR = smallest r with P(best rank <= r) >= 1/2  (lower median)
        MeanR = sum_{r>=0} P(best rank > r) = (n + 1) / (c + 1)
    With one count per image (images with different numbers of captions), R@K and
    MeanR are the means over the images, and MedR is the lower median of the rank of
    an image drawn at random.
    text->image, one true image among m = n_images, rank uniform on 1..m:
        R@K = min(K, m) / m,  MedR = ceil(m / 2) (lower median),  MeanR = (m + 1) / 2
    R@K is in percent; MedR is exact, not simulated.
    """
    ks = _check_ks(ks)
    per_image = ([captions_per_image] * n_images if isinstance(captions_per_image, int)
                 else list(captions_per_image))
    for name, value in (("n_images", n_images), ("n_texts", n_texts),
                        *(("captions_per_image", c) for c in per_image)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MMGuardError(f"{name} must be a positive integer; got {value!r}")
    n, m = n_texts, n_images
    if len(per_image) != m:
        raise MMGuardError(f"captions_per_image has {len(per_image)} counts for {m} images")
    if max(per_image) > n:
        raise MMGuardError(f"captions_per_image ({max(per_image)}) exceeds n_texts ({n})")
    # Images with the same count have the same distribution: compute each count once.
    counts = Counter(per_image)

    def mean_over_images(value) -> float:
        return float(sum(Fraction(images) * value(c) for c, images in counts.items()) / m)

    i2t = {f"R@{k}": 100.0 * mean_over_images(lambda c, k=k: 1 - _p_best_rank_above(n, c, k))
           for k in ks}
    i2t["MedR"] = float(_lower_median_best_rank(n, counts))
    i2t["MeanR"] = mean_over_images(lambda c: Fraction(n + 1, c + 1))
    t2i = {f"R@{k}": 100.0 * min(k, m) / m for k in ks}
    t2i["MedR"] = float((m + 1) // 2)
    t2i["MeanR"] = (m + 1) / 2
    return {"i2t": i2t, "t2i": t2i, "n_images": m, "n_texts": n}


def degradation(clean: dict, protected: dict) -> dict:
    """How much protection hurt retrieval, per direction.

    "R@K": 1 - protected/clean, a fraction (0.9 = 90% of clean recall is gone; negative
    if protection helped), None when clean recall is 0. "MedR_ratio": protected/clean
    median rank (> 1 is worse), None when clean MedR is 0.
    """
    out: dict = {}
    for direction in ("i2t", "t2i"):
        if direction not in clean or direction not in protected:
            raise MMGuardError(f"both results need an {direction!r} section")
        before, after = clean[direction], protected[direction]
        section: dict = {}
        for key, value in before.items():
            if not key.startswith("R@"):
                continue
            if key not in after:
                raise MMGuardError(f"protected {direction} results have no {key}")
            section[key] = None if value == 0 else 1.0 - after[key] / value
        section["MedR_ratio"] = None if before["MedR"] == 0 else after["MedR"] / before["MedR"]
        out[direction] = section
    return out


@torch.no_grad()
def evaluate_retrieval(model: ContrastiveModel, test: ImageCaptionSet,
                       batch_size: int = 256, test_batchnorm: bool = False) -> dict:
    """R@1/5/10, MedR and MeanR in both directions on a (clean) test set, and the
    random-guess level for it under "random".

    test_batchnorm: score with BatchNorm statistics re-estimated on the test images
    (in batches of `TEST_BATCHNORM_BATCH`), the model's own restored afterwards."""
    model.eval()
    device = model.device
    pixels = model_input_pixels(model, test.images)

    def encode(chunks) -> torch.Tensor:
        return torch.cat([model.encode_pixels(model.preprocess.normalize(chunk.to(device)))
                          for chunk in chunks])

    statistics = (batchnorm_statistics_of(model, lambda: encode(pixels.split(TEST_BATCHNORM_BATCH)))
                  if test_batchnorm else contextlib.nullcontext())
    with statistics:
        image_features = encode(pixels.split(batch_size))
    texts = [caption for captions in test.captions for caption in captions]
    owners = torch.tensor([i for i, captions in enumerate(test.captions) for _ in captions])
    text_features = torch.cat([model.encode_text(model.tokenize(texts[s:s + batch_size])
                                                 .to(device))
                               for s in range(0, len(texts), batch_size)])
    metrics = retrieval_metrics(image_features.cpu(), text_features.cpu(), owners)
    metrics["random"] = random_guess_level(len(test.images), len(texts),
                                           [len(captions) for captions in test.captions])
    return metrics
