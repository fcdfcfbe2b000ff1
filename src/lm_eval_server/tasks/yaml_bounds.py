"""YAML that a request sends or names, parsed with bounds on what it can make the parser do.

Within the bounds the result is exactly what the base loader gives (`yaml.safe_load` for
`BoundedSafeLoader`); beyond them loading stops with `YamlTooLarge`, at the node that crosses the
bound, having cost no more than the bound. Why each bound exists:

- **Depth.** PyYAML's composer and constructor recurse once per level: `[[[...]]]` 5,000 deep is
  a RecursionError (ten kilobytes, after a second of scanning: for each token the scanner checks
  every flow collection open on the line, and it reads up to 1,024 characters ahead).
- **Values, aliases counted where they are used.** An alias is one node however often it is
  used, so ten lines of anchors make a graph of 10^10 values for whatever walks it ("billion
  laughs"). The merge key `<<` goes further: the constructor copies the merged pairs, so
  `m2: {<<: [*m1, *m1]}`, `m3: {<<: [*m2, *m2]}`, ... doubles the work with every line while the
  document is still being loaded. Counting an alias as the size of what it names bounds both.
- **Numbers.** An integer of more than 4,300 digits raises ValueError (Python's limit on
  int-from-text conversion), a long sexagesimal float (`1:2:3:...:4.5`, YAML 1.1) overflows and
  a long sexagesimal integer costs time quadratic in its length.

Pure: parses text, no I/O.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    ScalarEvent,
)

# Levels of nesting (the root is level 0): a task or config YAML uses a handful.
MAX_DEPTH = 32
# Nodes (keys, values, items), an alias counting as the nodes of what it names.
MAX_VALUES = 20_000
# Characters of one number: more is nobody's setting, and costs the constructor.
MAX_NUMBER_CHARS = 100


class YamlRefused(ValueError):
    """The document cannot be loaded within the bounds; the message says why, and where."""

    def __init__(self, message: str, mark: Any = None) -> None:
        if mark is not None:
            message += f" (line {mark.line + 1}, column {mark.column + 1})"
        super().__init__(message)


class YamlTooLarge(YamlRefused):
    """The document crosses a bound."""


# What PyYAML's constructors raise, unwrapped, for a value they cannot build (`2001-13-01` as a
# date, `!!int abc`, `!!timestamp x`). Exact types: a loader's own refusals (subclasses) pass.
_CONSTRUCTOR_ERRORS = (ValueError, TypeError, AttributeError, OverflowError)


class _Bounds:
    """The bounds, for a loader whose composer is PyYAML's Python Composer (the counting is
    done in `compose_node`) and whose constructor is SafeConstructor. Call `_start_counting`
    from `__init__`."""

    max_depth = MAX_DEPTH
    max_values = MAX_VALUES
    max_number_chars = MAX_NUMBER_CHARS
    anchors: dict[str, Any]
    check_event: Any
    peek_event: Any

    def _start_counting(self) -> None:
        self._depth = -1  # the level of the node being composed
        self._reach = -1  # the deepest level reached inside it so far
        self._values = 0
        # Anchored node -> (values, height), known once the node is composed.
        self._shapes: dict[int, tuple[int, int]] = {}

    def _count(self, values: int, mark: Any) -> None:
        self._values += values
        if self._values > self.max_values:
            raise YamlTooLarge(
                f"the YAML holds more than {self.max_values} values (keys, items and scalars; "
                "an alias counts as the values it repeats)",
                mark,
            )

    def _too_deep(self, mark: Any) -> YamlTooLarge:
        return YamlTooLarge(f"the YAML nests more than {self.max_depth} levels deep", mark)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None:  # else the base class raises "found undefined alias"
                shape = self._shapes.get(id(node))
                if shape is None:
                    raise YamlTooLarge(
                        f"the alias *{event.anchor} is used inside its own anchor (a value "
                        "that contains itself)",
                        event.start_mark,
                    )
                values, height = shape
                reach = self._depth + 1 + height
                if reach > self.max_depth:
                    raise self._too_deep(event.start_mark)
                self._reach = max(self._reach, reach)
                self._count(values, event.start_mark)
            return super().compose_node(parent, index)  # type: ignore[misc]
        event = self.peek_event()
        self._depth += 1
        depth = self._depth
        if depth > self.max_depth:
            raise self._too_deep(event.start_mark)
        self._count(1, event.start_mark)
        values_before = self._values - 1
        outer_reach = self._reach
        self._reach = depth
        node = super().compose_node(parent, index)  # type: ignore[misc]
        if event.anchor is not None:
            self._shapes[id(node)] = (self._values - values_before, self._reach - depth)
        self._reach = max(outer_reach, self._reach)
        self._depth -= 1
        return node

    def _number_text(self, node: yaml.ScalarNode) -> None:
        if len(node.value) > self.max_number_chars:
            raise YamlTooLarge(
                f"a number of {len(node.value)} characters; at most {self.max_number_chars} "
                "are read (quote it to make it text)",
                node.start_mark,
            )

    def construct_bounded_int(self, node: yaml.ScalarNode) -> int:
        self._number_text(node)
        return yaml.constructor.SafeConstructor.construct_yaml_int(self, node)  # type: ignore[arg-type]

    def construct_bounded_float(self, node: yaml.ScalarNode) -> float:
        self._number_text(node)
        return yaml.constructor.SafeConstructor.construct_yaml_float(self, node)  # type: ignore[arg-type]

    @classmethod
    def _bound_numbers(cls) -> None:
        cls.add_constructor("tag:yaml.org,2002:int", cls.construct_bounded_int)  # type: ignore[attr-defined]
        cls.add_constructor("tag:yaml.org,2002:float", cls.construct_bounded_float)  # type: ignore[attr-defined]


class BoundedSafeLoader(_Bounds, yaml.SafeLoader):
    """`yaml.SafeLoader` (all Python, as `yaml.safe_load`) that counts depth and values while
    it composes the document. Subclass it (and call `add_constructor` on the subclass) for
    more tags; the bounds are class attributes, so a subclass may set its own."""

    def __init__(self, stream: Any) -> None:
        yaml.SafeLoader.__init__(self, stream)
        self._start_counting()

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:  # PyYAML names it so
        # A flow collection at flow level L is a node at least L - 1 levels deep. Refused in the
        # scanner, before it queues more: it looks up to 1,024 characters ahead for a key, and
        # checks every open level at each token (`[[[...` of one line cost 0.3 s to reach 33).
        if self.flow_level > self.max_depth:
            raise self._too_deep(self.get_mark())
        super().fetch_flow_collection_start(TokenClass)


BoundedSafeLoader._bound_numbers()

if hasattr(yaml, "CSafeLoader"):

    class BoundedCSafeLoader(
        _Bounds,
        yaml.composer.Composer,
        yaml.cyaml.CParser,
        yaml.constructor.SafeConstructor,
        yaml.resolver.Resolver,
    ):  # type: ignore[misc]
        """`yaml.CSafeLoader`'s libyaml scanner and parser (the loader lm-eval reads task YAMLs
        with, and several times faster than Python's), with PyYAML's Python composer in place
        of libyaml's so that the bounds are counted as the document is composed."""

        def __init__(self, stream: Any) -> None:
            yaml.cyaml.CParser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
            self._start_counting()

        # CParser composes in C; these are the Python Composer's (before CParser in the MRO
        # too, said again so that no reader has to check).
        get_single_node = yaml.composer.Composer.get_single_node
        check_node = yaml.composer.Composer.check_node
        get_node = yaml.composer.Composer.get_node

    BoundedCSafeLoader._bound_numbers()
