"""Tests of models.engine: training on a tiny separable problem, the non-finite-loss error,
prediction (mode restored, probabilities, loss), metrics against hand-computed values, the two
test-time-augmentation votes, and the figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.engine import (
    TRAIN_KEYS,
    best_epoch,
    classification_metrics,
    bootstrap_intervals,
    choose_threshold,
    cross_fitted_metrics,
    decide,
    loss_check_interval,
    plot_confusion_matrix,
    plot_learning_curves,
    predict,
    train_one_epoch,
    tta_labels,
    tta_probabilities,
)

CPU = torch.device("cpu")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BATCHES, BATCH_SIZE, SIDE = 4, 8, 16


def bright_pneumonia_batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """BATCHES batches of noise images; class 1 images are brighter by 0.5."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(BATCHES):
        labels = torch.randint(0, 2, (BATCH_SIZE,), generator=generator)
        images = 0.5 * torch.rand(BATCH_SIZE, 3, SIDE, SIDE, generator=generator) + 0.5 * labels.view(-1, 1, 1, 1)
        batches.append((images, labels))
    return batches


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )


class NaNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3))) * float("nan")


@pytest.mark.parametrize(("amp_dtype", "channels_last"), [(None, False), (torch.bfloat16, True)])
def test_training_decreases_the_loss(amp_dtype: torch.dtype | None, channels_last: bool) -> None:
    data = bright_pneumonia_batches()
    model = tiny_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    history = [
        train_one_epoch(model, data, optimizer, CPU, epoch=epoch, amp_dtype=amp_dtype,
                        channels_last=channels_last, progress=False)
        for epoch in range(8)
    ]
    assert all(set(stats) == set(TRAIN_KEYS) for stats in history)
    assert all(stats["images"] == BATCHES * BATCH_SIZE for stats in history)
    assert all(stats["seconds"] > 0 and stats["images_per_s"] > 0 for stats in history)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["accuracy"] >= 0.9


def test_training_loss_is_the_per_image_average_and_max_batches_cuts_the_epoch() -> None:
    data = [(images[:n], labels[:n]) for (images, labels), n in zip(bright_pneumonia_batches(), (8, 2, 8))]
    model = tiny_net()
    before = tiny_net()  # the same initial weights
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = train_one_epoch(model, data, optimizer, CPU, epoch=0, progress=False, max_batches=2)
    assert stats["images"] == 10
    first, second = (F.cross_entropy(before(x), y, reduction="sum").item() for x, y in data[:2])
    assert stats["loss"] == pytest.approx((first + second) / 10, rel=1e-5)


def test_non_finite_loss_raises_and_skips_the_step() -> None:
    model = NaNNet()
    weights = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match=r"epoch 3, batch 0"):
        train_one_epoch(model, bright_pneumonia_batches(), optimizer, CPU, epoch=3, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def nan_at(batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """bright_pneumonia_batches with NaN images in batch ``batch`` alone."""
    data = bright_pneumonia_batches()
    images, labels = data[batch]
    data[batch] = (torch.full_like(images, float("nan")), labels)
    return data


@pytest.mark.parametrize("every", [1, 2, 3, 4, 9])
def test_a_deferred_loss_check_still_names_the_non_finite_batch(every: int) -> None:
    model = tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match=r"epoch 1, batch 2$"):
        train_one_epoch(model, nan_at(2), optimizer, CPU, epoch=1, progress=False, check_every=every)


@pytest.mark.parametrize(("every", "steps_before_the_error"), [(1, 2), (3, 2), (4, 3)])
def test_the_check_comes_every_k_batches_before_that_batch_step(every: int, steps_before_the_error: int) -> None:
    """NaN in batch 2: checked every batch or every 3, the error comes before batch 2's step (weights of
    2 finite steps); every 4, it comes after batch 2's step, at batch 3's check (the weights are NaN)."""
    data = nan_at(2)
    reference = tiny_net()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    train_one_epoch(reference, data[:2], ref_optimizer, CPU, epoch=0, progress=False)
    model = tiny_net()
    with pytest.raises(FloatingPointError):
        train_one_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.1), CPU, epoch=0, progress=False,
                        check_every=every)
    weights = list(model.parameters())
    if steps_before_the_error == 2:
        assert all(torch.equal(a, b) for a, b in zip(weights, reference.parameters()))
    else:
        assert any(torch.isnan(w).any() for w in weights)


