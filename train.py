"""LoRA finetuning: not implemented yet (issue: train.py as a Cog training job)."""

from cog import BaseModel, Path


class TrainingOutput(BaseModel):
    weights: Path


def train(train_data: Path) -> TrainingOutput:
    raise NotImplementedError("training is not implemented yet")
