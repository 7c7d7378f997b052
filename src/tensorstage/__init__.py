"""tensorstage: model distributed LLM training and inference before you own the cluster.

The flow is one-directional (see docs/architecture.md): ModelSpec -> symbolic Graph ->
sharded graph -> per-rank-class Program -> Chakra ET traces / simulation / reports.
"""

__version__ = "0.1.0"
