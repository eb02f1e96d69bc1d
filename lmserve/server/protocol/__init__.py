"""The ONLY request/response models of the HTTP API: OpenAI-compatible, LMDeploy-native and the proxy's node
registration. Imported by the server, the proxy and the client; never copy a model elsewhere.

Field names and defaults follow LMDeploy's OpenAPI schema (docs: shared/reference/lmdeploy-openapi-endpoints.txt).
Fields that exist on the wire but are not supported yet are declared here (so /docs shows them) and rejected
with a 400 by the serving layer when set; they are never ignored silently.

One job per module; import from this package (`from lmserve.server.protocol import X`), which re-exports them all:
  common      the `_Model` base, errors, /v1/models, usage, stream options, response_format
  openai      /v1/chat/completions and /v1/completions
  lmdeploy    /generate, /v1/chat/interactive, control endpoints (abort, reset, update_weights), proxy nodes
  embeddings  /v1/embeddings, /pooling, /v1/encode
  distserve   /distserve/* (prefill-decode disaggregation) and the DistServe fields of chat and completions
"""

from __future__ import annotations

from lmserve.server.protocol.common import (ErrorInfo, ErrorResponse, FinishReasonStr, JsonSchema, ModelCard,
                                            ModelList, ModelPermission, PromptTokensDetails, ResponseFormat,
                                            StreamOptions, UsageInfo, _Model)
from lmserve.server.protocol.openai import (ChatCompletionRequest, ChatCompletionResponse,
                                            ChatCompletionResponseChoice, ChatCompletionResponseStreamChoice,
                                            ChatCompletionStreamResponse, ChatCompletionTokenLogprob, ChatMessage,
                                            ChoiceLogprobs, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                            CompletionResponseChoice, CompletionStreamResponse, DeltaFunctionCall,
                                            DeltaMessage, DeltaToolCall, FunctionCall, FunctionDefinition,
                                            GuidedFields, Tool, ToolCall, ToolChoice, ToolChoiceFuncName, TopLogprob)
from lmserve.server.protocol.lmdeploy import (AbortRequest, ChatInteractiveRequest, ChatInteractiveResponse,
                                              GenerateMetaInfo, GenerateRequest, GenerateResponse, NodeRequest,
                                              NodeStatus, ResetRequest, UpdateParamsRequest)
from lmserve.server.protocol.distserve import (DistServeCacheFreeRequest, DistServeConnectionRequest,
                                               DistServeConnectionResponse, DistServeConnectionStatus,
                                               DistServeDropConnectionRequest, DistServeEngineConfig,
                                               DistServeEngineEndpointInfo, DistServeFields, DistServeInitRequest,
                                               DistServeInitResponse, DistServeKVTransferEndpointInfo, EngineRole,
                                               MigrationProtocol, MigrationRequest)
from lmserve.server.protocol.embeddings import (EmbeddingData, EmbeddingInput, EmbeddingsRequest, EmbeddingsResponse,
                                                EncodeRequest, EncodeResponse, PoolingData, PoolingRequest,
                                                PoolingResponse)


__all__ = ["AbortRequest", "ChatCompletionRequest", "ChatCompletionResponse", "ChatCompletionResponseChoice",
           "ChatCompletionResponseStreamChoice", "ChatCompletionStreamResponse", "ChatCompletionTokenLogprob",
           "ChatInteractiveRequest", "ChatInteractiveResponse", "ChatMessage", "ChoiceLogprobs", "CompletionLogprobs",
           "CompletionRequest", "CompletionResponse", "CompletionResponseChoice", "CompletionStreamResponse",
           "DeltaFunctionCall", "DeltaMessage", "DeltaToolCall", "DistServeCacheFreeRequest",
           "DistServeConnectionRequest", "DistServeConnectionResponse", "DistServeConnectionStatus",
           "DistServeDropConnectionRequest", "DistServeEngineConfig", "DistServeEngineEndpointInfo", "DistServeFields",
           "DistServeInitRequest", "DistServeInitResponse", "DistServeKVTransferEndpointInfo", "EngineRole",
           "MigrationProtocol", "MigrationRequest", "EmbeddingData", "EmbeddingInput",
           "EmbeddingsRequest", "EmbeddingsResponse", "EncodeRequest", "EncodeResponse", "ErrorInfo", "ErrorResponse",
           "FinishReasonStr", "FunctionCall", "FunctionDefinition", "GenerateMetaInfo", "GenerateRequest",
           "GenerateResponse", "GuidedFields", "JsonSchema", "ModelCard", "ModelList", "ModelPermission",
           "NodeRequest", "NodeStatus", "PoolingData", "PoolingRequest", "PoolingResponse", "PromptTokensDetails",
           "ResetRequest", "ResponseFormat", "StreamOptions", "Tool", "ToolCall", "ToolChoice", "ToolChoiceFuncName",
           "TopLogprob", "UpdateParamsRequest", "UsageInfo", "_Model"]
