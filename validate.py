"""Validation of client request bodies (SPEC section 3): one detail per problem, never a 500."""
from __future__ import annotations

from urllib.parse import urlsplit

from errors import ValidationError

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
PART_TYPES = frozenset({"text", "image_url", "input_audio", "file", "refusal"})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_http_url(value) -> bool:
    """An absolute http(s) URL with a host."""
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return False


def _check_range(body: dict, name: str, lo: float, hi: float, problems: list) -> None:
    v = body.get(name)
    if v is None:
        return
    if not _is_num(v):
        problems.append({"path": name, "message": "must be a number"})
    elif not lo <= v <= hi:
        problems.append({"path": name, "message": f"must be between {lo:g} and {hi:g}"})


def _check_content(path: str, content, problems: list) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        problems.append({"path": path, "message": "must be a string or an array of content parts"})
        return
    for j, part in enumerate(content):
        ppath = f"{path}[{j}]"
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
            problems.append({"path": ppath, "message": "must be a content part with type text or image_url"})
        elif part["type"] == "text" and not isinstance(part.get("text"), str):
            problems.append({"path": f"{ppath}.text", "message": "must be a string"})
        elif part["type"] == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not (url.startswith("data:") or is_http_url(url)):
                problems.append({"path": f"{ppath}.image_url.url", "message": "must be an http(s) or data: URL"})


def _check_messages(messages, problems: list) -> None:
    if not isinstance(messages, list) or not messages:
        problems.append({"path": "messages", "message": "must be a non-empty array of messages"})
        return
    for i, msg in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(msg, dict):
            problems.append({"path": path, "message": "must be an object"})
            continue
        if msg.get("role") not in ROLES:
            problems.append({"path": f"{path}.role", "message": "must be one of " + ", ".join(sorted(ROLES))})
        if "content" not in msg and not msg.get("tool_calls") and not msg.get("function_call"):
            problems.append({"path": f"{path}.content", "message": "is required"})
        _check_content(f"{path}.content", msg.get("content"), problems)
        calls = msg.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                problems.append({"path": f"{path}.tool_calls", "message": "must be an array"})
            else:
                for j, call in enumerate(calls):
                    _check_function_holder(f"{path}.tool_calls[{j}]", call, "arguments", problems)
        if msg.get("function_call") is not None and not _is_function(msg["function_call"], "arguments"):
            problems.append({"path": f"{path}.function_call", "message": "must be an object with a name"})
        if msg.get("role") == "tool" and not isinstance(msg.get("tool_call_id"), str):
            problems.append({"path": f"{path}.tool_call_id", "message": "is required for tool messages"})


def _is_function(value, text_field: str) -> bool:
    """{"name": str, <text_field>?: str or object}: a function call or definition."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return False
    extra = value.get(text_field)
    return extra is None or isinstance(extra, (str, dict))


def _check_function_holder(path: str, item, field: str, problems: list) -> None:
    """A tool or tool call: an object whose `function` is an object with a name (other types pass through)."""
    if isinstance(item, dict) and item.get("type", "function") != "function":
        return
    if not isinstance(item, dict) or not _is_function(item.get("function"), field):
        problems.append({"path": f"{path}.function", "message": "must be an object with a name"})


def _check_tools(body: dict, problems: list) -> None:
    """tools, functions, tool_choice, function_call and response_format: the shapes the adapters read."""
    for i, tool in enumerate(body.get("tools") if isinstance(body.get("tools"), list) else ()):
        _check_function_holder(f"tools[{i}]", tool, "parameters", problems)
    for i, fn in enumerate(body.get("functions") if isinstance(body.get("functions"), list) else ()):
        if not _is_function(fn, "parameters"):
            problems.append({"path": f"functions[{i}]", "message": "must be an object with a name"})
    for name in ("tool_choice", "function_call"):
        v = body.get(name)
        if v is not None and not isinstance(v, (str, dict)):
            problems.append({"path": name, "message": "must be a string or an object"})
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and (not isinstance(fmt.get("type"), str) or (
            "json_schema" in fmt and not isinstance(fmt["json_schema"], dict))):
        problems.append({"path": "response_format", "message": "must have a string type (and an object json_schema)"})


def validate_chat(body: dict) -> None:
    """Raise ValidationError listing every problem in a chat-completions body."""
    problems: list[dict] = []
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        problems.append({"path": "model", "message": "must be a non-empty string"})
    _check_messages(body.get("messages"), problems)
    _check_range(body, "temperature", 0, 2, problems)
    _check_range(body, "top_p", 0, 1, problems)
    _check_range(body, "presence_penalty", -2, 2, problems)
    _check_range(body, "frequency_penalty", -2, 2, problems)
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if v is not None and (not _is_int(v) or v < 1):
            problems.append({"path": name, "message": "must be a positive integer"})
    n = body.get("n")
    if n is not None and (not _is_int(n) or not 1 <= n <= 128):
        problems.append({"path": "n", "message": "must be an integer between 1 and 128"})
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        problems.append({"path": "stop", "message": "must be a string or an array of at most 4 strings"})
    for name, kind in (("stream", bool), ("tools", list), ("stream_options", dict), ("response_format", dict),
                       ("seed", int), ("user", str), ("functions", list)):
        v = body.get(name)
        if v is not None and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
            problems.append({"path": name, "message": f"must be {_TYPE_NAMES[kind]}"})
    _check_tools(body, problems)
    fallbacks = body.get("fallbacks")
    if fallbacks is not None and not (isinstance(fallbacks, list) and all(
            isinstance(f, str) and f.strip() for f in fallbacks)):
        problems.append({"path": "fallbacks", "message": "must be an array of model names"})
    hook = body.get("webhookUrl")
    if hook is not None and not is_http_url(hook):
        problems.append({"path": "webhookUrl", "message": "must be an http(s) URL"})
    if problems:
        raise ValidationError(problems)


_TYPE_NAMES = {bool: "a boolean", list: "an array", dict: "an object", int: "an integer", str: "a string"}
