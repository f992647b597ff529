"""Where received KV goes: straight into a request's blocks and state slot of an executor (the
`KvSink` a transfer writes through, `prfaas.transport.receiver`). Used by a decode node taking a
prefill's KV and by a prefill node importing a moved prefix."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prfaas.engine.executor import Executor, SeqState
    from prfaas.transport.chunks import KvPiece


class ExecutorSink:
    """Writes received chunks into the executor's pool for one sequence. Freeing is the job of whoever
    reserved the sequence (it outlives the transfer), so `release` has nothing to do."""

    def __init__(self, executor: Executor, seq: SeqState) -> None:
        self.executor, self.seq = executor, seq

    def write(self, piece: KvPiece) -> None:
        self.executor.write_kv(self.seq, piece.layer, piece.kind, piece.token_start, piece.token_end, piece.tensor)

    def release(self) -> None:
        pass
