"""Structured outputs as requests ask for them: OpenAI's response_format and vLLM's structured_outputs, turned
into the engine's StructuredOutputsParams."""
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dsinfer.sampling_params import StructuredOutputsParams


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None
    model_config = ConfigDict(populate_by_name=True, extra="allow")


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (free), json_object (any JSON object) or json_schema."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(BaseModel):
    """vLLM's structured_outputs request field: exactly one of json, regex, choice, grammar, json_object."""
    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    def params(self) -> StructuredOutputsParams:
        fields = self.model_dump(exclude={"json_"})
        return StructuredOutputsParams(json=self.json_, **fields)


def constraint_field(response_format: ResponseFormat | None, structured: StructuredOutputsBody | None) -> str:
    """The request field an error in the constraint names."""
    if structured is not None:
        return "structured_outputs"
    if response_format is not None and response_format.type == "json_schema":
        return "response_format.json_schema.schema"
    return "response_format"


def requested_constraint(response_format: ResponseFormat | None,
                         structured: StructuredOutputsBody | None) -> StructuredOutputsParams | None:
    """The constraint a request asks for (None: free text); ValueError for both fields at once or an incomplete
    json_schema."""
    wants_json = response_format is not None and response_format.type != "text"
    if wants_json and structured is not None:
        raise ValueError("SamplingParams.structured_outputs: give either response_format or structured_outputs, "
                         "not both")
    if structured is not None:
        return structured.params()
    if not wants_json:
        return None
    if response_format.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if response_format.json_schema is None:
        raise ValueError("SamplingParams.structured_outputs: response_format of type json_schema needs its "
                         "json_schema field")
    return StructuredOutputsParams(json=response_format.json_schema.schema_)
