"""The decided training budget and augmentation of every model the chain trains: the one place they live.

The scripts take these as the defaults of their optimisation flags (`training.cli.add_training_args`): a flag
given on the command line wins, and the card's `recipe` records the values used. `make train` passes no
hyperparameters, so a script run directly trains the model `make train` trains.

A model trained from scratch takes the recipe of its architecture (`--arch`), whichever script trains it. So
the distilled student (`training.distill`) and its no-distillation baseline (`training.train --arch student`)
always get the same budget and augmentation: the comparison measures distillation and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from training.data import Augmentation


@dataclass(frozen=True)
class Recipe:
    """Epochs, peak learning rate of the one-cycle schedule, AdamW's weight decay and the augmentation."""

    epochs: int
    lr: float = 2e-3
    weight_decay: float = 0.05
    augmentation: Augmentation = field(default_factory=Augmentation)


# Keyed by architecture (fashion_cnn.ARCHITECTURES). The epochs are what fits `make train` (full, pruned, int8,
# distilled) in 20 minutes on a 2-core AVX2 CPU, where a full-model epoch takes about 90 s (docs/training.md).
RECIPES: dict[str, Recipe] = {
    # Flips and random erasing did not help the full model (docs/training.md).
    "full": Recipe(epochs=7),
    # Random erasing makes hard labels noisy where the erased patch held the evidence; the teacher, seeing the
    # same erased image, says how much evidence is left ("consistent teaching", Beyer et al. 2022): that is
    # where distillation can pay here. The baseline gets it too, so it is not what makes the difference.
    "student": Recipe(epochs=6, augmentation=Augmentation(erase_probability=0.5)),
}

# Fine-tuning a pruned model from its parent's weights (training.prune).
FINETUNE_RECIPE = Recipe(epochs=2)
