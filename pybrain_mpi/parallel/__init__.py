"""Model parallelism: pipelines over consecutive ranks, data x pipeline grids, tensor-split layers.

    pipe = pbm.parallel.Pipeline(model, balance=[3, 5], micro_batches=8, schedule="1f1b",
                                 loss_fn=torch.nn.MSELoss())
    loss = pipe.step(x, y)          # x used on stage 0, y on the last stage
    optimizer.step()                # over pipe.parameters(): this stage's only

See docs/architecture.md ("Model parallelism") for where each piece lives.
"""

from .grid import Grid, Group
from .p2p import Channel, Message
from .parameter_server import ParameterServer, ServerReport, shard_ranges
from .pipeline import SCHEDULES, Pipeline, partition_balanced, pipeline_layers
from .staged import StagedLayers, layer_seed
from .tensor import ColumnParallelLinear, RowParallelLinear

__all__ = ["Pipeline", "Grid", "Group", "Channel", "Message", "ColumnParallelLinear",
           "RowParallelLinear", "partition_balanced", "pipeline_layers", "SCHEDULES",
           "ParameterServer", "ServerReport", "shard_ranges", "StagedLayers", "layer_seed"]
