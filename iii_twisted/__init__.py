"""iii-twisted: the iii engine (a router for functions) on Twisted and Autobahn."""

__version__ = "0.1.0"
