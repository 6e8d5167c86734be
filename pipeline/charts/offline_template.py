"""A page template for ``dvc plots show`` and ``dvc plots diff`` whose pages render offline.

DVC fills a page template: the plots go where it says ``{plot_divs}``, and the
``<script>`` tags that load Vega, Vega-Lite and vega-embed from a CDN where it says
``{scripts}``. This template has no ``{scripts}``: it carries the three libraries inline
(vl-convert's bundle of them), so the page needs no network.

    python -m pipeline.charts.offline_template                   # writes .dvc/plots/offline.html
    dvc config --local plots.html_template plots/offline.html    # relative to .dvc/
"""

from __future__ import annotations

import argparse

import vl_convert

from pipeline.charts.render import VEGA_LITE
from pipeline.files import write_text
from pipeline.stage import run_stage

DEFAULT_OUT = ".dvc/plots/offline.html"


def offline_template() -> str:
    # DVC's plot specs are Vega-Lite 5, so the bundle carries the Vega-Lite the charts pin.
    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n{refresh_tag}\n<meta charset=\"utf-8\">\n"
        f"<title>DVC plots</title>\n<script>\n{bundle}\n</script>\n"
        "<style>table { border-spacing: 15px; }</style>\n"
        "</head>\n<body>\n{plot_divs}\n</body>\n</html>\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"where to write it (default: {DEFAULT_OUT})")
    out = parser.parse_args().out
    write_text(out, offline_template())
    print(f"{out}: use it with `dvc plots show --html-template {out}`, or for every run: "
          "`dvc config --local plots.html_template <its path relative to .dvc/>`")


if __name__ == "__main__":
    run_stage(main)
