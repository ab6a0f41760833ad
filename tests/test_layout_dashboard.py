"""Text that people must read stays readable: titles below the mode bar, long titles, subtitles and
messages wrapped to the panel, message figures on a blank ground, error lines that wrap."""

from __future__ import annotations

import importlib.resources
import re

import plotly.graph_objects as go

from dashboard.core import figures
from dashboard.core import page as ui


def _visible(line: str) -> str:
    return re.sub(r"<[^>]*>", "", line)


def test_messages_are_wrapped_and_drawn_on_a_blank_ground() -> None:
    run_id = "20261206-170108-ioi-tiny-gpt2-9b82" * 3  # a word longer than a line
    message = (
        f"cannot show run {run_id}: run {run_id} lacks the vhd tables captions, scenes, summary, tokens; "
        "pick another run, or re-run headlab run vhr to make one that has them"
    )
    fig = figures.message_figure(message)
    text = fig.layout.annotations[0].text
    lines = text.split("<br>")
    assert len(lines) > 3 and all(len(line) <= figures.MESSAGE_WIDTH for line in lines)
    assert "".join(lines).replace(" ", "") == message.replace(" ", "")
    assert fig.layout.plot_bgcolor == "rgba(0,0,0,0)" and fig.layout.paper_bgcolor == "rgba(0,0,0,0)"
    assert figures.message_figure("no run selected").layout.annotations[0].text == "no run selected"
    assert figures.wrap_message("a < b & c") == "a &lt; b &amp; c"


def test_titles_wrap_at_spaces_without_splitting_markup() -> None:
    warning = (
        '<span style="color:#b3261e"><b>⚠ recall or length collapses under alpha=3 (recall 0.40)</b></span>'
    )
    text = "95% percentile bootstrap intervals; dotted: the baseline; red dashes: recall −25%<br>" + warning
    wrapped = figures.wrap_markup(text, 40)
    lines = wrapped.split("<br>")
    assert all(len(_visible(line)) <= 40 for line in lines)
    assert _visible(wrapped.replace("<br>", " ")) == _visible(text.replace("<br>", " "))
    assert '<span style="color:#b3261e">' in wrapped  # the tag's own space is not a break
    title = figures.titled("Layer 7, head 9 on astronaut: attention from patch (7, 7)", "a short note")
    assert "<br>" in str(title["text"]) and title["subtitle"] == {"text": "a short note"}


def test_titles_are_set_below_the_mode_bar() -> None:
    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1]))
    fig.update_layout(title=figures.titled("A title", "line one<br>line two"), height=400, margin={"t": 50})
    figures.clear_modebar(fig)
    title = fig.layout.title
    assert (title.yref, title.y, title.yanchor, title.pad.t) == ("container", 1, "top", figures.MODEBAR_PX)
    top = figures.MODEBAR_PX + 22 + 6 + 2 * 16 + 12
    assert fig.layout.margin.t == top and fig.layout.height == 400 + top - 50  # the plot keeps its height
    roomy = go.Figure(layout={"title": {"text": "t"}, "margin": {"t": 200}, "height": 500})
    figures.clear_modebar(roomy)
    assert roomy.layout.margin.t == 200 and roomy.layout.height == 500
    untitled = figures.clear_modebar(go.Figure(layout={"margin": {"t": 10}}))
    assert untitled.layout.margin.t == 10 and untitled.layout.title.pad.t is None
    # subplot titles above the top row get room too
    from plotly.subplots import make_subplots

    panels = make_subplots(rows=1, cols=2, subplot_titles=["cluster 0<br>13% of maps", "cluster 1<br>27%"])
    panels.update_layout(title={"text": "Clusters"}, margin={"t": 10})
    assert figures.clear_modebar(panels).layout.margin.t == figures.MODEBAR_PX + 22 + 12 + 22 + 16
    # the figures of the report pass through it, and the mode bar has fewer buttons
    div = figures.figure_div(go.Figure(layout={"title": {"text": "t"}, "height": 300}), "d")
    assert '"yref":"container"' in div.replace(" ", "")
    assert "lasso2d" in ui.GRAPH_CONFIG["modeBarButtonsToRemove"]
    assert figures.PLOTLY_CONFIG["modeBarButtonsToRemove"] == figures.MODEBAR_REMOVE


def test_error_and_hint_lines_wrap_anywhere() -> None:
    css = importlib.resources.files("dashboard").joinpath("headlab.css").read_text(encoding="utf-8")
    rule = next(line for line in css.splitlines() if "overflow-wrap" in line)
    assert "anywhere" in rule and all(c in rule for c in (".error", ".hint", ".warning"))
    assert re.search(r"^\.warning \{", css, re.MULTILINE)
