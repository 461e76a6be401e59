import pytest
import torch
import torch.nn.functional as F

from rsseg.errors import ConfigError
from rsseg.training.losses import DiceBCELoss, soft_dice

BIG = 30.0  # sigmoid(+-30) is 0/1 to float precision


def _img(*rows):
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def test_soft_dice_hand_computed():
    probs = _img([0.5, 0.5], [0.5, 0.5])
    truth = _img([1, 1], [0, 0])
    # inter = 1, sum(p) = 2, sum(t) = 2: (2 * 1 + 1) / (4 + 1)
    assert soft_dice(probs, truth).item() == pytest.approx(0.6)
    assert soft_dice(probs, truth, smooth=1e-9).item() == pytest.approx(0.5)


def test_empty_truth_scores_one_when_predicted_empty_and_drops_with_false_positives():
    truth = torch.zeros(1, 1, 4, 4)
    assert soft_dice(torch.zeros(1, 1, 4, 4), truth).item() == pytest.approx(1.0)
    one_pixel = torch.zeros(1, 1, 4, 4)
    one_pixel[..., 0, 0] = 1.0
    assert soft_dice(one_pixel, truth).item() == pytest.approx(0.5)  # 1 / (1 + 1)
    assert soft_dice(torch.full((1, 1, 4, 4), 0.5), truth).item() == pytest.approx(1 / 9)  # 1 / (8 + 1)


def test_per_image_dice_is_the_mean_over_images_not_the_pooled_batch():
    probs = torch.zeros(2, 1, 2, 2)
    truth = torch.zeros(2, 1, 2, 2)
    probs[0, ..., 0, 0] = 1.0  # image 0: empty truth, one false pixel -> 0.5
    probs[1] = 1.0
    truth[1] = 1.0  # image 1: perfect -> 1
    assert soft_dice(probs, truth).tolist() == pytest.approx([0.5, 1.0])
    pooled = soft_dice(probs, truth, per_image=False).item()
    assert pooled == pytest.approx((2 * 4 + 1) / (5 + 4 + 1))
    loss = DiceBCELoss(dice_weight=1.0, bce_weight=0.0)
    logits = torch.where(probs > 0, BIG, -BIG)
    assert loss(logits, truth).item() == pytest.approx(1 - 0.75, abs=1e-6)


def test_a_batch_of_empty_tiles_still_gives_a_dice_gradient():
    logits = torch.zeros(3, 1, 8, 8, requires_grad=True)
    DiceBCELoss(dice_weight=1.0, bce_weight=0.0)(logits, torch.zeros(3, 1, 8, 8)).backward()
    assert (logits.grad > 0).all()  # every probability is pushed down


def test_ignore_pixels_are_left_out_of_both_terms():
    truth = _img([1, 1, 0, 0], [1, 1, 0, 0])
    logits = _img([BIG, BIG, -BIG, -BIG], [BIG, BIG, -BIG, -BIG])
    valid = _img([1, 1, 1, 0], [1, 1, 1, 0])
    wrong = logits.clone()
    wrong[..., 3] = BIG  # wrong, but only on ignored pixels
    loss = DiceBCELoss()
    assert loss(wrong, truth, valid).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(wrong, truth).item() > 0.1
    # hand-computed: BCE averaged over the 6 valid pixels only, Dice of the valid part
    logits = torch.zeros_like(truth)  # p = 0.5 everywhere
    bce = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")[valid > 0].mean()
    dice = (2 * 0.5 * 4 + 1) / (0.5 * 6 + 4 + 1)
    assert DiceBCELoss(0.5, 0.5)(logits, truth, valid).item() == pytest.approx(0.5 * bce.item() + 0.5 * (1 - dice))


def test_images_without_valid_pixels_do_not_count():
    truth = torch.ones(2, 1, 2, 2)
    logits = torch.full((2, 1, 2, 2), BIG)
    logits[1] = -BIG  # wrong everywhere on image 1, which is all ignore
    valid = torch.ones(2, 1, 2, 2)
    valid[1] = 0
    assert DiceBCELoss()(logits, truth, valid).item() == pytest.approx(0.0, abs=1e-6)
    assert DiceBCELoss()(logits, truth, torch.zeros_like(valid)).item() == pytest.approx(0.0)


def test_bce_only_matches_torch_and_weights_are_checked():
    logits = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    truth = (torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    expected = F.binary_cross_entropy_with_logits(logits, truth)
    assert DiceBCELoss(0.0, 1.0)(logits, truth).item() == pytest.approx(expected.item())
    assert DiceBCELoss(0.0, 1.0)(logits.bfloat16(), truth).dtype == torch.float32
    with pytest.raises(ConfigError, match="not both zero"):
        DiceBCELoss(0.0, 0.0)
