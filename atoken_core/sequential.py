"""First-party curriculum: the recipe's ``[[stage]]`` blocks in order, modalities mixed
round-robin with gradient accumulation (every optimiser step sees every active modality)."""

from __future__ import annotations

from typing import Any

from atoken_core.interfaces import Curriculum, StagePlan


class Sequential(Curriculum):
    def __init__(self, config: Any) -> None:
        self.config = config

    def stages(self, recipe: Any) -> list[StagePlan]:
        plans = []
        bottleneck, latent_dim = recipe.bottleneck, recipe.model.latent_dim
        for i, st in enumerate(recipe.stage):
            bottleneck = st.bottleneck or bottleneck  # a stage's switch stays in force afterwards
            latent_dim = st.latent_dim or latent_dim
            plans.append(
                StagePlan(
                    index=i, name=st.name, steps=st.steps, modalities=tuple(st.modalities),
                    batch_size=st.batch_size, lr=st.lr if st.lr is not None else recipe.optim.lr,
                    bottleneck=bottleneck, latent_dim=latent_dim, weights=dict(st.weights),
                )
            )
        return plans

    def modality_schedule(self, stage: StagePlan, step: int) -> list[str]:
        # Round-robin order rotates with the step so no modality is always accumulated first.
        k = step % len(stage.modalities)
        return list(stage.modalities[k:] + stage.modalities[:k])
