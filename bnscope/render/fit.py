"""Tables that fit the console's width without breaking a layer name or a number.

A :class:`FitTable` is laid out when it is rendered, for the width the console offers
(``options.max_width``), in these steps:

1. every column at its natural width (its widest cell or header) when that fits;
2. else headers wrap at their spaces (``d_mu`` over ``max``) and prose columns (messages,
   fixes, reasons) wrap between words, down to their minimum width;
3. else optional columns are hidden, the least useful first (each :class:`Col`'s ``drop``
   rank, 1 first) until the rest fits, then those that still fit come back, the most useful
   first; a caption under the table names the hidden ones: a wider console shows them, and
   the JSON document (``--json``, ``report.json``) holds every value;
4. else, as a last resort on a very narrow console, layer names wider than their column are
   shortened from the left with an ellipsis (``…denselayer16.norm2``): the end of a name is
   what tells sibling layers apart; prose wraps narrower than its minimum; and if that is not
   enough either, the rightmost remaining columns other than the layer name are hidden too.

Number and layer-name cells never wrap and are never cut: their column is at least as wide as
its widest cell. A :class:`Names` cell lists several layers (a group of identical findings) as
``5 layers: a, b, c, +2``, naming as many as the row's height allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

#: what a column holds: a layer name or a label per cell, never wrapped ("name"); numbers,
#: never wrapped, under a header that may wrap at its spaces ("num"); prose, wrapped between
#: words ("text")
Kind = Literal["name", "num", "text"]
Justify = Literal["left", "center", "right"]

#: a prose column wraps to no fewer columns than its longest word, up to this many (a layer
#: name inside a message stays whole when it is no longer than this)
LONGEST_WORD = 48
#: the narrowest a layer-name column is squeezed to (step 4)
NARROWEST_NAME = 10
#: the narrowest a prose column is squeezed to (step 4)
NARROWEST_TEXT = 8
ELLIPSIS = "…"


@dataclass(frozen=True)
class Col:
    """One column of a :class:`FitTable`: its header, what its cells hold (:data:`Kind`),
    ``drop`` (0: always shown; otherwise hidden on a narrow console, rank 1 first),
    justification and style, and for prose the narrowest it wraps to."""

    header: str
    kind: Kind = "num"
    drop: int = 0
    justify: Justify = "right"
    style: str = ""
    min_width: int = 16


@dataclass(frozen=True)
class Names:
    """A cell naming one or several layers; several are shown as ``5 layers: a, b, +3``."""

    names: tuple[str, ...]

    def label(self, shown: int, width: int | None = None) -> str:
        """The cell's text naming the first ``shown`` layers (each shortened to ``width``)."""
        names = [n if width is None else shorten_left(n, width) for n in self.names]
        if len(names) == 1:
            return names[0]
        listed = ", ".join(names[:shown])
        more = f", +{len(names) - shown}" if shown < len(names) else ""
        return f"{len(names)} layers: {listed}{more}"


Cell = str | Text | Names


def shorten_left(name: str, width: int) -> str:
    """``name`` in at most ``width`` cells: unchanged when it fits, else its end after an
    ellipsis, starting at a dotted component when that keeps at least half of the room
    (``features.denseblock4.denselayer16.norm2`` -> ``…denselayer16.norm2``)."""
    if cell_len(name) <= width:
        return name
    room = max(1, width - 1)
    tail = name[-room:]
    dot = tail.find(".")
    if 0 <= dot < len(tail) - 1 and len(tail) - dot - 1 >= room // 2:
        tail = tail[dot + 1 :]
    return ELLIPSIS + tail


def _lines(text: str) -> list[str]:
    return text.split("\n") or [""]


def _widest_line(text: str) -> int:
    return max(cell_len(line) for line in _lines(text))


def _widest_word(text: str) -> int:
    return max((cell_len(word) for word in text.split()), default=0)


def _two_line_width(header: str) -> int:
    """The narrowest width at which ``header`` wraps (between words) into two lines at most."""
    words = header.split()
    if len(words) < 2:
        return cell_len(header)
    return min(
        max(cell_len(" ".join(words[:k])), cell_len(" ".join(words[k:])))
        for k in range(1, len(words))
    )


@dataclass
class Layout:
    """Where a :class:`FitTable` goes at one width: the columns shown (indices), their
    widths (cells, without padding), the columns hidden, and whether layer names had to be
    shortened."""

    shown: list[int]
    widths: list[int]
    hidden: list[int]
    shortened: bool = False


