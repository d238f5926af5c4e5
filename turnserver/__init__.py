"""turnserver: a TURN/STUN relay server."""

__version__ = "0.1.0"
