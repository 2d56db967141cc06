import math

import pytest
import torch
import torch.nn.functional as F

from mmguard.errors import MMGuardError
from mmguard.evaluate import retrieval
from mmguard.evaluate.retrieval import (
    degradation,
    evaluate_retrieval,
    random_guess_level,
    retrieval_metrics,
    retrieval_ranks,
)


def hand_case():
    """3 images, 4 captions; image 0 has captions 0 and 1.

    Cosine similarities (rows images, columns captions; a = 1/sqrt(3)):
        img0: [0, 0.6, 0, a]
        img1: [1, 0,   1, a]
        img2: [0, 0.8, 0, a]
    """
    images = torch.tensor([[2.0, 0, 0], [0, 3.0, 0], [0, 0, 0.5]])  # unnormalized on purpose
    texts = torch.tensor([[0.0, 1, 0], [3.0, 0, 4], [0, 2.0, 0], [1.0, 1, 1]])
    owner = torch.tensor([0, 0, 1, 2])
    return images, texts, owner


def test_hand_computed_ranks():
    i2t, t2i = retrieval_ranks(*hand_case())
    # img0: best true caption is cap1 (0.6); no false caption reaches 0.6 -> 1.
    # img1: cap2 scores 1, false cap0 ties at 1 and is counted ahead -> 2.
    # img2: cap3 scores a; false cap1 (0.8) is above -> 2.
    assert i2t.tolist() == [1, 2, 2]
    # cap0: img1 (1) above, img2 ties at 0 -> 3.  cap1: img2 (0.8) above -> 2.
    # cap2: img1 alone at the top -> 1.  cap3: all three tie at a -> 3.
    assert t2i.tolist() == [3, 2, 1, 3]
    assert i2t.dtype == torch.long and t2i.dtype == torch.long


def test_hand_computed_metrics():
    result = retrieval_metrics(*hand_case(), ks=(1, 2, 5))
    assert result["n_images"] == 3 and result["n_texts"] == 4
    assert set(result) == {"i2t", "t2i", "n_images", "n_texts"}
    i2t, t2i = result["i2t"], result["t2i"]
    assert list(i2t) == ["R@1", "R@2", "R@5", "MedR", "MeanR"]
    assert i2t["R@1"] == pytest.approx(100 / 3)
    assert i2t["R@2"] == pytest.approx(100.0)
    assert i2t["MedR"] == 2.0
    assert i2t["MeanR"] == pytest.approx(5 / 3)
    assert t2i["R@1"] == pytest.approx(25.0)
    assert t2i["R@2"] == pytest.approx(50.0)
    assert t2i["R@5"] == pytest.approx(100.0)
    assert t2i["MedR"] == 2.0  # ranks [1, 2, 3, 3]: lower median, as torch.median
    assert t2i["MeanR"] == pytest.approx(2.25)
    assert all(type(v) is float for v in [*i2t.values(), *t2i.values()])


def multi_caption_case():
    """2 images, 5 captions whose rows interleave: owner [1, 0, 1, 0, 0].

    Cosine similarities (rows images, columns captions), exact by construction:
        img0: [0.6, 0.1, 0.2, 0.5, 0.3]    true: cap1, cap3, cap4
        img1: [0.2, 0.3, 0.4, 0.1, 0.0]    true: cap0, cap2
    """
    sims = torch.tensor([[0.6, 0.1, 0.2, 0.5, 0.3], [0.2, 0.3, 0.4, 0.1, 0.0]],
                        dtype=torch.float64)
    images = torch.eye(2, 3, dtype=torch.float64)
    # Unit text vectors whose first two coordinates are the similarities.
    texts = torch.cat([sims.T, (1 - (sims.T ** 2).sum(dim=1, keepdim=True)).sqrt()], dim=1)
    return images, texts, torch.tensor([1, 0, 1, 0, 0])


def test_image_to_text_hit_is_any_of_the_images_captions():
    i2t, t2i = retrieval_ranks(*multi_caption_case())
    # img0: its first caption (cap1, 0.1) is near the bottom, but its best true caption
    # is cap3 (0.5); only the false cap0 (0.6) is above it -> 2.
    # img1: best true caption cap2 (0.4); the false ones score 0.3 and less -> 1.
    assert i2t.tolist() == [2, 1]
    # One rank per caption: cap0 img0 (0.6) above img1 (0.2) -> 2; cap1 img1 (0.3) above
    # img0 (0.1) -> 2; cap2, cap3, cap4 are highest on their own image -> 1.
    assert t2i.tolist() == [2, 2, 1, 1, 1]
    metrics = retrieval_metrics(*multi_caption_case(), ks=(1, 2))
    assert metrics["i2t"]["R@1"] == pytest.approx(50.0)
    assert metrics["t2i"]["R@1"] == pytest.approx(60.0)
    assert metrics["n_images"] == 2 and metrics["n_texts"] == 5


