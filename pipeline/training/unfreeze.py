"""Progressive unfreezing with discriminative learning rates.

The model declares its layer groups (``model.layer_groups``, stem -> ... -> head).
A stage trains the head plus the top ``groups`` groups below it; everything
below is frozen: ``requires_grad=False`` and the group held in eval mode, so
BatchNorm statistics do not drift on a few hundred medical images.

While every encoder group is frozen (stage 0 is head only) the encoder runs
under ``torch.no_grad`` through hooks on ``model.encoder``: no graph, no saved
activations, so a head-only step costs about one inference pass. In partial
stages the frozen bottom groups already build no graph because nothing below
them requires grad.

The optimizer starts with the head's parameter group and *gains* groups with
``add_param_group`` as stages unfreeze more, so Adam moments of the groups
already training survive a stage change. Learning rate of a group at depth d
(head = 0) is ``lr * lr_decay**d`` times a cosine over the whole run, times a
linear warm-up that starts when the group joins the optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from medxfer.config.recipe import OptimCfg, StageCfg, check_stages
from medxfer.config.spec import SpecError
from torch import nn


@dataclass(frozen=True)
class Group:
    name: str
    modules: tuple[nn.Module, ...]
    depth: int  # 0 = head, counted down towards the stem

    def parameters(self) -> list[nn.Parameter]:
        seen: set[int] = set()
        out = []
        for m in self.modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out


def model_groups(model: nn.Module) -> list[Group]:
    """The model's layer groups, stem first, with depth counted from the head (none: an empty list)."""
    raw = list(getattr(model, "layer_groups", None) or [])
    n = len(raw)
    groups = []
    for i, g in enumerate(raw):
        name, modules = (g.name, g.modules) if hasattr(g, "name") else (g[0], g[1])
        mods = tuple(modules) if isinstance(modules, list | tuple) else (modules,)
        groups.append(Group(str(name), mods, n - 1 - i))
    return groups


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


