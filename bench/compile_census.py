"""What torch.compile made of a workload: graphs, graph breaks, compiled frames and recompiles.

A ``CompileCensus`` counts over the block it wraps (a worker compiles and warms up one case, so
dynamo's process-wide counters are that case's): the distinct graphs dynamo captured, the graph
breaks it met while compiling (once per compilation of a frame, not per call at run time), the
frames it compiled and, of those, the recompiles (a frame compiled again for new guards: another
shape, another Python value). A graph break splits a frame's graph and its resumed
remainder is a frame of its own, so breaks make graphs and frames, and frames shared by layers of
several shapes make recompiles. Reported as count metrics: deterministic for a model, its sizes
and the torch build.
"""

from __future__ import annotations

from types import CodeType, TracebackType

from torch._dynamo import convert_frame
from torch._dynamo.utils import counters

from bench.metrics import Metric, count

METRICS = ("compiled_graphs", "graph_breaks", "compiled_frames", "recompiles")


class CompileCensus:
    def __init__(self) -> None:
        self.codes: list[CodeType] = []

    def __enter__(self) -> CompileCensus:
        counters.clear()
        self._handle = convert_frame.register_bytecode_hook(self._compiled)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._handle.remove()
        self.graphs = counters["stats"]["unique_graphs"]
        self.breaks = sum(counters["graph_break"].values())

    def _compiled(self, code: CodeType, new_code: CodeType) -> None:  # returns None: the bytecode stays
        self.codes.append(code)

    def metrics(self) -> dict[str, Metric]:
        frames = len(self.codes)
        values = {"compiled_graphs": self.graphs, "graph_breaks": self.breaks, "compiled_frames": frames,
                  "recompiles": frames - len(set(self.codes))}
        return {name: count(float(value), "1") for name, value in values.items()}