@pytest.mark.parametrize("every", [2, 3, 32])
def test_a_deferred_loss_check_gives_the_same_epoch(every: int) -> None:
    data = [(images[:n], labels[:n]) for (images, labels), n in zip(bright_pneumonia_batches(), (8, 3, 8, 5))]
    runs = []
    for k in (1, every):
        model = tiny_net()
        stats = train_one_epoch(model, data, torch.optim.Adam(model.parameters(), lr=0.05), CPU, epoch=0,
                                progress=False, check_every=k)
        runs.append((stats, [p.detach().clone() for p in model.parameters()]))
    (first, w1), (second, w2) = runs
    assert first["images"] == second["images"] == 24
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-12)
    assert second["accuracy"] == first["accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))


def test_loss_check_interval() -> None:
    assert loss_check_interval(CPU, None) == 1
    assert loss_check_interval(torch.device("cuda", 0), None) == 32
    assert loss_check_interval(torch.device("cuda", 0), 1) == 1
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="check_every"):
            loss_check_interval(CPU, bad)


def test_float16_training_is_refused() -> None:
    model = tiny_net()
    with pytest.raises(ValueError, match="float16"):
        train_one_epoch(model, bright_pneumonia_batches(), torch.optim.SGD(model.parameters(), lr=0.1), CPU,
                        epoch=0, amp_dtype=torch.float16, progress=False)


@pytest.mark.parametrize("training", [True, False])
def test_predict_restores_the_mode_and_returns_probabilities(training: bool) -> None:
    data = bright_pneumonia_batches()
    model = nn.Sequential(*tiny_net(), nn.Dropout(0.9))  # dropout: eval mode is needed for stable outputs
    model.train(training)
    probs, labels, loss = predict(model, data, CPU)
    assert model.training is training
    assert probs.shape == (BATCHES * BATCH_SIZE, 2) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels, torch.cat([y for _, y in data]).numpy())
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in data])
    np.testing.assert_allclose(probs, logits.softmax(1).numpy(), atol=1e-6)
    assert loss == pytest.approx(F.cross_entropy(logits, torch.from_numpy(labels)).item(), rel=1e-5)


def test_predict_under_bfloat16_autocast_returns_float64_probabilities() -> None:
    probs, _, loss = predict(tiny_net(), bright_pneumonia_batches(), CPU, amp_dtype=torch.bfloat16, channels_last=True)
    assert probs.dtype == np.float64 and math.isfinite(loss)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)


LABELS = [0, 0, 0, 1, 1, 1, 1, 1]
P_PNEUMONIA = np.array([0.1, 0.3, 0.7, 0.4, 0.6, 0.8, 0.9, 0.95])  # TN TN FP FN TP TP TP TP
PROBS = np.stack([1 - P_PNEUMONIA, P_PNEUMONIA], axis=1)


def test_classification_metrics_match_hand_computed_values() -> None:
    metrics = classification_metrics(LABELS, PROBS)
    assert metrics["confusion_matrix"] == [[2, 1], [1, 4]]
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    assert metrics["precision"] == pytest.approx(4 / 5)
    assert metrics["recall"] == pytest.approx(4 / 5)
    assert metrics["f1"] == pytest.approx(4 / 5)
    assert metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["roc_auc"] == pytest.approx(13 / 15)  # 13 of the 15 (positive, negative) pairs ordered
    assert metrics["n"] == 8


def test_positive_zero_swaps_the_roles() -> None:
    metrics = classification_metrics(LABELS, PROBS, positive=0)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["specificity"] == pytest.approx(4 / 5)
    assert metrics["roc_auc"] == pytest.approx(13 / 15)


def test_single_class_labels_give_no_auc_and_zero_for_undefined_ratios() -> None:
    probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    metrics = classification_metrics([1, 1, 1], probs)
    assert metrics["roc_auc"] is None
    assert metrics["specificity"] == 0.0  # no negatives
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["confusion_matrix"] == [[0, 0], [1, 2]]


def test_tta_votes_disagree_where_the_rules_differ() -> None:
    probs = np.array([
        [0.95, 0.05], [0.20, 0.80], [0.30, 0.70],  # surest copy says 0; mean (0.483, 0.517) says 1
        [0.10, 0.90], [0.70, 0.30], [0.80, 0.20],  # surest copy says 1; mean (0.533, 0.467) says 0
    ])
    votes = tta_probabilities(probs, d=3)
    np.testing.assert_array_equal(decide(votes["max_confidence"]), [0, 1])
    np.testing.assert_array_equal(decide(votes["mean_probability"]), [1, 0])
    np.testing.assert_allclose(votes["mean_probability"], [[1.45 / 3, 1.55 / 3], [1.6 / 3, 1.4 / 3]])
    np.testing.assert_allclose(votes["max_confidence"], [[0.95, 0.05], [0.10, 0.90]])
    # a threshold decides both rules' probabilities the same way as a plain prediction's
    np.testing.assert_array_equal(decide(votes["mean_probability"], threshold=0.6), [0, 0])


