"""The optimiser is PyTorch's SGD with weight decay, and the schedules follow the recipes."""

import jax.numpy as jnp
import numpy as np
import optax

from dla_jax.train import optim

from train_helpers import load_config


def test_sgd_matches_pytorch_update_rule():
    train = load_config("cifar10").train
    tx = optim.create_optimizer(train, lambda step: 0.1)
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    state = tx.init(params)
    p, buf = np.array([1.0, -2.0, 3.0]), np.zeros(3)
    for g in ([0.5, 0.1, -0.2], [0.3, -0.4, 0.0], [0.0, 0.2, 0.1]):
        updates, state = tx.update({"w": jnp.array(g)}, state, params)
        params = optax.apply_updates(params, updates)
        d_p = np.array(g) + 1e-4 * p  # torch.optim.SGD: weight decay joins the gradient
        buf = 0.9 * buf + d_p
        p = p - 0.1 * buf
    np.testing.assert_allclose(params["w"], p, rtol=1e-6)


def test_cifar_multistep_decays_at_epochs_100_and_150():
    train = load_config("cifar10").train
    steps_per_epoch = 50000 / 128
    schedule = optim.create_lr_schedule(train, steps_per_epoch, 180 * 391)
    first_of_100 = round(100 * steps_per_epoch)
    first_of_150 = round(150 * steps_per_epoch)
    lrs = [float(schedule(s)) for s in (0, first_of_100 - 1, first_of_100, first_of_150 - 1, first_of_150)]
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-5)


def test_imagenet_warmup_then_steps_and_lr_scaling():
    train = load_config("imagenet", "resnet,50").train
    train.batch_size = 512
    steps_per_epoch = 1281167 / 512
    schedule = optim.create_lr_schedule(train, steps_per_epoch, 100 * 2503)
    warmup = round(3 * steps_per_epoch)
    assert float(schedule(0)) < 0.2 / 100
    np.testing.assert_allclose(float(schedule(warmup - 1)), 0.2, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(round(30 * steps_per_epoch))), 0.02, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(round(90 * steps_per_epoch))), 0.0002, rtol=1e-4)


def test_cosine_goes_from_peak_to_zero():
    train = load_config("quickstart").train
    train.warmup_epochs = 0.0
    schedule = optim.create_lr_schedule(train, 10.0, 100)
    np.testing.assert_allclose(
        [float(schedule(0)), float(schedule(50)), float(schedule(100))], [0.1, 0.05, 0.0], atol=1e-6
    )


def test_num_steps_overrides_epochs():
    train = load_config("quickstart").train
    assert optim.total_train_steps(train, 22.45) == round(train.num_epochs * 22.45)
    train.num_steps = 7
    assert optim.total_train_steps(train, 22.45) == 7


def test_periods_end_on_the_epoch_grid_and_the_last_at_the_last_step():
    """Eval/checkpoint periods of the quickstart: 15 epochs of 1437/64 = 22.45 steps, every 5."""
    steps_per_epoch = 1437 / 64
    total = optim.total_train_steps(load_config("quickstart").train, steps_per_epoch)
    ends = [step for step in range(1, total + 1) if optim.ends_period(step, 5.0, steps_per_epoch)]
    # 5, 10 and 15 epochs are 112.3, 224.5 and 336.8 steps; the last is the run's last step,
    # so the loop does not evaluate at 336 and again at 337.
    assert total == 337 and ends == [112, 225, 337]
    # More than one period per step: every step ends one.
    assert all(optim.ends_period(step, 0.5, 1.5) for step in range(1, 10))
