"""ExpertCollapseGuard: the collapse preset of :class:`RoutingAlarms` (dead experts, or a collapsed load)."""

from __future__ import annotations

from moe_lightning.callbacks.alarms import Action, AlarmRule, RoutingAlarms


class ExpertCollapseGuard(RoutingAlarms):
    """:class:`RoutingAlarms` with two rules that share ``patience`` and ``action``: a layer has dead experts (an
    expert's load at most ``dead_threshold`` times the mean), or its load entropy over ``log(E)`` is under
    ``min_load_entropy``. Every ``check_every_n_steps`` optimizer steps it sums each MoE layer's load over ranks;
    after ``patience`` failed checks in a row it acts:

    - ``"warn"``: a warning naming the layer, the metric and its value;
    - ``"stop"``: the warning, then ``trainer.should_stop``;
    - ``"reinit"``: the warning, then each dead expert becomes a noisy copy of the layer's busiest expert
      (see :func:`reinit_dead_experts`); a collapse without dead experts is only warned about;
    - ``"bias_bump"``: the warning, then the dead experts' selection bias goes up (aux-loss-free routers).

    Fired alarms go where :class:`RoutingAlarms` sends them (loggers, ``alarms.jsonl``, the dashboard).

    Args:
        check_every_n_steps: optimizer steps between checks (each costs one all-reduce and a host sync).
        dead_threshold: load at most this times the mean load counts as dead.
        min_load_entropy: normalised load entropy (1 is uniform) below which a layer has collapsed.
        patience: consecutive failed checks before acting.
        action: ``"warn"``, ``"stop"``, ``"reinit"`` or ``"bias_bump"``.
        reinit_noise: noise of a re-initialised expert, relative to the donor weights' std.
        seed: seeds the re-initialisation noise (with the step), the same on every rank.
    """

    def __init__(
        self,
        check_every_n_steps: int = 50,
        dead_threshold: float = 0.05,
        min_load_entropy: float = 0.5,
        patience: int = 3,
        action: Action = "warn",
        reinit_noise: float = 0.01,
        seed: int = 0,
    ) -> None:
        rules = [AlarmRule("dead_experts", 0, patience, action),
                 AlarmRule("load_entropy", min_load_entropy, patience, action)]
        super().__init__(rules, check_every_n_steps, dead_threshold=dead_threshold, probe_size=0,
                         reinit_noise=reinit_noise, seed=seed)
