"""Memory and communication planner: `erc-megatron plan --config RECIPE [--gpus N --gpu-memory-gb M]`.

- `inputs`: the recipe (raw YAML), the model's architecture, a layout, the step's workload;
- `params`: parameter counts per rank and stage;
- `memory`: per-rank parameter / gradient / optimizer / activation / logits bytes;
- `comm`: every collective of one step, per rank, group and phase (counts, bytes);
- `search`: the layouts that fit, ranked by an estimated learner time per step;
- `report`: the console tables and the JSON document.
"""
from erc_megatron.plan.comm import Event, predict_step, totals
from erc_megatron.plan.inputs import Arch, Layout, StepShapes, Workload, load_recipe_inputs
from erc_megatron.plan.memory import MemoryBreakdown, rank_memory
from erc_megatron.plan.search import Hardware, search

__all__ = ["Arch", "Event", "Hardware", "Layout", "MemoryBreakdown", "StepShapes", "Workload", "load_recipe_inputs",
           "predict_step", "rank_memory", "search", "totals"]
