import math

import pytest
import torch

from diffusers_speedup.training.lr_schedules import get_inverse_sqrt_schedule, get_lr_scheduler


def make_optimizer(lr=0.01):
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=lr, betas=(0.9, 0.99))


def lrs(scheduler, optimizer, num_steps):
    """Learning rate used by optimizer steps 0 .. num_steps-1 (read before each step, as the training loop does)."""
    values = []
    for _ in range(num_steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def edm2_lr(cur_nimg, batch_size, ref_lr, ref_batches, rampup_img):
    # EDM2 App. / training loop: t_ref counts iterations, the warm-up counts images.
    lr = ref_lr
    lr /= math.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    lr *= min(cur_nimg / rampup_img, 1)
    return lr


def test_inverse_sqrt_matches_edm2_formula():
    ref_lr, ref_batches, rampup_images, batch_size = 0.01, 10, 48, 4  # warm-up = 12 steps, decay from step 10
    optimizer = make_optimizer(ref_lr)
    scheduler = get_inverse_sqrt_schedule(optimizer, ref_batches, rampup_images, batch_size)
    got = lrs(scheduler, optimizer, 60)
    for step in (0, 1, 5, 9, 10, 11, 12, 13, 20, 40, 59):
        expected = edm2_lr(step * batch_size, batch_size, ref_lr, ref_batches, rampup_images)
        assert got[step] == pytest.approx(expected, rel=1e-12, abs=1e-15), step
    assert got[0] == 0.0
    assert got[40] == pytest.approx(ref_lr * min(160 / 48, 1) / math.sqrt(4.0))


def test_inverse_sqrt_without_warmup_or_decay():
    optimizer = make_optimizer(0.5)
    scheduler = get_inverse_sqrt_schedule(optimizer, ref_batches=0, rampup_images=0, batch_size=1)
    assert lrs(scheduler, optimizer, 3) == [0.5, 0.5, 0.5]


def test_inverse_sqrt_resumes_from_state_dict():
    optimizer = make_optimizer()
    scheduler = get_inverse_sqrt_schedule(optimizer, 5, 20, 2)
    lrs(scheduler, optimizer, 7)
    state = scheduler.state_dict()
    expected = lrs(scheduler, optimizer, 5)

    optimizer2 = make_optimizer()
    resumed = get_inverse_sqrt_schedule(optimizer2, 5, 20, 2)
    resumed.load_state_dict(state)
    optimizer2.param_groups[0]["lr"] = resumed.get_last_lr()[0]
    assert lrs(resumed, optimizer2, 5) == pytest.approx(expected)


def test_dispatcher_inverse_sqrt_uses_warmup_steps_as_images():
    optimizer = make_optimizer(1.0)
    scheduler = get_lr_scheduler("inverse_sqrt", optimizer, warmup_steps=4, batch_size=8, ref_batches=100)
    assert lrs(scheduler, optimizer, 6) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


@pytest.mark.parametrize(
    "name, expected",
    [
        ("constant", [1.0, 1.0, 1.0, 1.0, 1.0]),
        ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0, 1.0]),
        ("linear", [0.0, 0.5, 1.0, 2 / 3, 1 / 3]),
        ("cosine", [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))]),
    ],
)
def test_dispatcher_diffusers_schedules(name, expected):
    optimizer = make_optimizer(1.0)
    warmup = 0 if name == "constant" else 2
    scheduler = get_lr_scheduler(name, optimizer, warmup_steps=warmup, total_steps=5)
    assert lrs(scheduler, optimizer, 5) == pytest.approx(expected)


def test_dispatcher_errors():
    optimizer = make_optimizer()
    with pytest.raises(ValueError, match="Unknown lr scheduler name 'warmup_cosine'"):
        get_lr_scheduler("warmup_cosine", optimizer)
    with pytest.raises(ValueError, match="needs total_steps"):
        get_lr_scheduler("cosine", optimizer, warmup_steps=10)
    with pytest.raises(ValueError, match="Unknown options"):
        get_lr_scheduler("inverse_sqrt", optimizer, t_ref=7)
    with pytest.raises(ValueError, match="Unknown options"):
        get_lr_scheduler("linear", optimizer, total_steps=5, ref_batches=7)
    with pytest.raises(ValueError, match="warmup_steps"):
        get_lr_scheduler("linear", optimizer, warmup_steps=-1, total_steps=5)
    with pytest.raises(ValueError, match="batch_size"):
        get_inverse_sqrt_schedule(optimizer, batch_size=0)
