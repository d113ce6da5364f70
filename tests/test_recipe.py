"""The paper's recipe callback: reload the lowest-training-loss weights and restart Adam."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dblock.models import SNNClassifier
from dblock.training.recipe import PaperRecipe
from dblock.training.task import SNNTask

LOSSES = [3.0, 1.0, 2.0, 4.0, 5.0]  # scripted train/loss per epoch: the best epoch is 1


class Scripted(pl.LightningModule):
    """Optimises a real loss, but logs a scripted ``train/loss`` so the best epoch is known."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.snapshots: dict[int, dict] = {}
        self.at_start: dict[int, dict] = {}

    def training_step(self, batch, batch_idx):
        loss = (self.layer(batch[0]) - 1.0).pow(2).mean()
        self.log("train/loss", LOSSES[self.current_epoch], on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_start(self) -> None:  # runs after every callback's hook
        opt = self.optimizers().optimizer
        self.at_start[self.current_epoch] = {
            "weights": {k: v.clone() for k, v in self.state_dict().items()},
            "adam_state": len(opt.state),
            "lr": opt.param_groups[0]["lr"],
        }

    def on_train_epoch_end(self) -> None:
        self.snapshots[self.current_epoch] = {k: v.clone() for k, v in self.state_dict().items()}

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.1)
        return [opt], [torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3], gamma=0.1)]


def loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 4, generator=g)), batch_size=8)


def trainer(tmp_path, epochs, recipe):
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=[recipe],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_reloads_best_weights_and_restarts_adam_at_milestone(tmp_path):
    module = Scripted()
    recipe = PaperRecipe(milestones=[3], dirpath=tmp_path / "ckpt")
    trainer(tmp_path, 5, recipe).fit(module, loader())
    start = module.at_start[3]
    assert module.at_start[2]["adam_state"] > 0  # Adam had state before the milestone
    assert start["adam_state"] == 0  # ... and none right after it
    assert same(start["weights"], module.snapshots[1])  # lowest-loss epoch (1), not the last (2)
    assert not same(start["weights"], module.snapshots[2])
    assert abs(start["lr"] - 0.01) < 1e-12  # the scheduled lr cut is kept
    assert recipe.applied == [3]
    assert float(recipe.best_model_score) == 1.0
    assert recipe.best_model_path.endswith("best-train-loss.ckpt")
    final = {k: v for k, v in module.state_dict().items()}
    assert same(final, module.snapshots[1])  # the reported model is the best checkpoint


def test_recipe_state_resumes(tmp_path):
    first = Scripted()
    first_recipe = PaperRecipe(milestones=[3], dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, 4, first_recipe).fit(first, loader())
    resumed = Scripted()
    recipe = PaperRecipe(milestones=[3], dirpath=tmp_path / "ckpt", save_last=True)
    last = str(tmp_path / "ckpt" / "last.ckpt")
    trainer(tmp_path, 5, recipe).fit(resumed, loader(), ckpt_path=last)
    assert recipe.applied == [3] and float(recipe.best_model_score) == 1.0
    assert resumed.at_start[4]["adam_state"] > 0  # not restarted again after resuming


def test_recipe_on_snn_task(tmp_path):
    net = SNNClassifier(n_in=8, n_hidden=8, n_layers=1, n_classes=3, model="dblock", d=2, t_len=6)
    task = SNNTask(net, n_classes=3, lr=1e-2, milestones=[1])
    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((24, 6, 8), 0.5), generator=g)  # samples (T, n_in)
    data = TensorDataset(x, torch.randint(0, 3, (24,), generator=g))

    def time_major(items):  # batches (T, B, n_in), as the datamodules build them
        return torch.stack([i[0] for i in items], 1), torch.stack([i[1] for i in items])

    recipe = PaperRecipe(milestones=[1], dirpath=tmp_path / "ckpt")
    trainer(tmp_path, 2, recipe).fit(task, DataLoader(data, batch_size=8, collate_fn=time_major))
    assert recipe.applied == [1] and recipe.best_model_path
    best = torch.load(recipe.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    assert same(best, task.state_dict())
