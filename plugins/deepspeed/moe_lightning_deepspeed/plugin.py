"""The record the ``moe_lightning.plugins`` entry point points to: what this plugin registers (nothing imported)."""

from moe_lightning.plugins import Plugin, Registration

_STRATEGY = "moe_lightning_deepspeed.strategy:DeepSpeedExpertParallelStrategy"

PLUGIN = Plugin("deepspeed", (
    Registration("strategy", "deepspeed_moe", _STRATEGY, "DeepSpeed ZeRO-2 for dense parameters, experts sharded "
                 "over ranks with all-to-all"),
    *(
        Registration("strategy", f"deepspeed_moe_stage_{stage}", _STRATEGY, description, init_params={"stage": stage})
        for stage, description in (
            (1, "DeepSpeed ZeRO-1 for dense parameters, experts sharded over ranks with all-to-all"),
            (2, "DeepSpeed ZeRO-2 for dense parameters, experts sharded over ranks with all-to-all"),
            (3, "DeepSpeed ZeRO-3 for all parameters, experts replicated (expert_parallel_size=1)"),
        )
    ),
    Registration("experts", "deepspeed_moe", "moe_lightning_deepspeed.experts:DeepSpeedMoELayer",
                 "deepspeed.moe.layer.MoE (its TopKGate and experts) behind MoELayer's interface"),
    Registration("router_adapter", "deepspeed_top_k_gate", "moe_lightning_deepspeed.routing:routing_from_gate",
                 "a Routing from DeepSpeed's TopKGate outputs"),
))
