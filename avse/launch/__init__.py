"""How a run gets its processes and machines, and how it stops: stop signals."""
