"""Communication utilities: recording torch.distributed collectives (see `recorder`)."""
from .recorder import (
    COLLECTIVE_OPS,
    CollectiveEvent,
    CollectiveRecorder,
    GroupId,
    group_id,
    record_collectives,
)

__all__ = ["COLLECTIVE_OPS", "CollectiveEvent", "CollectiveRecorder", "GroupId", "group_id", "record_collectives"]
