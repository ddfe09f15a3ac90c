"""The endpoints OpenAI and vLLM clients call beside generation: /tokenize and /detokenize (vLLM's shapes),
/v1/models/{id}, /version, and /v1/embeddings (the model's mean-pooled, L2-normalised hidden states).
They sit behind the same guards as every route: the Guards middleware sees every request of the app."""
import asyncio
import base64
from typing import Literal

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictInt

import dsinfer
from dsinfer.server.errors import ApiError
from dsinfer.server.protocol import ChatMessage
from dsinfer.server.schemas import ERRORS


class TokenizeRequest(BaseModel):
    """Either a prompt, or messages rendered through the chat template (vLLM's two tokenize bodies in one)."""
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(None, description="default: true for a prompt, false for messages "
                                                                    "(the chat template writes its own)")
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "dsinfer"
    max_model_len: int


class VersionResponse(BaseModel):
    version: str


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="only the model's hidden size is supported")
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32 values")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class UtilityRoutes:
    """The routes' logic over one AsyncLLM; the router below only binds paths to these methods."""

    def __init__(self, async_llm, model_name: str):
        self.async_llm, self.model_name = async_llm, model_name
        self.llm = async_llm.llm
        self.max_model_len = self.llm.max_model_len
        self.model_vocab = self.llm.model.config.vocab_size
        self.hidden_size = self.llm.model.config.hidden_size

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    def check_model(self, name: str | None):
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    def need_tokenizer(self, param: str):
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer (its directory has no tokenizer.json)", param)
        return self.tokenizer

    def check_ids(self, ids: list[int], limit: int, param: str):
        bad = next((i for i in ids if not 0 <= i < limit), None)
        if bad is not None:
            raise ApiError(400, f"{param} has the token id {bad}, outside the vocabulary [0, {limit})", param,
                           "invalid_value")

    def card(self) -> ModelCard:
        return ModelCard(id=self.model_name, max_model_len=self.max_model_len)

    async def retrieve_model(self, model_id: str) -> ModelCard:
        if model_id != self.model_name:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")
        return self.card()

    async def version(self) -> VersionResponse:
        return VersionResponse(version=dsinfer.__version__)

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give either prompt or messages", "prompt" if req.prompt is None else "messages")
        ids = self.prompt_ids(req) if req.messages is None else self.chat_ids(req)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids, token_strs=strs)

    def prompt_ids(self, req: TokenizeRequest) -> list[int]:
        tok = self.need_tokenizer("prompt")
        add = True if req.add_special_tokens is None else req.add_special_tokens
        return self.encode(tok, req.prompt, add, "prompt")

    def chat_ids(self, req: TokenizeRequest) -> list[int]:
        tok = self.need_tokenizer("messages")
        conv = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = tok.apply_chat_template(conv, req.add_generation_prompt)
        except ValueError as exc:
            raise ApiError(400, f"messages could not be formatted by the chat template: {exc}", "messages")
        return self.encode(tok, text, bool(req.add_special_tokens), "messages")

    @staticmethod
    def encode(tok, text: str, add_special_tokens: bool, param: str) -> list[int]:
        try:
            return tok.encode(text, add_special_tokens=add_special_tokens)
        except (ValueError, TypeError) as exc:  # a lone surrogate cannot be encoded
            raise ApiError(400, f"{param} could not be tokenized: {exc}", param, "invalid_value")

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(req.model)
        tok = self.need_tokenizer("tokens")
        self.check_ids(req.tokens, len(tok), "tokens")
        return DetokenizeResponse(prompt=tok.decode(req.tokens, skip_special_tokens=False))

    async def embeddings(self, req: EmbeddingRequest) -> EmbeddingResponse:
        self.check_model(req.model)
        if req.dimensions is not None and req.dimensions != self.hidden_size:
            raise ApiError(400, f"dimensions must be left out or {self.hidden_size} (this model's hidden size)",
                           "dimensions", "unsupported")
        prompts = [self.embedding_ids(item) for item in self.embedding_items(req.input)]
        vectors = [await asyncio.to_thread(self.async_llm.embed, ids) for ids in prompts]
        data = [Embedding(index=i, embedding=encode_vector(v, req.encoding_format)) for i, v in enumerate(vectors)]
        used = sum(len(ids) for ids in prompts)
        return EmbeddingResponse(data=data, model=self.model_name,
                                 usage=EmbeddingUsage(prompt_tokens=used, total_tokens=used))

    @staticmethod
    def embedding_items(value) -> list:
        """The inputs one by one: a string or a list of token ids is one input; a list of either is many."""
        items = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else list(value)
        if not items:
            raise ApiError(400, "input is empty", "input", "invalid_value")
        return items

    def embedding_ids(self, item) -> list[int]:
        if item == "":
            raise ApiError(400, "input has an empty string", "input", "invalid_value")
        if isinstance(item, str):
            ids = self.encode(self.need_tokenizer("input"), item, True, "input")
        else:
            ids = list(item)
            self.check_ids(ids, self.model_vocab, "input")
        if not ids:
            raise ApiError(400, "input has an empty item", "input", "invalid_value")
        if len(ids) > self.max_model_len:
            raise ApiError(400, f"an input has {len(ids)} tokens, but this model's maximum context length is "
                           f"{self.max_model_len} tokens", "input", "context_length_exceeded")
        return ids


def encode_vector(vector, encoding_format: str) -> list[float] | str:
    values = vector.detach().float().cpu().numpy()
    if encoding_format == "base64":
        return base64.b64encode(values.astype("<f4").tobytes()).decode("ascii")
    return np.asarray(values, dtype=np.float64).tolist()


def utility_router(async_llm, model_name: str) -> APIRouter:
    """The router of these endpoints, for app.include_router (the app's middleware guards them)."""
    routes = UtilityRoutes(async_llm, model_name)
    router = APIRouter(responses=ERRORS)
    router.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True)(routes.tokenize)
    router.post("/detokenize", response_model=DetokenizeResponse)(routes.detokenize)
    router.get("/v1/models/{model_id:path}", response_model=ModelCard)(routes.retrieve_model)
    router.get("/version", response_model=VersionResponse)(routes.version)
    router.post("/v1/embeddings", response_model=EmbeddingResponse)(routes.embeddings)
    return router
