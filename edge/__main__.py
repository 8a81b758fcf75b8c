"""``python -m edge``: run one edge."""

from edge.server import main

main()
