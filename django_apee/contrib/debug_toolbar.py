"""A django-debug-toolbar panel: this request's stampede-safe calls.

django-debug-toolbar's cache panel lists plain ``get``/``set`` calls, but
shows nothing of what django-apee decided. This panel lists, per request,
each stampede-safe call (``get_or_set_stampede_safe``, ``@stampede_safe``,
``cache.get_or_set``, ``{% apee_cache %}``): its key, the state the entry was
in (fresh, early, stale, or a miss), whether this request hit, missed and
waited, or computed, and every wait with its time (for another process's
lease, or for this process's own computation of the key). Herd decisions of
plain ``get`` calls are listed below the calls, each with its key, the
entry's state (early, stale, expired, absent), what the reader got (a herd
miss: it won the lease and writes; served, the refresh claimed by another
reader; waited for another reader's write; ...) and how long it waited.

It reads ``observe/trace.py``, which the engine's event sink feeds; nothing
is patched. Enable it::

    DEBUG_TOOLBAR_PANELS = [
        *debug_toolbar.settings.PANELS_DEFAULTS,
        "django_apee.contrib.debug_toolbar.ApeePanel",
    ]

With the panel in ``DEBUG_TOOLBAR_PANELS``, django_apee's app config turns
tracing on at start-up (``observe.trace.enable``), before any alias is used.
Calls of async views are recorded too (the context travels with them); the
background refreshes a request starts are not (they run after it).
"""

from __future__ import annotations

from typing import Any

from debug_toolbar.panels import Panel
from django.utils.html import format_html, format_html_join

from django_apee.observe import trace

PANEL_PATH = "django_apee.contrib.debug_toolbar.ApeePanel"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


class ApeePanel(Panel):  # type: ignore[misc]
    """Each stampede-safe call of the request, and the herd decisions."""

    title = "django-apee"
    is_async = True

    @property
    def nav_subtitle(self) -> str:
        stats = self.get_stats()
        calls = stats.get("calls", [])
        computed = sum(1 for c in calls if c["outcome"] == "compute")
        waits = sum(len(c["waits"]) for c in calls)
        herd = len(stats.get("herd", []))
        return (
            f"{len(calls)} calls, {computed} computed, {waits} waits, "
            f"{herd} herd decisions"
        )

    def enable_instrumentation(self) -> None:
        trace.enable()  # runtimes built from now on record (see the docstring)
        self._recording = trace.start()

    def disable_instrumentation(self) -> None:
        trace.stop()

    def generate_stats(self, request: Any, response: Any) -> None:
        recording = getattr(self, "_recording", None) or trace.Recording()
        self.record_stats(
            {
                "calls": [
                    {
                        "alias": c.alias,
                        "key": c.key,
                        "state": c.state,
                        "outcome": c.outcome,
                        "waits": [_ms(w) for w in c.waits]
                        + [f"{_ms(w)} in process" for w in c.process_waits],
                        "seconds": c.seconds,
                        "steps": [s for s, _ in c.steps],
                    }
                    for c in recording.calls
                ],
                "herd": [
                    {
                        "alias": d.alias,
                        "key": d.key,
                        "state": d.state,
                        "decision": d.decision,
                        "waited": _ms(d.waited) if d.waited else "",
                    }
                    for d in recording.decisions
                ],
                # Unkeyed: a herd winner's write that found a newer value,
                # fallbacks (a cold wait's timeout is a decision row already).
                "other": [
                    {"alias": alias, "step": step}
                    for alias, step, _ in recording.loose
                    if step == "lease_lost"
                    or (
                        step.startswith("fallback:")
                        and step != "fallback:cold_wait_timeout"
                    )
                ],
            }
        )

    @property
    def content(self) -> str:
        stats = self.get_stats()
        calls = stats.get("calls", [])
        herd = stats.get("herd", [])
        other = stats.get("other", [])
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td>"
            "<td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    c["alias"],
                    c["key"],
                    c["state"],
                    c["outcome"],
                    ", ".join(c["waits"]) or "none",
                    _ms(c["seconds"]),
                    " ".join(c["steps"]),
                )
                for c in calls
            ),
        )
        herd_rows = format_html_join(
            "",
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td>"
            "<td>{}</td></tr>",
            (
                (h["alias"], h["key"], h["state"], h["decision"], h["waited"])
                for h in herd
            ),
        )
        other_rows = format_html_join(
            "",
            "<tr><td>{}</td><td></td><td></td><td>{}</td><td></td></tr>",
            ((o["alias"], o["step"]) for o in other),
        )
        return str(
            format_html(
                "<h4>Stampede-safe calls ({})</h4>"
                "<table><thead><tr><th>Cache</th><th>Key</th><th>State</th>"
                "<th>Result</th><th>Waits</th><th>Time</th><th>Events</th>"
                "</tr></thead><tbody>{}</tbody></table>"
                "<h4>Herd decisions of plain gets ({})</h4>"
                "<table><thead><tr><th>Cache</th><th>Key</th><th>State</th>"
                "<th>Decision</th><th>Waited</th></tr></thead>"
                "<tbody>{}{}</tbody></table>",
                len(calls),
                rows,
                len(herd),
                herd_rows,
                other_rows,
            )
        )
