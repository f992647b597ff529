"""A hostile process for tests/security: pushes one forged KV chunk (a FIRST_TOKEN chunk with a
token of its choosing) for a real transfer id, on the raw-TCP plane and on gRPC PushKv, under
whatever TLS identity its PRFAAS_* variables give it, and prints one JSON line with each
plane's verdict: {"tcp": "CODE: message", "grpc": "CODE: message"} ("OK" if it was accepted).

    python tests/security/inject_kv.py TRANSFER_ID TCP_ADDRESS GRPC_ADDRESS DECODE_NODE_ID
"""

from __future__ import annotations

import asyncio
import json
import sys

from prfaas.transport.errors import TransferError
from prfaas.transport.grpc_push import GrpcPushCall, KvChannels
from prfaas.transport.tcp import TcpPushCall
from prfaas.transport.wire import encode_first_token

FORGED_TOKEN = 7


async def push(call: TcpPushCall | GrpcPushCall, transfer_id: str) -> str:
    try:
        await call.write([encode_first_token(transfer_id, 0, 1, FORGED_TOKEN)])
        await call.finish()
        return "OK"
    except TransferError as e:
        return f"{e.code.value}: {e.message}"
    except Exception as e:  # noqa: BLE001 - the verdict is what the test reads
        err = await call.error(e)
        return f"{err.code.value}: {err.message}"


async def main(transfer_id: str, tcp: str, grpc_address: str, node: str) -> dict[str, str]:
    out = {"tcp": await push(TcpPushCall(tcp, 10.0, expect=node), transfer_id)}
    channels = KvChannels(1)
    try:
        out["grpc"] = await push(GrpcPushCall(channels.get(grpc_address, node)[0], grpc_address, 10.0), transfer_id)
    finally:
        await channels.close()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:5]))), flush=True)
