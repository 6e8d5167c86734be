"""Charts as pictures: the training curves and the precision comparison, rendered to SVG and
PNG from Vega-Lite specs without a browser or network, with a Markdown page that shows them."""
