"""The discriminator's update holds its own hinge-loss gradient only: the generator term -D(rec) of the
autoencoder's loss must not leak into it (upstream: Lightning's toggle_optimizer / zero_grad)."""

from __future__ import annotations

import copy

import torch

from repro.tokenizer.discriminator import hinge_d_loss
from repro.tokenizer_training.trainer import TokenizerTrainer
from repro.training.engine import run_training
from tests.test_tokenizer_training import digits, tiny_cfg  # noqa: F401 (the digits fixture)


class Recording(TokenizerTrainer):
    """Records the discriminator's inputs, its weights before its update, and the gradient its Adam steps on."""

    def build(self, ctx, strategy, kind) -> None:
        super().build(ctx, strategy, kind)
        disc, self.seen = self.loss_fn.discriminator, []
        disc.register_forward_pre_hook(lambda m, args: self.seen.append(args[0].detach().clone()))
        opt_d = self.opt.optimizers["disc"]
        step = opt_d.step

        def recording_step(*a, **k):
            self.before = copy.deepcopy(disc)
            self.grads = [p.grad.clone() for p in disc.parameters()]
            return step(*a, **k)

        opt_d.step = recording_step


def test_the_discriminator_steps_on_its_hinge_loss_gradient_alone(digits, tmp_path):
    cfg = tiny_cfg(digits, tmp_path, "train.max_steps=1", "loss.disc_start=0", "loss.disc_num_layers=1",
                   "train.warmup_steps=0", "loss.perceptual_weight=0")
    trainer = Recording(cfg)
    run_training(trainer)
    # calls: D(rec) in the generator term, then D(real) and D(rec) in the discriminator's own loss
    assert len(trainer.seen) == 3
    real, fake = trainer.seen[1], trainer.seen[2]
    disc = trainer.before
    expected = torch.autograd.grad(hinge_d_loss(disc(real), disc(fake)), list(disc.parameters()))
    for got, want in zip(trainer.grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