def test_tta_rejects_rows_not_a_multiple_of_d() -> None:
    with pytest.raises(ValueError, match="multiple of d=3"):
        tta_probabilities(np.full((4, 2), 0.5), d=3)


def test_tta_labels_return_one_label_per_group_and_reject_mixed_groups() -> None:
    np.testing.assert_array_equal(tta_labels([1, 1, 0, 0, 1, 1], d=2), [1, 0, 1])
    with pytest.raises(ValueError, match="group 1"):
        tta_labels([1, 1, 0, 1, 1, 1], d=2)
    with pytest.raises(ValueError, match="multiple"):
        tta_labels([1, 1, 0], d=2)


HISTORY = [
    {"epoch": 0, "train_loss": 0.7, "val_loss": 0.6, "train_accuracy": 0.5, "val_accuracy": 0.6, "val_f1": 0.5},
    {"epoch": 1, "train_loss": 0.5, "val_loss": 0.4, "train_accuracy": 0.7, "val_accuracy": 0.8, "val_f1": 0.7},
    {"epoch": 2, "train_loss": 0.3, "val_loss": 0.45, "train_accuracy": 0.9, "val_accuracy": 0.8, "val_f1": 0.75},
]


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 1000
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_best_epoch_is_the_minimum_finite_val_loss() -> None:
    assert best_epoch(HISTORY) == 1
    assert best_epoch([*HISTORY, {"epoch": 3, "val_loss": float("nan")}]) == 1
    assert best_epoch([{"epoch": 0, "train_loss": 1.0}]) is None


def test_learning_curves_write_a_png(tmp_path) -> None:
    path = plot_learning_curves(HISTORY, tmp_path / "curves.png")
    assert_png(path)


def test_learning_curves_refuse_an_empty_history(tmp_path) -> None:
    with pytest.raises(ValueError, match="empty"):
        plot_learning_curves([], tmp_path / "curves.png")
    assert not list(tmp_path.iterdir())


def test_confusion_matrix_writes_a_png(tmp_path) -> None:
    path = plot_confusion_matrix([[2, 1], [0, 0]], ["NORMAL", "PNEUMONIA"], tmp_path / "cm.png", title="test")
    assert_png(path)


def test_confusion_matrix_checks_the_class_names(tmp_path) -> None:
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix([[2, 1], [0, 3]], ["NORMAL"], tmp_path / "cm.png")


def test_confusion_matrix_labels_can_be_given_in_another_language() -> None:
    from models.engine import confusion_matrix_figure

    figure = confusion_matrix_figure([[2, 1], [0, 3]], ["NORMAL", "PNEUMONIA"],
                                     labels=("predicha", "real", "fracción de la clase real"))
    axes, bar = figure.axes
    assert (axes.get_xlabel(), axes.get_ylabel(), bar.get_ylabel()) == ("predicha", "real", "fracción de la clase real")
    assert [t.get_text() for t in axes.texts] == ["2\n66.7%", "1\n33.3%", "0\n0.0%", "3\n100.0%"]
    english = confusion_matrix_figure([[2, 1], [0, 3]], ["NORMAL", "PNEUMONIA"]).axes[0]
    assert (english.get_xlabel(), english.get_ylabel()) == ("predicted", "true")
    with pytest.raises(ValueError, match="labels"):
        confusion_matrix_figure([[2, 1], [0, 3]], ["NORMAL", "PNEUMONIA"], labels=("a", "b"))


def test_a_threshold_moves_the_decision_and_the_metrics_record_it() -> None:
    metrics = classification_metrics(LABELS, PROBS, threshold=0.65)  # the 0.7 NORMAL and 0.6 PNEUMONIA flip
    assert metrics["confusion_matrix"] == [[2, 1], [2, 3]] and metrics["threshold"] == 0.65
    assert metrics["balanced_accuracy"] == pytest.approx((3 / 5 + 2 / 3) / 2)
    assert classification_metrics(LABELS, PROBS)["threshold"] is None
    with pytest.raises(ValueError, match="N x 2"):
        decide(np.full((2, 3), 1 / 3), threshold=0.5)


