"""/distserve/* wire models (LMDeploy's `lmdeploy/pytorch/disagg/`: same names, same fields, enums as their
integer values) and the DistServe fields of the generation requests.

LMDeploy leaves TCP as a to-do (`DistServeTCPConfig` is empty); we serve exactly that protocol. The TCP
`endpoint_info` string of `DistServeKVTransferEndpointInfo` is a JSON object: the KV server's ZeroMQ address and
the KV layout (block_size, dtype, num_layers, num_kv_heads, head_dim), which peers compare at connect time.
"""
from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field

from lmserve.server.protocol.common import _Model


class MigrationProtocol(enum.IntEnum):
    TCP = 1
    RDMA = 2
    NVLINK = 3


class EngineRole(enum.IntEnum):
    Hybrid = 1
    Prefill = 2
    Decode = 3


class DistServeConnectionStatus(enum.IntEnum):
    SUCCESS = 1
    FAIL = 2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class DistServeTCPConfig(_Strict):
    """Nothing to configure: the KV server binds a free port on the host of `local_engine_id`."""


class DistServeRDMAConfig(_Strict):
    with_gdr: bool = True
    link_type: int = 2


class DistServeNVLinkConfig(_Strict):
    pass


class DistServeEngineConfig(_Strict):
    tp_size: int
    ep_size: int
    dp_size: int
    pp_size: int | None
    dp_rank: int
    block_size: int
    num_cpu_blocks: int
    num_gpu_blocks: int


class DistServeInitRequest(_Strict):
    local_engine_id: str
    local_engine_config: DistServeEngineConfig
    remote_engine_id: str
    remote_engine_config: DistServeEngineConfig
    protocol: MigrationProtocol
    rank: int | None = None
    tcp_config: DistServeTCPConfig | None = None
    rdma_config: DistServeRDMAConfig | None = None
    nvlink_config: DistServeNVLinkConfig | None = None


class DistServeEngineEndpointInfo(_Strict):
    zmq_address: str


class DistServeKVTransferEndpointInfo(_Strict):
    protocol: MigrationProtocol
    endpoint_info: str


class DistServeInitResponse(_Strict):
    status: DistServeConnectionStatus
    engine_endpoint_info: DistServeEngineEndpointInfo
    kvtransfer_endpoint_info: list[DistServeKVTransferEndpointInfo]


class DistServeConnectionRequest(_Strict):
    protocol: MigrationProtocol
    remote_engine_id: str
    remote_engine_endpoint_info: DistServeEngineEndpointInfo
    remote_kvtransfer_endpoint_info: list[DistServeKVTransferEndpointInfo]


class DistServeConnectionResponse(_Strict):
    status: DistServeConnectionStatus


class DistServeDropConnectionRequest(_Strict):
    engine_id: str
    remote_engine_id: str


class DistServeCacheFreeRequest(_Strict):
    remote_engine_id: str
    remote_session_id: int


class MigrationRequest(_Strict):
    protocol: MigrationProtocol = MigrationProtocol.TCP
    remote_engine_id: str
    remote_session_id: int
    remote_token_id: int
    remote_block_ids: list[int] = Field(default_factory=list)
    is_dummy_prefill: bool = False


class DistServeFields(_Model):
    """Fields LMDeploy's proxy adds to /v1/chat/completions and /v1/completions in DistServe mode: the prefill
    request keeps its KV (`preserve_cache`, `with_cache`: answer `cache_block_ids`), the decode request names
    where to pull it from (`migration_request`)."""
    migration_request: MigrationRequest | None = None
    with_cache: bool = False
    preserve_cache: bool = False
