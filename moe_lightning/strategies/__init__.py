"""Lightning strategies; importing this package registers them, and the installed plugins' strategies, by name in
Lightning's StrategyRegistry."""

from lightning.pytorch.strategies import StrategyRegistry

from moe_lightning.plugins import register_plugin_strategies
from moe_lightning.strategies.expert_parallel import ExpertParallelStrategy

# Lightning registers only its own strategies; ours must be registered when the package is imported.
_NAMES = {
    ExpertParallelStrategy.strategy_name: (
        "Experts sharded over ranks with all-to-all dispatch; dense parameters replicated", {}
    ),
    f"{ExpertParallelStrategy.strategy_name}_fully_shard": (
        "Experts sharded over ranks with all-to-all dispatch; dense parameters sharded with FSDP2",
        {"dense_parallel": "fully_shard"},
    ),
}
for _name, (_description, _init_params) in _NAMES.items():
    if _name not in StrategyRegistry:
        StrategyRegistry.register(_name, ExpertParallelStrategy, description=_description, **_init_params)
register_plugin_strategies()

__all__ = ["ExpertParallelStrategy"]
