"""Matching and timing for app handlers: path templates, MQTT topic filters, schedules.

Sans IO, like the rest of `fogline.core`: the HTTP front, the MQTT ingest and the
scheduler of the node call these pure functions, and the unit tests drive them with
plain strings and injected times. `fogline.app` builds its decorators on top of them.

- Path templates: `/machines/{machine}`; a `{name}` matches exactly one non-empty
  segment, `{name:path}` (last segment only) matches the rest of the path. A literal
  segment beats a parameter at the same position, whatever the registration order.
- Topic filters follow MQTT 3.1.1/5 (section 4.7): `+` is one whole level, `#` is the
  whole last level and matches the parent too, and a leading wildcard never matches a
  topic that starts with `$` (`$SYS/...`).
- Schedules tick on a fixed grid; after a pause they run once, never once per missed
  interval (a backlog of identical flushes helps nobody and would stall the node).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar
from urllib.parse import unquote

from fogline.errors import ConfigError

H = TypeVar("H")

HTTP_METHODS: tuple[str, ...] = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
PATH_TEMPLATE_CHARS_MAX = 1024
TOPIC_BYTES_MAX = 65_535  # the MQTT limit on a topic (a UTF-8 string with a u16 length)
INTERVAL_S_MIN = 0.01
INTERVAL_S_MAX = 30 * 24 * 3600.0

_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}$")
# Characters a literal path segment may hold: RFC 3986 pchar without '%'-escapes decoded.
_LITERAL = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:@%]+$")
_INTERVAL_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


# Path templates -----------------------------------------------------------------------

@dataclass(frozen=True)
class PathTemplate:
    """A parsed path template; `segments` hold literals or (param, is_rest) pairs."""

    text: str
    segments: tuple[str | tuple[str, bool], ...]

    @property
    def shape(self) -> str:
        """The template with parameter names erased: two routes of one method and one
        shape could never be told apart, so registering both is an error."""
        parts = [s if isinstance(s, str) else ("{*}" if s[1] else "{}") for s in self.segments]
        return "/" + "/".join(parts)

    @property
    def rank(self) -> tuple[int, ...]:
        """Sort key: literals first, then single parameters, then a rest parameter."""
        return tuple(0 if isinstance(s, str) else (2 if s[1] else 1) for s in self.segments)

    def match(self, segments: list[str]) -> dict[str, str] | None:
        """Path parameters if the (raw, still percent-encoded) segments match, else None."""
        params: dict[str, str] = {}
        for index, segment in enumerate(self.segments):
            if isinstance(segment, str):
                if index >= len(segments) or segments[index] != segment:
                    return None
                continue
            name, is_rest = segment
            if is_rest:
                rest = segments[index:]
                if not rest or not rest[0]:
                    return None
                params[name] = unquote("/".join(rest))
                return params
            if index >= len(segments) or not segments[index]:
                return None
            params[name] = unquote(segments[index])
        return params if len(segments) == len(self.segments) else None


def parse_path_template(text: str) -> PathTemplate:
    """Validate a route template such as `/machines/{machine}`; ConfigError if bad."""
    if not isinstance(text, str) or not text.startswith("/"):
        raise ConfigError(f"route path {text!r} must be a string starting with '/'")
    if len(text) > PATH_TEMPLATE_CHARS_MAX:
        raise ConfigError(f"route path is longer than {PATH_TEMPLATE_CHARS_MAX} characters")
    if text == "/":
        return PathTemplate(text, ())
    if text.endswith("/"):
        raise ConfigError(f"route path {text!r} must not end with '/'")
    segments: list[str | tuple[str, bool]] = []
    names: set[str] = set()
    raw = text[1:].split("/")
    for index, segment in enumerate(raw):
        if not segment:
            raise ConfigError(f"route path {text!r} has an empty segment ('//')")
        param = _PARAM.match(segment)
        if param:
            name, is_rest = param.group(1), param.group(2) is not None
            if name in names:
                raise ConfigError(f"route path {text!r} repeats the parameter {{{name}}}")
            if is_rest and index != len(raw) - 1:
                raise ConfigError(f"route path {text!r}: {{{name}:path}} must be the last "
                                  "segment")
            names.add(name)
            segments.append((name, is_rest))
        elif "{" in segment or "}" in segment:
            raise ConfigError(f"route path {text!r}: segment {segment!r} must be a literal "
                              "or a whole {name} / {name:path} parameter")
        elif not _LITERAL.match(segment):
            raise ConfigError(f"route path {text!r}: segment {segment!r} holds characters "
                              "not allowed in a URL path")
        else:
            segments.append(segment)
    return PathTemplate(text, tuple(segments))


def check_method(method: str) -> str:
    """The upper-cased HTTP method, or ConfigError."""
    if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
        raise ConfigError(f"HTTP method {method!r} is not one of {', '.join(HTTP_METHODS)}")
    return method.upper()


class RouteMatch(NamedTuple, Generic[H]):
    """A found route: unpacks as `handler, path_params`."""

    handler: H
    path_params: dict[str, str]


@dataclass(frozen=True)
class MethodNotAllowed:
    """The path exists but not for this method (HTTP 405; send `Allow: ...`)."""

    allowed: tuple[str, ...]


class RouteTable(Generic[H]):
    """Routes of one app; `match()` tells 404 (None) from 405 (MethodNotAllowed)."""

    def __init__(self) -> None:
        # One entry per template shape, most specific first: (template, {method: handler}).
        self._routes: list[tuple[PathTemplate, dict[str, H]]] = []

    def add(self, method: str, template: PathTemplate, handler: H) -> None:
        for existing, handlers in self._routes:
            if existing.shape == template.shape:
                if method in handlers:
                    raise ConfigError(f"duplicate route {method} {template.text} (already "
                                      f"registered as {method} {existing.text})")
                if existing.text != template.text:
                    raise ConfigError(f"route {method} {template.text} must name its "
                                      f"parameters as {existing.text} does")
                handlers[method] = handler
                return
        self._routes.append((template, {method: handler}))
        self._routes.sort(key=lambda entry: entry[0].rank)

    def match(self, method: str, path: str) -> RouteMatch[H] | MethodNotAllowed | None:
        """The handler for a request path (without the query string)."""
        if not path.startswith("/"):
            return None
        segments = [] if path == "/" else path[1:].split("/")
        allowed: set[str] = set()
        for template, handlers in self._routes:
            params = template.match(segments)
            if params is None:
                continue
            handler = handlers.get(method)
            if handler is None and method == "HEAD":
                handler = handlers.get("GET")
            if handler is not None:
                return RouteMatch(handler, params)
            allowed.update(handlers)
        if not allowed:
            return None
        if "GET" in allowed:
            allowed.add("HEAD")
        return MethodNotAllowed(tuple(sorted(allowed)))


# MQTT topic filters -------------------------------------------------------------------

def check_topic_filter(pattern: str) -> str:
    """Validate an MQTT topic filter (`factory/+/vibration`, `sensors/#`); ConfigError."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"topic filter {pattern!r} must be a non-empty string")
    if len(pattern.encode()) > TOPIC_BYTES_MAX:
        raise ConfigError(f"topic filter is longer than {TOPIC_BYTES_MAX} bytes")
    if "\x00" in pattern:
        raise ConfigError(f"topic filter {pattern!r} must not contain NUL")
    levels = pattern.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ConfigError(f"topic filter {pattern!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise ConfigError(f"topic filter {pattern!r}: '+' must be a whole level")
    return pattern


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT matching of a topic name against a valid filter."""
    if "+" in topic or "#" in topic:
        return False  # a topic name never holds wildcards; nothing matches it
    if topic.startswith("$") and pattern[:1] in ("+", "#"):
        return False
    pattern_levels = pattern.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(pattern_levels):
        if level == "#":
            return True  # also the parent: `a/#` matches `a`
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(pattern_levels) == len(topic_levels)


# Schedules ----------------------------------------------------------------------------

def parse_interval(interval: str | float) -> float:
    """`"10s"`, `"500ms"`, `"1m30s"`, `"2h"`, `"1d"` or a number of seconds -> seconds."""
    if isinstance(interval, bool):
        raise ConfigError(f"interval {interval!r} must be a duration such as '10s'")
    if isinstance(interval, int | float):
        seconds = float(interval)
    elif isinstance(interval, str):
        text = interval.strip()
        parts = _INTERVAL_PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ConfigError(f"interval {interval!r} is not a duration; use e.g. '500ms', "
                              "'10s', '5m', '1h30m'")
        seconds = sum(float(number) * _UNIT_S[unit] for number, unit in parts)
    else:
        raise ConfigError(f"interval {interval!r} must be a duration such as '10s'")
    if not math.isfinite(seconds) or not INTERVAL_S_MIN <= seconds <= INTERVAL_S_MAX:
        raise ConfigError(f"interval {interval!r} must be between {INTERVAL_S_MIN}s and "
                          f"{INTERVAL_S_MAX:.0f}s")
    return seconds


class Schedule:
    """When a periodic handler is due, on a fixed grid `start_s + k * interval_s`.

    The runner asks `next_due(now_s)` how long to wait and calls `on_tick(now_s)` when
    it wakes; a True answer means "run the handler once now". Time is whatever the
    caller passes (the node clock's monotonic seconds), so tests need no sleeping.
    """

    def __init__(self, interval_s: float, start_s: float) -> None:
        if not (math.isfinite(interval_s) and interval_s > 0):
            raise ConfigError(f"schedule interval must be > 0 s, got {interval_s!r}")
        self.interval_s = interval_s
        self.due_s = start_s + interval_s
        # Grid points that passed without a run (a pause, a slow handler): for metrics.
        self.missed_total = 0

    def next_due(self, now_s: float) -> float:
        """The time of the next run: `now_s` itself when a run is overdue."""
        return max(self.due_s, now_s)

    def on_tick(self, now_s: float) -> bool:
        """True if the handler should run now; moves the next due time past `now_s`."""
        if now_s < self.due_s:
            return False
        passed = math.floor((now_s - self.due_s) / self.interval_s) + 1
        self.missed_total += passed - 1
        self.due_s += passed * self.interval_s
        return True