class Unfreezer:
    """Owns the stage, which groups train, the optimizer's parameter groups and the LR of every step.

    Use: ``set_train_mode()`` after ``model.train()``; ``begin_epoch(epoch)`` before each
    epoch (returns True when the stage changed); ``step_lr()`` before each optimizer
    step; ``record(score)`` after validation (higher is better) for plateau triggers.
    """

    def __init__(
        self,
        model: nn.Module,
        stages: list[StageCfg],
        optim: OptimCfg,
        *,
        epochs: int,
        steps_per_epoch: int,
        freeze_bn_stats: bool = False,
    ):
        self.model = model
        self.groups = model_groups(model)
        # The stages against this model's layer groups: the rules live in medxfer.config.recipe.
        check_stages(stages, [g.name for g in self.groups])
        self.by_name = {g.name: g for g in self.groups}
        self.stages = list(stages)
        self.cfg = optim
        self.epochs = epochs
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.total_steps = self.epochs * self.steps_per_epoch
        self.warmup_steps = round(optim.warmup_epochs * self.steps_per_epoch)
        self.freeze_bn_stats = freeze_bn_stats
        # Mutable state (saved in checkpoints as "scheduler").
        self.stage = 0
        self.stage_epoch = 0
        self.step = 0
        self.best: float | None = None
        self.bad_epochs = 0
        self.transitions: list[dict[str, Any]] = []
        self.optimizer = self._new_optimizer()
        self._apply_stage(self.stage)
        self._grad_stack: list[bool] = []
        self._hooks = self._install_no_grad_hooks()

    # --- stages -------------------------------------------------------------------------------------------------
    def n_trainable(self, stage: int) -> int:
        """Groups trained in `stage`, head included."""
        g = self.stages[stage].groups
        n = len(self.groups)
        return n if g == "all" else min(n, int(g) + 1)

    def trainable(self, stage: int | None = None) -> list[Group]:
        """Top-down: head first."""
        k = self.n_trainable(self.stage if stage is None else stage)
        return list(reversed(self.groups))[:k]

    @property
    def encoder_frozen(self) -> bool:
        return self.n_trainable(self.stage) <= 1

    def base_lr(self, group: Group) -> float:
        return self.cfg.lr * self.cfg.lr_decay**group.depth

    def _apply_stage(self, stage: int) -> None:
        train = {g.name for g in self.trainable(stage)}
        for g in self.groups:
            for p in g.parameters():
                p.requires_grad_(g.name in train)
        in_opt = {pg.get("name") for pg in self.optimizer.param_groups}
        for g in self.trainable(stage):
            if g.name not in in_opt:
                self._add_group(g, start_step=self.step)

    def _add_group(self, g: Group, start_step: int) -> None:
        pg = {
            "params": g.parameters(),
            "lr": 0.0,
            "name": g.name,
            "depth": g.depth,
            "base_lr": self.base_lr(g),
            "start_step": start_step,
        }
        if self.optimizer.param_groups and self.optimizer.param_groups[0].get("placeholder"):
            # torch optimizers cannot be built empty; the placeholder holds no real parameter
            self.optimizer.param_groups.clear()
        self.optimizer.add_param_group(pg)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        dummy = [{"params": [nn.Parameter(torch.zeros(1))], "placeholder": True}]
        if self.cfg.name == "sgd":
            return torch.optim.SGD(
                dummy, lr=self.cfg.lr, momentum=0.9, nesterov=True, weight_decay=self.cfg.weight_decay
            )
        return torch.optim.AdamW(dummy, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def begin_epoch(self, epoch: int) -> bool:
        """Advance the stage if its epoch has come or the select metric plateaued. True if the stage changed."""
        changed = False
        while self.stage + 1 < len(self.stages):
            nxt = self.stages[self.stage + 1]
            by_epoch = nxt.epoch is not None and epoch >= nxt.epoch
            by_plateau = nxt.plateau_patience is not None and not changed and self.bad_epochs >= nxt.plateau_patience
            if not (by_epoch or by_plateau):
                break
            self.stage += 1
            self.stage_epoch = epoch
            self.best, self.bad_epochs = None, 0
            self._apply_stage(self.stage)
            self.transitions.append(
                {"stage": self.stage, "epoch": epoch, "trigger": "epoch" if by_epoch else "plateau"}
            )
            changed = True
        return changed

    def record(self, score: float) -> None:
        """Validation score of the epoch just finished (higher is better; NaN counts as no improvement)."""
        if math.isfinite(score) and (self.best is None or score > self.best):
            self.best, self.bad_epochs = score, 0
        else:
            self.bad_epochs += 1

    # --- modes and gradients ------------------------------------------------------------------------------------
    def set_train_mode(self) -> None:
        """Call after model.train(): frozen groups back to eval; optionally all BatchNorm statistics frozen."""
        train = {g.name for g in self.trainable()}
        for g in self.groups:
            if g.name not in train:
                for m in g.modules:
                    m.eval()
        if self.freeze_bn_stats:
            for m in self.model.modules():
                if _is_bn(m):
                    m.eval()

    def _install_no_grad_hooks(self) -> list[Any]:
        enc = getattr(self.model, "encoder", None)
        if enc is None:
            return []

        def pre(_mod, _args):
            self._grad_stack.append(torch.is_grad_enabled())
            if self.encoder_frozen:
                torch.set_grad_enabled(False)

        def post(_mod, _args, _out):
            if self._grad_stack:
                torch.set_grad_enabled(self._grad_stack.pop())

        return [enc.register_forward_pre_hook(pre), enc.register_forward_hook(post, always_call=True)]

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # --- learning rate ------------------------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        if self.cfg.schedule == "constant" or self.total_steps <= 0:
            return 1.0
        t = min(step, self.total_steps) / self.total_steps
        return 0.5 * (1.0 + math.cos(math.pi * t))

    def step_lr(self) -> None:
        """Set every group's LR for the coming optimizer step, then count the step."""
        f = self.lr_factor(self.step)
        for pg in self.optimizer.param_groups:
            w = 1.0
            if self.warmup_steps > 0:
                w = min(1.0, (self.step - pg["start_step"] + 1) / self.warmup_steps)
            pg["lr"] = pg["base_lr"] * f * w
        self.step += 1

    def lrs(self) -> dict[str, float]:
        return {pg["name"]: float(pg["lr"]) for pg in self.optimizer.param_groups}

    # --- description, layout, state -----------------------------------------------------------------------------
    def describe(self) -> list[str]:
        lines = []
        prev: set[str] = set()
        for i, s in enumerate(self.stages):
            groups = self.trainable(i)
            new = [g for g in groups if g.name not in prev]
            prev |= {g.name for g in groups}
            # Counted from 1 as the console's epoch lines count (the recipe's `epoch: 2` is the 0-based index 2:
            # the third epoch, printed "epoch 3: stage 1").
            when = f"epoch {s.epoch + 1}" if s.epoch is not None else "start"
            if s.plateau_patience is not None:
                when = (
                    f"epoch {s.epoch + 1} or " if s.epoch is not None else ""
                ) + f"after {s.plateau_patience} epoch(s) without improvement"
            what = ", ".join(f"{g.name} (lr {self.base_lr(g):.2e})" for g in new) or "nothing new"
            frozen = len(self.groups) - len(groups)
            lines.append(
                f"stage {i} from {when}: +{what}; {len(groups)}/{len(self.groups)} groups train, "
                f"{frozen} frozen" + (", encoder under no_grad" if len(groups) <= 1 else "")
            )
        if self.freeze_bn_stats:
            lines.append("BatchNorm statistics frozen in every group")
        return lines

    def layout(self) -> list[dict[str, Any]]:
        """Parameter-group layout of the optimizer, in order (stored in checkpoints)."""
        return [
            {
                "name": pg["name"],
                "depth": int(pg["depth"]),
                "base_lr": float(pg["base_lr"]),
                "start_step": int(pg["start_step"]),
                "n_params": int(sum(p.numel() for p in pg["params"])),
            }
            for pg in self.optimizer.param_groups
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "stage_epoch": self.stage_epoch,
            "step": self.step,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "transitions": list(self.transitions),
            "steps_per_epoch": self.steps_per_epoch,
            "layout": self.layout(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore stage and counters and rebuild the optimizer's groups in their saved order.

        Load the optimizer's own state dict *after* this: it matches groups by position.
        """
        self.stage = int(state["stage"])
        self.stage_epoch = int(state["stage_epoch"])
        self.step = int(state["step"])
        self.best = state["best"]
        self.bad_epochs = int(state["bad_epochs"])
        self.transitions = list(state.get("transitions", []))
        self.optimizer = self._new_optimizer()
        for entry in state["layout"]:
            if entry["name"] not in self.by_name:
                raise SpecError(
                    f"checkpoint layer group {entry['name']!r} does not exist in this model; "
                    "was the encoder changed since the run started?"
                )
            self._add_group(self.by_name[entry["name"]], start_step=int(entry["start_step"]))
        self._apply_stage(self.stage)