def test_chosen_threshold_maximises_accuracy_and_prefers_the_one_nearest_a_half() -> None:
    t = choose_threshold(LABELS, P_PNEUMONIA)
    accuracy = classification_metrics(LABELS, PROBS, threshold=t)["accuracy"]
    for other in np.linspace(0, 1, 201):  # no threshold does better
        assert classification_metrics(LABELS, PROBS, threshold=other)["accuracy"] <= accuracy + 1e-12
    assert t == pytest.approx(0.35) and accuracy == 7 / 8  # between 0.3 (NORMAL) and 0.4 (PNEUMONIA)
    flat = np.array([0.1, 0.2, 0.3, 0.8, 0.85, 0.9, 0.95, 0.97])  # every t in (0.3, 0.8) separates them
    assert choose_threshold(LABELS, flat) == 0.5
    # a model whose scores are all shifted up: the threshold follows them
    shifted = np.array([0.60, 0.62, 0.64, 0.70, 0.72, 0.74, 0.76, 0.78])
    assert choose_threshold(LABELS, shifted) == pytest.approx(0.67)
    assert classification_metrics(LABELS, np.stack([1 - shifted, shifted], 1), threshold=0.67)["accuracy"] == 1.0


def test_cross_fitted_metrics_never_decide_an_image_with_a_threshold_fitted_on_it() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    p = rng.uniform(size=400)  # no signal: an in-sample threshold looks better than chance, a crossed one does not
    probs = np.stack([1 - p, p], 1)
    in_sample = classification_metrics(labels, probs, threshold=choose_threshold(labels, p))["accuracy"]
    crossed = cross_fitted_metrics(labels, probs, groups=np.arange(400))["accuracy"]
    assert crossed < in_sample and abs(crossed - 0.5) < 0.08
    groups = np.repeat(np.arange(100), 4)  # replicated images are kept in one half
    assert cross_fitted_metrics(labels, probs, groups)["threshold"] == "cross-fitted"


def test_bootstrap_intervals_hold_the_estimate_and_shrink_with_more_images() -> None:
    rng = np.random.default_rng(1)

    def width(n: int) -> float:
        labels = rng.integers(0, 2, n)
        p = np.clip(labels * 0.6 + rng.uniform(-0.3, 0.5, n), 0, 1)
        probs = np.stack([1 - p, p], 1)
        lo, hi = bootstrap_intervals(labels, probs, 0.5, seed=0)["accuracy"]
        assert lo <= classification_metrics(labels, probs, threshold=0.5)["accuracy"] <= hi
        return hi - lo

    assert width(2000) < width(100) / 2


def test_resolve_device_chooses_once_and_says_when_cuda_is_missing(monkeypatch):
    from models.engine import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda:1: CUDA is not available"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)  # torchrun: this rank's GPU
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)  # an explicit index stays
    with pytest.raises(ValueError, match="--device cuda:2: this machine has 2 GPU"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name, fragment", [("foo", "expected auto, cpu, cuda or cuda:N"),
                                            ("cuda:x", "expected auto, cpu, cuda or cuda:N"),
                                            ("mps", "only auto, cpu, cuda and cuda:N")])
def test_resolve_device_refuses_other_names_in_one_line(name, fragment):
    from models.engine import resolve_device

    with pytest.raises(ValueError, match=fragment):
        resolve_device(name)


def test_metric_helpers_refuse_bad_shapes_and_values() -> None:
    with pytest.raises(ValueError, match="threshold must be in"):
        decide(PROBS, threshold=1.5)
    with pytest.raises(ValueError, match="expected labels N and probs N x C"):
        classification_metrics(LABELS[:3], PROBS)
    with pytest.raises(ValueError, match="positive class 2 out of range"):
        classification_metrics(LABELS, PROBS, positive=2)
    with pytest.raises(ValueError, match="expected N labels and N probabilities"):
        choose_threshold(LABELS, P_PNEUMONIA[:3])
    with pytest.raises(ValueError, match="d must be an int >= 1"):
        tta_probabilities(PROBS, d=0)
    with pytest.raises(ValueError, match="N\\*d x C"):
        tta_probabilities(P_PNEUMONIA, d=2)
    with pytest.raises(ValueError, match="no batches to predict"):
        predict(tiny_net(), [], CPU)


def test_a_seeded_prediction_repeats_its_draws_and_leaves_the_global_stream_alone() -> None:
    def drawing_loader():  # like a loader without workers: its augmentation draws from torch's generator
        for _ in range(2):
            yield torch.rand(4, 3, 8, 8), torch.randint(0, 2, (4,))

    net = tiny_net()
    before = torch.get_rng_state()
    first, _, _ = predict(net, drawing_loader(), CPU, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    again, _, _ = predict(net, drawing_loader(), CPU, seed=3)
    other, _, _ = predict(net, drawing_loader(), CPU, seed=4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
