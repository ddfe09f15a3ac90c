"""DeepSeek-V3 tool calls, as vLLM's deepseek_v3 tool parser reads them:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
    ...<｜tool▁calls▁end｜>

parsed into OpenAI tool_calls (whole, or as stream deltas), and the grammar that forces such calls for
tool_choice "required" or a named function."""
import json
import uuid

from dsinfer.server.reasoning import held_back

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
ARGS_OPEN, ARGS_CLOSE = "\n```json\n", "\n```"
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": "[ ]?"}  # as structured outputs' default


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex[:24]}"


def parse_call(segment: str) -> tuple[str | None, str | None, bool]:
    """One call's text after <｜tool▁call▁begin｜>: (name or None until it is complete, arguments so far or None,
    whether the arguments are complete)."""
    _, sep, rest = segment.partition(SEP)
    name, newline, _ = rest.partition("\n")
    if not sep or not newline:
        return None, None, False
    _, opened, args = rest.partition(ARGS_OPEN)
    if not opened:
        return name.strip(), None, False
    body, closed, _ = args.partition(ARGS_CLOSE)
    if not closed:
        body = body[:len(body) - held_back(body, ARGS_CLOSE)]
    return name.strip(), body, bool(closed)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content before the calls or None, complete calls as OpenAI tool_calls); no calls: (text, [])."""
    if CALLS_BEGIN not in text:
        return text, []
    content, _, calls_text = text.partition(CALLS_BEGIN)
    calls = []
    for segment in calls_text.split(CALLS_END)[0].split(CALL_BEGIN)[1:]:
        name, args, complete = parse_call(segment.split(CALL_END)[0] if CALL_END in segment else segment)
        if name and complete:
            calls.append(tool_call(call_id(), name, args))
    return content or None, calls


def tool_call(cid: str, name: str, arguments: str) -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


class ToolCallStream:
    """A choice's content deltas -> stream deltas: {"content": ...} before the calls, then per call a first
    {"tool_calls": [{index, id, type, function: {name, arguments: ""}}]} and argument fragments after it."""

    def __init__(self):
        self.text, self.sent_content, self.names_sent, self.sent_args = "", 0, 0, []
        self.ids: list[str] = []

    @property
    def called(self) -> bool:
        return bool(self.ids)

    def feed(self, delta: str, final: bool = False) -> list[dict]:
        self.text += delta
        content, found, calls_text = self.text.partition(CALLS_BEGIN)
        if not found and not final:
            content = content[:len(content) - held_back(content, CALLS_BEGIN)]
        out = [{"content": content[self.sent_content:]}] if len(content) > self.sent_content else []
        self.sent_content = max(self.sent_content, len(content))
        if found:
            segments = calls_text.split(CALLS_END)[0].split(CALL_BEGIN)[1:]
            for i, segment in enumerate(segments):
                out += self.call_deltas(i, parse_call(segment.split(CALL_END)[0]))
        return out

    def call_deltas(self, index: int, parsed) -> list[dict]:
        name, args, _ = parsed
        out = []
        if name is None:
            return out
        if index == len(self.ids):
            self.ids.append(call_id())
            self.sent_args.append(0)
            out.append({"tool_calls": [{"index": index, **tool_call(self.ids[index], name, "")}]})
        if args and len(args) > self.sent_args[index]:
            out.append({"tool_calls": [{"index": index, "function": {"arguments": args[self.sent_args[index]:]}}]})
            self.sent_args[index] = len(args)
        return out


def tool_grammar(tools: list[dict], named: str | None, token_id, several: bool = False) -> str:
    """A Lark grammar (llguidance's, with %json) of a DeepSeek-V3 call of the given tools (only `named` when
    given), or of one or more with `several`, each with arguments of its parameters' schema. token_id(text) is a
    special token's id, or None when the vocabulary lacks it (then the grammar spells it out)."""
    def tok(text):
        tid = token_id(text)
        return f"<[{tid}]>" if tid is not None else json.dumps(text)
    functions = [t["function"] for t in tools if named is None or t["function"]["name"] == named]
    more = ' ("\\n"? call)*' if several else ""
    names = " | ".join(f"fn{i}" for i in range(len(functions)))
    rules = [f"start: {tok(CALLS_BEGIN)} call{more} {tok(CALLS_END)}",
             f'call: {tok(CALL_BEGIN)} "function" {tok(SEP)} ({names}) {tok(CALL_END)}']
    for i, fn in enumerate(functions):
        schema = {**(fn.get("parameters") or {"type": "object"}), "x-guidance": JSON_OPTIONS}
        rules.append(f"fn{i}: {json.dumps(fn['name'] + ARGS_OPEN)} args{i} {json.dumps(ARGS_CLOSE)}")
        rules.append(f"args{i}: %json {json.dumps(schema)}")
    return "\n".join(rules)
