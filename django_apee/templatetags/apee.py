"""``{% apee_cache %}``: Django's ``{% cache %}`` tag, rendered once fleet-wide.

Usage (``{% load apee %}``)::

    {% apee_cache expire_time fragment_name [vary_on ...] [using="alias"] [soft=N] %}
        ... expensive template code ...
    {% endapee_cache %}

The arguments mean what they mean to ``{% cache %}``: ``expire_time`` is
resolved at render time and must be int-like or ``None`` (never expires);
``fragment_name`` is the raw token; ``vary_on`` values and ``using`` are
filter expressions. ``soft=N`` (seconds, also resolved at render time) is the
soft timeout: past it the old fragment is still served while one renderer,
fleet-wide, renders a new one. Left out, the cache's ``SOFT_TIMEOUT_RATIO``
applies. ``using=`` and ``soft=`` come last, in either order.

The key is ``make_template_fragment_key(fragment_name, vary_on)``, the key
``{% cache %}`` uses, so switching tags keeps existing entries and
``cache.delete(make_template_fragment_key(...))`` still invalidates.

On an ApeeCache the fragment goes through ``get_or_set_stampede_safe``; on
any other backend the tag does what ``{% cache %}`` does (get, render, set).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from copy import copy
from dataclasses import dataclass
from datetime import tzinfo
from typing import Any

from django.core.cache import InvalidCacheBackendError, caches
from django.core.cache.utils import make_template_fragment_key
from django.template import Library, Node, TemplateSyntaxError, VariableDoesNotExist
from django.template.loader_tags import BlockContext
from django.urls import get_script_prefix, get_urlconf, set_script_prefix, set_urlconf
from django.utils import timezone, translation

register = Library()

TAG = "apee_cache"
OPTIONS = ("using", "soft")


class ApeeCacheNode(Node):  # type: ignore[misc]
    """One ``{% apee_cache %}`` block of a compiled template."""

    def __init__(
        self,
        nodelist: Any,
        expire_time: Any,
        fragment_name: str,
        vary_on: list[Any],
        options: dict[str, Any],
    ) -> None:
        self.nodelist = nodelist
        self.expire_time = expire_time
        self.fragment_name = fragment_name
        self.vary_on = vary_on
        self.using = options.get("using")
        self.soft = options.get("soft")

    def render(self, context: Any) -> Any:
        expire_time = self._expire_time(context)
        soft = self._soft_timeout(context, expire_time)
        fragment_cache = self._cache(context)
        vary_on = [var.resolve(context) for var in self.vary_on]
        key = make_template_fragment_key(self.fragment_name, vary_on)
        stampede_safe = getattr(fragment_cache, "get_or_set_stampede_safe", None)
        if stampede_safe is None:  # not an ApeeCache: {% cache %}'s way
            value = fragment_cache.get(key)
            if value is None:
                value = self.nodelist.render(context)
                fragment_cache.set(key, value, expire_time)
            return value
        render = FragmentRender(self.nodelist, context)
        return stampede_safe(key, render, expire_time, soft_timeout=soft)

    def _resolve(self, expression: Any, context: Any) -> Any:
        try:
            return expression.resolve(context)
        except VariableDoesNotExist:
            raise TemplateSyntaxError(
                f'"{TAG}" tag got an unknown variable: {expression.var!r}'
            ) from None

    def _expire_time(self, context: Any) -> int | None:
        """The hard timeout, checked as ``{% cache %}`` checks it."""
        value = self._resolve(self.expire_time, context)
        if value is None:
            return None
        try:
            return int(value)
        except (ValueError, TypeError):
            raise TemplateSyntaxError(
                f'"{TAG}" tag got a non-integer timeout value: {value!r}'
            ) from None

    def _soft_timeout(self, context: Any, expire_time: int | None) -> float | None:
        """The soft timeout in seconds; None: the cache's rule decides.

        Checked on every backend, so a template that works on a LocMemCache
        in development does not fail on the ApeeCache in production. It is
        dropped where nothing is stored with a timeout: a fragment that never
        expires (``None``) or is not stored at all (``0`` or less).
        """
        if self.soft is None:
            return None
        value = self._resolve(self.soft, context)
        if value is None:
            return None
        try:
            soft = float(value)
        except (ValueError, TypeError):
            soft = math.nan
        if not math.isfinite(soft) or soft <= 0:
            raise TemplateSyntaxError(
                f'"{TAG}" tag got soft={value!r}; it must be a number of '
                "seconds greater than 0."
            )
        if expire_time is None or expire_time <= 0:
            return None
        if soft > expire_time:
            raise TemplateSyntaxError(
                f'"{TAG}" tag got soft={value!r}, longer than its expire time '
                f"{expire_time!r}: a fragment is never served past its expire "
                "time, so its soft timeout must not exceed it."
            )
        return soft

    def _cache(self, context: Any) -> Any:
        """The backend: ``using``, else ``template_fragments``, else ``default``."""
        if self.using is None:
            try:
                return caches["template_fragments"]
            except InvalidCacheBackendError:
                return caches["default"]
        alias = self._resolve(self.using, context)
        try:
            return caches[alias]
        except InvalidCacheBackendError:
            raise TemplateSyntaxError(
                f"Invalid cache name specified for {TAG} tag: {alias!r}"
            ) from None


class FragmentRender:
    """Render a fragment later, possibly in another thread, as it renders now.

    On an ApeeCache the render may run in a background refresh thread while
    the request thread goes on rendering the rest of the template with the
    same Context. ``copy(context)`` alone is not enough for that:

    * it copies the *list* of context dicts, not the dicts. The request
      thread writes into them after the tag returns: ``{% for %}`` sets its
      loop variable in its own top dict on each iteration, so a fragment
      inside a loop, refreshed in the background, would render a *later*
      item under the key of this one. Each dict is copied here (and the
      mutable ``forloop`` dicts too, since ``forloop.counter`` and
      ``{% ifchanged %}`` live in them);
    * the same holds for the render context, where ``{% block %}`` keeps a
      BlockContext that it pops and pushes while rendering: copied too;
    * the active language, time zone, URLconf and script prefix belong to
      the request thread; a pool thread has the defaults, so ``{% trans %}``,
      dates and ``{% url %}`` would come out in the wrong language, zone or
      prefix and be stored under this fragment's key. They are captured
      here and applied around the render.

    What stays shared are the values themselves (the request, the user,
    querysets), which a fragment only reads. A background render runs its
    queries on its own thread's database connection (closed afterwards),
    outside the request's transaction, possibly after the response has
    gone out.
    """

    def __init__(self, nodelist: Any, context: Any) -> None:
        self.nodelist = nodelist
        self.context = snapshot(context)
        self.state = ThreadState.capture()

    def __call__(self) -> Any:
        with self.state.applied():
            return self.nodelist.render(self.context)


def snapshot(context: Any) -> Any:
    """A copy of ``context`` that later writes to ``context`` cannot reach."""
    duplicate = copy(context)  # also copies render_context, template, request
    duplicate.dicts = [_own_layer(layer) for layer in context.dicts]
    duplicate.render_context.dicts = [
        {key: _own_render_state(value) for key, value in layer.items()}
        for layer in context.render_context.dicts
    ]
    return duplicate


def _own_layer(layer: dict[Any, Any]) -> dict[Any, Any]:
    owned = dict(layer)
    loop = owned.get("forloop")
    if isinstance(loop, dict):
        owned["forloop"] = _own_loop(loop)
    return owned


def _own_loop(loop: dict[Any, Any]) -> dict[Any, Any]:
    owned = dict(loop)
    parent = owned.get("parentloop")
    if isinstance(parent, dict) and parent:
        owned["parentloop"] = _own_loop(parent)
    return owned


def _own_render_state(value: Any) -> Any:
    if isinstance(value, BlockContext):
        owned = BlockContext()
        for name, blocks in value.blocks.items():
            owned.blocks[name] = list(blocks)
        return owned
    return value


@dataclass(frozen=True)
class ThreadState:
    """What Django keeps per thread that changes how a template renders."""

    language: str | None
    zone: tzinfo
    urlconf: Any
    script_prefix: str

    @classmethod
    def capture(cls) -> ThreadState:
        return cls(
            language=translation.get_language(),
            zone=timezone.get_current_timezone(),
            urlconf=get_urlconf(),
            script_prefix=get_script_prefix(),
        )

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Render as the captured thread would; put this thread back after."""
        urlconf, script_prefix = get_urlconf(), get_script_prefix()
        set_urlconf(self.urlconf)
        set_script_prefix(self.script_prefix)
        try:
            with translation.override(self.language), timezone.override(self.zone):
                yield
        finally:
            set_urlconf(urlconf)
            set_script_prefix(script_prefix)


def do_apee_cache(parser: Any, token: Any) -> ApeeCacheNode:
    """Compile ``{% apee_cache %}``; the arguments are checked as ``{% cache %}``'s.

    As there, options are only looked for after the first two arguments:
    ``{% apee_cache 60 using="x" %}`` is a fragment named ``using="x"``.
    """
    nodelist = parser.parse((f"end{TAG}",))
    parser.delete_first_token()
    tokens = token.split_contents()
    if len(tokens) < 3:
        raise TemplateSyntaxError(f"{tokens[0]!r} tag requires at least 2 arguments.")
    options: dict[str, Any] = {}
    while len(tokens) > 3:
        name, equals, value = tokens[-1].partition("=")
        if not equals or name not in OPTIONS:
            break
        if name in options:
            raise TemplateSyntaxError(
                f"{tokens[0]!r} tag received {name}= more than once."
            )
        options[name] = parser.compile_filter(value)
        tokens.pop()
    return ApeeCacheNode(
        nodelist,
        parser.compile_filter(tokens[1]),
        tokens[2],  # the fragment name is never a variable, as in {% cache %}
        [parser.compile_filter(bit) for bit in tokens[3:]],
        options,
    )


register.tag(TAG, do_apee_cache)
