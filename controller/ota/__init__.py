"""Over-the-air updates, controller side: keys, delta planning, signed offers, MQTT publishing."""