else:  # PyYAML built without libyaml
    BoundedCSafeLoader = BoundedSafeLoader  # type: ignore[misc]


def measure(text: str, loader: type[_Bounds] = BoundedSafeLoader) -> int:
    """The values of the document (aliases counted where they are used), counted from the
    parser's events alone; YamlTooLarge beyond a bound. Nothing is kept but a count per open
    collection and per anchor: each event is garbage as soon as it is counted, so a refused
    bomb leaves nothing for the garbage collector (composing 20,000 nodes to refuse them kept
    about 100,000 objects alive at once: a full collection, 70 ms with every thread stopped, for
    every other request of a flood)."""
    parser: Any = loader(text)
    max_depth, max_values = loader.max_depth, loader.max_values
    values = 0
    # Open collections: [values before it, its anchor, its level, deepest level inside].
    open_: list[list[Any]] = []
    # Anchor -> (values, height) of what it names, once complete.
    shapes: dict[str, tuple[int, int]] = {}

    def too_many(mark: Any) -> YamlTooLarge:
        return YamlTooLarge(
            f"the YAML holds more than {max_values} values (keys, items and scalars; an alias "
            "counts as the values it repeats)",
            mark,
        )

    def too_deep(mark: Any) -> YamlTooLarge:
        return YamlTooLarge(f"the YAML nests more than {max_depth} levels deep", mark)

    try:
        while parser.check_event():
            event = parser.get_event()
            level = len(open_)
            if isinstance(event, AliasEvent):
                shape = shapes.get(event.anchor)
                if shape is None:
                    if any(frame[1] == event.anchor for frame in open_):
                        raise YamlTooLarge(
                            f"the alias *{event.anchor} is used inside its own anchor (a value "
                            "that contains itself)",
                            event.start_mark,
                        )
                    continue  # undefined: the composer says so
                values += shape[0]
                reach = level + shape[1]
                if reach > max_depth:
                    raise too_deep(event.start_mark)
                if open_:
                    open_[-1][3] = max(open_[-1][3], reach)
            elif isinstance(event, ScalarEvent | CollectionStartEvent):
                if level > max_depth:
                    raise too_deep(event.start_mark)
                values += 1
                if isinstance(event, ScalarEvent):
                    if event.anchor is not None:
                        shapes[event.anchor] = (1, 0)
                else:
                    open_.append([values - 1, event.anchor, level, level])
            elif isinstance(event, CollectionEndEvent) and open_:
                before, anchor, start, reach = open_.pop()
                if anchor is not None:
                    shapes[anchor] = (values - before, reach - start)
                if open_:
                    open_[-1][3] = max(open_[-1][3], reach)
            if values > max_values:
                raise too_many(event.start_mark)
    finally:
        parser.dispose()
    return values


def load(text: str, loader: type[BoundedSafeLoader] = BoundedSafeLoader) -> Any:
    """`yaml.load(text, loader)`: YamlTooLarge beyond a bound, YamlRefused for a value no
    constructor can build, yaml.YAMLError for text that is not YAML; the loader's own
    exceptions pass through. Nothing else escapes: not a RecursionError, should a document
    reach Python's limit despite the bounds, nor a constructor's bare ValueError."""
    try:
        measure(text, loader)  # refuses a bomb before anything is built
        return yaml.load(text, Loader=loader)  # a SafeLoader subclass
    except RecursionError:
        pass  # refused below, outside the handler: its traceback holds every frame
    except _CONSTRUCTOR_ERRORS as exc:
        if type(exc) not in _CONSTRUCTOR_ERRORS:
            raise
        raise YamlRefused(f"a value cannot be read: {exc}") from None
    raise YamlTooLarge("the YAML nests too deeply to be read")
