"""Chat messages -> the model's own chat template -> text, token ids and per-message spans.

`render(tok, messages, ...)` checks the messages (roles, content), gives them and the tools the
shape vLLM's chat parser gives its template (tool-call arguments as objects, tools as vLLM dumps
them, optionally developer turns as system), renders them with the tokenizer's chat template (vLLM's options: add_generation_prompt, continue_final_message,
chat_template_kwargs, tools), encodes the text without adding special tokens (the template
writes them, as vLLM does), and finds each message's content in the rendered text: the
content's characters, then its tokens, extended over the end-of-turn special token that
follows it (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`), so a scored assistant turn includes
the token that ends it. Content that the template does not render verbatim has no span.

This module does not score and knows no wire format.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from opd_services.errors import InvalidRequest
from opd_services.teacher.text.tokenizer import Encoded, Tokenizer, check_text

ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "function")


@dataclass(frozen=True, slots=True)
class Chat:
    text: str
    encoded: Encoded
    spans_M_2: np.ndarray            # int64 [M, 2]: tokens [start, end) of each message's turn; -1 = not found


def _content(m: dict, field: str) -> str | None:
    """A message's content as one string (OpenAI's list of text parts joined by "\n", as vLLM does)."""
    c = m.get("content")
    if c is None:
        return None
    if isinstance(c, str):
        check_text(c, f"{field}.content")
        return c
    if isinstance(c, list):
        parts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{field}.content[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) "
                                                              "are served")
            check_text(part["text"], f"{field}.content[{j}].text")
            parts.append(part["text"])
        return "\n".join(parts)
    raise InvalidRequest(f"{field}.content", f"must be a string or a list of text parts, got {type(c).__name__}")


def normalized(messages: Any, field: str = "messages") -> list[dict]:
    """Checked messages with string content, ready for a chat template."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(field, "must be a non-empty list of messages ({\"role\", \"content\"})")
    out = []
    for i, m in enumerate(messages):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f, "must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"{f}.role", f"unknown role {role!r}; one of {', '.join(ROLES)}")
        m = {k: v for k, v in m.items() if k != "score"}
        content = _content(m, f)
        if content is None and not m.get("tool_calls"):
            raise InvalidRequest(f"{f}.content", "is required (a string) unless the message has tool_calls")
        m["content"] = content if content is not None else ""
        out.append(m)
    return out


# ---- what vLLM's chat parser does to messages and tools before the template sees them -------------

def tool_dicts(tools: list | None) -> list[dict] | None:
    """Tools as vLLM's ChatCompletionToolsParam.model_dump() gives them to the template."""
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or t.get("type", "function") != "function":
            raise InvalidRequest(f"tools[{i}]", 'must be {"type": "function", "function": {"name": ..., '
                                                '"description": ..., "parameters": {...}}}')
        f = {"name": fn["name"], "description": fn.get("description"), "parameters": fn.get("parameters")}
        defer = fn.get("defer_loading", t.get("defer_loading"))
        f |= ({"strict": fn["strict"]} if fn.get("strict") is not None else {})
        f |= ({"defer_loading": defer} if defer is not None else {})
        out.append({"type": "function", "function": f} | ({"defer_loading": t["defer_loading"]}
                                                           if t.get("defer_loading") is not None else {}))
    return out


def _parsed_args(args: Any) -> dict:
    """vLLM's _postprocess_messages: tool-call arguments as an object ({} when empty or not an object)."""
    if not args:
        return {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return {}
    return args if isinstance(args, dict) else {}


def vllm_messages(messages: Any, template: str | None, merge_developer: bool = True) -> Any:
    """The messages as vLLM's chat parser hands them to the template (unchanged where they are malformed:
    `normalized` names the fault). merge_developer=False keeps one message per message sent (the native
    API returns a span per message), so developer turns reach the template as they are."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return messages
    out = copy.deepcopy(messages)
    for m in out:
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and isinstance(calls, list):
            if not calls:
                m.pop("tool_calls")
            for c in calls:
                if isinstance(c, dict) and isinstance(c.get("function"), dict):
                    c["function"]["arguments"] = _parsed_args(c["function"].get("arguments"))
    if merge_developer and template and any(m.get("role") == "developer" for m in out) and not (
            '"developer"' in template or "'developer'" in template):
        out = _developer_as_system(out)
    return out


def _developer_as_system(messages: list[dict]) -> list[dict]:
    """vLLM: developer turns become system turns, merged into one at the start where there are several."""
    msgs = [{k: v for k, v in m.items() if k != "tools"} | {"role": "system"} if m.get("role") == "developer" else m
            for m in messages]
    systems = [i for i, m in enumerate(msgs) if m.get("role") == "system"]
    if not systems or systems == [0]:
        return msgs
    texts = [c for i in systems if (c := normalized([msgs[i]], f"messages[{i}]")[0]["content"])]
    return [{"role": "system", "content": "\n\n".join(texts)}] + [m for m in msgs if m.get("role") != "system"]


# ---- rendering ------------------------------------------------------------------------------------

def render(tok: Tokenizer, messages: Any, field: str = "messages", *, add_generation_prompt: bool = False,
           continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
           tools: list | None = None, chat_template: str | None = None, merge_developer: bool = False) -> Chat:
    """Render with the model's chat template (or `chat_template`) as vLLM does (its parser's view of the
    messages and tools first), then tokenize and locate the turns."""
    template = chat_template or tok.template
    msgs = normalized(vllm_messages(messages, template, merge_developer), field)
    tools = tool_dicts(tools)
    if template is None:
        raise InvalidRequest(field, "this teacher's tokenizer has no chat template; send text or token ids instead")
    if add_generation_prompt and continue_final_message:
        raise InvalidRequest("continue_final_message", "cannot be used with add_generation_prompt; set one of them")
    if continue_final_message and msgs[-1]["role"] != "assistant":
        raise InvalidRequest("continue_final_message", "needs the last message to be the assistant's")
    kwargs = dict(chat_template_kwargs or {})
    for reserved in ("messages", "tools", "add_generation_prompt", "continue_final_message", "tokenize"):
        if reserved in kwargs:
            raise InvalidRequest(f"chat_template_kwargs.{reserved}", "is set by the request itself; remove it here")
    try:
        text = tok.hf.apply_chat_template(msgs, tools=tools, chat_template=template, tokenize=False,
                                          add_generation_prompt=add_generation_prompt,
                                          continue_final_message=continue_final_message, **kwargs)
    except InvalidRequest:
        raise
    except Exception as e:   # jinja's TemplateError and the template's own raise_exception(...)
        raise InvalidRequest(field, f"the model's chat template refused these messages: {e}") from None
    encoded = tok.encode(text, field, add_special_tokens=False)
    return Chat(text=text, encoded=encoded, spans_M_2=_spans(tok, msgs, text, encoded))


def _spans(tok: Tokenizer, msgs: list[dict], text: str, enc: Encoded) -> np.ndarray:
    """Each message's content located in order in the rendered text, as token ranges."""
    spans = np.full((len(msgs), 2), -1, dtype=np.int64)
    starts, ends = enc.offsets_L_2[:, 0], enc.offsets_L_2[:, 1]
    pos = 0
    for i, m in enumerate(msgs):
        content = m["content"]
        if not content:
            continue
        at = text.find(content, pos)
        if at < 0 and content.strip():
            content = content.strip()                # templates that trim (Llama-3's)
            at = text.find(content, pos)
        if at < 0:
            continue
        c0, c1 = at, at + len(content)
        pos = c1
        t0 = int(np.searchsorted(ends, c0, side="right"))      # first token ending after c0
        t1 = int(np.searchsorted(starts, c1, side="left"))     # first token starting at or after c1
        if t1 < len(enc.ids_L) and int(enc.ids_L[t1]) in tok.special_ids:
            t1 += 1                                           # the turn's end-of-turn token
        spans[i] = (t0, t1)
    return spans