def test_multi_caption_manifest_reaches_retrieval_grouped_by_image(tmp_path):
    from PIL import Image

    from mmguard.attack.contrastive import load_pairs
    from mmguard.data.sources import read_dataset
    from tests.conftest import write_manifest

    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (4, 4), colour).save(tmp_path / name)
    manifest = write_manifest(tmp_path, [{"image": "a.png", "caption": "red one"},
                                         {"image": "b.png", "caption": "blue one"},
                                         {"image": "a.png", "caption": "a red square"}])
    pairs = load_pairs(read_dataset(manifest))
    assert pairs.keys == ["a.png", "b.png"]
    assert pairs.captions == [["red one", "a red square"], ["blue one"]]
    assert len(pairs.images) == 2


def test_default_ks_give_standard_keys():
    result = retrieval_metrics(*hand_case())
    assert list(result["i2t"]) == ["R@1", "R@5", "R@10", "MedR", "MeanR"]
    assert list(result["t2i"]) == ["R@1", "R@5", "R@10", "MedR", "MeanR"]


def test_perfect_features_rank_first():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(30, 16, generator=gen)
    owner = torch.arange(75) % 30
    scales = torch.rand(75, 1, generator=gen) + 0.5  # scale must not matter
    result = retrieval_metrics(images, images[owner] * scales, owner)
    for direction in ("i2t", "t2i"):
        assert result[direction]["R@1"] == 100.0
        assert result[direction]["MedR"] == 1.0
        assert result[direction]["MeanR"] == 1.0


@pytest.mark.parametrize("value", [1.0, 0.0])
def test_constant_features_get_the_worst_ranks(value):
    owner = torch.tensor([0, 0, 0, 1, 1, 2, 3, 4, 4])  # captions per image: 3, 2, 1, 1, 2
    images = torch.full((5, 8), value)
    texts = torch.full((9, 8), value)
    i2t, t2i = retrieval_ranks(images, texts, owner)
    # Best of c true captions among 9 at worst: 9 - c + 1.
    assert i2t.tolist() == [7, 8, 9, 9, 8]
    assert t2i.tolist() == [5] * 9
    result = retrieval_metrics(images, texts, owner)
    assert result["i2t"]["R@1"] == 0.0 and result["t2i"]["R@1"] == 0.0
    assert result["t2i"]["MedR"] == 5.0


def reference_ranks(images, texts, owner):
    """Slow reference: sort with ties broken against the true items, read off positions."""
    sims = (F.normalize(images, dim=1) @ F.normalize(texts, dim=1).T).tolist()
    owner = owner.tolist()
    n_img, n_txt = len(sims), len(owner)
    i2t = []
    for i in range(n_img):
        order = sorted(range(n_txt), key=lambda j, i=i: (-sims[i][j], owner[j] == i))
        i2t.append(1 + next(pos for pos, j in enumerate(order) if owner[j] == i))
    t2i = []
    for j in range(n_txt):
        order = sorted(range(n_img), key=lambda i, j=j: (-sims[i][j], i == owner[j]))
        t2i.append(1 + order.index(owner[j]))
    return i2t, t2i


def shuffled_case(seed):
    gen = torch.Generator().manual_seed(seed)
    n_img, n_txt, dim = 40, 110, 12
    owner = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (n_txt - n_img,),
                                                          generator=gen)])
    owner = owner[torch.randperm(n_txt, generator=gen)]
    images = torch.randn(n_img, dim, generator=gen, dtype=torch.float64)
    texts = images[owner] + 1.5 * torch.randn(n_txt, dim, generator=gen, dtype=torch.float64)
    # Give a third of the captions another caption's features: their ranks become poor.
    moved = torch.randperm(n_txt, generator=gen)[: n_txt // 3]
    texts[moved] = texts[moved[torch.randperm(len(moved), generator=gen)]]
    return images, texts, owner


def tied_case(seed):
    """Every feature is a one-hot vector, so similarities are exactly 0 or 1: many ties."""
    gen = torch.Generator().manual_seed(seed)
    n_img, n_txt, dim = 25, 60, 4
    owner = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (n_txt - n_img,),
                                                          generator=gen)])
    images = F.one_hot(torch.randint(0, dim, (n_img,), generator=gen), dim).float()
    texts = F.one_hot(torch.randint(0, dim, (n_txt,), generator=gen), dim).float()
    return images, texts, owner


