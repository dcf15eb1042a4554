"""bgproxy: a blue-green traffic-switching reverse proxy."""

__version__ = "0.1.0"
