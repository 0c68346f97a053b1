"""Routing statistics as plain functions over :class:`Routing` objects (no Lightning inside)."""

from moe_lightning.analytics.assignment import UNROUTED, chosen_experts, top1_expert
from moe_lightning.analytics.churn import churn_counts, routing_churn
from moe_lightning.analytics.cooccurrence import cooccurrence_counts
from moe_lightning.analytics.cost import expert_flops, expert_flops_per_row
from moe_lightning.analytics.counts import RoutingCounts
from moe_lightning.analytics.expert_timing import expert_seconds, recorded_expert_inputs, time_share
from moe_lightning.analytics.entropy import distribution_entropy, load_entropy, token_entropy
from moe_lightning.analytics.layer_stats import LayerRoutingStats, layer_statistics
from moe_lightning.analytics.load import coefficient_of_variation, dead_experts, dropped_fraction, load_share, max_mean_imbalance
from moe_lightning.analytics.near_ties import BF16_TIE_MARGIN, near_tie_mask, topk_margin
from moe_lightning.analytics.specialisation import (
    label_expert_counts,
    normalized_mutual_information,
    token_expert_counts,
    top_tokens_per_expert,
)
from moe_lightning.analytics.summary import LayerSummary, summarize_routings
from moe_lightning.analytics.traces import load_traces, save_trace, trace_columns
from moe_lightning.analytics.transitions import transition_counts

__all__ = [
    "BF16_TIE_MARGIN", "UNROUTED", "LayerRoutingStats", "LayerSummary", "RoutingCounts", "chosen_experts",
    "churn_counts", "coefficient_of_variation", "cooccurrence_counts", "dead_experts", "distribution_entropy",
    "dropped_fraction", "expert_flops", "expert_flops_per_row", "expert_seconds", "label_expert_counts", "layer_statistics",
    "load_entropy", "load_share", "load_traces", "max_mean_imbalance", "near_tie_mask",
    "normalized_mutual_information", "recorded_expert_inputs", "routing_churn", "save_trace", "summarize_routings", "time_share", "token_entropy",
    "token_expert_counts", "top1_expert", "top_tokens_per_expert", "topk_margin", "trace_columns",
    "transition_counts",
]