@pytest.mark.parametrize("block", [None, 7, 1000])
@pytest.mark.parametrize("case", [shuffled_case(1), shuffled_case(2), tied_case(3)])
def test_vectorized_ranks_match_slow_reference(case, block, monkeypatch):
    if block is not None:  # small blocks exercise the blocked computation
        monkeypatch.setattr(retrieval, "_BLOCK_ELEMENTS", block)
    i2t, t2i = retrieval_ranks(*case)
    ref_i2t, ref_t2i = reference_ranks(*case)
    assert i2t.tolist() == ref_i2t
    assert t2i.tolist() == ref_t2i
    # The cases must not be trivial: ranks spread over several values.
    assert len(set(ref_i2t)) >= 3 and len(set(ref_t2i)) >= 3


def test_metrics_are_summaries_of_the_ranks():
    case = shuffled_case(4)
    i2t, t2i = retrieval_ranks(*case)
    result = retrieval_metrics(*case, ks=(1, 5))
    for ranks, section in ((i2t, result["i2t"]), (t2i, result["t2i"])):
        ranks = sorted(ranks.tolist())
        assert section["R@1"] == pytest.approx(100 * sum(r <= 1 for r in ranks) / len(ranks))
        assert section["R@5"] == pytest.approx(100 * sum(r <= 5 for r in ranks) / len(ranks))
        assert section["MedR"] == ranks[(len(ranks) - 1) // 2]
        assert section["MeanR"] == pytest.approx(sum(ranks) / len(ranks))


def test_rejects_inconsistent_inputs():
    images, texts, owner = hand_case()
    with pytest.raises(MMGuardError, match="no caption"):
        retrieval_ranks(images, texts, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(MMGuardError, match="refers to image 3"):
        retrieval_ranks(images, texts, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(MMGuardError, match="one entry per caption"):
        retrieval_ranks(images, texts, owner[:3])
    with pytest.raises(MMGuardError, match="dimension"):
        retrieval_ranks(images, texts[:, :2], owner)
    with pytest.raises(MMGuardError, match="NaN"):
        retrieval_ranks(images, texts * math.nan, owner)
    with pytest.raises(MMGuardError, match="cut-offs"):
        retrieval_metrics(images, texts, owner, ks=(0, 5))


def test_random_guess_exact_small_cases():
    level = random_guess_level(n_images=4, n_texts=4, captions_per_image=1, ks=(1, 2, 4))
    assert level["i2t"]["R@1"] == pytest.approx(25.0)
    assert level["i2t"]["R@2"] == pytest.approx(50.0)
    assert level["i2t"]["R@4"] == pytest.approx(100.0)
    assert level["t2i"]["R@1"] == pytest.approx(25.0)
    assert level["t2i"]["MedR"] == 2.0  # uniform on 1..4: lower median
    assert level["t2i"]["MeanR"] == pytest.approx(2.5)
    assert level["n_images"] == 4 and level["n_texts"] == 4

    # Two true captions among four: P(best <= 1) = 1/2, P(best <= 2) = 1 - 1/6.
    two = random_guess_level(n_images=2, n_texts=4, captions_per_image=2, ks=(1, 2, 3))
    assert two["i2t"]["R@1"] == pytest.approx(50.0)
    assert two["i2t"]["R@2"] == pytest.approx(100 * 5 / 6)
    assert two["i2t"]["R@3"] == pytest.approx(100.0)  # at most n - c + 1 = 3
    assert two["i2t"]["MedR"] == 1.0
    assert two["i2t"]["MeanR"] == pytest.approx(5 / 3)
    assert random_guess_level(5, 5, 1)["t2i"]["MedR"] == 3.0


def test_random_guess_with_different_caption_counts():
    # 3 images with 1, 1 and 2 captions among n = 4. One caption: P(best <= r) = r/4.
    # Two: P(best > 1) = C(2,1)/C(4,1) = 1/2, P(best > 2) = C(2,2)/C(4,2) = 1/6.
    level = random_guess_level(n_images=3, n_texts=4, captions_per_image=[1, 2, 1],
                               ks=(1, 2, 3))
    assert level["i2t"]["R@1"] == pytest.approx(100 * (1 / 4 + 1 / 4 + 1 / 2) / 3)
    assert level["i2t"]["R@2"] == pytest.approx(100 * (1 / 2 + 1 / 2 + 5 / 6) / 3)
    assert level["i2t"]["R@3"] == pytest.approx(100 * (3 / 4 + 3 / 4 + 1) / 3)
    # P(rank <= 1) = 1/3 < 1/2 <= P(rank <= 2) = 11/18.
    assert level["i2t"]["MedR"] == 2.0
    assert level["i2t"]["MeanR"] == pytest.approx((5 / 2 + 5 / 2 + 5 / 3) / 3)
    assert level["t2i"]["R@1"] == pytest.approx(100 / 3)
    # One count per image that are all equal is the single-count form.
    assert random_guess_level(4, 12, [3, 3, 3, 3]) == random_guess_level(4, 12, 3)
    with pytest.raises(MMGuardError, match="3 counts for 2 images"):
        random_guess_level(2, 4, [1, 1, 2])


def test_random_guess_matches_monte_carlo():
    n_images, captions, ks = 20, 5, (1, 5, 10)
    n_texts = n_images * captions
    trials = 20000
    gen = torch.Generator().manual_seed(0)
    # Caption positions in a random order of all captions; the first `captions` are true.
    positions = torch.rand(trials, n_texts, generator=gen).argsort(dim=1).argsort(dim=1)
    best_i2t = positions[:, :captions].min(dim=1).values + 1
    t2i = torch.randint(1, n_images + 1, (trials,), generator=gen)
    level = random_guess_level(n_images, n_texts, captions, ks)
    for k in ks:
        assert level["i2t"][f"R@{k}"] == pytest.approx(
            100 * (best_i2t <= k).double().mean().item(), abs=1.5)
        assert level["t2i"][f"R@{k}"] == pytest.approx(
            100 * (t2i <= k).double().mean().item(), abs=1.5)
    assert level["i2t"]["MeanR"] == pytest.approx(best_i2t.double().mean().item(), rel=0.03)
    assert level["i2t"]["MedR"] == pytest.approx(best_i2t.median().item(), abs=1)
    assert level["t2i"]["MedR"] == 10.0
    # Clearly above the 1-caption level: five chances instead of one.
    assert level["i2t"]["R@1"] == pytest.approx(5.0)


def test_random_guess_rejects_bad_sizes():
    with pytest.raises(MMGuardError, match="captions_per_image"):
        random_guess_level(3, 2, 3)
    with pytest.raises(MMGuardError, match="n_images"):
        random_guess_level(0, 2, 1)


def test_degradation_arithmetic():
    clean = {"i2t": {"R@1": 50.0, "R@5": 80.0, "MedR": 2.0, "MeanR": 4.0},
             "t2i": {"R@1": 0.0, "R@5": 40.0, "MedR": 8.0, "MeanR": 9.0}}
    protected = {"i2t": {"R@1": 5.0, "R@5": 80.0, "MedR": 40.0, "MeanR": 50.0},
                 "t2i": {"R@1": 1.0, "R@5": 50.0, "MedR": 4.0, "MeanR": 5.0}}
    result = degradation(clean, protected)
    assert result["i2t"]["R@1"] == pytest.approx(0.9)
    assert result["i2t"]["R@5"] == pytest.approx(0.0)
    assert result["i2t"]["MedR_ratio"] == pytest.approx(20.0)
    assert result["t2i"]["R@1"] is None
    assert result["t2i"]["R@5"] == pytest.approx(-0.25)  # protection helped here
    assert result["t2i"]["MedR_ratio"] == pytest.approx(0.5)
    assert set(result) == {"i2t", "t2i"}
    assert set(result["i2t"]) == {"R@1", "R@5", "MedR_ratio"}


def test_test_batchnorm_scores_the_same_whatever_running_statistics_training_left(monkeypatch):
    from mmguard.attack.contrastive import ImageCaptionSet
    from mmguard.models.registry import create_contrastive_model

    torch.manual_seed(0)
    model = create_contrastive_model("rn-test", None, "cpu")
    test = ImageCaptionSet([torch.rand(3, 40, 40) for _ in range(10)],
                           [[f"a photo of item {i}"] for i in range(10)])
    seen = []
    real_metrics = retrieval.retrieval_metrics

    def capture(image_features, text_features, owners, *args, **kwargs):
        seen.append(image_features)
        return real_metrics(image_features, text_features, owners, *args, **kwargs)

    monkeypatch.setattr(retrieval, "retrieval_metrics", capture)

    def features(test_batchnorm: bool) -> torch.Tensor:
        evaluate_retrieval(model, test, test_batchnorm=test_batchnorm)
        return seen[-1]

    plain, adapted = features(False), features(True)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    for norm in norms:  # what training on noisy data might leave behind
        norm.running_mean.add_(torch.randn_like(norm.running_mean))
        norm.running_var.mul_(4.0)
    corrupted = [(n.running_mean.clone(), n.running_var.clone()) for n in norms]
    assert not torch.allclose(features(False), plain, atol=1e-3)
    torch.testing.assert_close(features(True), adapted)
    for norm, (mean, var) in zip(norms, corrupted, strict=True):  # the model's own are back
        assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)
