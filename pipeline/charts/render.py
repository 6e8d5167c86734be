"""Vega-Lite spec -> SVG or PNG with vl-convert: no browser, no network, same bytes every time.

vl-convert runs Vega in an embedded JavaScript engine and rasterises with resvg. Text is
measured and drawn with Liberation Sans, which vl-convert carries inside its own binary, so
the layout does not depend on the fonts a machine has; a viewer without it falls back to
Arial, whose metrics Liberation Sans shares.
"""

from __future__ import annotations

from typing import Any

import vl_convert

# Vega-Lite as bundled in vl-convert, pinned so that the same spec always lays out the same.
VEGA_LITE = "5.21"
FONT = "Liberation Sans, Arial, Helvetica, sans-serif"
CONFIG = {"font": FONT, "background": "white"}
# Data is inline: an empty allow-list keeps every fetch from a URL out of the rendering.
OFFLINE: dict[str, Any] = {"vl_version": VEGA_LITE, "config": CONFIG, "allowed_base_urls": []}


def to_svg(spec: dict[str, Any]) -> str:
    return vl_convert.vegalite_to_svg(spec, **OFFLINE)


def to_png(spec: dict[str, Any], scale: float) -> bytes:
    """PNG at ``scale`` times the SVG's pixel size."""
    return vl_convert.vegalite_to_png(spec, scale=scale, **OFFLINE)
