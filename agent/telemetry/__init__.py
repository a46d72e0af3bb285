"""Agent telemetry: serving metrics, host readings, thermal policy, offline buffer,
Prometheus exposition. Heartbeats and the MQTT link live in the app's modules."""
