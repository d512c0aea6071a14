"""SLF / ALF / AFF (and RoCL's LE / rLE) on a trained encoder, as a Ray Train worker loop.

- slf: encoder frozen, new linear head trained with CE on clean images.
- alf: encoder frozen, head trained adversarially (eval.alf_loss: TRADES by default, or PGD-AT).
- aff: everything trained with TRADES (beta=6).
- le / rle: RoCL's linear evaluation on clean / PGD-10 adversarial examples (= slf / alf with PGD-AT).
"Frozen" protocols put the encoder's BN in eval mode (eval.bn_mode=eval) or, like DeACL's reference
code, leave it in train mode so that its running statistics move (eval.bn_mode=train).
Then SA and PGD-20 RA on the test split (sharded across workers, counts all-reduced) and
AutoAttack on a subset. DeACL's recipe is the default (SGD 0.9, wd 2e-4, lr/10 at 15 and 20).
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.loaders import build_loader
from data_pipeline.write import beton_path
from trainer.adversarial_training import pgd_at_loss, trades_loss
from trainer.checkpoint import atomic_save, load_encoder, load_model_file
from trainer.evaluation.robustness import autoattack_accuracy, clean_and_pgd_counts, pgd_config
from trainer.optim import build_optimizer, build_scheduler
from trainer.runtime import Progress, all_reduce_mean, all_reduce_sum, new_checkpoint_dir, setup_worker


class Classifier(nn.Module):
    """Encoder (with its normalisation) + linear head: pixels in [0,1] -> logits."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


PROTOCOL_LOSS = {"slf": "ce", "le": "ce", "alf": "trades", "rle": "pgd_at", "aff": "trades"}
FULL_FINETUNE = {"aff"}
ALF_LOSSES = ("trades", "pgd_at")


def protocol_loss(protocol: str, ecfg: Mapping[str, Any]) -> str:
    """The head's training loss: ce | trades | pgd_at (ALF's is eval.alf_loss)."""
    if protocol == "alf":
        kind = ecfg.get("alf_loss", "trades")
        if kind not in ALF_LOSSES:
            raise ValueError(f"eval.alf_loss={kind!r} is invalid: allowed: {', '.join(ALF_LOSSES)}")
        return kind
    return PROTOCOL_LOSS[protocol]


def set_train_modes(model: Classifier, full: bool, bn_mode: str = "eval") -> None:
    """Modes for one training epoch: everything in train mode; a frozen encoder goes to eval mode
    (BN running statistics fixed) unless bn_mode == "train" (DeACL's reference quirk)."""
    model.train()
    if not full and bn_mode == "eval":
        model.encoder.eval()


