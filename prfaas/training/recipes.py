"""The training run that made the shipped models (their configs: prfaas/model/trained/configs.py)."""

from __future__ import annotations

from dataclasses import dataclass

from prfaas.model.trained.configs import CONFIGS, PRESET, VOCAB_SIZE, model_config

__all__ = ["CONFIGS", "PRESET", "VOCAB_SIZE", "TrainRecipe", "model_config"]


@dataclass(frozen=True)
class TrainRecipe:
    seq_len: int = 512  # tokens per row
    batch: int = 4  # rows per step (2 rows and 800 steps at 4e-3 came out worse: docs/models.md)
    steps: int = 400
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch
