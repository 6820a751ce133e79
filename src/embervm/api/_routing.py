"""Routes from the model's ``http`` traits: method + ``requestUri`` template → operation.

Templates have literal segments, ``{label}`` (one percent-encoded segment) and ``{label+}``
(greedy: the rest of the path, slashes included), and may end in a query-string literal
(``/path?x-id=Op`` or ``/path?tagging``) that must be present for the route to match.
Matching runs on the raw (still percent-encoded) path so that an encoded ``/`` inside a label
stays inside that label, exactly as botocore encoded it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

from botocore.model import OperationModel

from embervm.errors import ValidationError
from embervm.model import operation_model, operation_names

_LABEL = re.compile(r"^\{([A-Za-z0-9_.-]+)(\+?)\}$")


@dataclass(frozen=True)
class Route:
    """One operation's route, compiled."""

    operation: str
    method: str
    template: str
    pattern: re.Pattern[str]
    greedy: frozenset[str]
    query_literals: tuple[tuple[str, str | None], ...]
    literal_segments: int
    model: OperationModel | None = None

    @property
    def operation_model(self) -> OperationModel:
        """The operation's model (the service model's, unless the route was given one)."""
        return self.model if self.model is not None else operation_model(self.operation)


@dataclass(frozen=True)
class RouteMatch:
    """A matched route, its decoded URI labels and the query keys the template consumed."""

    route: Route
    labels: dict[str, str]


def compile_route(
    operation: str, method: str, request_uri: str, model: OperationModel | None = None
) -> Route:
    """Compile one ``requestUri`` template into a matcher (``model``: for other models)."""
    path, _, query = request_uri.partition("?")
    parts: list[str] = []
    greedy: set[str] = set()
    literals = 0
    for segment in path.strip("/").split("/"):
        label = _LABEL.match(segment)
        if label is None:
            parts.append(re.escape(segment))
            literals += 1
        elif label.group(2):
            greedy.add(label.group(1))
            parts.append(f"(?P<{_group(label.group(1))}>.+)")
        else:
            parts.append(f"(?P<{_group(label.group(1))}>[^/]+)")
    regex = "^/" + "/".join(parts) + "$" if path.strip("/") else "^/$"
    query_literals = tuple(
        (key, value if sep else None)
        for key, sep, value in (item.partition("=") for item in query.split("&") if item)
    )
    return Route(
        operation=operation,
        method=method.upper(),
        template=request_uri,
        pattern=re.compile(regex),
        greedy=frozenset(greedy),
        query_literals=query_literals,
        literal_segments=literals,
        model=model,
    )


def _group(label: str) -> str:
    """Regex group names must be identifiers; labels may contain '-' or '.'."""
    return "L_" + re.sub(r"[^A-Za-z0-9_]", lambda m: f"_{ord(m.group()):02x}_", label)


def _label_name(group: str) -> str:
    body = group[2:]
    return re.sub(r"_([0-9a-f]{2})_", lambda m: chr(int(m.group(1), 16)), body)


class Router:
    """All routes of the model, most specific first."""

    def __init__(self, routes: list[Route]) -> None:
        self._routes = sorted(
            routes,
            key=lambda r: (-r.literal_segments, len(r.greedy), -len(r.query_literals)),
        )

    @classmethod
    def from_model(cls) -> Router:
        routes = []
        for name in operation_names():
            http = operation_model(name).http
            routes.append(compile_route(name, http["method"], http["requestUri"]))
        return cls(routes)

    @property
    def routes(self) -> list[Route]:
        return list(self._routes)

    def match(self, method: str, raw_path: str, query: list[tuple[str, str]]) -> RouteMatch | None:
        """The route for a request, or None. Labels come back percent-decoded.

        Raises ``ValidationError`` when a label is not valid percent-encoded UTF-8.
        """
        keys = {k: v for k, v in query}
        for route in self._routes:
            if route.method != method.upper():
                continue
            found = route.pattern.match(raw_path)
            if found is None:
                continue
            if any(
                key not in keys or (value is not None and keys[key] != value)
                for key, value in route.query_literals
            ):
                continue
            labels = {}
            for group, raw in found.groupdict().items():
                try:
                    labels[_label_name(group)] = unquote(raw, errors="strict")
                except UnicodeDecodeError as exc:
                    raise ValidationError(
                        f"1 validation error detected: the URI label '{_label_name(group)}' "
                        "is not valid percent-encoded UTF-8"
                    ) from exc
            return RouteMatch(route, labels)
        return None


def parse_query(raw: bytes) -> list[tuple[str, str]]:
    """Decode a query string; undecodable or absurdly long ones are a ValidationError."""
    try:
        text = raw.decode("ascii")
        return parse_qsl(
            text, keep_blank_values=True, errors="strict", max_num_fields=1000, separator="&"
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValidationError(
            "1 validation error detected: the query string is not valid percent-encoded UTF-8"
        ) from exc
