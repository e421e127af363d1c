"""Request bodies of the OpenAI API subset the server speaks, and OpenAI-format errors.

Fields the server does implement are validated, and a wrong value is a 400 whose message names the
fix. Fields whose request it cannot honour are a 400 naming them, never silently dropped: ``logprobs``
/ ``top_logprobs``, ``response_format`` of type ``json_object`` or ``json_schema``, ``tools`` with a
``tool_choice`` that requires a call, and non-text message parts (images, audio). Other unknown fields
(``presence_penalty``, ``frequency_penalty``, ``tools`` the model may leave unused...) are ignored:
the answer is plain text.
The two extension fields (``documents``, ``picaso``) come from the client's ``extra_body``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

METHODS = ("picaso-s", "picaso-r", "caso", "soup", "concat")
MAX_STOP_CHARS = 256  # as picaso_rag.generation bounds them: each is checked against the text every token
MAX_SEED = 2**63 - 1


class APIError(Exception):
    """An error answered in OpenAI's JSON format: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 503: "server_overloaded", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def _utf8(text: str | None, name: str) -> None:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer accepts: refuse them by name."""
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{name} contains a lone surrogate (invalid UTF-16 escape); send valid Unicode text") from None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None  # a string, or OpenAI's parts: {"type": "text", "text": ...}

    @model_validator(mode="after")
    def _text_parts_only(self) -> "Message":
        for part in self.content if isinstance(self.content, list) else ():
            kind = part.get("type")
            if kind != "text":
                raise ValueError(f"a {kind!r} part: this server reads text only; send the message as text parts "
                                 "(or a string)")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text part needs its text (a string)")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)


class DocumentSpec(BaseModel):
    """``{"id": "<node id>"}``: a stored document; ``{"text": "..."}``: an ad hoc text (encoded, cached)."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(default=None, min_length=1, max_length=1024)
    text: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> "DocumentSpec":
        if (self.id is None) == (self.text is None):
            raise ValueError('each document is {"id": "<node id>"} or {"text": "..."}, exactly one of the two')
        if self.text is not None and not self.text.strip():
            raise ValueError("a document text is empty or whitespace; drop it")
        return self


class PicasoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal[METHODS] | None = None  # type: ignore[valid-type]
    top_k: int | None = Field(default=None, ge=0, strict=True)  # 0: no retrieval
    task: bool | None = Field(default=None, strict=True)  # a front end's background task: see _Common.is_task


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = Field(default=False, strict=True)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    # strict: true for max_tokens or "yes" for stream is a 400, not 1 and True
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False, strict=True)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False, strict=True)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, strict=True)
    n: int = Field(default=1, strict=True)
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    user: str | None = None
    documents: list[DocumentSpec] | None = None
    picaso: PicasoOptions | None = None
    # asked for, they cannot be honoured (see the module docstring): a 400, not a silent answer without them
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    metadata: dict | None = None  # Open WebUI marks its background tasks with metadata.task (title, tags...)

    @model_validator(mode="after")
    def _checks(self) -> "_Common":
        if self.n != 1:
            raise ValueError("n must be 1 (one choice per request); send several requests for several answers")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes at most 4 non-empty strings of at most {MAX_STOP_CHARS} characters")
        for s in stops:
            _utf8(s, "stop")
        for i, d in enumerate(self.documents or []):
            _utf8(d.text, f"documents[{i}].text")
            _utf8(d.id, f"documents[{i}].id")
        if self.logprobs not in (None, False, 0) or self.top_logprobs:
            raise ValueError("logprobs are not returned by this server; drop logprobs/top_logprobs")
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise ValueError(f"response_format {kind!r} cannot be guaranteed by this server (it answers in plain "
                             "text); drop response_format, or ask for the format in the message")
        if self.tools and (self.tool_choice == "required" or isinstance(self.tool_choice, dict)):
            raise ValueError("this server does not call tools (its answers are plain text), so tool_choice "
                             f"{self.tool_choice!r} cannot be met; send tool_choice 'auto' or 'none', or no tools")
        return self

    @property
    def is_task(self) -> bool:
        """A front end's background task (a title, tags, follow-up suggestions), not a question about the
        documents: ``metadata.task`` (Open WebUI) or ``picaso.task: true`` (any client). Answered
        without retrieval, with a short default budget."""
        return bool((self.metadata or {}).get("task")) or bool(self.picaso and self.picaso.task)

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)

    @model_validator(mode="after")
    def _last_is_user(self) -> "ChatCompletionRequest":
        if self.messages[-1].role != "user" or not self.messages[-1].text.strip():
            raise ValueError("the last message must be a non-empty user message (the question to answer)")
        for i, m in enumerate(self.messages):
            _utf8(m.text, f"messages[{i}].content")
        return self


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)

    @model_validator(mode="after")
    def _valid_text(self) -> "CompletionRequest":
        _utf8(self.prompt, "prompt")
        return self


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A pydantic error list as one sentence naming the field and the fix."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "the request body is not valid JSON; send a JSON object (content-type: application/json).", None
    if kind == "missing":
        return f"{param} is required; add it to the request body.", param
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if param:
        return f"{param}: {msg}; fix this field and retry.", param
    return f"{msg}; send a JSON object with the fields of the OpenAI API.", None
