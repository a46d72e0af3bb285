"""Benchmarks of edgefleet (``python -m bench.NAME``) and the fleet simulator they share
(:mod:`bench.fleet_sim`, on the minimal MQTT 5 client :mod:`bench.mqtt5_lite`)."""