def run_protocol(cfg: Mapping[str, Any], ctx, model_path: str, protocol: str, label: str,
                 report_each_epoch) -> dict[str, float]:
    import ray.train.torch

    ecfg, data = cfg["eval"], cfg["data"]
    lin = ecfg["linear"]
    encoder = load_encoder(model_path, ctx.device, with_projector=False)
    model = Classifier(encoder, int(data["num_classes"])).to(ctx.device)
    full = protocol in FULL_FINETUNE
    for p in encoder.parameters():
        p.requires_grad_(full)
    if full:
        train_net = ray.train.torch.prepare_model(model)
    else:
        head = ray.train.torch.prepare_model(model.head)
        train_net = lambda x: head(model.encoder(x))  # noqa: E731
    lr_table = lin["lr"]
    lr = float(lr_table[protocol] if protocol in lr_table else lr_table["alf" if protocol == "rle" else "slf"])
    tcfg = {**lin, "lr": lr, "lr_scaling": "none", "schedule": "step", "warmup_epochs": 0}
    per_rank = int(lin["batch_size"]) // ctx.world_size
    train_loader = build_loader(str(beton_path(data, "train")), "weak", per_rank, ctx.device, ctx.num_threads,
                                train=True, seed=int(cfg["seed"]), distributed=ctx.distributed,
                                augment=data.get("augment"))
    opt = build_optimizer(model.parameters(), tcfg)
    sched = build_scheduler(opt, tcfg, len(train_loader))
    train_attack = pgd_config({**ecfg["pgd"], "steps": int(ecfg.get("train_attack_steps", 10))})
    loss_kind = protocol_loss(protocol, ecfg)
    epochs = int(lin["epochs"])
    progress = Progress(f"{label}/{protocol}", epochs, 0, ctx.is_main)
    for epoch in range(epochs):
        train_loader.set_epoch(epoch)
        set_train_modes(model, full, ecfg.get("bn_mode", "eval"))
        t0, n = time.time(), 0
        loss_sum = torch.zeros((), device=ctx.device)
        correct = torch.zeros((), device=ctx.device)
        for batch in train_loader:
            x, y = batch["views"][0], batch["label"]
            if loss_kind == "ce":
                if full:
                    logits = train_net(x)
                else:
                    with torch.no_grad():
                        h = model.encoder(x)
                    logits = head(h)
                loss = F.cross_entropy(logits, y)
            elif loss_kind == "pgd_at":
                loss, logits = pgd_at_loss(model, train_net, x, y, train_attack)
            else:
                loss, logits = trades_loss(model, train_net, x, y, train_attack, float(lin["trades_beta"]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            n += y.shape[0]
        metrics = all_reduce_mean({"train_loss": loss_sum / max(1, len(train_loader)),
                                   "train_acc": correct / max(1, n)}, ctx)
        progress.epoch_line(epoch, n * ctx.world_size, time.time() - t0, metrics)
        if epoch + 1 < epochs:
            report_each_epoch({f"{protocol}_{k}": v for k, v in metrics.items()})

    test_loader = build_loader(str(beton_path(data, "test")), "eval", per_rank, ctx.device, ctx.num_threads,
                               train=False, distributed=ctx.distributed, drop_last=False)
    counts = all_reduce_sum(clean_and_pgd_counts(model, test_loader, pgd_config(ecfg["pgd"])), ctx)
    result = {f"{protocol}_sa": counts["clean_correct"] / counts["total"],
              f"{protocol}_ra": counts["pgd_correct"] / counts["total"],
              f"{protocol}_n_test": counts["total"]}
    aa = ecfg.get("autoattack", {})
    if aa.get("enabled", True):
        # AutoAttack on the first n_examples of the test set, computed on rank 0.
        aa_value = torch.zeros((), device=ctx.device)
        if ctx.is_main:
            xs, ys = [], []
            single = build_loader(str(beton_path(data, "test")), "eval", per_rank, ctx.device, ctx.num_threads,
                                  train=False, drop_last=False)
            limit = aa.get("n_examples")
            for batch in single:
                xs.append(batch["views"][0])
                ys.append(batch["label"])
                if limit and sum(len(v) for v in ys) >= limit:
                    break
            x, y = torch.cat(xs)[:limit], torch.cat(ys)[:limit]
            t0 = time.time()
            aa_value += autoattack_accuracy(model, x, y, float(ecfg["pgd"]["eps"]), int(data["num_classes"]),
                                            aa.get("version", "standard"))
            print(f"[{label}/{protocol}] AutoAttack on {len(y)} test images: {aa_value.item():.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
            result[f"{protocol}_aa_n"] = float(len(y))
        result[f"{protocol}_aa"] = all_reduce_sum({"aa": aa_value}, ctx)["aa"]
    if ctx.is_main:
        print(f"[{label}/{protocol}] SA {result[f'{protocol}_sa']:.4f} RA(PGD-{ecfg['pgd']['steps']}) "
              f"{result[f'{protocol}_ra']:.4f}" + (f" AA {result[f'{protocol}_aa']:.4f}" if f"{protocol}_aa" in result else ""),
              flush=True)
    return result, model


def evaluate_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry: run each protocol of the stage on one checkpoint, report results."""
    import ray.train

    cfg, stage = config["cfg"], config["stage"]
    ctx = setup_worker(cfg)
    blob = load_model_file(stage["model_path"])
    arch = {"model_cfg": blob["model_cfg"], "stats": blob["stats"], "num_classes": int(cfg["data"]["num_classes"]),
            "label": stage["label"], "encoder_checkpoint": str(stage["model_path"])}
    results: dict[str, float] = {}
    classifiers: dict[str, dict[str, Any]] = {}  # rank 0: every head so far, in every checkpoint
    for protocol in stage["protocols"]:
        res, model = run_protocol(cfg, ctx, stage["model_path"], protocol, stage["label"],
                                  lambda m: ray.train.report(m))
        results.update(res)
        ckpt_dir = None
        if ctx.is_main:
            # Self-contained (architecture included): trainer.analyze_representations loads it.
            classifiers[protocol] = {"classifier": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                                     "protocol": protocol, "results": res, **arch}
            ckpt_dir = new_checkpoint_dir()
            # The stage keeps only the last checkpoint: it must hold the heads of all protocols.
            for name, blob_p in classifiers.items():
                atomic_save(blob_p, os.path.join(ckpt_dir, f"classifier_{name}.pt"))
        ray.train.report(dict(results), checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)
        if ckpt_dir:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
