"""Operating tools: inspection (status, health, gauges), dead letters, replay, safe trimming, dead consumers.

Library functions over a `Streams` connection; the `fastworker` subcommands and the fleet's periodic jobs call
them. Reading functions never write; every writing function says in its docstring what it changes.
"""

from fastworker.ops.consumers import dead_consumers, remove_dead_consumers
from fastworker.ops.deadletters import (
    DeadLetter,
    RequeueResult,
    dead_letter_pair,
    get_dead_letter,
    list_dead_letters,
    purge_dead_letters,
    requeue_dead_letters,
)
from fastworker.ops.inspect import (
    ConsumerInfo,
    GroupInfo,
    Health,
    Snapshot,
    StreamInfo,
    check_health,
    inspect_stream,
    list_streams,
    missing_groups,
    snapshot,
)
from fastworker.ops.replay import ReplayPlan, ResetPlan, plan_replay, plan_reset, replay, reset_group
from fastworker.ops.trim import TrimRefused, TrimResult, safe_trim, supports_acked_trim

__all__ = [
    "ConsumerInfo",
    "DeadLetter",
    "GroupInfo",
    "Health",
    "ReplayPlan",
    "RequeueResult",
    "ResetPlan",
    "Snapshot",
    "StreamInfo",
    "TrimRefused",
    "TrimResult",
    "check_health",
    "dead_consumers",
    "dead_letter_pair",
    "get_dead_letter",
    "inspect_stream",
    "list_dead_letters",
    "list_streams",
    "missing_groups",
    "plan_replay",
    "plan_reset",
    "purge_dead_letters",
    "remove_dead_consumers",
    "replay",
    "requeue_dead_letters",
    "reset_group",
    "safe_trim",
    "snapshot",
    "supports_acked_trim",
]
