"""Communication: recording torch.distributed collectives (`recorder`) and the training-step
communication profiler (`profiler`, `report`, `plot`, `timing`)."""
from .profiler import PHASES, ROLES, CommProfiler, comm_phase, start_comm_profiler
from .recorder import (
    COLLECTIVE_OPS,
    CollectiveEvent,
    CollectiveRecorder,
    GroupId,
    group_id,
    record_collectives,
)

__all__ = ["COLLECTIVE_OPS", "PHASES", "ROLES", "CollectiveEvent", "CollectiveRecorder", "CommProfiler", "GroupId",
           "comm_phase", "group_id", "record_collectives", "start_comm_profiler"]
