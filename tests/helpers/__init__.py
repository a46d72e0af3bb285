"""Shared test helpers: real Mosquitto broker, free ports, process management."""
