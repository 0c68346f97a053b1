"""Lightning strategies; importing this package registers them by name in Lightning's StrategyRegistry."""

from lightning.pytorch.strategies import StrategyRegistry

from moe_lightning.strategies.expert_parallel import ExpertParallelStrategy

# Lightning registers only its own strategies; ours must be registered when the package is imported.
if ExpertParallelStrategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(
        ExpertParallelStrategy.strategy_name,
        ExpertParallelStrategy,
        description="Experts sharded over ranks with all-to-all dispatch; dense parameters replicated",
    )

__all__ = ["ExpertParallelStrategy"]