class FitTable:
    """A table laid out for the console's width at render time (see the module docstring).

    Add rows with :meth:`add_row` (``str``, rich ``Text`` or :class:`Names` cells);
    :meth:`layout` says what a given width shows; rendering yields a rich ``Table``."""

    def __init__(
        self,
        *columns: Col,
        title: str | None = None,
        show_lines: bool = False,
        hidden_note: bool = True,
    ) -> None:
        self.columns = list(columns)
        self.title = title
        self.show_lines = show_lines
        self.hidden_note = hidden_note
        self.rows: list[list[Text | Names]] = []
        self._widths: dict[int, tuple[int, int]] = {}  # column -> (natural, minimum)

    def add_row(self, *cells: Cell) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([c if isinstance(c, (Text, Names)) else Text(c) for c in cells])
        self._widths.clear()

    # -- measuring ---------------------------------------------------------------------------

    def _cell_natural(self, cell: Text | Names) -> int:
        if isinstance(cell, Names):
            return cell_len(cell.label(len(cell.names)))
        return _widest_line(cell.plain)

    def _cell_minimum(self, col: Col, cell: Text | Names) -> int:
        if isinstance(cell, Names):
            comma = 1 if len(cell.names) > 1 else 0
            head = len(f"{len(cell.names)} layers:") if comma else 0
            return max(head, max(cell_len(n) for n in cell.names) + comma)
        if col.kind == "text":
            return min(_widest_word(cell.plain), LONGEST_WORD)
        return _widest_line(cell.plain)

    def _measure(self, index: int) -> tuple[int, int]:
        if index not in self._widths:
            col = self.columns[index]
            natural = max(
                [_widest_line(col.header), *[self._cell_natural(row[index]) for row in self.rows]]
            )
            least = max(
                [_two_line_width(col.header)]
                + [self._cell_minimum(col, row[index]) for row in self.rows]
            )
            if col.kind == "text":
                least = min(max(least, col.min_width), natural)
            self._widths[index] = (natural, least)
        return self._widths[index]

    def natural(self, index: int) -> int:
        """The width column ``index`` takes with nothing wrapped."""
        return self._measure(index)[0]

    def minimum(self, index: int) -> int:
        """The narrowest column ``index`` gets before it is hidden: its widest layer name or
        number (unbreakable), its header in two lines at most, and for prose its
        ``min_width`` (or its natural width, when narrower)."""
        return self._measure(index)[1]

    @staticmethod
    def overhead(columns: int) -> int:
        """Borders and padding of a table with ``columns`` columns (rich's default box)."""
        return 3 * columns + 1

    def fits(self, width: int) -> bool:
        """Whether every column fits ``width`` (wrapped down to its minimum), none hidden."""
        return self._fit(range(len(self.columns)), width)

    def layout(self, width: int) -> Layout:
        """The columns shown at ``width`` and their widths (see the module docstring)."""
        shown = list(range(len(self.columns)))
        hidden: list[int] = []
        while not self._fit(shown, width):
            droppable = [i for i in shown if self.columns[i].drop]
            if droppable:
                victim = min(droppable, key=lambda i: (self.columns[i].drop, -i))
                shown.remove(victim)
                hidden.append(victim)
                continue
            least = [self.minimum(i) for i in shown]
            squeezed = self._squeeze(shown, least, width - self.overhead(len(shown)), hidden)
            others = [i for i in shown if self.columns[i].kind != "name"]
            if sum(squeezed.widths) + self.overhead(len(shown)) <= width or not others:
                return squeezed
            # narrower still than squeezed names allow: the rightmost other column goes too
            shown.remove(others[-1])
            hidden.append(others[-1])
        for i in list(reversed(hidden)):  # the most useful first: the last hidden
            trial = sorted([*shown, i])
            if self._fit(trial, width):
                shown = trial
                hidden.remove(i)
        room = width - self.overhead(len(shown))
        natural = [self.natural(i) for i in shown]
        if sum(natural) <= room:
            return Layout(shown, natural, hidden)
        least = [self.minimum(i) for i in shown]
        return Layout(shown, self._distribute(shown, least, natural, room), hidden)

    def _fit(self, shown: Sequence[int], width: int) -> bool:
        """Whether the columns ``shown``, wrapped down to their minimums, fit ``width``."""
        return sum(self.minimum(i) for i in shown) + self.overhead(len(shown)) <= width

    def _distribute(
        self, shown: list[int], least: list[int], natural: list[int], room: int
    ) -> list[int]:
        """Widths from the minimums up: spare room goes to prose first (fewer wrapped lines),
        then to headers that wrapped, one cell at a time, round robin."""
        widths = list(least)
        spare = room - sum(widths)
        for prose in (True, False):
            wanting = [
                k
                for k, i in enumerate(shown)
                if (self.columns[i].kind == "text") == prose and widths[k] < natural[k]
            ]
            while spare > 0 and wanting:
                for k in list(wanting):
                    if spare == 0:
                        break
                    widths[k] += 1
                    spare -= 1
                    if widths[k] >= natural[k]:
                        wanting.remove(k)
        return widths

    def _squeeze(self, shown: list[int], least: list[int], room: int, hidden: list[int]) -> Layout:
        """Last resort: layer-name columns, then prose, narrower than their minimum."""
        widths = list(least)
        shortened = False
        for kinds, floor in ((("name",), NARROWEST_NAME), (("text",), NARROWEST_TEXT)):
            for k, i in enumerate(shown):
                excess = sum(widths) - room
                if excess <= 0:
                    break
                if self.columns[i].kind in kinds and widths[k] > floor:
                    new = max(floor, widths[k] - excess)
                    shortened = shortened or kinds == ("name",)
                    widths[k] = new
        return Layout(shown, widths, hidden, shortened)

    # -- rendering ---------------------------------------------------------------------------

    def caption(self, layout: Layout) -> Text | None:
        """The line under the table that names the hidden columns."""
        if not layout.hidden or not self.hidden_note:
            return None
        names = ", ".join(self.columns[i].header for i in sorted(layout.hidden))
        count = len(layout.hidden)
        return Text(
            f"{count} column{'s' if count != 1 else ''} hidden at this width: {names} "
            f"(a wider terminal shows {'them' if count != 1 else 'it'}; --json and "
            "report.json hold every value)",
            style="dim",
        )

    def _cell(
        self, console: Console, cell: Text | Names, col: Col, width: int, budget: int
    ) -> Text:
        if isinstance(cell, Names):
            return names_cell(console, cell, width, budget)
        if col.kind == "name" and _widest_line(cell.plain) > width:
            out = Text(style=cell.style)
            for n, line in enumerate(_lines(cell.plain)):
                out.append(("\n" if n else "") + shorten_left(line, width))
            return out
        return cell

    def render_table(self, console: Console, width: int) -> Table:
        """The rich ``Table`` this table is at ``width``."""
        layout = self.layout(width)
        table = Table(
            title=self.title,
            title_justify="left",
            show_lines=self.show_lines,
            caption=self.caption(layout),
            caption_justify="left",
        )
        for i, w in zip(layout.shown, layout.widths, strict=True):
            col = self.columns[i]
            table.add_column(
                col.header, justify=col.justify, style=col.style or None, width=w,
                overflow="fold",
            )  # fmt: skip
        for row in self.rows:
            budget = 2  # lines a Names cell may take: at least 2, else the row's height
            for i, w in zip(layout.shown, layout.widths, strict=True):
                cell = row[i]
                if isinstance(cell, Text):
                    budget = max(budget, len(cell.wrap(console, w, overflow="fold")))
            table.add_row(
                *[
                    self._cell(console, row[i], self.columns[i], w, budget)
                    for i, w in zip(layout.shown, layout.widths, strict=True)
                ]
            )
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.render_table(console, options.max_width)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        shown = range(len(self.columns))
        over = self.overhead(len(self.columns))
        least = [self.minimum(i) for i in shown if not self.columns[i].drop]
        natural = sum(self.natural(i) for i in shown) + over
        return Measurement(sum(least) + self.overhead(len(least)), natural).with_maximum(
            options.max_width
        )


def names_cell(console: Console, cell: Names, width: int, budget: int) -> Text:
    """``cell`` in at most ``budget`` lines of ``width`` cells, naming as many layers as fit
    (at least one)."""
    for shown in range(len(cell.names), 0, -1):
        text = Text(cell.label(shown, width - (1 if len(cell.names) > 1 else 0)))
        if shown == 1 or len(text.wrap(console, width, overflow="fold")) <= budget:
            return text
    return Text(cell.label(1, width))  # pragma: no cover - the loop always returns
