"""Chakra ET traces: schema, per-class templates stamped per rank, parallel writer, reader/validator.

Public API: `write_chakra`, `expand_classes`, `read_chakra`, `decode_chakra`, `validate_trace_dir`,
`node_attrs`.
"""

from tensorstage.trace.program_json import expand_classes
from tensorstage.trace.reader import decode_chakra, node_attrs, read_chakra, validate_trace_dir
from tensorstage.trace.writer import write_chakra

__all__ = ["decode_chakra", "expand_classes", "node_attrs", "read_chakra", "validate_trace_dir", "write_chakra"]
